"""Host processes by pid, and the detached watchdogs memvirt leaves behind to clean up after a
command that dies halfway (a killed migration end, a killed compression controller)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from types import FrameType


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def spawn_watchdog(module: str, *args: str) -> subprocess.Popen[bytes]:
    """``python -m module PID args...`` (PID: this process) in its own session with no stdio, so
    it outlives this process being killed."""
    return subprocess.Popen(
        [sys.executable, "-m", module, str(os.getpid()), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def end_watchdog(proc: subprocess.Popen[bytes] | None) -> None:
    """Stop a watchdog whose job is done (SIGTERM: it exits without acting)."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        proc.wait()


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so every ``finally`` runs as for Ctrl-C: limits
    lifted, host settings restored, guests this process started stopped."""


_terminated: list[bool] = []


def terminated() -> bool:
    """Whether SIGTERM reached this process (typer turns every KeyboardInterrupt into exit 130)."""
    return bool(_terminated)


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    # A second SIGTERM must not cut the clean-up the first one started (SIGKILL still works,
    # and the watchdogs cover it).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _terminated.append(True)
    raise Terminated()


def terminate_like_interrupt() -> None:
    """Make SIGTERM end this process the way Ctrl-C does (see :class:`Terminated`)."""
    signal.signal(signal.SIGTERM, _raise_terminated)
