"""Where the daemon's VMs come from: pluggable sources, each a small class with ``targets()``.

* :class:`MemvirtSource`: memvirt's own VMs (``vms_root()``), running ones only; a VM whose
  state is corrupt is skipped with a warning, never fatal; frozen templates are left alone.
* :class:`AttachedSource`: QEMU processes started by anything else, registered with
  ``memvirt attach --qmp PATH [--pid N]`` (``state_home()/attached/NAME.json``). Their RAM is
  treated as anonymous RAM (what a plain ``qemu -m`` gives), mapped as QEMU's command line says
  (machine type, :func:`memvirt.memory.procmem.qemu_ram_layout`); the size comes from QMP.

A source is anything with ``name`` and ``targets() -> list[Target]``; libvirt domains will be
one more. The same QEMU (by pid) found twice is kept once, the first source's.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from memvirt.errors import MemvirtError, UsageError
from memvirt.memory import rammap
from memvirt.memory.procmem import qemu_ram_layout
from memvirt.paths import state_home
from memvirt.procs import pid_alive
from memvirt.qemu.monitor import Monitor
from memvirt.qemu.vm import VM, VMConfig, check_name, vms_root

log = logging.getLogger("memvirtd")


@dataclass
class Target:
    """One VM the daemon manages: its name, the memvirt VM object the engines take, its source."""

    name: str
    vm: VM
    source: str

    @property
    def pid(self) -> int:
        return self.vm.config.pid


class Source(Protocol):
    name: str

    def targets(self) -> list[Target]: ...


class MemvirtSource:
    name = "memvirt"

    def __init__(self) -> None:
        self._warned: set[str] = set()

    def targets(self) -> list[Target]:
        out = []
        for d in sorted(vms_root().iterdir()):
            if not (d / "vm.json").exists():
                continue
            try:
                vm = VM.load(d.name)
            except (MemvirtError, TypeError) as e:
                if d.name not in self._warned:
                    self._warned.add(d.name)
                    log.warning("skipping VM %s: %s", d.name, str(e).splitlines()[0] if str(e) else type(e).__name__)
                continue
            if vm.alive() and not vm.is_template:
                out.append(Target(vm.name, vm, self.name))
        return out


class AttachedVM(VM):
    """A QEMU memvirt did not start, addressed through its registered QMP socket."""

    def __init__(self, config: VMConfig, qmp: str):
        super().__init__(config)
        self.dir = attached_root()
        self._qmp = Path(qmp)

    @property
    def qmp_path(self) -> Path:
        return self._qmp

    def memcg(self):
        return None


def attached_root() -> Path:
    root = state_home() / "attached"
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    return root


def _is_qemu(pid: int) -> bool:
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return False
    return os.path.basename(exe).startswith("qemu-system")


def _listening_inodes(pid: int) -> set[str]:
    """Socket inodes held by ``pid`` (to match a QMP socket path with its owner)."""
    out = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                t = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if t.startswith("socket:["):
                out.add(t[8:-1])
    except OSError:
        pass
    return out


def _socket_owner_inodes(path: str) -> set[str]:
    """Inodes of listening Unix sockets bound at ``path`` (/proc/net/unix)."""
    found = set()
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                parts = line.split()
                if len(parts) >= 8 and parts[7] == path:
                    found.add(parts[6])
    except OSError:
        pass
    return found


def find_qemu_pid(qmp: str) -> int | None:
    """The QEMU process listening on the QMP socket ``qmp``, if exactly one does."""
    inodes = _socket_owner_inodes(qmp)
    owners = (
        [int(p) for p in os.listdir("/proc") if p.isdigit() and _is_qemu(int(p)) and inodes & _listening_inodes(int(p))]
        if inodes
        else []
    )
    return owners[0] if len(owners) == 1 else None


def register(qmp: str, pid: int | None, name: str | None) -> dict:
    """Validate and record an outside QEMU: ``pid`` must be a QEMU holding the QMP socket ``qmp``."""
    path = os.path.abspath(qmp)
    try:
        is_sock = stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        is_sock = False
    if not is_sock:
        raise UsageError(f"--qmp {qmp}: not a Unix socket")
    if pid is None:
        pid = find_qemu_pid(path)
        if pid is None:
            raise UsageError(f"no single QEMU process listens on {path}: give --pid")
    if not pid_alive(pid) or not _is_qemu(pid):
        raise UsageError(f"pid {pid} is not a running QEMU (qemu-system-*)")
    if not (_socket_owner_inodes(path) & _listening_inodes(pid)):
        raise UsageError(f"QEMU pid {pid} does not hold the QMP socket {path}")
    with Monitor(Path(path), name or f"pid {pid}", timeout=5) as mon:
        size = int(mon.command("query-memory-size-summary")["base-memory"])
        qname = (mon.command("query-name") or {}).get("name", "")
    name = check_name(name or qname or f"qemu-{pid}")
    if (vms_root() / name / "vm.json").exists():
        raise UsageError(f"a memvirt VM is named {name!r}: give the attached one another --name")
    rec = {"name": name, "qmp": path, "pid": pid, "memory": size}
    f = attached_root() / f"{name}.json"
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec))
    tmp.replace(f)
    return rec


def unregister(name: str) -> bool:
    f = attached_root() / f"{check_name(name)}.json"
    if f.exists():
        f.unlink()
        return True
    return False


class AttachedSource:
    name = "attached"

    def targets(self) -> list[Target]:
        out = []
        for f in sorted(attached_root().glob("*.json")):
            try:
                rec = json.loads(f.read_text()[:4096])
                name, qmp, pid, memory = check_name(rec["name"]), str(rec["qmp"]), int(rec["pid"]), int(rec["memory"])
            except (OSError, ValueError, KeyError, TypeError, MemvirtError):
                log.warning("skipping attached VM record %s: corrupt", f.name)
                continue
            if not pid_alive(pid) or not _is_qemu(pid):
                continue  # gone: the record stays until 'memvirt attach --detach', a restarted QEMU has a new pid
            try:
                regions = qemu_ram_layout(pid, memory).regions
            except MemvirtError as e:
                log.warning("skipping attached VM %s: %s", name, e)
                continue
            cfg = VMConfig(name=name, memory=memory, ram="anonymous", pid=pid, regions=rammap.to_dict(regions))
            out.append(Target(name, AttachedVM(cfg, qmp), self.name))
        return out


def discover(sources: list[Source]) -> dict[str, Target]:
    """Every VM of every source by name; a source that fails is logged and skipped this round."""
    found: dict[str, Target] = {}
    pids: set[int] = set()
    for s in sources:
        try:
            ts = s.targets()
        except Exception as e:
            log.warning("discovery through %s failed: %s", s.name, e)
            continue
        for t in ts:
            if t.name in found or t.pid in pids:
                continue
            found[t.name] = t
            pids.add(t.pid)
    return found
