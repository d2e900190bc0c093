"""The receiver's handshake deadline and concurrency, and one channel shared by sending threads,
on loopback with a real ``memvirt receive`` process (no QEMU: the good client's SETUP is one the
receiver refuses)."""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from memvirt.migrate.protocol import HANDSHAKE_TIMEOUT, HELLO, MAGIC, VERSION, Kind, PeerError, client_handshake

SECRET = secrets.token_hex(32)
LIMIT = 3.0
"""The receivers' ``--handshake-timeout`` here: shorter than the default, so the tests wait less."""
assert LIMIT < HANDSHAKE_TIMEOUT


def _receiver(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], int]:
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": str(root),
        "MEMVIRT_SECRET": SECRET,
        "MEMVIRT_HOME": str(tmp_path / "home"),
        "MEMVIRT_RAM_DIR": str(tmp_path / "ram"),
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "memvirt",
            "receive",
            "--listen",
            "127.0.0.1:0",
            "--timeout",
            "60",
            "--handshake-timeout",
            str(LIMIT),
            *args,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stderr.readline()
    m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
    assert m, line
    return proc, int(m.group(1))


def _closed_after(sock: socket.socket, t0: float, trickle: bytes) -> float:
    """Trickle ``trickle`` one byte a second until the receiver closes; seconds from ``t0``."""
    sock.settimeout(1.0)
    for b in trickle:
        try:
            sock.sendall(bytes([b]))
            if sock.recv(1) == b"":
                return time.monotonic() - t0
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - t0
    sock.settimeout(30)
    try:
        while sock.recv(4096):
            pass
    except OSError:
        pass
    return time.monotonic() - t0


def test_slow_loris_is_dropped_while_a_good_sender_gets_through(tmp_path: Path) -> None:
    rx, port = _receiver(tmp_path)
    try:
        t0 = time.monotonic()
        loris = socket.create_connection(("127.0.0.1", port))
        hello = HELLO.pack(MAGIC, VERSION, 0, os.urandom(32))
        dropped: list[float] = []
        t = threading.Thread(target=lambda: dropped.append(_closed_after(loris, t0, hello * 2)))
        t.start()
        time.sleep(1.5)
        # A good sender, while the slow one holds its connection: authenticated at once.
        t1 = time.monotonic()
        good = client_handshake(socket.create_connection(("127.0.0.1", port)), SECRET.encode(), 30)
        assert time.monotonic() - t1 < 3.0
        t.join(LIMIT + 10)
        assert dropped and LIMIT - 0.5 <= dropped[0] <= LIMIT + 3, dropped
        # The good session is still served: its SETUP (a comma in accel) is refused with a reason.
        good.send_json(
            Kind.SETUP,
            {
                "name": "hs",
                "memory": 64 << 20,
                "cpus": 1,
                "image": "x",
                "accel": "tcg,x=y",
                "regions": [{"gpa": 0, "size": 64 << 20, "offset": 0}],
            },
        )
        with pytest.raises(PeerError, match="accel"):
            good.recv(Kind.READY)
        good.close()
        assert rx.wait(30) == 1
        err = rx.stderr.read()
        assert "the handshake took over" in err and err.count("memvirt: error:") == 1, err
        assert "Traceback" not in err
    finally:
        rx.kill()
        rx.wait()
        loris.close()


def test_handshake_slots_are_bounded(tmp_path: Path) -> None:
    """Past MAX_HANDSHAKES silent peers, a newcomer is refused at once rather than queued; once
    the silent ones time out, a good sender gets through."""
    from memvirt.migrate.receiver import MAX_HANDSHAKES

    rx, port = _receiver(tmp_path)
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_HANDSHAKES)]
    try:
        time.sleep(0.5)
        extra = socket.create_connection(("127.0.0.1", port))
        extra.settimeout(3)
        t = time.monotonic()
        try:
            assert extra.recv(1) == b""
        except ConnectionResetError:
            pass
        assert time.monotonic() - t < 2.5
        time.sleep(LIMIT)
        good = client_handshake(socket.create_connection(("127.0.0.1", port)), SECRET.encode(), 30)
        good.close()
    finally:
        for s in silent:
            s.close()
        rx.kill()
        rx.wait()
    assert "handshakes already in progress" in rx.stderr.read()


def test_threads_sharing_a_channel_never_reuse_a_nonce() -> None:
    """Two threads sending on one channel: every frame opens on the other side (sequence numbers
    and the socket are taken together under the channel's lock)."""
    from memvirt.migrate.protocol import server_handshake

    srv = socket.create_server(("127.0.0.1", 0))
    key = os.urandom(32).hex().encode()
    got: list[bytes] = []
    errors: list[BaseException] = []

    def serve() -> None:
        conn, _ = srv.accept()
        chan = server_handshake(conn, key, 10)
        try:
            for _ in range(400):
                got.append(bytes(chan.recv(Kind.DATA)[1]))
        except BaseException as e:
            errors.append(e)
        conn.close()

    t = threading.Thread(target=serve)
    t.start()
    chan = client_handshake(socket.create_connection(srv.getsockname()), key, 10)

    def send(tag: int) -> None:
        for i in range(200):
            chan.send(Kind.DATA, bytes([tag]) * (100 + (i % 7) * 40000))

    senders = [threading.Thread(target=send, args=(k,)) for k in (1, 2)]
    for s in senders:
        s.start()
    for s in senders:
        s.join(60)
    t.join(60)
    chan.close()
    srv.close()
    assert not errors, errors
    assert sorted(g[0] for g in got) == [1] * 200 + [2] * 200
