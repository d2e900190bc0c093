"""Host-wide settings memvirt changes for a while, and gives back however it ends.

KSM's knobs (and any other sysfs or procfs value) belong to the host: other tools (ksmtuned, an
operator) may own them. :class:`Borrowed` writes a setting only after recording its previous
value in a journal (``state_home()/borrowed/NAME-PID.json``), and on :meth:`Borrowed.restore`
puts back each one that still holds what memvirt wrote; one that changed since is someone
else's now and stays as it is. :meth:`Borrowed.check` tells whether another tool changed a
setting memvirt is holding, so a command can stop instead of fighting it.

The journal makes the restore survive memvirt's death: :meth:`Borrowed.guard` starts a detached
watchdog (``python -m memvirt.borrow PID JOURNAL``) that restores from it if the process dies
before restoring itself (SIGKILL, a crash); Ctrl-C and SIGTERM unwind through ``finally``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from memvirt.errors import MemvirtError, UsageError
from memvirt.paths import state_home
from memvirt.procs import end_watchdog, pid_alive, spawn_watchdog

POLL = 0.5


def _read(path: Path) -> str:
    return path.read_text().split("\n", 1)[0].strip()


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(f"{value}\n")
    except PermissionError as e:
        raise UsageError(f"no permission to change {path}: run as root") from e
    except OSError as e:
        raise MemvirtError(f"setting {path} to {value} failed: {e.strerror}") from e


class Borrowed:
    """Settings this process has changed: their previous values and what it wrote."""

    def __init__(self, name: str):
        folder = state_home() / "borrowed"
        folder.mkdir(mode=0o700, exist_ok=True)
        self.journal = folder / f"{name}-{os.getpid()}.json"
        self.before: dict[str, str] = {}
        self.written: dict[str, str] = {}
        self._guard: subprocess.Popen[bytes] | None = None

    def set(self, path: Path, value: object) -> None:
        """Write ``value`` to ``path``, recording the previous value first (once per path)."""
        key = str(path)
        if key not in self.before:
            try:
                self.before[key] = _read(path)
            except OSError as e:
                raise MemvirtError(f"reading {path} failed: {e.strerror}") from e
        self.written[key] = str(value)
        self._save()
        _write(path, str(value))

    def check(self) -> list[tuple[str, str, str]]:
        """Settings another tool changed while held: (path, what memvirt wrote, what it is now)."""
        out = []
        for key, mine in self.written.items():
            try:
                now = _read(Path(key))
            except OSError:
                continue
            if now != mine:
                out.append((key, mine, now))
        return out

    def restore(self, order: tuple[str, ...] = ()) -> list[str]:
        """Put back every setting still as memvirt left it (paths in ``order`` last, in that order);
        the paths left alone because another tool changed them since."""
        left = _restore(self.before, self.written, order)
        self.before.clear()
        self.written.clear()
        self.journal.unlink(missing_ok=True)
        end_watchdog(self._guard)
        self._guard = None
        return left

    def guard(self, order: tuple[str, ...] = ()) -> None:
        """Start the watchdog that restores from the journal if this process dies first."""
        if self._guard is None:
            self._save()
            self._guard = spawn_watchdog("memvirt.borrow", str(self.journal), *order)

    def _save(self) -> None:
        tmp = self.journal.with_suffix(".tmp")
        tmp.write_text(json.dumps({"before": self.before, "written": self.written}))
        tmp.replace(self.journal)

    def __enter__(self) -> Borrowed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def _restore(before: dict[str, str], written: dict[str, str], order: tuple[str, ...]) -> list[str]:
    keys = [k for k in before if k not in order] + [k for k in order if k in before]
    left = []
    for key in keys:
        path = Path(key)
        try:
            now = _read(path)
        except OSError:
            continue
        if now == before[key]:
            continue
        if now != written.get(key):
            left.append(key)
            continue
        try:
            _write(path, before[key])
        except MemvirtError:
            left.append(key)
    return left


def main(pid: int, journal: Path, order: tuple[str, ...]) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while pid_alive(pid):
        time.sleep(POLL)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        state = json.loads(journal.read_text())
    except (OSError, ValueError):
        return
    _restore(state.get("before", {}), state.get("written", {}), order)
    journal.unlink(missing_ok=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]), tuple(sys.argv[3:]))
