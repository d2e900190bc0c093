"""``memvirt libvirt migrate``: libvirt's own migration of a domain, smaller by its free pages."""

from __future__ import annotations

from typing import Annotated

import typer

from memvirt.cli.output import JsonOpt, emit_json, human, out, spinner

app = typer.Typer(help="Act on libvirt domains as libvirt itself would, with memvirt's help.", no_args_is_help=True)


@app.command()
def migrate(
    name: Annotated[str, typer.Argument(help="A running libvirt domain (NAME or libvirt:NAME).")],
    dest: Annotated[str, typer.Argument(help="The destination libvirt URI, e.g. qemu+tcp://host/system.")],
    connect: Annotated[str | None, typer.Option("--connect", "-c", help="Source libvirt URI.", metavar="URI")] = None,
    live: Annotated[bool, typer.Option("--live/--offline", help="Copy while the guest runs (virsh --live).")] = True,
    reclaim: Annotated[bool, typer.Option("--reclaim/--no-reclaim", help="Discard free pages first.")] = True,
    during: Annotated[bool, typer.Option("--during/--no-during", help="Keep discarding while libvirt copies.")] = True,
    migrate_uri: Annotated[
        str | None, typer.Option(help="QEMU's migration URI (default tcp://DEST-HOST).", metavar="URI")
    ] = None,
    dest_xml: Annotated[
        typer.FileText | None, typer.Option(help="Domain XML for the destination (other paths).")
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Migrate a libvirt domain with libvirt (peer to peer), after discarding the guest's free pages.

    QEMU sends discarded pages as zero pages. libvirt does the move: on failure the domain keeps
    running here. Reports libvirt's job statistics: bytes, total time, downtime.
    """
    from memvirt.dedup.reclaim import Reclaimer
    from memvirt.virt import set_uri
    from memvirt.virt.domain import load
    from memvirt.virt.migrate import migrate as run

    if connect:
        set_uri(connect)
    vm = load(name)
    with spinner(f"migrating {vm.name} to {dest}"):
        rep = run(
            vm,
            dest,
            live=live,
            reclaimer=Reclaimer if reclaim else None,
            during=during,
            migrate_uri=migrate_uri,
            dest_xml=dest_xml.read() if dest_xml else None,
        )
    report = rep.to_json()
    if json_:
        emit_json(report)
        return
    out.print(
        f"{vm.name} -> {dest}: {human(report['bytes'])} sent in {report['total_ms']} ms, "
        f"downtime {report['downtime_ms']} ms; memvirt discarded {human(rep.reclaimed_before)} before "
        f"({rep.reclaim_ms} ms) and {human(rep.reclaimed_during)} during the copy ({rep.passes_during} passes); "
        f"{rep.wall_ms} ms in all"
    )
