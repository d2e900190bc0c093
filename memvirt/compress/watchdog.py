"""Undoes what a compression controller set up if it dies without cleaning up (SIGKILL, crash).

A VM left under a memory cap by a dead controller would stall the moment its working set grows
(memvirt caps wait instead of OOM-killing), and a kdamond left on blocks every later DAMON user.
The controller starts this detached as ``python -m memvirt.compress.watchdog PID DAMON GROUP...``
(``DAMON`` is 1 if it runs kdamonds) and stops it with SIGTERM after its own clean-up; if ``PID``
goes away first, the watchdog lifts the groups' caps and turns DAMON off.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from memvirt.procs import pid_alive, spawn_watchdog

POLL = 0.5


def spawn(groups: list[str], damon: bool) -> subprocess.Popen[bytes]:
    """Start the watchdog for this process."""
    return spawn_watchdog("memvirt.compress.watchdog", "1" if damon else "0", *groups)


def main(pid: int, damon: bool, groups: list[str]) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while pid_alive(pid):
        time.sleep(POLL)
    from memvirt.compress.damon import KDAMONDS
    from memvirt.errors import MemvirtError
    from memvirt.qemu.memcg import MemCgroup

    for path in groups:
        group = MemCgroup.load(path)
        if group is not None:
            try:
                group.set_limit(None)
            except MemvirtError:
                pass
    if damon:
        try:
            n = int((KDAMONDS / "nr_kdamonds").read_text())
            for i in range(n):
                (KDAMONDS / str(i) / "state").write_text("off")
            (KDAMONDS / "nr_kdamonds").write_text("0")
        except OSError:
            pass


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3:])
