"""``memvirt demo``: the main job on the built-in default guest, start to finish."""

from __future__ import annotations

import time
from typing import Annotated

import numpy as np
import typer

from memvirt.cli.mem import zero_pages
from memvirt.cli.output import emit_json, human, out, spinner, table
from memvirt.image.build import find_image
from memvirt.memory.procmem import parse_size
from memvirt.qemu.vm import start_vm


def demo(
    memory: Annotated[str, typer.Option(help="Guest RAM.")] = "512M",
    image: Annotated[str | None, typer.Option(help="Image or kernel series (default: Debian 6.1).")] = None,
    name: Annotated[str, typer.Option(help="Name of the demo VM.")] = "memvirt-demo",
    json_: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Boot the default guest, show its memory map and what the host reads in its memory, stop it."""
    report: dict[str, object] = {}
    t0 = time.monotonic()
    with spinner("building the default image (first run downloads a Debian kernel)"):
        img = find_image(image)
    with spinner(f"booting {name}"):
        vm = start_vm(name, img, memory=parse_size(memory))
    report["boot_seconds"] = round(time.monotonic() - t0, 1)
    try:
        report["guest"] = {
            "kernel": vm.exec("uname -r").check("uname").text.strip(),
            "meminfo": vm.exec("head -3 /proc/meminfo").check("meminfo").text.strip().splitlines(),
        }
        vm.pause()
        with vm.memory() as mem:
            t = time.monotonic()
            populated = int(mem.populated_pfns().sum()) if hasattr(mem, "populated_pfns") else None
            zeros = zero_pages(mem)
            banner = _find_banner(mem)
            report["host_view"] = {
                "regions": [{"gpa": r.gpa, "size": r.size} for r in mem.regions],
                "ram_bytes": mem.ram_size,
                "pages_touched": populated,
                "pages_zero": zeros,
                "kernel_banner": banner,
                "scan_seconds": round(time.monotonic() - t, 3),
            }
        vm.resume()
    finally:
        vm.stop()
    if json_:
        emit_json(report)
        return
    g, h = report["guest"], report["host_view"]
    out.print(f"[bold]Guest[/] {name}: kernel {g['kernel']}, booted in {report['boot_seconds']} s")
    for line in g["meminfo"]:
        out.print(f"  guest says  {line}")
    table("Guest physical memory map", ["START", "END", "SIZE"],
          [[f"{r['gpa']:#014x}", f"{r['gpa'] + r['size']:#014x}", human(r["size"])] for r in h["regions"]])
    out.print(f"host reads   {h['pages_touched']} of {h['ram_bytes'] // 4096} pages ever touched, "
              f"{h['pages_zero']} all-zero, in {h['scan_seconds']} s")
    out.print(f"host finds   {h['kernel_banner']!r}")


def _find_banner(mem) -> str | None:  # noqa: ANN001
    """The kernel's version banner, found by scanning RAM (no guest help)."""
    needle = np.frombuffer(b"Linux version ", dtype=np.uint8)
    for _, chunk in mem.chunks():
        raw = chunk.tobytes()
        i = raw.find(needle.tobytes())
        while i >= 0:
            text = raw[i : i + 200].split(b"\n")[0].split(b"\0")[0]
            if b"(" in text and b"#" in text:
                return text.decode(errors="replace")
            i = raw.find(needle.tobytes(), i + 1)
    return None
