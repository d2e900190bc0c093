"""The control socket: ``memvirt status`` asks the daemon over a local Unix socket.

The socket is created mode 0600 in a 0700 folder (``state_home()/memvirtd`` unless told), so only
its owner (root for the system service) may talk to it, as with libvirtd's socket. One request
per connection, a line of at most 256 bytes (``status``), answered with one JSON document;
a client gets 2 s to send it.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from memvirt.errors import MemvirtError, UsageError
from memvirt.paths import state_home

MAX_REQUEST = 256
MAX_REPLY = 16 << 20


def run_dir() -> Path:
    d = state_home() / "memvirtd"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    return d


def default_socket() -> Path:
    return run_dir() / "control.sock"


class ControlServer:
    """Answers ``status`` requests from a thread with ``handler()``'s JSON."""

    def __init__(self, path: Path, handler: Callable[[], dict[str, Any]]):
        self.path, self.handler = Path(path), handler
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            self.sock.bind(str(self.path))
        except OSError as e:
            raise UsageError(f"cannot create the control socket {self.path}: {e.strerror}") from e
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self.sock.listen(8)
        self._stop = False
        self.thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.settimeout(2.0)
                    req = b""
                    while b"\n" not in req and len(req) <= MAX_REQUEST:
                        chunk = conn.recv(MAX_REQUEST)
                        if not chunk:
                            break
                        req += chunk
                    cmd = req.split(b"\n", 1)[0].strip().decode("ascii", "replace")
                    try:
                        reply = self.handler() if cmd == "status" else {"error": f"unknown request {cmd[:40]!r}"}
                    except Exception as e:
                        reply = {"error": f"status failed: {e}"}
                    conn.sendall(json.dumps(reply, default=str).encode() + b"\n")
                except OSError:
                    continue

    def close(self) -> None:
        self._stop = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.path.unlink(missing_ok=True)


def query(path: Path, request: str = "status", timeout: float = 10.0) -> dict[str, Any]:
    """Ask the daemon; a one-line error when none answers there."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(request.encode() + b"\n")
            data = b""
            while len(data) <= MAX_REPLY:
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
    except FileNotFoundError:
        raise UsageError(f"no memvirtd control socket at {path}: is the daemon running?") from None
    except ConnectionRefusedError:
        raise UsageError(f"nothing answers at {path}: the daemon is not running (stale socket)") from None
    except PermissionError:
        raise UsageError(f"no permission to talk to the daemon at {path} (it is root's: run as root)") from None
    except (TimeoutError, OSError) as e:
        raise MemvirtError(f"the daemon at {path} did not answer: {e}") from e
    try:
        reply = json.loads(data)
    except ValueError:
        raise MemvirtError(f"the daemon at {path} sent a malformed answer") from None
    if not isinstance(reply, dict):
        raise MemvirtError(f"the daemon at {path} sent a malformed answer")
    return reply
