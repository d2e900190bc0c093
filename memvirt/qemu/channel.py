"""The host end of the guest command channel (a virtio-serial port exposed as a unix socket).

Requests are ``ID BASE64(script)\\n``; the guest agent answers ``ID RC BASE64(output)\\n``. The ID
lets a client skip a stale answer left by a client that timed out. A lock file serialises
clients: one QEMU chardev serves one connection at a time.
"""

from __future__ import annotations

import base64
import fcntl
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from memvirt.errors import GuestError

MAX_ANSWER = 16 << 20
"""Longest answer line accepted (base64: 12 MiB of output); the guest is not trusted to stop."""


@dataclass(frozen=True)
class Result:
    """What a guest command did."""

    rc: int
    output: bytes

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")

    def check(self, what: str) -> Result:
        if self.rc != 0:
            raise GuestError(f"{what} failed in the guest (exit {self.rc}): {self.text.strip()[:300]}")
        return self


class GuestChannel:
    """Run shell commands in a guest and read their output."""

    def __init__(self, socket_path: Path, lock_path: Path, vm_name: str, max_answer: int = MAX_ANSWER):
        self.max_answer = max_answer
        self.socket_path = socket_path
        self.lock_path = lock_path
        self.vm_name = vm_name

    def run(self, script: str, timeout: float = 60.0) -> Result:
        """Run ``script`` with the guest's ``sh``; wait at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        req_id = secrets.token_hex(6)
        line = f"{req_id} {base64.b64encode(script.encode()).decode()}\n".encode()
        with open(os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            sock = self._connect(deadline)
            try:
                sock.sendall(line)
                return self._await(sock, req_id, deadline)
            finally:
                sock.close()

    def _connect(self, deadline: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            sock.connect(str(self.socket_path))
        except OSError as e:
            sock.close()
            raise GuestError(f"cannot open the command channel of VM {self.vm_name!r}: {e.strerror or e}") from e
        return sock

    def _await(self, sock: socket.socket, req_id: str, deadline: float) -> Result:
        """Read answer lines until ours; the buffer is scanned once (from where the last scan
        stopped) and bounded by :data:`MAX_ANSWER`, whatever the guest sends."""
        buf = bytearray()
        start = scanned = 0
        while True:
            while (nl := buf.find(b"\n", scanned)) >= 0:
                line, start = bytes(buf[start:nl]), nl + 1
                scanned = start
                result = self._parse(line, req_id)
                if result is not None:
                    return result
            if start:
                del buf[:start]
                start = 0
            scanned = len(buf)
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestError(f"VM {self.vm_name!r} did not answer within the timeout")
            sock.settimeout(left)
            try:
                chunk = sock.recv(1 << 16)
            except TimeoutError as e:
                raise GuestError(f"VM {self.vm_name!r} did not answer within the timeout") from e
            if not chunk:
                raise GuestError(f"the command channel of VM {self.vm_name!r} closed (did QEMU exit?)")
            buf += chunk
            if len(buf) > self.max_answer:
                raise GuestError(
                    f"VM {self.vm_name!r} sent an answer over {self.max_answer >> 20} MiB "
                    "(redirect big output to a file in the guest)"
                )

    def _parse(self, line: bytes, req_id: str) -> Result | None:
        """Our answer from ``line``, or None for another request's stale answer."""
        parts = line.split(b" ", 2)
        if len(parts) != 3 or parts[0] != req_id.encode():
            return None
        try:
            return Result(int(parts[1]), base64.b64decode(parts[2], validate=True))
        except ValueError as e:
            raise GuestError(f"VM {self.vm_name!r} sent a malformed answer") from e

    def wait_ready(self, timeout: float, alive: Callable[[], bool]) -> None:
        """Ping the agent until it answers; fail early if ``alive()`` says QEMU died."""
        deadline = time.monotonic() + timeout
        while True:
            if not alive():
                raise GuestError(f"QEMU of VM {self.vm_name!r} exited during boot")
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestError(f"VM {self.vm_name!r} did not bring up its command channel in {timeout:.0f} s")
            try:
                if self.run("echo memvirt-ok", timeout=min(2.0, left)).output.strip() == b"memvirt-ok":
                    return
            except GuestError:
                time.sleep(0.3)
