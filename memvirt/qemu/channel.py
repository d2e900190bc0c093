"""The host end of the guest command channel (a virtio-serial port exposed as a unix socket).

Requests are ``ID BASE64(script)\\n``; the guest agent answers ``ID RC BASE64(output)\\n``. The ID
lets a client skip a stale answer left by a client that timed out. A lock file serialises
clients: one QEMU chardev serves one connection at a time.
"""

from __future__ import annotations

import base64
import fcntl
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from memvirt.errors import GuestError


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

    def __init__(self, socket_path: Path, lock_path: Path, vm_name: str):
        self.socket_path = socket_path
        self.lock_path = lock_path
        self.vm_name = vm_name

    def run(self, script: str, timeout: float = 60.0) -> Result:
        """Run ``script`` with the guest's ``sh``; wait at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        req_id = secrets.token_hex(6)
        line = f"{req_id} {base64.b64encode(script.encode()).decode()}\n".encode()
        with open(self.lock_path, "a+") as lock:
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
            raise GuestError(f"cannot open the command channel of VM {self.vm_name!r}: {e.strerror or e}") from None
        return sock

    def _await(self, sock: socket.socket, req_id: str, deadline: float) -> Result:
        buf = b""
        while True:
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                parts = line.split(b" ", 2)
                if len(parts) == 3 and parts[0].decode(errors="replace") == req_id:
                    try:
                        return Result(int(parts[1]), base64.b64decode(parts[2]))
                    except ValueError:
                        raise GuestError(f"VM {self.vm_name!r} sent a malformed answer") from None
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestError(f"VM {self.vm_name!r} did not answer within the timeout")
            sock.settimeout(left)
            try:
                chunk = sock.recv(1 << 16)
            except TimeoutError:
                raise GuestError(f"VM {self.vm_name!r} did not answer within the timeout") from None
            if not chunk:
                raise GuestError(f"the command channel of VM {self.vm_name!r} closed (did QEMU exit?)")
            buf += chunk

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
