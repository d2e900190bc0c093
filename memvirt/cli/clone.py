"""``memvirt clone``: freeze a VM as a template and start lazy (copy-on-write) or eager clones."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from memvirt.cli.output import JsonOpt, emit_json, err, human, out, table
from memvirt.clone import clone as clone_vm


def clone(
    name: Annotated[str, typer.Argument(help="The VM to clone (it is frozen as a template).")],
    count: Annotated[int, typer.Option("--count", "-n", help="How many clones.")] = 1,
    prefix: Annotated[str | None, typer.Option(help="Clones are PREFIX-1..PREFIX-N (default NAME-clone).")] = None,
    eager: Annotated[bool, typer.Option(help="Copy the template's RAM for each clone first (the baseline).")] = False,
    wait: Annotated[bool, typer.Option(help="Wait until each clone's guest answers and set its hostname.")] = True,
    json_: JsonOpt = False,
) -> None:
    """Clone a running VM; lazy clones share its RAM copy-on-write and start in about QEMU's own start time.

    The source becomes a frozen template (paused, RAM file read-only); 'vm resume' and 'vm stop' of it are refused
    while lazy clones run, unless --force.
    """
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    ) as bar:
        task = bar.add_task(f"freezing {name} as a template", total=None)

        def progress(stage: str, done: int, total: int) -> None:
            bar.update(task, description=stage, completed=done, total=total)

        report = clone_vm(name, count=count, prefix=prefix, eager=eager, wait_guest=wait, progress=progress)
    if json_:
        emit_json(report.to_json())
        return
    how = "froze" if report.frozen_now else "reused"
    out.print(
        f"{how} template {report.template} (device state {human(report.state_bytes)}"
        + (f", saved in {report.freeze_seconds * 1000:.0f} ms)" if report.frozen_now else ")")
    )
    table(
        None,
        ["CLONE", "PID", "MODE", "START (ms)", "QEMU (ms)", "RESTORE (ms)", "COPY", "GUEST UP (ms)"],
        [
            [
                c.name,
                c.pid,
                "lazy" if c.lazy else "eager",
                f"{c.seconds * 1000:.0f}",
                f"{c.qemu_seconds * 1000:.0f}",
                f"{c.restore_seconds * 1000:.0f}",
                f"{human(c.copied_bytes)} in {c.copy_seconds * 1000:.0f} ms" if not c.lazy else "-",
                f"{c.guest_seconds * 1000:.0f}" if c.guest_seconds is not None else "-",
            ]
            for c in report.clones
        ],
    )
