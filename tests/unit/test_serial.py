"""The serial console reader keeps the log under its cap whatever the guest prints (issue 14, item 9):
run against a unix socket standing in for QEMU's chardev."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

from memvirt.qemu.serial import spawn_serial_drain


def test_console_log_is_capped_and_keeps_the_newest(tmp_path: Path) -> None:
    sock_path, log = tmp_path / "serial.sock", tmp_path / "serial.log"
    cap = 256 << 10
    drain = spawn_serial_drain(sock_path, log, cap)  # started before "QEMU" listens, as in launch_qemu
    try:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(sock_path))
        server.listen(1)
        server.settimeout(30)
        conn, _ = server.accept()
        lines = b"".join(b"line %08d\n" % i for i in range(300000))  # 4.2 MB
        conn.sendall(lines)
        conn.close()
        server.close()
        assert drain.wait(30) == 0
    finally:
        drain.kill()
    old = tmp_path / "serial.log.1"
    assert log.stat().st_size <= cap and old.stat().st_size <= cap
    assert (old.read_bytes() + log.read_bytes()).endswith(b"line 00299999\n")
    assert lines.endswith(old.read_bytes() + log.read_bytes())
    assert stat.S_IMODE(os.stat(log).st_mode) == 0o600


def test_console_tail_follows_a_rotated_log(tmp_path: Path) -> None:
    """pm's event reader keeps reading after the console reader rotated ``serial.log``."""
    from memvirt.pm.events import ConsoleTail

    log = tmp_path / "serial.log"
    log.write_bytes(b"boot noise\n" * 1000)
    tail = ConsoleTail(log, "pm-s1", ("source",))
    with log.open("ab") as f:
        f.write(b"memvirt-pm: source frozen seconds=0.01 t=1\n")
    assert [e.name for e in tail.poll()] == ["frozen"]
    os.replace(log, tmp_path / "serial.log.1")
    log.write_bytes(b"memvirt-pm: source thawed t=2\n")
    assert [e.name for e in tail.poll()] == ["thawed"]
