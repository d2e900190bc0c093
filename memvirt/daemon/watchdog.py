"""Resumes a guest the daemon paused if the daemon dies inside the pause (SIGKILL, a crash).

Free-page reclaim stops the guest for a few milliseconds at a time; :class:`memvirt.dedup.reclaim.Reclaimer`
resumes it in a ``finally``, which a SIGKILL skips. So around each pass the daemon keeps a
journal entry ``run_dir()/pausing/NAME.json`` (the VM's QMP socket), and this watchdog, started
detached as ``python -m memvirt.daemon.watchdog PID DIR``, sends ``cont`` to each journalled VM
that QEMU reports ``paused`` once PID is gone. A pass only starts on a running guest, so a
journalled guest found paused was paused by the daemon (an operator's pause in the same
milliseconds is the one case it would undo). Caps and KSM have their own watchdogs.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

from memvirt.procs import pid_alive, spawn_watchdog

POLL = 0.2


def spawn(journal: Path):
    return spawn_watchdog("memvirt.daemon.watchdog", str(journal))


def resume_journalled(journal: Path) -> list[str]:
    """``cont`` every journalled VM QEMU reports paused; the names resumed. Entries are used up."""
    from memvirt.errors import MemvirtError
    from memvirt.qemu.monitor import Monitor

    resumed = []
    for f in sorted(journal.glob("*.json")) if journal.is_dir() else []:
        try:
            rec = json.loads(f.read_text()[:4096])
            qmp, name = Path(str(rec["qmp"])), str(rec["name"])
            with Monitor(qmp, name, timeout=5) as mon:
                if mon.status() == "paused":
                    mon.command("cont")
                    resumed.append(name)
        except (OSError, ValueError, KeyError, TypeError, MemvirtError):
            pass
        f.unlink(missing_ok=True)
    return resumed


def main(pid: int, journal: Path) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while pid_alive(pid):
        time.sleep(POLL)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    resume_journalled(journal)


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]))
