"""Shared CLI output: JSON, tables and progress bars, all on the same consoles."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


JsonOpt = Annotated[
    bool,
    typer.Option(
        "--json", help="Print JSON on stdout (a long-running command when it ends; with --watch, one object per pass)."
    ),
]
"""The ``--json`` option of every command: machine-readable output on stdout, progress and
notices on stderr."""


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def table(title: str | None, columns: list[str], rows: list[list[Any]]) -> None:
    t = Table(title=title, show_edge=False, box=None, header_style="bold")
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[str(x) for x in r])
    out.print(t)


@contextmanager
def spinner(text: str) -> Iterator[None]:
    """A spinner on stderr while slow work runs (silent when stderr is not a terminal)."""
    with err.status(text):
        yield


@contextmanager
def byte_progress(text: str) -> Iterator[Any]:
    """A progress bar over bytes; yields ``update(done, total)``."""
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as p:
        task = p.add_task(text, total=None)

        def update(done: int, total: int) -> None:
            p.update(task, completed=done, total=total)

        yield update


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
