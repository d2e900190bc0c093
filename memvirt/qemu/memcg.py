"""One memory cgroup per VM, so the host kernel can account, limit and reclaim each guest on its own.

QEMU is started inside its VM's group: a page is charged to the group of the task that first
touched it, and this kernel no longer moves charges when a task changes group
(``move_charge_at_immigrate`` is gone), so a VM started outside a group can't be put under a
limit later. Both hierarchies are handled: cgroup v2 (``memory.high``, see :meth:`MemCgroup.set_limit`) where the memory
controller is enabled there, otherwise v1 (``memory.limit_in_bytes``), as on hosts that mount
v1 controllers beside an empty v2 tree.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from memvirt.errors import MemvirtError

V1_ROOT = Path("/sys/fs/cgroup/memory")
V2_ROOTS = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))
PARENT = "memvirt"
UNLIMITED = 1 << 62


def _v2_root() -> Path | None:
    for root in V2_ROOTS:
        try:
            if "memory" in (root / "cgroup.controllers").read_text().split():
                return root
        except OSError:
            continue
    return None


@dataclass(frozen=True)
class MemCgroup:
    """A VM's memory cgroup: where QEMU runs, what it may keep resident, what it has faulted back."""

    path: Path
    version: int

    @classmethod
    def create(cls, vm_name: str, state_dir: Path) -> MemCgroup | None:
        """Make the group for a VM (named after the VM and its state folder, so two memvirt homes
        never share one); None where the host offers no writable memory controller."""
        leaf = f"{vm_name}-{hashlib.sha1(str(state_dir).encode()).hexdigest()[:8]}"
        v2 = _v2_root()
        try:
            if v2 is not None:
                parent = v2 / PARENT
                parent.mkdir(exist_ok=True)
                if "memory" not in (parent / "cgroup.subtree_control").read_text().split():
                    (parent / "cgroup.subtree_control").write_text("+memory")
                group = cls(parent / leaf, 2)
            elif (V1_ROOT / "memory.limit_in_bytes").exists():
                group = cls(V1_ROOT / PARENT / leaf, 1)
                group.path.parent.mkdir(exist_ok=True)
            else:
                return None
            group.path.mkdir(exist_ok=True)
        except OSError:
            return None
        return group

    @classmethod
    def load(cls, path: str) -> MemCgroup | None:
        p = Path(path)
        if not p.is_dir():
            return None
        return cls(p, 2 if (p / "memory.max").exists() else 1)

    def _file(self, v1: str, v2: str) -> Path:
        return self.path / (v2 if self.version == 2 else v1)

    def enter(self) -> None:
        """Move the calling process into the group (QEMU's parent does this just before exec)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def usage(self) -> int:
        """Bytes charged now: the VM's resident RAM plus QEMU's own memory."""
        return int(self._file("memory.usage_in_bytes", "memory.current").read_text())

    def _limit_file(self) -> Path:
        return self._file("memory.limit_in_bytes", "memory.high")

    def limit(self) -> int:
        text = self._limit_file().read_text().strip()
        return UNLIMITED if text == "max" else min(int(text), UNLIMITED)

    def set_limit(self, nbytes: int | None) -> None:
        """Cap resident memory (None: no cap). Lowering it reclaims at once: cold pages go to swap.

        A cap must never cost the VM its life: a hard limit below what the guest touches makes
        the kernel OOM-kill QEMU. So on v2 the cap is ``memory.high`` (reclaim and throttle,
        never kill) and on v1 the group's OOM killer is disabled while a cap is set (QEMU waits,
        :meth:`under_oom` tells, and raising the cap lets it go on).
        """
        value = ("max" if self.version == 2 else "-1") if nbytes is None else str(int(nbytes))
        try:
            if self.version == 1 and nbytes is not None:
                (self.path / "memory.oom_control").write_text("1")
            self._limit_file().write_text(value)
            if self.version == 1 and nbytes is None:
                (self.path / "memory.oom_control").write_text("0")
        except OSError as e:
            raise MemvirtError(f"setting the memory limit of {self.path.name} failed: {e.strerror}") from e

    def cap_hits(self) -> int:
        """How often the group has run into its cap (v1 ``memory.failcnt``, v2 ``high`` events):
        a group held at its cap hits it on every page it asks for."""
        try:
            if self.version == 1:
                return int((self.path / "memory.failcnt").read_text())
            for line in (self.path / "memory.events").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "high":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def under_oom(self) -> bool:
        """True while the group's tasks wait for memory the cap does not allow (v1 with the OOM
        killer disabled; v2's ``memory.high`` throttles instead, which :meth:`stall` shows)."""
        if self.version != 1:
            return False
        try:
            text = (self.path / "memory.oom_control").read_text()
        except OSError:
            return False
        return "under_oom 1" in text

    def stat(self) -> dict[str, int]:
        out = {}
        for line in self._file("memory.stat", "memory.stat").read_text().splitlines():
            k, _, v = line.partition(" ")
            if v.strip().lstrip("-").isdigit():
                out[k] = int(v)
        return out

    def counters(self) -> tuple[int, int]:
        """(pages faulted back in from swap, bytes swapped out now), the two signals of pressure and saving."""
        s = self.stat()
        refaults = s.get("workingset_refault_anon", s.get("workingset_refault", 0)) + s.get(
            "workingset_refault_file", 0
        )
        swapped = s.get("swap", 0) if self.version == 1 else int(self._file("", "memory.swap.current").read_text())
        return refaults, swapped

    def stall(self) -> float:
        """Percent of the last 10 s some of the group's tasks stalled on memory (cgroup v2 PSI;
        0 on v1, which has no per-group pressure)."""
        if self.version != 2:
            return 0.0
        try:
            first = (self.path / "memory.pressure").read_text().splitlines()[0]
        except (OSError, IndexError):
            return 0.0
        fields = dict(f.split("=", 1) for f in first.split()[1:] if "=" in f)
        return float(fields.get("avg10", 0.0))

    def pids(self) -> list[int]:
        try:
            return [int(x) for x in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def remove(self) -> None:
        """Delete the group once its tasks are gone (a group with tasks is left alone). A QEMU that
        just exited may still be listed for a moment, so this waits up to a second for it."""
        for _ in range(20):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.05)
