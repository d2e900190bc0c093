"""QMP through the ``qemu.qmp`` library, with its errors mapped onto memvirt's.

As qemu.qmp separates ``ExecuteError`` from ``ConnectError``, a caller can tell three failures
apart, all :class:`VMError`: :class:`QEMURefused` (QEMU answered with an error; its message and
error class kept), :class:`QEMUGone` (connection refused, socket missing, EOF: QEMU exited) and
:class:`QEMUTimeout` (no answer in time). ``TimeoutError`` is an ``OSError`` since Python 3.3, so
it must be caught before ``OSError``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from memvirt.errors import QEMUGone, QEMURefused, QEMUTimeout

logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
log = logging.getLogger(__name__)


class Monitor:
    """A synchronous QMP session with one VM."""

    def __init__(self, socket_path: Path, vm_name: str, timeout: float = 30.0):
        self.vm_name = vm_name
        self._qmp = QEMUMonitorProtocol(str(socket_path))
        try:
            self._qmp.connect()
        except (OSError, QMPError) as e:
            raise QEMUGone(f"cannot reach QEMU of VM {vm_name!r} ({e.__class__.__name__}: {e}); is it running?") from e
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
        log.debug("QMP %s %s on VM %s", name, args or "", self.vm_name)
        try:
            return self._qmp.cmd(name, **args)
        except ExecuteError as e:
            raise QEMURefused(f"QEMU refused {name} on VM {self.vm_name!r}: {e.error.error.desc}", e.error_class) from e
        except TimeoutError as e:
            raise QEMUTimeout(f"QEMU of VM {self.vm_name!r} did not answer {name} in time") from e
        except (OSError, QMPError, EOFError) as e:
            raise QEMUGone(f"lost QEMU of VM {self.vm_name!r} during {name}: {e}") from e

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
            raise QEMUGone(f"lost QEMU of VM {self.vm_name!r} while passing it a descriptor: {e}") from e
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
