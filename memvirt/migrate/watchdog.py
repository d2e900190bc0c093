"""Removes a partial migration target whose receiver died (killed, crashed) before it ran.

Run detached by the receiver as ``python -m memvirt.migrate.watchdog RECEIVER_PID VM_DIR``. It
exits by itself as soon as the target runs (the receiver cleared its ``incoming_by`` mark) or is
gone, and otherwise when the receiver's pid is gone: then it kills the target's QEMU, which never
ran a guest instruction, and removes its RAM file and state.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

POLL = 0.2


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def main(receiver: int, vm_dir: Path) -> None:
    from memvirt.migrate.receiver import INCOMING
    from memvirt.qemu.vm import VM

    while True:
        try:
            config = json.loads((vm_dir / "vm.json").read_text())
        except (OSError, ValueError):
            return
        if config.get("extra", {}).get(INCOMING) != receiver:
            return
        if not _alive(receiver):
            os.environ["MEMVIRT_HOME"] = str(vm_dir.parent.parent)
            VM.load(vm_dir.name).discard()
            return
        time.sleep(POLL)


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]))
