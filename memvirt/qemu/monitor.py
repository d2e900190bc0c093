"""QMP through the ``qemu.qmp`` library, with its errors mapped onto memvirt's.

"QEMU refused" (an ``ExecuteError``) becomes a :class:`VMError` carrying QEMU's own message;
"QEMU is gone" (connection refused, socket missing, EOF) becomes a :class:`VMError` that says so.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from memvirt.errors import VMError

logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


class Monitor:
    """A synchronous QMP session with one VM."""

    def __init__(self, socket_path: Path, vm_name: str, timeout: float = 30.0):
        self.vm_name = vm_name
        self._qmp = QEMUMonitorProtocol(str(socket_path))
        try:
            self._qmp.connect()
        except (TimeoutError, OSError, QMPError) as e:
            raise VMError(
                f"cannot reach QEMU of VM {vm_name!r} ({e.__class__.__name__}: {e}); is it running?"
            ) from None
        self._qmp.settimeout(timeout)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._qmp.close()
        except (TimeoutError, OSError, EOFError, QMPError, RuntimeError):
            pass

    def command(self, name: str, timeout: float | None = None, **args: Any) -> Any:
        """Run a QMP command and return its result."""
        if timeout is not None:
            self._qmp.settimeout(timeout)
        try:
            return self._qmp.cmd(name, **args)
        except ExecuteError as e:
            raise VMError(f"QEMU refused {name} on VM {self.vm_name!r}: {e}") from None  # str() is error.error.desc
        except (OSError, QMPError, EOFError) as e:
            raise VMError(f"lost QEMU of VM {self.vm_name!r} during {name}: {e}") from None
        except TimeoutError:
            raise VMError(f"QEMU of VM {self.vm_name!r} did not answer {name} in time") from None

    def hmp(self, line: str) -> str:
        """A human-monitor command, for the few things QMP lacks."""
        args: dict[str, Any] = {"command-line": line}
        return str(self.command("human-monitor-command", **args))

    def status(self) -> str:
        return str(self.command("query-status")["status"])

    def send_fd(self, fd: int, name: str) -> None:
        """Hand QEMU a copy of descriptor ``fd`` (SCM_RIGHTS on the QMP socket) as ``name``, for
        ``fd:NAME`` URIs: no ``exec:`` shell forked from QEMU."""
        try:
            self._qmp.send_fd_scm(fd)
        except (OSError, QMPError) as e:
            raise VMError(f"lost QEMU of VM {self.vm_name!r} while passing it a descriptor: {e}") from None
        self.command("getfd", fdname=name)

    def set_capabilities(self, **states: bool) -> None:
        """``migrate-set-capabilities``, named as keywords (``x_ignore_shared=True`` for QEMU's
        ``x-ignore-shared``): the one place the capability list is spelled out."""
        caps = [{"capability": k.replace("_", "-"), "state": v} for k, v in states.items()]
        self.command("migrate-set-capabilities", capabilities=caps)

    def wait_event(self, name: str, timeout: float) -> dict[str, Any] | None:
        """The next event called ``name`` within ``timeout`` seconds, or None."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                ev = self._qmp.pull_event(wait=left)
            except TimeoutError:
                return None
            if ev and ev.get("event") == name:
                return ev
        return None
