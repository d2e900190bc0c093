"""A running libvirt domain, addressed as ``libvirt:NAME``, behaves as a memvirt :class:`VM`.

libvirt already knows everything memvirt needs: QEMU's pid (its pid file and the ``-uuid`` on
QEMU's command line), the RAM size and how it is backed (the live domain XML). Guest RAM is read
through ``/proc/PID/mem`` for default anonymous RAM, or through QEMU's own descriptor of the
backend (``/proc/PID/fd/N``) for ``<memoryBacking><source type='memfd'/><access mode='shared'/>``
or a shared file backend, where reclaim punches holes.

QEMU is driven through libvirt, never its monitor socket (libvirt owns that socket and allows
one client): ``stop``/``cont`` become ``virDomainSuspend``/``virDomainResume``, so libvirt's view
of the domain stays true; any other QMP command goes through ``virDomainQemuMonitorCommand``,
after which libvirt marks the domain *tainted: custom-monitor* (``virsh dominfo`` shows it; the
domain is managed normally otherwise). No QMP events reach memvirt that way:
:meth:`LibvirtMonitor.wait_event` answers None at once and callers fall back to their own clocks.
"""

from __future__ import annotations

import json
import os
import threading
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from memvirt.errors import NotFound, UsageError, VMError

try:
    import libvirt  # the binding (PyPI libvirt-python), not this package: see memvirt/virt/__init__.py
    import libvirt_qemu
except ImportError:
    raise UsageError(
        "libvirt:NAME needs the libvirt-python binding: pip install 'memvirt[libvirt]' (see docs/libvirt.md)"
    ) from None
from memvirt.memory import rammap
from memvirt.memory.source import GuestMemory
from memvirt.paths import private_dir, state_home
from memvirt.procs import pid_alive
from memvirt.qemu.channel import GuestChannel
from memvirt.qemu.memcg import MemCgroup
from memvirt.qemu.vm import VM, VMConfig

PREFIX = "libvirt:"
DEFAULT_URI = "qemu:///system"
AGENT_PORT = "org.memvirt.cmd"
Q35_LOWMEM_LIMIT = 0xB0000000
"""A q35 machine with at least this much RAM splits it around the 32-bit PCI hole (QEMU
``hw/i386/pc_q35.c``, ``pc_q35_init``), a map this module does not lay out."""

_uri: str | None = None
_quiet = threading.Lock()
_silenced = False


def set_uri(uri: str | None) -> None:
    """The connection every ``libvirt:NAME`` uses from now on (``memvirt --connect URI``)."""
    global _uri
    _uri = uri


def current_uri() -> str:
    """``--connect``, else ``$LIBVIRT_DEFAULT_URI`` (libvirt's own variable), else ``qemu:///system``."""
    return _uri or os.environ.get("LIBVIRT_DEFAULT_URI") or DEFAULT_URI


def is_libvirt(spec: str) -> bool:
    return spec.startswith(PREFIX)


def _silence() -> None:
    """libvirt prints every error to stderr by default; memvirt reports them itself, in one line."""
    global _silenced
    with _quiet:
        if not _silenced:
            libvirt.registerErrorHandler(lambda *_: None, None)
            _silenced = True


def _message(e: libvirt.libvirtError) -> str:
    return " ".join(str(e.get_error_message() or e).split())


def connect(uri: str | None = None) -> libvirt.virConnect:
    """Open ``uri``; a libvirt that is not running or refuses is a one-line :class:`VMError`."""
    _silence()
    uri = uri or current_uri()
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise VMError(f"cannot connect to libvirt at {uri}: {_message(e)} (is libvirtd running?)") from e


class LibvirtMonitor:
    """The :class:`memvirt.qemu.monitor.Monitor` interface over libvirt."""

    def __init__(self, dom: libvirt.virDomain, vm_name: str):
        self.dom = dom
        self.vm_name = vm_name

    def __enter__(self) -> LibvirtMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        pass

    def command(self, name: str, timeout: float | None = None, **args: Any) -> Any:
        """Run QMP ``name``; ``stop``/``cont`` as libvirt's own suspend/resume."""
        try:
            if name == "stop":
                self.dom.suspend()
                return {}
            if name == "cont":
                self.dom.resume()
                return {}
            if name == "query-status":
                return {"status": self.status(), "running": self.status() == "running"}
            cmd = json.dumps({"execute": name, "arguments": args} if args else {"execute": name})
            answer = json.loads(libvirt_qemu.qemuMonitorCommand(self.dom, cmd, 0))
        except libvirt.libvirtError as e:
            raise VMError(f"libvirt refused {name} on domain {self.vm_name!r}: {_message(e)}") from e
        if "error" in answer:
            raise VMError(f"QEMU refused {name} on domain {self.vm_name!r}: {answer['error'].get('desc', answer)}")
        return answer.get("return")

    def hmp(self, line: str) -> str:
        try:
            return str(
                libvirt_qemu.qemuMonitorCommand(self.dom, line, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
            )
        except libvirt.libvirtError as e:
            raise VMError(f"libvirt refused {line.split()[0]!r} on domain {self.vm_name!r}: {_message(e)}") from e

    def status(self) -> str:
        """QEMU's run state as libvirt knows it (no monitor passthrough, so no taint)."""
        try:
            state, reason = self.dom.state()
        except libvirt.libvirtError as e:
            raise VMError(f"lost domain {self.vm_name!r}: {_message(e)}") from e
        if state == libvirt.VIR_DOMAIN_CRASHED and reason == libvirt.VIR_DOMAIN_CRASHED_PANICKED:
            # <on_crash>preserve</on_crash>: QEMU holds the guest paused, as memvirt's own VMs'
            # ``-action panic=pause`` does; libvirt's resume lets it run again
            return "guest-panicked"
        return STATES.get(state, "unknown")

    def wait_event(self, name: str, timeout: float) -> dict[str, Any] | None:
        """libvirt forwards no QMP events to a passthrough client: callers use their own clocks."""
        return None


STATES = {
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
    libvirt.VIR_DOMAIN_BLOCKED: "running",
}


def _kib(el: ET.Element | None) -> int:
    if el is None or not (el.text or "").strip():
        raise VMError("the domain XML has no <memory> size")
    scale = {"b": 1, "bytes": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30}
    return int(el.text or 0) * scale.get(el.get("unit", "KiB").lower(), 1 << 10)


def _attr(el: ET.Element, path: str, name: str) -> str | None:
    """Attribute ``name`` of the element at ``path`` under ``el``, None where either is missing."""
    found = el.find(path)
    return None if found is None else found.get(name)


def _qemu_pid(uuid: str, name: str) -> int:
    """The QEMU process of the domain with ``uuid`` on this host.

    libvirt's pid file (``/run/libvirt/qemu/NAME.pid`` for the system instance) is tried first; any
    other instance (session, a second libvirtd) is found by the ``-uuid`` on QEMU's command line."""
    candidates = []
    try:
        candidates.append(int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip()))
    except (OSError, ValueError):
        pass
    candidates += [int(p) for p in os.listdir("/proc") if p.isdigit()]
    needle = b"\0-uuid\0" + uuid.encode() + b"\0"
    for pid in candidates:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if needle in b"\0" + f.read():
                    return pid
        except OSError:
            continue
    raise VMError(f"domain {name!r} runs, but not on this host (no QEMU process with uuid {uuid})")


def _backend_fd(pid: int, ram_size: int) -> str:
    """``/proc/PID/fd/N``: QEMU's descriptor of the shared RAM backend (memfd or file) of ``ram_size`` bytes."""
    fds = Path(f"/proc/{pid}/fd")
    for fd in sorted(fds.iterdir(), key=lambda p: int(p.name)):
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(("/memfd:", "/")) and not target.startswith(("/dev/", "/proc/")):
            try:
                if os.stat(fd).st_size == ram_size:
                    return str(fd)
            except OSError:
                continue
    raise VMError(f"QEMU process {pid} holds no shared RAM backend of {ram_size} bytes")


class LibvirtVM(VM):
    """A running libvirt domain as a memvirt VM.

    Its state folder (``state_home()/libvirt/NAME``) holds only what memvirt's own tools keep beside
    a VM (reclaim's pause mark, the command channel's lock); libvirt keeps the domain."""

    def __init__(self, name: str, uri: str | None = None):
        self.uri = uri or current_uri()
        self.conn = connect(self.uri)
        try:
            self.dom = self.conn.lookupByName(name)
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise NotFound(f"no libvirt domain named {name!r} at {self.uri} (see 'virsh list --all')") from e
            raise VMError(f"libvirt at {self.uri}: {_message(e)}") from e
        if not self.dom.isActive():
            raise UsageError(f"libvirt domain {name!r} is shut off: start it first ('virsh start {name}')")
        root = ET.fromstring(self.dom.XMLDesc(0))
        if root.get("type") not in ("qemu", "kvm"):
            raise UsageError(f"libvirt domain {name!r} is a {root.get('type')} domain: memvirt handles QEMU")
        size = _kib(root.find("memory"))
        machine = _attr(root, "os/type", "machine") or "pc"
        if "q35" in machine and size >= Q35_LOWMEM_LIMIT:
            raise UsageError(
                f"libvirt domain {name!r} is a q35 machine with {size >> 20} MiB: its split RAM map is not laid out yet"
            )
        pid = _qemu_pid(self.dom.UUIDString(), name)
        # memfd or file backing with shared access: QEMU holds an fd of guest RAM, where holes can be punched
        shared = _attr(root, "memoryBacking/access", "mode") == "shared"
        config = VMConfig(
            name=name,
            memory=size,
            cpus=self.dom.maxVcpus(),
            ram="shared" if shared else "anonymous",
            accel=root.get("type") or "",
            pid=pid,
            ram_path=_backend_fd(pid, size) if shared else "",
            regions=rammap.to_dict(rammap.pc_ram_map(size)),
        )
        self.config = config
        self.dir = private_dir(private_dir(state_home() / "libvirt") / name)
        self._agent = next(
            (
                _attr(ch, "source", "path")
                for ch in root.findall("devices/channel")
                if _attr(ch, "target", "name") == AGENT_PORT
            ),
            None,
        )

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def channel(self) -> GuestChannel:
        """memvirt's command agent, when the domain XML has its virtio-serial port as a unix socket."""
        if not self._agent:
            raise UsageError(
                f"libvirt domain {self.name!r} has no {AGENT_PORT} channel: memvirt cannot run commands in it"
            )
        return GuestChannel(Path(self._agent), self.dir / "cmd.lock", self.name)

    def alive(self) -> bool:
        try:
            return bool(self.dom.isActive()) and pid_alive(self.config.pid)
        except libvirt.libvirtError:
            return False

    def require_alive(self) -> None:
        if not self.alive():
            raise VMError(f"libvirt domain {self.name!r} is no longer running")

    def status(self) -> str:
        if not self.alive():
            return "dead"
        return LibvirtMonitor(self.dom, self.name).status()

    def monitor(self, timeout: float = 30.0) -> LibvirtMonitor:  # type: ignore[override]
        self.require_alive()
        return LibvirtMonitor(self.dom, self.name)

    def resume(self, force: bool = False) -> None:
        with self.monitor() as mon:
            mon.command("cont")

    def memory(self) -> GuestMemory:
        from memvirt.memory.procmem import ProcMemory
        from memvirt.memory.ramfile import RamFileMemory

        self.require_alive()
        if self.config.ram == "shared":
            return RamFileMemory(self.config.ram_path, self.regions)
        return ProcMemory(self.config.pid, self.config.memory, self.regions)

    def ram_mapping(self) -> tuple[int, int]:
        """QEMU's mapping of guest RAM: the shared backend's, matched by inode (a memfd has no path)."""
        from memvirt.memory.procmem import find_ram_mapping

        self.require_alive()
        c = self.config
        if c.ram == "anonymous":
            return find_ram_mapping(c.pid, c.memory), c.memory
        ino = os.stat(c.ram_path).st_ino
        with open(f"/proc/{c.pid}/maps") as f:
            for line in f:
                fields = line.split()
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if int(fields[4]) == ino and hi - lo == c.memory and fields[1][3] == "s":
                    return lo, c.memory
        raise VMError(f"QEMU process {c.pid} has no shared mapping of its RAM backend")

    def stop(self, timeout: float = 10.0, force: bool = False) -> None:
        raise UsageError(f"{self.name!r} is libvirt's domain: stop it with 'virsh shutdown' or 'virsh destroy'")

    def save(self) -> None:
        """libvirt keeps the domain's configuration; memvirt stores none."""

    def memcg(self) -> MemCgroup | None:
        """The memory cgroup libvirt made for the domain (``machine/qemu-ID-NAME.libvirt-qemu``)."""
        from memvirt.qemu.memcg import V1_ROOT, _v2_root

        try:
            lines = Path(f"/proc/{self.config.pid}/cgroup").read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                return MemCgroup.load(str(V1_ROOT / path.lstrip("/")))
            if controllers == "" and (v2 := _v2_root()) is not None:
                # libvirt puts QEMU's own threads in an ``emulator`` child; the domain's limit is the parent's
                group = Path(path.lstrip("/"))
                return MemCgroup.load(str(v2 / (group.parent if group.name == "emulator" else group)))
        return None


def load(spec: str) -> LibvirtVM:
    """``libvirt:NAME`` (or a bare NAME) on the current connection."""
    name = spec.removeprefix(PREFIX)
    if not name:
        raise UsageError("libvirt: needs a domain name (libvirt:NAME)")
    return LibvirtVM(name)
