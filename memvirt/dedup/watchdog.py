"""Resumes a guest that a reclaim paused and then died without resuming (SIGKILL, crash).

A reclaim pauses its guest many times, for milliseconds each; if it is killed inside a pause the
guest would stay paused for good. Before each ``stop`` the reclaim writes a *pause mark* (a small
JSON file: its own pid, the QEMU pid and QMP socket) and removes it after ``cont``. A watchdog,
started detached as ``python -m memvirt.dedup.watchdog GUARDED_PID PATH``, waits for
``GUARDED_PID`` to go away, then resumes every guest whose mark under ``PATH`` (one mark file,
or a folder of them) names that pid, if QEMU reports it ``paused``. A guest the user paused
carries no mark of the dead process and stays paused. It also closes a pidfd a borrow cut short
left inside QEMU (:func:`memvirt.qemu.remote.close_stray_pidfds`).

One mechanism serves both users: ``memvirt reclaim`` runs a watchdog per pass over the mark
``VM_DIR/reclaim.paused``; memvirtd runs one for its whole life over its folder of marks
(``memvirtd/pausing/``), so a pass costs no process start, and attached VMs (which share one
folder) get marks of their own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memvirt.procs import pid_alive, spawn_watchdog

POLL = 0.2
MARK = "reclaim.paused"
MAX_MARK = 4096


@dataclass(frozen=True)
class PauseMark:
    """Who paused which guest: the pausing process, the QEMU process and its QMP socket."""

    pid: int
    qemu_pid: int
    qmp: str
    name: str = ""
    libvirt: str = ""
    """The connection URI of a libvirt domain (``libvirt:NAME``), resumed through libvirt."""


def spawn(path: Path) -> subprocess.Popen[bytes]:
    """Start the watchdog for this process over ``path`` (a mark file, or a folder of marks)."""
    return spawn_watchdog("memvirt.dedup.watchdog", str(path))


def mark_paused(path: Path, vm, pid: int | None = None) -> None:
    """Before ``stop``: this process (or ``pid``) is about to pause ``vm``."""
    rec = {"pid": pid or os.getpid(), "qemu_pid": vm.config.pid, "qmp": str(vm.qmp_path), "name": vm.name}
    if getattr(vm, "uri", None):
        rec["libvirt"] = vm.uri
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(rec))
    tmp.replace(path)


def unmark(path: Path) -> None:
    """After ``cont``: the guest runs again."""
    path.unlink(missing_ok=True)


def read_mark(path: Path) -> PauseMark | None:
    """The mark at ``path``, or None when absent or not a mark (a corrupt one is never acted on)."""
    try:
        rec = json.loads(path.read_text()[:MAX_MARK])
        return PauseMark(
            int(rec["pid"]),
            int(rec["qemu_pid"]),
            str(rec["qmp"]),
            str(rec.get("name", "")),
            str(rec.get("libvirt", "")),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def marks(path: Path) -> list[Path]:
    """The mark files at ``path``: itself, or the ``*.json`` of a folder."""
    if path.is_dir():
        return sorted(path.glob("*.json"))
    return [path] if path.exists() else []


def resume_marked(dead: int, path: Path) -> list[str]:
    """Resume each guest marked paused by ``dead`` (a process that is gone) that QEMU reports
    paused; the marks of ``dead`` are used up. Returns the names resumed."""
    from memvirt.errors import MemvirtError

    resumed = []
    for f in marks(path):
        m = read_mark(f)
        if m is None or m.pid != dead:
            continue
        try:
            if pid_alive(m.qemu_pid):
                try:
                    from memvirt.qemu.remote import close_stray_pidfds

                    close_stray_pidfds(m.qemu_pid)
                except MemvirtError:
                    pass
                with _monitor(m) as mon:
                    if mon.status() == "paused":
                        mon.command("cont")
                        resumed.append(m.name or str(m.qemu_pid))
        except (OSError, MemvirtError):
            pass
        f.unlink(missing_ok=True)
    return resumed


def _monitor(m: PauseMark) -> Any:
    """QEMU's monitor, or libvirt's for a libvirt domain (memvirt/virt/: cont is libvirt's resume)."""
    from memvirt.qemu.monitor import Monitor

    if m.libvirt:
        from memvirt.virt.domain import LibvirtVM

        return LibvirtVM(m.name, m.libvirt).monitor()
    return Monitor(Path(m.qmp), m.name or f"pid {m.qemu_pid}", timeout=5)


def main(pid: int, path: Path) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while pid_alive(pid):
        time.sleep(POLL)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    resume_marked(pid, path)


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]))
