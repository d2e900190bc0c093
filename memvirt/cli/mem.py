"""``memvirt mem``: look at guest physical memory from any source."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import numpy as np
import typer

from memvirt.cli.output import JsonOpt, emit_json, human, out, table
from memvirt.errors import UsageError
from memvirt.memory.source import PAGE_SIZE, GuestMemory
from memvirt.targets import FORMATS, open_memory
from memvirt.units import parse_size

app = typer.Typer(
    help="Read guest physical memory (VM, pid:N, RAM file, ELF/kdump dump, raw image).", no_args_is_help=True
)

SourceArg = Annotated[str, typer.Argument(help="A VM name, pid:N, or a memory file (dump, RAM file, raw image).")]
FormatOpt = Annotated[str, typer.Option("--format", "-f", help=f"File format: {', '.join(FORMATS)}.")]
RamSizeOpt = Annotated[
    str | None, typer.Option("--ram-size", help="Guest RAM size, to lay out a RAM file or raw image.")
]
MachineOpt = Annotated[
    str | None,
    typer.Option(
        "--machine", help="QEMU machine family of a RAM file or raw image: pc or q35 (default: ask the guest)."
    ),
]
QmpOpt = Annotated[
    str | None, typer.Option("--qmp", help="QMP socket of the running QEMU: its RAM map comes from QEMU itself.")
]


def _open(source: str, format: str, ram_size: str | None, machine: str | None, qmp: str | None) -> GuestMemory:
    return open_memory(source, format, parse_size(ram_size) if ram_size else None, machine, qmp)


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError as e:
        raise UsageError(f"not a number: {text!r} (use decimal or 0x hex)") from e


def zero_pages(mem: GuestMemory) -> int:
    """Count all-zero pages, a chunk at a time."""
    zeros = 0
    for _, chunk in mem.chunks():
        pages = chunk.view(np.uint64).reshape(-1, PAGE_SIZE // 8)
        zeros += int(np.count_nonzero(~pages.any(axis=1)))
    return zeros


@app.command("info")
def info(
    source: SourceArg,
    format: FormatOpt = "auto",
    ram_size: RamSizeOpt = None,
    machine: MachineOpt = None,
    qmp: QmpOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Show a source's RAM map and size."""
    with _open(source, format, ram_size, machine, qmp) as mem:
        regions = [{"gpa": r.gpa, "end": r.end, "size": r.size} for r in mem.regions]
        data: dict[str, Any] = {
            "source": mem.describe(),
            "kind": mem.kind,
            "ram_bytes": mem.ram_size,
            "max_pfn": mem.max_pfn,
            "regions": regions,
            "layout": mem.layout,
            "vmcoreinfo": mem.vmcoreinfo is not None,
        }
    if json_:
        emit_json(data)
        return
    out.print(f"{data['source']}: {human(data['ram_bytes'])} of RAM, max pfn {data['max_pfn']:#x}")
    if data["layout"]:
        out.print(f"RAM map: {data['layout']}")
    table(
        None, ["START", "END", "SIZE"], [[f"{r['gpa']:#014x}", f"{r['end']:#014x}", human(r["size"])] for r in regions]
    )


@app.command("read")
def read(
    source: SourceArg,
    address: Annotated[str, typer.Argument(help="Guest-physical address (decimal or 0x hex).")],
    length: Annotated[str, typer.Argument(help="Bytes to read.")] = "256",
    format: FormatOpt = "auto",
    ram_size: RamSizeOpt = None,
    machine: MachineOpt = None,
    qmp: QmpOpt = None,
    raw: Annotated[bool, typer.Option("--raw", help="Write the bytes to stdout instead of a hex dump.")] = False,
) -> None:
    """Read guest-physical memory and print a hex dump (or the raw bytes)."""
    gpa, n = _int(address), _int(length)
    if n <= 0 or n > 1 << 30:
        raise UsageError("length must be between 1 and 1 GiB")
    with _open(source, format, ram_size, machine, qmp) as mem:
        data = mem.read(gpa, n).tobytes()
    if raw:
        sys.stdout.buffer.write(data)
        return
    for off in range(0, len(data), 16):
        row = data[off : off + 16]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        out.print(f"{gpa + off:012x}  {row.hex(' '):<47}  {text}", markup=False)
