"""``memvirt daemon`` (also ``memvirtd``), ``memvirt attach`` and ``memvirt status``: the host service."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from memvirt.cli.output import emit_json, human, out
from memvirt.errors import UsageError

DEFAULT_METRICS = "127.0.0.1:9735"


def daemon(
    config: Annotated[
        Path | None,
        typer.Option(help="Config file (default: $MEMVIRT_HOME/memvirtd.toml; defaults when that is absent)."),
    ] = None,
    metrics: Annotated[
        str, typer.Option(help="ADDR:PORT of the Prometheus endpoint (port 0: any free one).")
    ] = DEFAULT_METRICS,
    socket: Annotated[
        Path | None, typer.Option(help="Control socket (default: $MEMVIRT_HOME/memvirtd/control.sock).")
    ] = None,
    check: Annotated[bool, typer.Option("--check", help="Validate the config, print it as applied, and exit.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug details.")] = False,
) -> None:
    """Run memvirt's memory policies over every VM of this host, continuously (memvirtd).

    Discovers memvirt's VMs and QEMUs registered with 'memvirt attach'; per VM runs free-page
    reclaim, working-set compression and (host-wide) KSM pacing as the config says; serves
    Prometheus metrics; answers 'memvirt status'. SIGHUP reloads the config, SIGTERM gives back
    every cap and host setting. Tells systemd READY=1 through $NOTIFY_SOCKET when there is one.
    """
    from memvirt.daemon import config as config_mod
    from memvirt.daemon.metrics import parse_addr

    host, port = parse_addr(metrics)
    if check:
        from dataclasses import asdict

        emit_json(asdict(config_mod.load(config)))
        return
    from memvirt.daemon.service import Daemon

    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if verbose else logging.INFO,
        format="memvirtd: %(levelname)s: %(message)s",
    )
    for noisy in ("qemu", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    Daemon(config, (host, port), socket).run()


def attach(
    qmp: Annotated[Path | None, typer.Option(help="The QMP socket of a running QEMU (server mode).")] = None,
    pid: Annotated[int | None, typer.Option(help="Its process id (default: the QEMU listening on --qmp).")] = None,
    name: Annotated[str | None, typer.Option(help="Name to manage it by (default: QEMU's -name, or qemu-PID).")] = None,
    forget: Annotated[str | None, typer.Option(help="Unregister the attached VM of this name instead.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Register a QEMU that memvirt did not start, so memvirtd manages it too.

    The pid must be a qemu-system process that holds the QMP socket; its RAM is taken as anonymous
    RAM, mapped as its command line's machine type (pc or q35) says. The registration lives in
    $MEMVIRT_HOME/attached until --forget.
    """
    from memvirt.daemon import discovery

    if forget is not None:
        if not discovery.unregister(forget):
            raise UsageError(f"no attached VM named {forget!r}")
        out.print(f"forgot {forget}")
        return
    if qmp is None:
        raise UsageError("give --qmp PATH (or --forget NAME)")
    rec = discovery.register(str(qmp), pid, name)
    if json_:
        emit_json(rec)
        return
    out.print(f"attached {rec['name']}: QEMU pid {rec['pid']}, {human(rec['memory'])} of RAM, QMP {rec['qmp']}")


def status(
    socket: Annotated[Path | None, typer.Option(help="The daemon's control socket.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """What memvirtd manages and what each policy is doing now."""
    from memvirt.daemon import control

    st = control.query(socket or control.default_socket())
    if json_:
        emit_json(st)
        return
    t = st.get("trigger", {})
    out.print(
        f"memvirtd pid {st.get('pid')}: config {st.get('config')}; trigger {t.get('mode')} "
        f"({'acting' if t.get('engaged') else 'idle'}: {t.get('reason')}); KSM {st.get('ksm')}; "
        f"metrics {st.get('metrics')}"
    )
    rows, errors = [], []
    for v in st.get("vms", []):
        errors += [f"{v.get('vm')}: {k}: {e}" for k, e in (v.get("errors") or {}).items()]
        rows.append(
            [
                v.get("vm"),
                v.get("source"),
                human(v.get("resident_bytes", 0)),
                human(v["guest_free_bytes"]) if "guest_free_bytes" in v else "?",
                human(v.get("reclaimed_bytes", 0)),
                v.get("reclaim"),
                v.get("compress"),
            ]
        )
    from rich.table import Table

    t = Table(show_edge=False, box=None, header_style="bold")
    for i, c in enumerate(["VM", "SOURCE", "RESIDENT", "GUEST FREE", "RECLAIMED", "RECLAIM", "COMPRESS"]):
        t.add_column(c, no_wrap=i < 5)
    for r in rows:
        t.add_row(*[str(x) for x in r])
    out.print(t)
    for line in errors:
        out.print(f"failing (retried): {line}", markup=False)


def memvirtd() -> None:
    """The ``memvirtd`` console script: ``memvirt daemon`` with the CLI's error handling."""
    from memvirt.cli import main as cli_main

    sys.argv = [sys.argv[0], "daemon", *sys.argv[1:]]
    cli_main.main()
