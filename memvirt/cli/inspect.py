"""``memvirt inspect``: what the guest kernel knows about every page, read from the host."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from memvirt.cli.output import JsonOpt, emit_json, human, out, spinner, table
from memvirt.errors import UsageError
from memvirt.introspect import CHOICES, CLASSES, Introspector
from memvirt.introspect.census import Census
from memvirt.targets import FORMATS, held_still, open_memory
from memvirt.units import parse_size


def inspect(
    source: Annotated[str, typer.Argument(help="A VM name, pid:N, a RAM file, or a dump (ELF, kdump, raw).")],
    json_: JsonOpt = False,
    map_: Annotated[Path | None, typer.Option("--map", help="Draw the guest-physical address space to a PNG.")] = None,
    pause: Annotated[bool, typer.Option("--pause/--no-pause", help="Pause a running guest while reading it.")] = True,
    layouts: Annotated[str, typer.Option(help=f"Layout source: {', '.join(CHOICES)}.")] = "auto",
    content: Annotated[
        bool, typer.Option("--content/--no-content", help="Also count all-zero pages (reads all RAM).")
    ] = True,
    format: Annotated[str, typer.Option("--format", "-f", help=f"File format: {', '.join(FORMATS)}.")] = "auto",
    ram_size: Annotated[str | None, typer.Option(help="Guest RAM size, for a RAM file or raw image.")] = None,
    machine: Annotated[
        str | None,
        typer.Option(help="QEMU machine family of a RAM file or raw image: pc or q35 (default: ask the guest)."),
    ] = None,
    qmp: Annotated[
        str | None, typer.Option(help="QMP socket of the running QEMU: its RAM map comes from QEMU.")
    ] = None,
) -> None:
    """Classify every guest page (free, per-cpu free, page cache, anon, slab, page tables, kernel,
    reserved, unbacked) from the guest kernel's own structures: no agent, no debug symbols.

    A live scan (--no-pause) reads a running guest and may be inconsistent: it says so.
    """
    if layouts not in CHOICES:
        raise UsageError(f"--layouts must be one of {', '.join(CHOICES)}")
    with open_memory(source, format, parse_size(ram_size) if ram_size else None, machine, qmp) as mem:
        t = time.perf_counter()
        with spinner(f"bootstrapping from {mem.describe()}"):
            intro = Introspector(mem, layouts=layouts, any_page_size=True)
        with spinner("scanning"), held_still(source, pause) as state:
            census = intro.scan(live=bool(state["live"]), content=content)
        census.timings["total"] = time.perf_counter() - t
        if "pause_seconds" in state:
            census.timings["paused"] = float(state["pause_seconds"])
    report = census.to_json()
    report["source"] = mem.describe()
    report["ram_map"] = mem.layout
    report["layout_facts"] = intro.layout_sources()
    if map_ is not None:
        from memvirt.introspect.plot import draw_map

        report["map"] = str(draw_map(census, map_, title=f"{source}: Linux {census.release}"))
    if json_:
        emit_json(report)
        return
    _print(census, report)


def _print(census: Census, report: dict) -> None:
    total = sum(census.counts[c] for c in CLASSES if c != "unbacked") or 1
    live = " (LIVE: racy, the guest kept running)" if census.live else ""
    out.print(f"[bold]{report['source']}[/]: Linux {census.release}{live}")
    rows = [
        [c, census.counts[c], human(census.counts[c] * census.page_size), f"{100 * census.counts[c] / total:.1f} %"]
        for c in CLASSES
    ]
    if "zero" in census.counts:
        rows.append(
            ["(zero content)", census.counts["zero"], human(census.counts["zero"] * census.page_size), "of allocated"]
        )
    table(None, ["CLASS", "PAGES", "SIZE", "SHARE"], rows)
    tm = census.timings
    parts = [f"bootstrap {tm['bootstrap'] * 1000:.0f} ms", f"scan {tm['scan'] * 1000:.1f} ms"]
    if "paused" in tm:
        parts.append(f"guest paused {tm['paused'] * 1000:.0f} ms")
    out.print("timings: " + ", ".join(parts) + f"; layout facts from {report['layout_facts']}")
    for w in census.warnings:
        out.print(f"[yellow]warning:[/] {w}")
    if "map" in report:
        out.print(f"map written to {report['map']}")
