"""``memvirt pm``: physical-machine migration through the kernel's hibernation image."""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

import typer

from memvirt.cli.output import JsonOpt, emit_json, err, human, out, table
from memvirt.errors import MemvirtError
from memvirt.pm.events import Event
from memvirt.pm.link import measure_link
from memvirt.pm.migrate import CODECS, SCHEMES

app = typer.Typer(
    help="Move a running machine through its kernel's hibernation image (no hypervisor help).", no_args_is_help=True
)


def _describe(e: Event) -> str | None:
    """A progress line for an agent event (None: not worth a line)."""
    f = e.fields
    mib = lambda k: human(float(f.get(k, 0)))  # noqa: E731
    lines = {
        ("target", "listening"): f"target listening on {f.get('on')}",
        ("source", "connected"): f"source connected ({f.get('scheme')}, {f.get('compress')})",
        (
            "source",
            "precopied",
        ): f"pre-copied {f.get('pages')} pages ({mib('wire')}) in {f.get('seconds')} s while running",
        ("source", "freezing"): f"freezing the source ({mib('used')} in use)",
        ("source", "frozen"): f"frozen in {float(f.get('seconds', 0)) * 1000:.0f} ms",
        ("source", "created"): f"image of {mib('image')} created in {f.get('seconds')} s",
        ("source", "written"): f"image on the shared disk: {mib('disk')} in {f.get('seconds')} s",
        ("source", "sent"): f"sent {f.get('literal')} pages, {f.get('zero')} zero, {f.get('ref')} by reference "
        f"({mib('wire')} on the wire) in {f.get('seconds')} s",
        ("target", "received"): f"target verified the image ({mib('image')}) in {f.get('seconds')} s",
        ("target", "restoring"): "target restoring",
        ("source", "acked"): "source powering off" + (" (host's verdict)" if f.get("verdict") else ""),
        ("resumed", "running"): "the machine runs on the target",
        ("source", "uncertain"): f"source got no answer from the target ({f.get('error')}): it waits, frozen, "
        "for the host's verdict",
        ("source", "thawed"): f"source thawed: {f.get('error')}",
        ("target", "failed"): f"target failed: {f.get('error')}",
        ("source", "failed"): f"source failed: {f.get('error')}",
    }
    return lines.get((e.role, e.name))


@app.command("migrate")
def migrate(
    source: Annotated[str, typer.Argument(help="The running machine (a VM started with --lan).")],
    to: Annotated[str, typer.Option("--to", help="The machine to move it to: same kernel, RAM and LAN.")],
    scheme: Annotated[str, typer.Option(help=f"How the image travels: {', '.join(SCHEMES)}.")] = "memory",
    compress: Annotated[str, typer.Option(help=f"Stream compression: {', '.join(CODECS)}.")] = "lz4",
    shrink: Annotated[
        bool,
        typer.Option(
            "--shrink/--no-shrink",
            help="Ask the kernel for the smallest image (PREF_IMAGE_SIZE 0: page cache dropped before the snapshot).",
        ),
    ] = False,
    timeout: Annotated[float, typer.Option(help="Give up (the source thaws) after this many seconds.")] = 600.0,
    zram: Annotated[
        bool | None,
        typer.Option(
            "--zram/--no-zram",
            help="Add compressed swap in SOURCE's RAM for "
            "the migration, so an image above half of RAM fits (default: only "
            "when it would not fit without).",
        ),
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Move the running machine SOURCE onto machine TO through its kernel's hibernation image.

    An agent inside SOURCE freezes it, has its kernel build the hibernation image and streams it,
    encrypted, authenticated and checksummed, to the agent on TO, which restores it. Afterwards the VM named
    TO runs SOURCE's machine (its processes, hostname, address) and SOURCE is powered off and
    removed. If anything fails before TO has the complete image, SOURCE thaws and runs on; if TO's
    answer is lost, memvirt decides from TO's console which one runs (never both).
    """
    from memvirt.pm.migrate import migrate as run

    def progress(e: Event) -> None:
        line = _describe(e)
        if line and not json_:
            err.print(f"pm: {line}", markup=False, highlight=False)

    class _Warnings(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            err.print(f"pm: warning: {record.getMessage()}", markup=False, highlight=False)

    log = logging.getLogger("memvirt.pm")
    log.addHandler(_Warnings())
    log.propagate = False

    r = run(source, to, scheme, compress, shrink, timeout, progress, zram)
    if json_:
        emit_json(r.to_json())
        return
    out.print(f"[bold]{source}[/] now runs as VM [bold]{to}[/] (address {r.address}); {source} powered off")
    pages = r.pages
    table(
        None,
        ["", "VALUE"],
        [
            ["downtime", f"{r.downtime_seconds:.2f} s"],
            ["  freeze", f"{r.freeze_seconds * 1000:.0f} ms"],
            ["  create image", f"{r.create_seconds:.2f} s"],
            ["  transfer", f"{r.transfer_seconds:.2f} s"],
            ["  restore", f"{r.restore_seconds:.2f} s"],
            ["image / used memory", f"{human(r.image_bytes)} / {human(r.used_bytes)}"],
            [
                "pages literal / zero / by reference",
                f"{pages.get('literal', 0)} / {pages.get('zero', 0)} / {pages.get('ref', 0)}",
            ],
            ["bytes on the wire" if r.scheme != "disk" else "bytes on the shared disk", human(r.stream_bytes)],
            ["compression ratio", f"{r.compression_ratio:.2f}"],
            [
                "pre-copied while running",
                f"{r.precopy_pages} pages, {human(r.precopy_wire_bytes)} in {r.precopy_seconds:.1f} s"
                if r.scheme == "iterative"
                else "-",
            ],
            ["total time", f"{r.total_seconds:.2f} s"],
        ]
        + (
            [
                [
                    "zram swap (added, removed after)",
                    f"{human(r.swapped_bytes)} swapped in at the snapshot"
                    + (f", {human(r.zram_stats.compressed_bytes)} compressed" if r.zram_stats else f"; {r.zram_error}"),
                ]
            ]
            if r.zram
            else []
        ),
    )


@app.command("check")
def check(
    source: Annotated[str, typer.Argument(help="The machine to move.")],
    to: Annotated[str, typer.Option("--to", help="The machine to move it to.")],
    scheme: Annotated[str, typer.Option(help=f"Scheme to check for: {', '.join(SCHEMES)}.")] = "memory",
    json_: JsonOpt = False,
) -> None:
    """Check that SOURCE can move onto TO (same kernel and RAM, hibernation, the image fits) without
    freezing anything; exit 0 if it can, else one line saying why."""
    from memvirt.pm.facts import IMAGE_MARGIN
    from memvirt.pm.migrate import preflight

    _, _, (s, d), zram = preflight(source, to, scheme)
    info: dict[str, Any] = {
        "source": source,
        "target": to,
        "kernel": s.release,
        "image_estimate_bytes": s.image_estimate,
        "image_limit_bytes": min(s.image_limit, d.mem_available - IMAGE_MARGIN),
        "zram": zram,
        "ok": True,
    }
    if json_:
        emit_json(info)
    else:
        out.print(
            f"{source} -> {to}: ok (kernel {s.release}; image about {human(s.image_estimate)}, "
            f"at most {human(info['image_limit_bytes'])} fits{'; needs zram swap' if zram else ''})"
        )


@app.command("link")
def link(
    source: Annotated[str, typer.Argument(help="Sending VM.")],
    target: Annotated[str, typer.Argument(help="Receiving VM on the same LAN.")],
    size: Annotated[str, typer.Option(help="Bytes to send (e.g. 32M).")] = "32M",
    json_: JsonOpt = False,
) -> None:
    """Measure the LAN throughput between two machines (one TCP stream, as the migration uses)."""
    from memvirt.qemu.vm import VM
    from memvirt.units import parse_size

    rate = measure_link(VM.load(source), VM.load(target), parse_size(size))
    if json_:
        emit_json({"source": source, "target": target, "bytes_per_second": round(rate)})
    else:
        out.print(f"{source} -> {target}: {rate / 1e6:.1f} MB/s")


def demo_pm(name: str, image: str | None) -> dict[str, Any]:
    """For ``memvirt demo``: two machines on a LAN, one running a workload, moved with the iterative
    scheme; stops both machines."""
    from concurrent.futures import ThreadPoolExecutor

    from memvirt.image.build import find_image
    from memvirt.pm.migrate import migrate as run
    from memvirt.qemu.vm import VM, start_vm

    img = find_image(image)
    names = [f"{name}-pm-a", f"{name}-pm-b"]
    try:
        with ThreadPoolExecutor(2) as pool:
            src, dst = pool.map(lambda n: start_vm(n, img, memory=512 << 20, lan_name=f"{name}-lan"), names)
        src.exec_background(
            "memtouch --hot 16M --cold 48M --content mix --dirty-rate 1M --counter-file /tmp/pm.count",
            "/tmp/pm-memtouch.log",
        )
        src.exec_background("datacheck write --size 16M --seed 9 --state /tmp/pm.dc", "/tmp/pm-dc.log")
        while src.exec("test -s /tmp/pm.count && test -f /tmp/pm.dc").rc:
            time.sleep(0.3)
        link = measure_link(src, dst, 16 << 20)
        r = run(src.name, dst.name, "iterative", "lz4")
        moved = VM.load(dst.name)
        first = int(moved.exec("cat /tmp/pm.count").text)
        time.sleep(1.0)
        runs_on = int(moved.exec("cat /tmp/pm.count").text) > first
        verified = moved.exec("datacheck verify --state /tmp/pm.dc").rc == 0
        return {
            **r.to_json(),
            "link_bytes_per_s": round(link),
            "hostname": moved.exec("hostname").text.strip(),
            "workload_runs_on": runs_on,
            "data_verified": verified,
        }
    finally:
        for n in names:
            try:
                VM.load(n).stop()
            except MemvirtError:
                pass


def print_demo_pm(d: dict[str, Any]) -> None:
    out.print(
        f"[bold]Physical-machine migration[/] {d['source']} -> {d['target']} (iterative, through the kernel's "
        f"hibernation image): the machine runs on as {d['target']} (hostname {d['hostname']}), workload "
        f"{'runs on' if d['workload_runs_on'] else 'STOPPED'}, data {'verified' if d['data_verified'] else 'BAD'}"
    )
    table(
        None,
        ["DOWNTIME", "FREEZE", "CREATE", "TRANSFER", "RESTORE", "IMAGE / USED", "ON THE WIRE", "LINK"],
        [
            [
                f"{float(d['downtime_seconds']):.2f} s",
                f"{float(d['freeze_seconds']) * 1000:.0f} ms",
                f"{float(d['create_seconds']):.2f} s",
                f"{float(d['transfer_seconds']):.2f} s",
                f"{float(d['restore_seconds']):.2f} s",
                f"{human(float(d['image_bytes']))} / {human(float(d['used_bytes']))}",
                human(float(d["stream_bytes"])),
                f"{float(d['link_bytes_per_s']) / 1e6:.1f} MB/s",
            ]
        ],
    )
