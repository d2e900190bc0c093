"""VM lifecycle: start QEMU for an image, find it again by name, pause, dump, stop.

Each VM has a state folder ``state_home()/vms/<name>`` (``vm.json``, QMP and command-channel
sockets, serial log); its shared RAM file lives in :func:`memvirt.paths.ram_dir`. Any later
command finds the VM by name. A VM whose QEMU died is reported ``dead``, never ``running``.

A VM frozen as a *template* (see :mod:`memvirt.clone`) backs its lazy clones' RAM: they map its
RAM file copy-on-write (RAM mode ``cow``), so it must not run, and is not stopped, while they live.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from memvirt.arch import arch
from memvirt.errors import GuestError, MemvirtError, NotFound, UsageError, VMError
from memvirt.image.build import Image
from memvirt.memory import rammap
from memvirt.memory.clonemem import CloneMemory
from memvirt.memory.holes import remove_journal
from memvirt.memory.procmem import ProcMemory, find_file_mapping, find_ram_mapping
from memvirt.memory.ramfile import RamFileMemory
from memvirt.memory.source import GuestMemory, Region
from memvirt.paths import PRIVATE_FILE, private_dir, private_file, ram_dir, state_home, touch_private
from memvirt.procs import pid_alive
from memvirt.qemu import lan
from memvirt.qemu.accel import choose_accel, qemu_binary
from memvirt.qemu.channel import GuestChannel, Result
from memvirt.qemu.config import RAM_MODES, VMConfig, ram_mode
from memvirt.qemu.memcg import MemCgroup
from memvirt.qemu.monitor import Monitor
from memvirt.qemu.serial import SERIAL_SOCK, spawn_serial_drain

PAUSE_WAIT = 60.0
"""Seconds to wait for another pauser (a migration's switch-over is bounded by its session timeout)."""

log = logging.getLogger(__name__)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
TEMPLATE = "template"
TEMPLATE_STATE = "template.state"
BOOT_TIMEOUT = 180.0
DUMP_FORMATS = ("elf", "kdump-zlib", "raw")


def vms_root() -> Path:
    """Every VM's state folder lives here: private (0700, checked), as is each VM's own folder."""
    return private_dir(state_home() / "vms")


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise UsageError(f"invalid VM name {name!r}: use letters, digits, '.', '_' or '-' (max 64)")
    return name


LOADERS: dict[str, Callable[[str], VM]] = {}
"""``PREFIX`` of ``PREFIX:NAME`` -> loader of a VM another tool keeps; ``libvirt`` is filled in by
:mod:`memvirt.virt` when it is imported (qemu/ names no package above it)."""


class VM:
    """A memvirt-managed QEMU guest, addressed by name."""

    def __init__(self, config: VMConfig):
        self.config = config
        self.dir = vms_root() / config.name

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def qmp_path(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def serial_log(self) -> Path:
        return self.dir / "serial.log"

    @property
    def regions(self) -> tuple[Region, ...]:
        return rammap.from_dict(self.config.regions)

    @property
    def channel(self) -> GuestChannel:
        return GuestChannel(self.dir / "cmd.sock", self.dir / "cmd.lock", self.name)

    @classmethod
    def load(cls, name: str) -> VM:
        prefix, sep, _ = name.partition(":")
        if sep and prefix in LOADERS:  # a VM another tool keeps (libvirt:NAME): it keeps its state
            return LOADERS[prefix](name)
        check_name(name)
        path = vms_root() / name / "vm.json"
        try:
            return cls(VMConfig.from_dict(json.loads(path.read_text())))
        except FileNotFoundError as e:
            raise NotFound(f"no VM named {name!r} (see 'memvirt vm list')") from e
        except (ValueError, TypeError) as e:
            raise VMError(f"state of VM {name!r} is corrupt ({path}); 'memvirt vm stop {name}' cleans it up") from e

    @classmethod
    def all(cls) -> list[VM]:
        return list(registry())

    @property
    def is_template(self) -> bool:
        return self.config.role == TEMPLATE

    def lazy_clones(self) -> list[VM]:
        """Live clones whose RAM maps this VM's RAM file copy-on-write."""
        return [
            v
            for v in registry()
            if v.name != self.name and v.config.clone_of == self.name and v.config.ram == "cow" and v.alive()
        ]

    def _refuse_if_backing(self, action: str, force: bool) -> None:
        if force:
            return
        clones = self.lazy_clones()
        if clones:
            names = ", ".join(v.name for v in clones[:5]) + (", ..." if len(clones) > 5 else "")
            raise UsageError(
                f"VM {self.name!r} is the template of {len(clones)} running lazy clone(s) ({names}); "
                f"{action} would {'corrupt' if action == 'resuming it' else 'orphan'} them: stop them first or "
                "use --force"
            )

    def save(self) -> None:
        tmp = self.dir / f"vm.json.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        with open(private_file(tmp, flags=os.O_WRONLY), "w") as f:
            f.write(json.dumps(self.config.to_dict(), indent=2))
        tmp.rename(self.dir / "vm.json")

    def alive(self) -> bool:
        return pid_alive(self.config.pid)

    def status(self) -> str:
        """``running``, ``paused`` (or another QEMU run state), or ``dead``."""
        if not self.alive():
            return "dead"
        try:
            with self.monitor(timeout=5) as mon:
                st = mon.status()
        except VMError:
            return "dead" if not self.alive() else "unresponsive"
        return st

    def require_alive(self) -> None:
        if not self.alive():
            raise VMError(f"VM {self.name!r} is dead (its QEMU exited); see {self.serial_log}")

    def hold_pauses(self, wait: float = PAUSE_WAIT) -> int:
        """Take this VM's pause lock (an exclusive ``flock`` on ``pause.lock``, a descriptor to
        close to release it). Whoever pauses the guest to resume it later holds it from ``stop`` to
        ``cont``: a reclaim's batch, a migration's switch-over. Without it a reclaim's ``cont``
        resumed a guest a migration had paused for its final round."""
        try:
            fd = os.open(self.dir / "pause.lock", os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:  # its folder goes with the VM (a migration stopped it)
            raise VMError(f"VM {self.name!r} is gone ({e.strerror})") from e
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise VMError(
                        f"VM {self.name!r} stayed paused by another memvirt operation for {wait:.0f} s"
                    ) from None
                time.sleep(0.002)

    def monitor(self, timeout: float = 30.0) -> Monitor:
        self.require_alive()
        return Monitor(self.qmp_path, self.name, timeout)

    def exec(self, script: str, timeout: float = 60.0) -> Result:
        """Run a shell script in the guest."""
        self.require_alive()
        if self.is_template:
            raise UsageError(f"VM {self.name!r} is a frozen template (its CPUs are stopped): run commands in a clone")
        return self.channel.run(script, timeout)

    def exec_background(self, script: str, log: str) -> int:
        """Start ``script`` detached in the guest with output to ``log``; return its guest pid."""
        quoted = script.replace("'", "'\\''")
        res = self.exec(f"setsid sh -c '{quoted}' > {log} 2>&1 < /dev/null & echo $!").check("starting " + script)
        words = res.text.split()
        if not words or not words[-1].isdigit():
            raise GuestError(f"VM {self.name!r} gave no process id for {script[:60]!r}: {res.text.strip()[:100]!r}")
        return int(words[-1])

    def pause(self) -> None:
        with self.monitor() as mon:
            mon.command("stop")

    def resume(self, force: bool = False) -> None:
        """Continue the guest; a template becomes an ordinary VM again (refused while clones use its RAM)."""
        self._refuse_if_backing("resuming it", force)
        with self.monitor() as mon:
            mon.command("cont")
        if self.is_template:
            self.drop_template()

    def drop_template(self) -> None:
        """Forget that this VM is a template: its RAM file writable again, its saved state gone, and
        QEMU's migration sending RAM again (freezing left ``x-ignore-shared`` on)."""
        if self.alive():
            with self.monitor() as mon:
                mon.set_capabilities(x_ignore_shared=False)
        frozen = self.config.frozen
        os.chmod(self.config.ram_path, (frozen.ram_file_mode if frozen else PRIVATE_FILE) & 0o700)
        self.config.frozen = None
        (self.dir / TEMPLATE_STATE).unlink(missing_ok=True)
        self.config.role = ""
        self.save()

    def memory(self) -> GuestMemory:
        """The guest's physical memory: its RAM file, its clone overlay, or its QEMU process's
        memory. A memvirt VM's RAM map is recorded when it starts, so there is nothing to find:
        the readers are memory/'s, one floor down (a VM another tool keeps reads its own way)."""

        self.require_alive()
        c = self.config
        if c.ram == "shared":
            return RamFileMemory(c.ram_path, self.regions)
        if c.ram == "cow":
            return CloneMemory(c.pid, c.backing, c.memory, self.regions)
        return ProcMemory(c.pid, c.memory, self.regions)

    def ram_mapping(self) -> tuple[int, int]:
        """``(host address, size)`` of the guest RAM inside the QEMU process, whatever backs it."""
        self.require_alive()
        c = self.config
        if c.ram == "anonymous":
            return find_ram_mapping(c.pid, c.memory), c.memory
        size = max(r.offset + r.size for r in self.regions)
        path, private = (c.backing, True) if c.ram == "cow" else (c.ram_path, False)
        start, _ = find_file_mapping(c.pid, path, size, private)
        return start, size

    def discard(self) -> None:
        """Remove a half-made VM (a failed clone or migration target): its QEMU, also one whose
        pid was never saved, its RAM file and its state."""
        pidfile = self.dir / "qemu.pid"
        if not self.config.pid and pidfile.exists():
            try:
                self.config.pid = int(pidfile.read_text().strip() or 0)
            except ValueError:
                pass
        self.stop(force=True)

    def stop(self, timeout: float = 10.0, force: bool = False) -> None:
        """Kill QEMU (if alive) and remove the VM's state and RAM file.

        A template with live lazy clones is kept unless ``force``: its RAM file is their memory.
        (Forced, the clones keep running on the unlinked file, but no new clone can be made.)
        """
        self._refuse_if_backing("stopping it", force)
        pid = self.config.pid
        if self.alive():
            try:
                with self.monitor(timeout=5) as mon:
                    mon.command("quit")
            except VMError:
                pass
            deadline = time.monotonic() + timeout
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.alive():
                os.kill(pid, signal.SIGKILL)
                while self.alive():
                    time.sleep(0.05)
        if self.config.ram_path:
            Path(self.config.ram_path).unlink(missing_ok=True)
            remove_journal(self.config.ram_path)
        group = self.memcg()
        if group is not None:
            group.remove()
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.config.lan:
            lan.release(self, lan_members(self.config.lan))

    def memcg(self) -> MemCgroup | None:
        """The memory cgroup QEMU runs in, if the host gave it one (see :mod:`memvirt.qemu.memcg`)."""
        path = self.config.memcg
        return MemCgroup.load(path) if path else None


def registry() -> Iterator[VM]:
    """Every VM of this state home, by name. One whose ``vm.json`` is corrupt is skipped with a
    warning: it must not hide the others (``memvirt vm stop NAME`` removes it)."""
    for d in sorted(vms_root().iterdir()):
        if not (d / "vm.json").exists():
            continue
        try:
            yield VM.load(d.name)
        except NotFound:  # removed since the listing
            continue
        except MemvirtError as e:
            log.warning("skipping VM %s: %s", d.name, e)


def lan_members(name: str) -> list[VM]:
    """The VMs on LAN ``name``."""
    return [v for v in registry() if v.config.lan == name]


def qemu_argv(vm: VM, image: Image, incoming: str | None = None) -> list[str]:
    """The QEMU command line of a memvirt VM; ``incoming`` is a migration URI to load (clones)."""
    c = vm.config
    size = f"{c.memory >> 20}M"
    if c.ram == "shared":
        backend = f"memory-backend-file,id=ram0,size={size},mem-path={c.ram_path},share=on"
    elif c.ram == "cow":
        backend = f"memory-backend-file,id=ram0,size={size},mem-path={c.backing},share=off"
    else:
        backend = f"memory-backend-ram,id=ram0,size={size},merge=on"
    a = arch(c.arch)
    cpu = "host" if c.accel == "kvm" else a.cpu_tcg
    d = vm.dir
    append = f"console={a.console} panic=-1 quiet memvirt.name={c.name} {c.append}".strip()
    return (
        [
            qemu_binary(c.arch),
            "-name",
            c.name,
            "-machine",
            f"{a.machine},accel={c.accel},memory-backend=ram0",
            "-cpu",
            cpu,
            "-smp",
            str(c.cpus),
            "-m",
            size,
            "-object",
            backend,
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
            str(image.vmlinuz),
            "-initrd",
            str(image.initrd),
            "-append",
            append,
            "-chardev",
            f"socket,id=ser0,path={d / SERIAL_SOCK},server=on,wait=off",
            "-serial",
            "chardev:ser0",
            "-qmp",
            f"unix:{d / 'qmp.sock'},server=on,wait=off",
            "-device",
            "virtio-serial-pci,id=vser0",
            "-chardev",
            f"socket,id=cmdch,path={d / 'cmd.sock'},server=on,wait=off",
            "-device",
            "virtserialport,bus=vser0.0,chardev=cmdch,name=org.memvirt.cmd",
            "-device",
            "vmcoreinfo",
            "-device",
            a.pvpanic,
            "-action",
            "panic=pause",
            "-daemonize",
            "-pidfile",
            str(d / "qemu.pid"),
        ]
        + (lan.qemu_args(vm) if c.lan else [])
        + (["-incoming", incoming] if incoming else [])
    )


def launch_qemu(
    vm: VM, image: Image, what: str = "VM", incoming: str | None = None, pass_fds: tuple[int, ...] = ()
) -> None:
    """Run QEMU (it daemonizes) inside the VM's own memory cgroup; its cgroup and pid go into the
    config (not saved: the caller saves once the VM is complete).

    The one way memvirt starts a QEMU (VMs, clones, migration targets). QEMU that fails to start
    exits non-zero: a :class:`VMError` quoting its last stderr line (``what`` names the VM's
    kind). The pid is read even then, so the caller's clean-up (:meth:`VM.discard`) can kill a
    QEMU that wrote it.
    """
    group = MemCgroup.create(vm.name, vm.dir)
    drain = spawn_serial_drain(vm.dir / SERIAL_SOCK, vm.serial_log)
    if group is not None:
        vm.config.memcg = str(group.path)
    argv = qemu_argv(vm, image, incoming)
    log.info("starting QEMU for %s %s (%s)", what, vm.name, f"cgroup {group.path}" if group else "no memory cgroup")
    log.debug("QEMU command line: %s", shlex.join(argv))
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        pass_fds=pass_fds,
        preexec_fn=group.enter if group is not None else None,
    )
    try:
        vm.config.pid = int((vm.dir / "qemu.pid").read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        pass
    if proc.returncode != 0:
        drain.kill()
        drain.wait()
        msg = proc.stderr.strip().splitlines()
        raise VMError(f"QEMU failed to start {what} {vm.name!r}: {msg[-1] if msg else f'exit {proc.returncode}'}")
    if not vm.config.pid:
        raise VMError(f"QEMU started {what} {vm.name!r} but left no pid in {vm.dir / 'qemu.pid'}")


def start_vm(
    name: str,
    image: Image,
    memory: int = 512 << 20,
    cpus: int = 1,
    ram: str = "shared",
    append: str = "",
    wait: bool = True,
    lan_name: str = "",
) -> VM:
    """Boot a VM and (by default) wait until its command channel answers; with ``lan_name`` it
    joins that VM LAN and gets its address there."""
    check_name(name)
    try:
        mode = ram_mode(ram)
    except ValueError as e:
        raise UsageError(f"--ram must be one of {', '.join(RAM_MODES)}, not {ram!r}") from e
    if memory < (64 << 20) or memory % (1 << 20):
        raise UsageError("--memory must be a whole number of MiB, at least 64M")
    if not 1 <= cpus <= 64:
        raise UsageError("--cpus must be between 1 and 64")
    vdir = vms_root() / name
    if (vdir / "vm.json").exists():
        existing = VM.load(name)
        if existing.alive():
            raise UsageError(f"a VM named {name!r} is already running")
        existing.stop()
    ram_path = str(ram_dir() / f"{name}.ram") if ram == "shared" else ""
    private_dir(vdir)
    if ram_path:
        Path(ram_path).unlink(missing_ok=True)
        touch_private(ram_path, memory)
    config = VMConfig(
        name=name,
        memory=memory,
        cpus=cpus,
        arch=image.arch,
        ram=mode,
        image=str(image.path),
        kernel_release=image.release,
        accel=choose_accel(image.vmlinuz, image.arch),
        append=append,
        ram_path=ram_path,
        regions=rammap.to_dict(rammap.machine_ram_map(image.arch, memory)),
        started=time.time(),
        lan=lan.check_lan_name(lan_name) if lan_name else "",
    )
    vm = VM(config)
    if lan_name:
        with lan.allocation_lock(lan_name):
            lan.allocate(vm, lan_members(lan_name))
            vm.save()
    try:
        launch_qemu(vm, image)
    except VMError:
        shutil.rmtree(vdir, ignore_errors=True)
        if ram_path:
            Path(ram_path).unlink(missing_ok=True)
        group = vm.memcg()
        if group is not None:
            group.remove()
        raise
    vm.save()
    if wait:
        try:
            vm.channel.wait_ready(BOOT_TIMEOUT, vm.alive)
            if lan_name:
                lan.configure(vm)
        except BaseException as e:
            # Ctrl-C or SIGTERM while it boots must not leave a half-started guest behind either.
            tail = _tail(vm.serial_log)
            vm.stop()
            if not isinstance(e, Exception):
                raise
            raise VMError(f"VM {name!r} did not boot: {tail}") from e
    return vm


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return "no serial output"
    return " | ".join(text[-lines:]) or "no serial output"


def vm_memory(vm: VM) -> GuestMemory:
    """``vm.memory()``: kept as a function for the callers that pass VMs around."""
    return vm.memory()
