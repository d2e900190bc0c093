"""``memvirt daemon`` (also ``memvirtd``), ``memvirt attach`` and ``memvirt status``: the host service."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from memvirt.cli.output import JsonOpt, emit_json, human, out
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
    if check:
        from dataclasses import asdict

        from memvirt.daemon import config as config_mod
        from memvirt.daemon.metrics import parse_addr

        parse_addr(metrics)
        emit_json(asdict(config_mod.load(config)))
        return
    from memvirt.daemon.main import run

    run(config, metrics, socket, False, verbose)


def attach(
    qmp: Annotated[Path | None, typer.Option(help="The QMP socket of a running QEMU (server mode).")] = None,
    pid: Annotated[int | None, typer.Option(help="Its process id (default: the QEMU listening on --qmp).")] = None,
    name: Annotated[str | None, typer.Option(help="Name to manage it by (default: QEMU's -name, or qemu-PID).")] = None,
    forget: Annotated[str | None, typer.Option(help="Unregister the attached VM of this name instead.")] = None,
    json_: JsonOpt = False,
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
    json_: JsonOpt = False,
) -> None:
    """What memvirtd manages and what each policy is doing now."""
    from memvirt.daemon import control

    st = control.query(socket or control.default_socket())
    if json_:
        emit_json(st)
        return
    print_status(st)


def print_status(st: dict) -> None:
    """The daemon's status: one line for the host, a table of VMs, then any failing policy."""
    t, host = st.get("trigger", {}), st.get("host", {})
    out.print(
        f"memvirtd pid {st.get('pid')}: config {st.get('config')}; trigger {t.get('mode')} "
        f"({'acting' if t.get('engaged') else 'idle'}: {t.get('reason')}); KSM {st.get('ksm')}; "
        f"metrics {st.get('metrics')}; itself: {host.get('daemon_cpu_seconds', '?')} s CPU, "
        f"{human(host.get('daemon_rss_bytes', 0))} RSS"
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

    tab = Table(show_edge=False, box=None, header_style="bold")
    for i, c in enumerate(["VM", "SOURCE", "RESIDENT", "GUEST FREE", "RECLAIMED", "RECLAIM", "COMPRESS"]):
        tab.add_column(c, no_wrap=i < 5)
    for r in rows:
        tab.add_row(*[str(x) for x in r])
    out.print(tab)
    for line in errors:
        out.print(f"failing (retried): {line}", markup=False)


def demo_config(name: str) -> str:
    """memvirtd's config for ``memvirt demo``: fast rounds for the demo VM; every other VM of the
    host is only watched (reclaim and compression off), so the demo changes nothing of theirs."""
    return (
        "interval = 2\n"
        "[reclaim]\nenabled = false\n"
        '[compress]\npolicy = "off"\n'
        "[ksm]\nenabled = false\n"
        f"[[vm]]\nmatch = {json.dumps(name)}\n"
        "[vm.reclaim]\nenabled = true\nevery = 5\n"
        '[vm.compress]\npolicy = "measure"\ninterval = 2\n'
    )


def demo_daemon(name: str, passes: int = 2, timeout: float = 180.0) -> dict:
    """For ``memvirt demo``: memvirtd over the demo VM until it made ``passes`` reclaim passes and
    measured a working set, its status then, and a SIGTERM stop (exit 0, the guest still running).
    The daemon is its own process (as the service is), its socket and log in a private folder."""
    import os
    import signal
    import subprocess
    import tempfile
    import time

    from memvirt.daemon import control
    from memvirt.errors import MemvirtError
    from memvirt.qemu.vm import VM

    with tempfile.TemporaryDirectory(prefix="memvirt-demo-daemon-") as tmp:
        cfg, sock, log = Path(tmp) / "memvirtd.toml", Path(tmp) / "control.sock", Path(tmp) / "memvirtd.log"
        cfg.write_text(demo_config(name))
        argv = [sys.executable, "-m", "memvirt", "daemon", "--config", str(cfg), "--metrics", "127.0.0.1:0"]
        with open(log, "wb") as lf:
            proc = subprocess.Popen([*argv, "--socket", str(sock)], stdin=subprocess.DEVNULL, stdout=lf, stderr=lf)
        t0 = time.monotonic()
        st: dict = {}
        try:
            while True:
                if proc.poll() is not None:
                    raise MemvirtError(f"memvirtd exited ({proc.returncode}): {_last_line(log)}")
                if time.monotonic() - t0 > timeout:
                    raise MemvirtError(
                        f"memvirtd made no {passes} reclaim passes in {timeout:.0f} s: {_last_line(log)}"
                    )
                if sock.exists():
                    st = control.query(sock)
                    v: dict[str, Any] = next((v for v in st.get("vms", []) if v.get("vm") == name), {})
                    if v.get("passes", 0) >= passes and "working_set_bytes" in v:
                        break
                time.sleep(0.5)
            seconds = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
        vm = VM.load(name)
        return {
            "status": st,
            "seconds": round(seconds, 1),
            "exit_code": rc,
            "guest_status": vm.status(),
            "guest_alive": vm.exec("echo alive").text.strip() == "alive",
            "socket_removed": not os.path.exists(sock),
        }


def _last_line(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def print_demo_daemon(d: dict) -> None:
    st = d["status"]
    out.print(f"[bold]memvirtd[/] over the demo VM for {d['seconds']} s; [bold]memvirt status[/] then said:")
    print_status(st)
    out.print(
        f"stopped with SIGTERM: exit {d['exit_code']}, "
        f"guest {d['guest_status'] if d['guest_alive'] else 'NOT ANSWERING'}"
    )


def memvirtd() -> None:
    """The ``memvirtd`` console script (kept here for old unit files): the lean entry point."""
    from memvirt.daemon.main import main

    main()
