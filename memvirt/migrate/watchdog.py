"""Cleans up after a migration end that died (killed, crashed) halfway.

Receiver: run detached as ``python -m memvirt.migrate.watchdog RECEIVER_PID VM_DIR``. It exits by
itself as soon as the receiver cleared its ``incoming_by`` mark (which it does before it resumes
the target, so a target that may have run is never killed) or the VM is gone, and otherwise when
the receiver's pid is gone: then it kills the target's QEMU, which never ran a guest
instruction, and removes its RAM file and state.

Sender: ``python -m memvirt.migrate.watchdog SENDER_PID VM_DIR source``, stopped with SIGTERM when
the sender is done. If the sender dies first while the source is held (throttled, or paused for
the switch-over), it resumes the source, unless the sender had already told the target to run
(the :data:`COMMITTED` mark in VM_DIR): one guest must never run twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from memvirt.procs import pid_alive, spawn_watchdog

POLL = 0.2
COMMITTED = "migrate.committed"


def main(receiver: int, vm_dir: Path) -> None:
    from memvirt.qemu.config import VMConfig
    from memvirt.qemu.vm import VM

    while True:
        try:
            config = VMConfig.from_dict(json.loads((vm_dir / "vm.json").read_text()))
        except (OSError, ValueError, TypeError):
            return
        if config.incoming_by != receiver:
            return
        if not pid_alive(receiver):
            os.environ["MEMVIRT_HOME"] = str(vm_dir.parent.parent)
            VM.load(vm_dir.name).discard()
            return
        time.sleep(POLL)


def spawn_source_guard(vm_dir: Path) -> subprocess.Popen[bytes]:
    """Start the sender's watchdog for this process."""
    return spawn_watchdog("memvirt.migrate.watchdog", str(vm_dir), "source")


def source_main(sender: int, vm_dir: Path) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while pid_alive(sender):
        time.sleep(POLL)
    if (vm_dir / COMMITTED).exists() or not (vm_dir / "vm.json").exists():
        return
    os.environ["MEMVIRT_HOME"] = str(vm_dir.parent.parent)
    from memvirt.errors import MemvirtError
    from memvirt.qemu.vm import VM

    try:
        vm = VM.load(vm_dir.name)
        if vm.alive():
            with vm.monitor() as mon:
                if mon.status() in ("paused", "postmigrate"):
                    mon.command("cont")
    except MemvirtError:
        pass


if __name__ == "__main__":
    if sys.argv[3:] == ["source"]:
        source_main(int(sys.argv[1]), Path(sys.argv[2]))
    else:
        main(int(sys.argv[1]), Path(sys.argv[2]))
