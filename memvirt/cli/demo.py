"""``memvirt demo``: the main job on the built-in default guest, start to finish.

Boots the default guest, starts a memory workload in it, shows its memory map, inspects it from
the host (no agent, no debug symbols) beside the guest's own figures, gives its free pages back
to the host, keeps only its working set resident with the cold rest compressed, runs memvirtd
over it for two reclaim passes (``memvirt status`` shown, then a SIGTERM stop), clones it lazily
(copy-on-write), live-migrates it (memvirt beside QEMU's own precopy), and stops it. Then two
machines on a VM LAN show physical-machine migration: one moves onto the other through its
kernel's hibernation image (``--no-pm`` skips it).

Each step's result is printed as soon as it is done, so a later failure never hides what ran; a
step the host can't support is shown as skipped with the reason; the exit code is 1 if any step
failed. The guests the demo starts are stopped on every way out: errors, Ctrl-C, SIGTERM, and (by
a reaper process) SIGKILL.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from memvirt.cli.compress import demo_compress, print_demo_compress
from memvirt.cli.daemon import demo_daemon, print_demo_daemon
from memvirt.cli.dedup import demo_reclaim, print_demo_reclaim
from memvirt.cli.migrate import demo_migration, print_demo_migration
from memvirt.cli.output import JsonOpt, emit_json, err, human, out, spinner, table
from memvirt.cli.pm import demo_pm, print_demo_pm
from memvirt.errors import MemvirtError, UsageError
from memvirt.image.build import find_image
from memvirt.introspect import CLASSES, Introspector
from memvirt.introspect.groundtruth import FrozenFigures
from memvirt.procs import end_watchdog
from memvirt.qemu import reaper
from memvirt.qemu.vm import VM, start_vm, vm_memory
from memvirt.units import parse_size

WORKLOAD = "memtouch --hot 32M --cold 96M --content mix --dirty-rate 1M"
DAEMON_CHURN = "memtouch --hot 64M --content random --seed 3 --duration 1 >/dev/null"


class Skip(Exception):
    """A step the host can't support; its message says why."""


@dataclass
class Steps:
    """Runs the demo's steps, keeping each one's outcome; with ``show``, prints each as it ends."""

    show: bool
    done: list[dict[str, Any]] = field(default_factory=list)

    def run(
        self,
        key: str,
        text: str,
        fn: Callable[[], Any],
        printer: Callable[[Any], None] | None = None,
        needs: str | None = None,
        bad_input_ends: bool = False,
    ) -> Any:
        """``fn()``'s result, or None when it failed or was skipped (recorded either way). ``needs``
        names an earlier step whose failure makes this one pointless; with ``bad_input_ends``, a
        UsageError (the user's input, not the host) ends the demo at once with exit code 2."""
        t0 = time.monotonic()
        rec: dict[str, Any] = {"step": key}
        if needs is not None and not self.ok(needs):
            rec.update(status="skipped", reason=f"needs the {needs} step, which did not complete")
        else:
            try:
                with spinner(text):
                    result = fn()
                rec.update(status="ok", result=result)
            except Skip as e:
                rec.update(status="skipped", reason=str(e))
            except UsageError:
                if bad_input_ends:
                    raise
                rec.update(status="failed", reason=str(sys.exc_info()[1]))
            except MemvirtError as e:
                rec.update(status="failed", reason=str(e))
            except KeyboardInterrupt:
                rec.update(status="failed", reason="interrupted", seconds=round(time.monotonic() - t0, 2))
                self.done.append(rec)
                raise
            except Exception as e:
                if os.environ.get("MEMVIRT_DEBUG"):
                    traceback.print_exc()
                rec.update(status="failed", reason=f"internal error: {type(e).__name__}: {e}")
        rec["seconds"] = round(time.monotonic() - t0, 2)
        self.done.append(rec)
        if self.show:
            if rec["status"] == "ok" and printer is not None:
                printer(rec["result"])
            elif rec["status"] != "ok":
                out.print(f"[bold]{key}[/]: {rec['status'].upper()}: {rec['reason']}", highlight=False)
        return rec.get("result")

    def ok(self, key: str) -> bool:
        return any(r["step"] == key and r["status"] == "ok" for r in self.done)

    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.done if r["status"] == "failed"]


def demo(
    memory: Annotated[str, typer.Option(help="Guest RAM.")] = "512M",
    image: Annotated[str | None, typer.Option(help="Image or kernel series (default: Debian 6.1).")] = None,
    arch: Annotated[str, typer.Option(help="Guest architecture of a kernel series: amd64 or arm64 (TCG).")] = "amd64",
    name: Annotated[str, typer.Option(help="Name of the demo VM.")] = "memvirt-demo",
    map_: Annotated[Path, typer.Option("--map", help="Where to draw the guest's memory map.")] = Path(
        "memvirt-demo-map.png"
    ),
    pm: Annotated[
        bool, typer.Option("--pm/--no-pm", help="Also show physical-machine migration (two more boots).")
    ] = True,
    json_: JsonOpt = False,
) -> None:
    """Boot the default guest; inspect, reclaim, compress, manage (memvirtd), clone and live-migrate it; stop it.

    Every step that ran is reported even when a later one fails; exit code 1 if any failed.
    QEMU's own migration, shown beside memvirt's, listens unauthenticated on a loopback port while it runs.
    """
    mem_bytes = parse_size(memory)
    steps = Steps(show=not json_)
    report: dict[str, Any] = {"steps": steps.done}
    img = steps.run(
        "image",
        "building the default image (the first run downloads a Debian kernel)",
        lambda: find_image(image, arch),
        lambda i: out.print(f"[bold]Image[/]: {i.path}"),
        bad_input_ends=True,
    )
    # Guests named NAME or NAME-* die with this command, however it ends (a SIGKILL included).
    before = reaper.existing()
    guard = reaper.spawn(name)
    try:
        # pm boots its machines from an image spec: an arm64 series must name the image built here.
        pm_spec = str(img.path) if arch != "amd64" and img is not None else image
        _run(steps, report, img, name, mem_bytes, map_, pm, pm_spec)
    finally:
        try:
            if json_:
                emit_json(report)
            reaper.reap(name, keep=before)  # whatever a step's own clean-up missed
        finally:
            end_watchdog(guard)
    failed = steps.failed()
    summary = (
        f"demo: {sum(r['status'] == 'ok' for r in steps.done)} steps ok, {len(failed)} failed, "
        f"{sum(r['status'] == 'skipped' for r in steps.done)} skipped"
    )
    err.print(summary, markup=False)
    if failed:
        raise MemvirtError(f"demo step {failed[0]['step']!r} failed: {failed[0]['reason']}")


def _run(
    steps: Steps, report: dict[str, Any], img: Any, name: str, memory: int, map_: Path, pm: bool, image: str | None
) -> None:
    vm: VM | None = None

    def boot() -> dict[str, Any]:
        nonlocal vm
        t0 = time.monotonic()
        vm = start_vm(name, img, memory=memory)
        return {
            "name": name,
            "boot_seconds": round(time.monotonic() - t0, 1),
            "kernel": vm.exec("uname -r").check("uname").text.strip(),
            "workload": WORKLOAD,
        }

    try:
        steps.run("boot", f"booting {name}", boot, _print_boot, needs="image")
        steps.run("workload", f"starting a workload: {WORKLOAD}", lambda: _start_workload(_need(vm)), needs="boot")
        steps.run(
            "inspection",
            "inspecting the paused guest from the host",
            lambda: _inspect(_need(vm), map_),
            _print_inspection,
            needs="boot",
        )
        steps.run(
            "reclaim",
            "reclaiming the guest's free pages (no guest driver)",
            lambda: demo_reclaim(_need(vm)),
            print_demo_reclaim,
            needs="boot",
        )
        steps.run(
            "compression",
            "compressing the guest's cold memory, keeping its working set resident",
            lambda: _compress(_need(vm)),
            print_demo_compress,
            needs="boot",
        )
        steps.run(
            "daemon",
            "running memvirtd over the guest for two reclaim passes",
            lambda: _daemon(name),
            print_demo_daemon,
            needs="boot",
        )
        steps.run(
            "clone",
            f"cloning {name} lazily (its RAM shared copy-on-write)",
            lambda: _clone(name),
            lambda c: _print_clone(c, name),
            needs="boot",
        )
        steps.run(
            "migration",
            "live-migrating the guest: memvirt, then QEMU's precopy",
            lambda: demo_migration(name),
            print_demo_migration,
            needs="boot",
        )
    finally:
        if vm is not None:
            try:
                VM.load(name).stop()
            except MemvirtError:
                pass
    if pm:
        steps.run(
            "pm",
            "physical-machine migration: two machines on a LAN, one moves onto the other",
            lambda: demo_pm(name, image),
            print_demo_pm,
            needs="image",
        )
    for r in steps.done:
        if r["status"] == "ok" and r["step"] != "image":
            report[r["step"]] = r["result"]


def _need(vm: VM | None) -> VM:
    if vm is None:
        raise MemvirtError("the demo guest is not running")
    return vm


def _compress(vm: VM) -> dict[str, Any]:
    """The compression step, or the host facility it lacks (as a skip, not a failure)."""
    from memvirt.compress import tiers

    if vm.memcg() is None:
        raise Skip("the host offers no writable memory cgroup controller, so a VM's memory can't be limited")
    if not tiers.SYS_BLOCK.joinpath("zram0").exists() and not tiers.ZRAM_CONTROL.exists():
        raise Skip("this host kernel has no zram (CONFIG_ZRAM, 'modprobe zram')")
    return demo_compress(vm)


def _daemon(name: str) -> dict[str, Any]:
    """The daemon step, or why it cannot run here (one memvirtd per state folder)."""
    from memvirt.daemon import control

    try:
        other = control.query(control.default_socket(), timeout=2)
    except MemvirtError:
        other = None
    if other is not None:
        raise Skip(f"memvirtd (pid {other.get('pid')}) already manages this state folder's VMs")
    # Free memory made dirty again (as a long-running guest's is), so the daemon has some to give back.
    VM.load(name).exec(DAEMON_CHURN, timeout=300).check("allocating and freeing memory in the guest")
    return demo_daemon(name)


def _print_boot(b: dict[str, Any]) -> None:
    out.print(
        f"[bold]Guest[/] {b['name']}: Linux {b['kernel']}, booted in {b['boot_seconds']} s, running '{b['workload']}'"
    )


def _start_workload(vm: VM) -> dict[str, Any]:
    vm.exec_background(WORKLOAD, "/tmp/memtouch.log")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        log = vm.exec("cat /tmp/memtouch.log").text
        if "memtouch ready" in log:
            return {"workload": WORKLOAD}
        time.sleep(0.2)
    raise MemvirtError(f"memtouch did not get ready within 60 s (its log: {log.strip()[-200:]!r})")


def _clone(name: str) -> dict[str, object]:
    """Freeze the guest as a template and start a lazy clone that runs on from the guest's state;
    then stop the clone and let the guest run again."""
    from memvirt.clone import clone
    from memvirt.clone.memory import mapping_usage

    c = clone(name, count=1, prefix=f"{name}-clone").clones[0]
    cl = VM.load(c.name)
    try:
        usage = mapping_usage(cl.config.pid, cl.config.backing, cl.config.memory)
        return {
            "name": c.name,
            "running_ms": round(c.seconds * 1000),
            "qemu_start_ms": round(c.qemu_seconds * 1000),
            "guest_answers_ms": round((c.guest_seconds or 0) * 1000),
            "hostname": cl.exec("hostname").text.strip(),
            "workload_runs_on": cl.exec("pidof memtouch").rc == 0,
            "private_bytes": usage["private"],
            "template_ram_bytes": os.stat(cl.config.backing).st_blocks * 512,
            "memory": cl.config.memory,
        }
    finally:
        cl.stop()
        VM.load(name).resume()


def _inspect(vm: VM, map_path: Path) -> dict[str, object]:
    """Census of the paused guest, and the guest's own /proc figures at the same instant."""
    from memvirt.introspect.plot import draw_map

    with vm_memory(vm) as mem:
        intro = Introspector(mem)
        with FrozenFigures(vm) as snap:
            census = intro.scan(content=True)
    figs = snap.figures
    assert figs is not None  # FrozenFigures fills it on a clean exit, else raises
    guest = {
        "free": figs.pages("MemFree"),
        "free_pcp": figs.pcp_total,
        "page_cache": figs.pages("Cached") + figs.pages("Buffers"),
        "anon": figs.pages("AnonPages"),
        "slab": figs.pages("Slab"),
        "page_table": figs.pages("PageTables"),
    }
    draw_map(census, map_path, title=f"{vm.name}: Linux {census.release}, seen from the host")
    return {
        "kernel": census.release,
        "regions": [{"gpa": r.gpa, "size": r.size} for r in vm.regions],
        "pages": census.counts,
        "guest_says": guest,
        "map": str(map_path),
        "bootstrap_ms": round(census.timings["bootstrap"] * 1000, 1),
        "scan_ms": round(census.timings["scan"] * 1000, 1),
        "layout_facts": intro.layout_sources(),
    }


def _print_inspection(ins: dict[str, Any]) -> None:
    table(
        "Guest physical memory map",
        ["START", "END", "SIZE"],
        [[f"{r['gpa']:#014x}", f"{r['gpa'] + r['size']:#014x}", human(r["size"])] for r in ins["regions"]],
    )
    pages, says = ins["pages"], ins["guest_says"]
    rows = [[c, pages[c], human(pages[c] * 4096), says.get(c, "")] for c in CLASSES]
    rows.append(["(zero content)", pages.get("zero", 0), human(pages.get("zero", 0) * 4096), ""])
    table(
        "What the host reads in guest memory (no agent, no debug symbols)",
        ["CLASS", "PAGES", "SIZE", "GUEST'S OWN FIGURE (pages)"],
        rows,
    )
    out.print(
        f"bootstrap {ins['bootstrap_ms']} ms, scan {ins['scan_ms']} ms; "
        f"layout facts from {ins['layout_facts']}; map: {ins['map']}"
    )


def _print_clone(c: dict[str, Any], name: str) -> None:
    out.print(
        f"[bold]Clone[/] {c['name']} (hostname {c['hostname']}): running {c['running_ms']} ms after the request "
        f"(QEMU's own start {c['qemu_start_ms']} ms), guest answered at {c['guest_answers_ms']} ms; workload "
        f"{'runs on' if c['workload_runs_on'] else 'NOT running'}; private RAM {human(c['private_bytes'])} of "
        f"{human(c['memory'])}, the rest shared copy-on-write with {name}'s {human(c['template_ram_bytes'])} RAM file"
    )
