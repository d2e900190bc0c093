"""Host processes by pid, and the detached watchdogs memvirt leaves behind to clean up after a
command that dies halfway (a killed migration end, a killed compression controller)."""

from __future__ import annotations

import os
import subprocess
import sys


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
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )


def end_watchdog(proc: subprocess.Popen[bytes] | None) -> None:
    """Stop a watchdog whose job is done (SIGTERM: it exits without acting)."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        proc.wait()
