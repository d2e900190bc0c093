"""``memvirt migrate`` and ``memvirt receive``: live migration with memvirt's own precopy engine."""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from memvirt.cli.output import JsonOpt, emit_json, err, human, out, table
from memvirt.errors import MemvirtError
from memvirt.memory.source import PAGE_SIZE
from memvirt.migrate.codec import CHOICES
from memvirt.migrate.precopy import Round
from memvirt.migrate.protocol import (
    DEFAULT_PORT,
    HANDSHAKE_TIMEOUT,
    SECRET_ENV,
    SECRET_FORMS,
    check_insecure,
    load_secret,
    parse_endpoint,
)
from memvirt.units import parse_size

SecretOpt = Annotated[
    Path | None,
    typer.Option(
        "--secret-file",
        help=(
            f"File holding the shared secret, mode 0600 (else ${SECRET_ENV}, which memvirt removes from its "
            f"environment at once); both ends need the same: {SECRET_FORMS}."
        ),
    ),
]
InsecureOpt = Annotated[
    bool,
    typer.Option(
        "--insecure",
        help=("No shared secret: peers are not authenticated nor the stream hidden. Loopback addresses only."),
    ),
]


class DirtyChoice(StrEnum):
    auto = "auto"
    uffd_wp = "uffd-wp"
    fingerprint = "fingerprint"


class VerifyChoice(StrEnum):
    digest = "digest"
    full = "full"


def migrate(
    name: Annotated[str, typer.Argument(help="VM to migrate (started with --ram shared).")],
    to: Annotated[str, typer.Option("--to", help="The receiver, HOST:PORT.")],
    as_: Annotated[str | None, typer.Option("--as", help="Name of the VM on the target (default: the same).")] = None,
    downtime: Annotated[float, typer.Option(help="Downtime target in ms (QEMU's default 300).")] = 300.0,
    codec: Annotated[str, typer.Option(help=f"Page compression: {', '.join(CHOICES)}.")] = "auto",
    free: Annotated[bool, typer.Option("--elide-free/--no-elide-free", help="Skip pages the guest holds free.")] = True,
    max_rounds: Annotated[int, typer.Option(help="Most precopy rounds before the switch-over.")] = 30,
    max_bandwidth: Annotated[str, typer.Option(help="Most bytes per second to send, e.g. 100M (0: no cap).")] = "0",
    dirty: Annotated[
        DirtyChoice, typer.Option(help="How later rounds find changed pages: the write tracker or fingerprints.")
    ] = DirtyChoice.auto,
    verify: Annotated[
        VerifyChoice,
        typer.Option(help="digest: the target checks what it received; full: also every page in use at the pause."),
    ] = VerifyChoice.digest,
    secret_file: SecretOpt = None,
    insecure: InsecureOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Live-migrate a VM to a 'memvirt receive' endpoint: memvirt moves the RAM (free pages skipped,
    zero pages as markers, duplicates as references, the rest compressed), QEMU only device state.

    On success the source VM is stopped; on any failure it keeps running here, unchanged.
    """
    from memvirt.migrate.sender import migrate as run

    secret = load_secret(secret_file, insecure)
    host, port = parse_endpoint(to)
    if secret is None:
        check_insecure(host)

    def progress(st: Round) -> None:
        if not json_:
            tag = "final" if st.final else f"round {st.index + 1}"
            err.print(
                f"{tag}: {st.changed} changed"
                + (f" of {st.written} written" if st.written else "")
                + f", {st.free} free, sent {st.data} data, {st.zero} zero, "
                f"{st.dup} dup, {st.discarded} punched, {human(st.wire_bytes)} in {st.seconds * 1000:.0f} ms"
                + (f", guest throttled {st.throttle:.0%}" if st.throttle else "")
            )

    report = run(
        name,
        host,
        port,
        secret,
        as_,
        downtime / 1000,
        codec,
        free,
        max_rounds,
        progress,
        parse_size(max_bandwidth),
        dirty.value,
        verify.value,
    )
    if report.notice and not json_:
        err.print(report.notice)
    if json_:
        emit_json(report.to_json())
        return
    pages = report.pages()
    out.print(f"[bold]{name}[/] -> {report.target} at {report.peer}: running there ({report.stop_reason})")
    table(
        None,
        ["", "VALUE"],
        [
            ["rounds", f"{len(report.rounds)} ({report.dirty_method})"],
            ["pages sent as data", f"{pages['data']} ({human(pages['data'] * PAGE_SIZE)})"],
            ["zero pages (markers)", pages["zero"]],
            ["duplicates (references)", pages["dup"]],
            ["free at pause (not sent)", pages["free_final"]],
            ["punched (became free)", pages["discarded"]],
            ["bytes on the wire", human(report.wire_bytes)],
            ["device state", human(report.devstate_bytes)],
            ["codecs", ", ".join(f"{k} x{v}" for k, v in report.codecs.items()) or "-"],
            ["total time", f"{report.total_seconds:.2f} s"],
            ["downtime", f"{report.downtime_seconds * 1000:.0f} ms (target {report.downtime_target * 1000:.0f} ms)"],
            ["guest throttled (auto-converge)", f"up to {report.max_throttle:.0%}" if report.max_throttle else "no"],
        ],
    )


def receive(
    listen: Annotated[
        str, typer.Option("--listen", help="HOST:PORT to listen on (default loopback).")
    ] = f"127.0.0.1:{DEFAULT_PORT}",
    count: Annotated[int, typer.Option(help="Migrations to accept before exiting.")] = 1,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 600.0,
    handshake_timeout: Annotated[
        float,
        typer.Option(help="Seconds a connecting peer has to prove the shared secret; a slow or silent one is dropped."),
    ] = HANDSHAKE_TIMEOUT,
    hold_file: Annotated[
        Path | None,
        typer.Option(hidden=True, help="Test hook: hold a verified, paused target until this file is removed."),
    ] = None,
    secret_file: SecretOpt = None,
    insecure: InsecureOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Receive migrations: start a matching VM waiting for device state on a fresh RAM file, fill
    it, verify, resume it. Peers without the shared secret are refused; a failed migration's
    partial VM is removed, never resumed."""
    from memvirt.migrate.receiver import serve

    secret = load_secret(secret_file, insecure)
    host, port = parse_endpoint(listen)
    if secret is None:
        check_insecure(host)

    def log(msg: str) -> None:
        err.print(f"memvirt receive: {msg}", markup=False, highlight=False)

    def listening(h: str, p: int) -> None:
        log(f"listening on {h}:{p}{' (INSECURE: no authentication)' if secret is None else ''}")

    results = serve(host, port, secret, count, timeout, hold_file, log, listening, handshake_timeout)
    if json_:
        emit_json([r.__dict__ for r in results])
    else:
        for r in results:
            out.print(
                f"{r.name}: {'running' if r.ok else 'failed: ' + r.error} ({r.rounds} rounds, "
                f"{human(r.bytes_received)} received, {r.seconds:.2f} s)"
            )


def demo_migration(name: str) -> dict[str, dict[str, Any]]:
    """For ``memvirt demo``: migrate VM ``name`` with memvirt (to a separate receiver process, with a
    one-off secret), then the result with QEMU's own precopy; stops every VM it made, ``name`` too.
    QEMU's migration listens unauthenticated on a loopback port for its few seconds (as QEMU's
    ``tcp:`` transport always does): any local process could connect to it meanwhile."""
    import os
    import re
    import secrets
    import subprocess

    from memvirt.migrate.qemu_native import qemu_migrate
    from memvirt.migrate.sender import migrate as run
    from memvirt.qemu.vm import VM

    secret = secrets.token_hex(32)
    env = {**os.environ, "MEMVIRT_SECRET": secret}
    rx = subprocess.Popen(
        [sys.executable, "-m", "memvirt", "receive", "--listen", "127.0.0.1:0", "--timeout", "300"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    made = [f"{name}-m", f"{name}-q"]
    try:
        m = re.search(r":(\d+)", rx.stderr.readline() if rx.stderr else "")
        if not m:
            raise MemvirtError("the demo's receiver did not start")
        rep = run(name, "127.0.0.1", int(m.group(1)), secret.encode(), made[0])
        rx.wait(60)
        ours = {
            "bytes": rep.wire_bytes,
            "total_s": round(rep.total_seconds, 2),
            "downtime_ms": round(rep.downtime_seconds * 1000),
            "rounds": len(rep.rounds),
        }
        qemu = qemu_migrate(VM.load(made[0]), made[1])
        theirs = {k: qemu[k] for k in ("bytes", "total_s", "downtime_ms", "rounds")}
        return {"memvirt": ours, "qemu": theirs}
    finally:
        if rx.poll() is None:
            rx.kill()
        for n in made:
            try:
                VM.load(n).stop()
            except MemvirtError:
                pass


def print_demo_migration(d: dict[str, dict[str, Any]]) -> None:
    rows = [
        [k, human(float(v["bytes"])), f"{float(v['total_s']):.2f} s", f"{v['downtime_ms']} ms", v["rounds"]]
        for k, v in d.items()
    ]
    table("live migration, memvirt vs QEMU precopy", ["ENGINE", "ON THE WIRE", "TOTAL", "DOWNTIME", "ROUNDS"], rows)
