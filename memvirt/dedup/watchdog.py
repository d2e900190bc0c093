"""Resumes a guest that a reclaim paused and then died without resuming (SIGKILL, crash).

A reclaim pauses its guest many times, for milliseconds each; if it is killed inside a pause the
guest would stay paused for good. Reclaim starts this detached as ``python -m
memvirt.dedup.watchdog RECLAIM_PID VM_DIR QEMU_PID`` and stops it with SIGTERM when its pass is
done. If ``RECLAIM_PID`` goes away first, it resumes the guest, but only if the reclaim had marked
the pause as its own (:data:`MARK` in VM_DIR holds its pid): a guest the user paused stays paused.
It also closes a pidfd a borrow cut short left inside QEMU (:func:`memvirt.qemu.remote.close_stray_pidfds`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from memvirt.procs import pid_alive, spawn_watchdog

POLL = 0.2
MARK = "reclaim.paused"


def spawn(vm_dir: Path, qemu_pid: int) -> subprocess.Popen[bytes]:
    """Start the watchdog for this process."""
    return spawn_watchdog("memvirt.dedup.watchdog", str(vm_dir), str(qemu_pid))


def mark_paused(vm_dir: Path) -> None:
    """Before ``stop``: this process is about to pause the guest."""
    (vm_dir / MARK).write_text(str(os.getpid()))


def unmark(vm_dir: Path) -> None:
    """After ``cont``: the guest runs again."""
    (vm_dir / MARK).unlink(missing_ok=True)


def main(pid: int, vm_dir: Path, qemu_pid: int) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while pid_alive(pid):
        time.sleep(POLL)
    if not pid_alive(qemu_pid):
        return
    from memvirt.errors import MemvirtError

    try:
        from memvirt.qemu.remote import close_stray_pidfds

        close_stray_pidfds(qemu_pid)
    except MemvirtError:
        pass
    mark = vm_dir / MARK
    try:
        ours = mark.read_text().strip() == str(pid)
    except OSError:
        return
    if not ours:
        return
    os.environ["MEMVIRT_HOME"] = str(vm_dir.parent.parent)
    from memvirt.qemu.vm import VM

    try:
        if vm_dir.parent.name == "libvirt":  # a libvirt domain (memvirt/virt/): resumed through libvirt
            from memvirt.virt.domain import set_uri

            set_uri((vm_dir / "uri").read_text().strip())
            vm = VM.load("libvirt:" + vm_dir.name)
        else:
            vm = VM.load(vm_dir.name)
        if vm.config.pid == qemu_pid and vm.alive():
            with vm.monitor() as mon:
                if mon.status() == "paused":
                    mon.command("cont")
        mark.unlink(missing_ok=True)
    except (MemvirtError, OSError):
        pass


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
