"""Stops the guests a process started when that process dies without stopping them (SIGKILL,
a crash): no QEMU and no RAM file in /dev/shm outlives the command or test session that made it.

Run detached (:func:`spawn`) as ``python -m memvirt.qemu.reaper PID PREFIX [DIR...]``: once
``PID`` is gone it stops every VM of this state home whose name is ``PREFIX`` or starts with
``PREFIX-`` (``PREFIX`` ``*``: every VM), then removes the ``DIR``\\s. SIGTERM ends it without
acting: the owner stopped its guests itself.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

from memvirt.procs import pid_alive, spawn_watchdog

POLL = 0.5
EVERY = "*"


def spawn(prefix: str, *dirs: str) -> subprocess.Popen[bytes]:
    """Start the reaper for this process's guests named ``prefix``/``prefix-*`` (``*``: all)."""
    return spawn_watchdog("memvirt.qemu.reaper", prefix, *dirs)


def _ours(name: str, prefix: str) -> bool:
    return prefix == EVERY or name == prefix or name.startswith(prefix + "-")


def existing() -> set[str]:
    """Names of the VMs this state home holds now (to leave them out of a later :func:`reap`)."""
    from memvirt.qemu.vm import vms_root

    return {d.name for d in vms_root().iterdir() if (d / "vm.json").exists()}


def reap(prefix: str, keep: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Stop the VMs of this state home that match ``prefix``, except those in ``keep``; their names."""
    from memvirt.errors import MemvirtError
    from memvirt.qemu.vm import registry

    stopped = []
    for vm in registry():  # skips (and logs) a VM whose state is corrupt
        if not _ours(vm.name, prefix) or vm.name in keep:
            continue
        try:  # one half-removed VM must not keep the others running
            vm.stop(force=True)
            stopped.append(vm.name)
        except MemvirtError:
            continue
    return stopped


def main(pid: int, prefix: str, dirs: list[str]) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while pid_alive(pid):
        time.sleep(POLL)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    reap(prefix)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3:])
