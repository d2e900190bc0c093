"""The host end of the guest command channel over a socketpair: answers are bounded, scanned once,
and garbage is a one-line GuestError (issue 14, item 9)."""

from __future__ import annotations

import base64
import socket
import threading
import time
from pathlib import Path

import pytest

from memvirt.errors import GuestError
from memvirt.qemu.channel import MAX_ANSWER, GuestChannel, Result
from memvirt.qemu.vm import VM, VMConfig

_KEEP: list[socket.socket] = []
"""Guest ends kept open for the session (a closed end would read as QEMU gone)."""


def _serve(data: bytes, chunk: int = 1 << 16) -> socket.socket:
    """The host end of a socketpair whose guest end sends ``data`` (from a thread) and stays open."""
    host, guest = socket.socketpair()

    def send() -> None:
        try:
            for i in range(0, len(data), chunk):
                guest.sendall(data[i : i + chunk])
        except OSError:
            pass

    t = threading.Thread(target=send, daemon=True)
    t.start()
    _KEEP.append(guest)
    return host


def _answer(req: str, rc: int, out: bytes) -> bytes:
    return f"{req} {rc} ".encode() + base64.b64encode(out) + b"\n"


def _chan(max_answer: int = MAX_ANSWER) -> GuestChannel:
    return GuestChannel(Path("/nonexistent"), Path("/nonexistent"), "t", max_answer)


def test_skips_stale_answers_and_reads_split_lines() -> None:
    data = _answer("old", 0, b"stale") + b"junk line\n" + _answer("abc", 3, b"hello\nworld")
    sock = _serve(data, chunk=1)
    assert _chan()._await(sock, "abc", time.monotonic() + 10) == Result(3, b"hello\nworld")


def test_big_answer_is_linear() -> None:
    """48 MiB of answer (cap raised): one pass over the buffer; the old bytes-concatenation and
    rescan took about 20 s for this."""
    out = bytes(range(256)) * (36 << 12)
    data = _answer("abc", 0, out)
    assert len(data) > 48 << 20
    sock = _serve(data, chunk=1 << 20)
    t = time.monotonic()
    assert _chan(64 << 20)._await(sock, "abc", time.monotonic() + 60).output == out
    assert time.monotonic() - t < 5


def test_answer_over_cap_is_refused_quickly() -> None:
    sock = _serve(b"abc 0 " + b"A" * (40 << 20))
    t = time.monotonic()
    with pytest.raises(GuestError, match=r"answer over 16 MiB") as e:
        _chan()._await(sock, "abc", time.monotonic() + 60)
    assert "\n" not in str(e.value)
    assert time.monotonic() - t < 5


def test_endless_stale_lines_do_not_accumulate() -> None:
    """Many complete lines (not ours) are dropped as they are read: only the cap on one line counts."""
    data = b"".join(_answer("old", 0, b"x" * 1000) for _ in range(30000)) + _answer("abc", 0, b"ok")
    assert len(data) > 2 << 20
    sock = _serve(data)
    assert _chan(1 << 20)._await(sock, "abc", time.monotonic() + 30).output == b"ok"


@pytest.mark.parametrize("line", [b"abc x aGk=\n", b"abc 0 !!notbase64!!\n", b"abc 0 aGk\n"])
def test_malformed_answer_is_one_line(line: bytes) -> None:
    with pytest.raises(GuestError, match="malformed answer"):
        _chan()._await(_serve(line), "abc", time.monotonic() + 10)


def test_timeout_and_close() -> None:
    host, guest = socket.socketpair()
    with pytest.raises(GuestError, match="did not answer within the timeout"):
        _chan()._await(host, "abc", time.monotonic() + 0.2)
    guest.close()
    with pytest.raises(GuestError, match="closed"):
        _chan()._await(host, "abc", time.monotonic() + 5)


@pytest.mark.parametrize("text", [b"", b"\n", b"sh: not found\n", b"12abc\n"])
def test_exec_background_garbage_pid(text: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    vm = VM(VMConfig(name="fake", memory=64 << 20))
    monkeypatch.setattr(vm, "exec", lambda *a, **k: Result(0, text))
    with pytest.raises(GuestError, match="gave no process id"):
        vm.exec_background("sleep 1", "/tmp/log")
