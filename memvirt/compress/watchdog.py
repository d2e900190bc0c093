"""Undoes what a compression controller set up if it dies without cleaning up (SIGKILL, crash).

A VM left under a memory cap by a dead controller would stall the moment its working set grows
(memvirt caps wait instead of OOM-killing), and a kdamond left on blocks every later DAMON user.
The controller starts this detached as ``python -m memvirt.compress.watchdog PID N TIER GROUP...``
(``N``: how many kdamonds it created, 0 for none; ``TIER`` 1 if the command set up the zram
tier itself; each ``GROUP`` as ``PATH=LIMIT``, the cap it had before) and stops it with SIGTERM after its own
clean-up; if ``PID`` goes away first, the
watchdog puts the groups' caps back as they were, removes those kdamonds, and only those
(:func:`memvirt.compress.damon.release`: another tool's stay as they are), and takes down the
tier the command set up, so the host's swap is as it was before the command.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from memvirt.procs import pid_alive, spawn_watchdog

POLL = 0.5


def spawn(groups: list[str], kdamonds: int, tier: bool = False) -> subprocess.Popen[bytes]:
    """Start the watchdog for this process."""
    return spawn_watchdog("memvirt.compress.watchdog", str(kdamonds), "1" if tier else "0", *groups)


def main(pid: int, kdamonds: int, tier: bool, groups: list[str]) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while pid_alive(pid):
        time.sleep(POLL)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from memvirt.compress.damon import release
    from memvirt.errors import MemvirtError
    from memvirt.qemu.memcg import UNLIMITED, MemCgroup

    for arg in groups:
        path, _, found = arg.rpartition("=")
        group = MemCgroup.load(path)
        if group is not None:
            limit = int(found) if found.isdigit() else UNLIMITED
            try:
                group.set_limit(None if limit >= UNLIMITED else limit)
            except MemvirtError:
                pass
    if kdamonds:
        release(kdamonds)
    if tier:
        from memvirt.compress import tiers

        try:
            tiers.down()
        except MemvirtError:
            pass


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4:])
