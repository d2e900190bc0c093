"""``memvirt demo``: the main job on the built-in default guest, start to finish.

Boots the default guest, starts a memory workload in it, shows its memory map, inspects it from
the host (no agent, no debug symbols) beside the guest's own figures, gives its free pages back
to the host, keeps only its working set resident with the cold rest compressed, clones it lazily
(copy-on-write), live-migrates it (memvirt beside QEMU's own precopy), and stops it. Then two
machines on a VM LAN show physical-machine migration: one moves onto the other through its
kernel's hibernation image (``--no-pm`` skips it).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer

from memvirt.cli.compress import demo_compress, print_demo_compress
from memvirt.cli.dedup import demo_reclaim, print_demo_reclaim
from memvirt.cli.migrate import demo_migration, print_demo_migration
from memvirt.cli.output import emit_json, human, out, spinner, table
from memvirt.cli.pm import demo_pm, print_demo_pm
from memvirt.image.build import find_image
from memvirt.introspect import CLASSES, Introspector
from memvirt.introspect.groundtruth import FrozenFigures
from memvirt.qemu.vm import VM, start_vm
from memvirt.units import parse_size

WORKLOAD = "memtouch --hot 32M --cold 96M --content mix --dirty-rate 1M"


def demo(
    memory: Annotated[str, typer.Option(help="Guest RAM.")] = "512M",
    image: Annotated[str | None, typer.Option(help="Image or kernel series (default: Debian 6.1).")] = None,
    name: Annotated[str, typer.Option(help="Name of the demo VM.")] = "memvirt-demo",
    map_: Annotated[Path, typer.Option("--map", help="Where to draw the guest's memory map.")] = Path("memvirt-demo-map.png"),
    pm: Annotated[bool, typer.Option("--pm/--no-pm", help="Also show physical-machine migration (two more boots).")] = True,
    json_: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Boot the default guest; inspect, reclaim, compress, clone and live-migrate it from the host; stop it.

    QEMU's own migration, shown beside memvirt's, listens unauthenticated on a loopback port while it runs."""
    report: dict[str, object] = {}
    t0 = time.monotonic()
    with spinner("building the default image (the first run downloads a Debian kernel)"):
        img = find_image(image)
    with spinner(f"booting {name}"):
        vm = start_vm(name, img, memory=parse_size(memory))
    report["boot_seconds"] = round(time.monotonic() - t0, 1)
    try:
        report["guest"] = {"kernel": vm.exec("uname -r").check("uname").text.strip()}
        with spinner(f"starting a workload: {WORKLOAD}"):
            _start_workload(vm)
        report["inspection"] = _inspect(vm, map_)
        with spinner("reclaiming the guest's free pages (no guest driver)"):
            report["reclaim"] = demo_reclaim(vm)
        with spinner("compressing the guest's cold memory, keeping its working set resident"):
            report["compression"] = demo_compress(vm)
        with spinner(f"cloning {name} lazily (its RAM shared copy-on-write)"):
            report["clone"] = _clone(name)
        with spinner("live-migrating the guest: memvirt, then QEMU's precopy"):
            report["migration"] = demo_migration(name)
    finally:
        vm.stop()
    if pm:
        with spinner("physical-machine migration: two machines on a LAN, one moves onto the other"):
            report["pm"] = demo_pm(name, image)
    if json_:
        emit_json(report)
    else:
        _print(name, report)


def _start_workload(vm: VM) -> None:
    vm.exec_background(WORKLOAD, "/tmp/memtouch.log")
    for _ in range(300):
        if "memtouch ready" in vm.exec("cat /tmp/memtouch.log").text:
            return
        time.sleep(0.2)


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
            "name": c.name, "running_ms": round(c.seconds * 1000), "qemu_start_ms": round(c.qemu_seconds * 1000),
            "guest_answers_ms": round((c.guest_seconds or 0) * 1000), "hostname": cl.exec("hostname").text.strip(),
            "workload_runs_on": cl.exec("pidof memtouch").rc == 0, "private_bytes": usage["private"],
            "template_ram_bytes": os.stat(cl.config.backing).st_blocks * 512, "memory": cl.config.memory,
        }
    finally:
        cl.stop()
        VM.load(name).resume()


def _inspect(vm: VM, map_path: Path) -> dict[str, object]:
    """Census of the paused guest, and the guest's own /proc figures at the same instant."""
    from memvirt.introspect.plot import draw_map

    with vm.memory() as mem:
        intro = Introspector(mem)
        with spinner("inspecting the paused guest from the host"), FrozenFigures(vm) as snap:
            census = intro.scan(content=True)
    figs = snap.figures
    guest = {
        "free": figs.pages("MemFree"), "free_pcp": figs.pcp_total,
        "page_cache": figs.pages("Cached") + figs.pages("Buffers"), "anon": figs.pages("AnonPages"),
        "slab": figs.pages("Slab"), "page_table": figs.pages("PageTables"),
    }
    draw_map(census, map_path, title=f"{vm.name}: Linux {census.release}, seen from the host")
    return {
        "kernel": census.release, "regions": [{"gpa": r.gpa, "size": r.size} for r in vm.regions],
        "pages": census.counts, "guest_says": guest, "map": str(map_path),
        "bootstrap_ms": round(census.timings["bootstrap"] * 1000, 1), "scan_ms": round(census.timings["scan"] * 1000, 1),
        "layout_facts": intro.layout_sources(),
    }


def _print(name: str, report: dict) -> None:
    g, ins = report["guest"], report["inspection"]
    out.print(f"[bold]Guest[/] {name}: Linux {g['kernel']}, booted in {report['boot_seconds']} s, running '{WORKLOAD}'")
    table("Guest physical memory map", ["START", "END", "SIZE"],
          [[f"{r['gpa']:#014x}", f"{r['gpa'] + r['size']:#014x}", human(r["size"])] for r in ins["regions"]])
    pages, says = ins["pages"], ins["guest_says"]
    rows = [[c, pages[c], human(pages[c] * 4096), says.get(c, "")] for c in CLASSES]
    rows.append(["(zero content)", pages.get("zero", 0), human(pages.get("zero", 0) * 4096), ""])
    table("What the host reads in guest memory (no agent, no debug symbols)",
          ["CLASS", "PAGES", "SIZE", "GUEST'S OWN FIGURE (pages)"], rows)
    out.print(f"bootstrap {ins['bootstrap_ms']} ms, scan {ins['scan_ms']} ms; "
              f"layout facts from {ins['layout_facts']}; map: {ins['map']}")
    print_demo_reclaim(report["reclaim"])
    print_demo_compress(report["compression"])
    c = report["clone"]
    out.print(f"[bold]Clone[/] {c['name']} (hostname {c['hostname']}): running {c['running_ms']} ms after the request "
              f"(QEMU's own start {c['qemu_start_ms']} ms), guest answered at {c['guest_answers_ms']} ms; workload "
              f"{'runs on' if c['workload_runs_on'] else 'NOT running'}; private RAM {human(c['private_bytes'])} of "
              f"{human(c['memory'])}, the rest shared copy-on-write with {name}'s {human(c['template_ram_bytes'])} RAM file")
    print_demo_migration(report["migration"])
    if "pm" in report:
        print_demo_pm(report["pm"])
