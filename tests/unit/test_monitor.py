"""QMP failures told apart against a fake QMP server on a Unix socket: QEMU refused (its error
class kept), QEMU gone (socket missing, connection dropped) and QEMU too slow (a timeout is not
"lost QEMU")."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from memvirt.errors import QEMUGone, QEMURefused, QEMUTimeout, VMError
from memvirt.qemu.monitor import Monitor

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}


def _serve(server: socket.socket, stop: threading.Event) -> None:
    """One client at a time; answers by command name: ``refuse-me`` errors, ``hang`` never
    answers, ``die`` closes the connection, anything else returns ``{}``."""
    server.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = server.accept()
        except TimeoutError:
            continue
        with conn:
            conn.sendall(json.dumps(GREETING).encode() + b"\n")
            for msg in _messages(conn):
                name, reply = msg.get("execute"), {"return": {}}
                if name == "refuse-me":
                    reply = {"error": {"class": "DeviceNotActive", "desc": "No balloon device has been activated"}}
                elif name == "hang":
                    continue
                elif name == "die":
                    break
                if "id" in msg:
                    reply["id"] = msg["id"]
                conn.sendall(json.dumps(reply).encode() + b"\n")


def _messages(conn: socket.socket) -> Iterator[dict[str, Any]]:
    """JSON objects as the client sends them (qemu.qmp ends them with no newline, as QEMU allows)."""
    buf, decoder = "", json.JSONDecoder()
    while data := conn.recv(65536):
        buf += data.decode()
        while buf.strip():
            try:
                msg, end = decoder.raw_decode(buf.lstrip())
            except ValueError:
                break
            buf = buf.lstrip()[end:]
            yield msg


@pytest.fixture
def qmp(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "qmp.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    stop = threading.Event()
    t = threading.Thread(target=_serve, args=(server, stop), daemon=True)
    t.start()
    yield path
    stop.set()
    t.join(5)
    server.close()


def test_an_answer_is_returned(qmp: Path) -> None:
    with Monitor(qmp, "fake", timeout=5) as mon:
        assert mon.command("query-anything") == {}


def test_refused_keeps_qemus_message_and_class(qmp: Path) -> None:
    with Monitor(qmp, "fake", timeout=5) as mon, pytest.raises(QEMURefused) as info:
        mon.command("refuse-me")
    assert str(info.value) == "QEMU refused refuse-me on VM 'fake': No balloon device has been activated"
    assert info.value.error_class == "DeviceNotActive"


def test_a_timeout_is_not_lost_qemu(qmp: Path) -> None:
    with Monitor(qmp, "fake", timeout=5) as mon, pytest.raises(QEMUTimeout) as info:
        mon.command("hang", timeout=0.3)
    assert str(info.value) == "QEMU of VM 'fake' did not answer hang in time"
    assert isinstance(info.value.__cause__, TimeoutError)


def test_a_dropped_connection_is_qemu_gone(qmp: Path) -> None:
    with Monitor(qmp, "fake", timeout=5) as mon, pytest.raises(QEMUGone, match="lost QEMU of VM 'fake' during die"):
        mon.command("die")


def test_no_socket_is_qemu_gone(tmp_path: Path) -> None:
    with pytest.raises(QEMUGone, match=r"cannot reach QEMU of VM 'fake' .*; is it running\?") as info:
        Monitor(tmp_path / "missing.sock", "fake")
    assert isinstance(info.value, VMError) and info.value.__cause__ is not None
