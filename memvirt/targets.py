"""Open any memory source by what the user typed: a VM name, ``pid:N``, or a file.

This is the front door every command that reads guest memory by a name goes through (inspect,
mem, dedup analyze), so the RAM map of a source
memvirt did not start is found here once: from QEMU itself when it runs (``pid:N`` reads its
command line, ``--qmp`` its memory-region tree), else from the guest kernel inside the file
(:mod:`memvirt.introspect.ramlayout` puts each candidate map to it).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from memvirt.errors import BadImage, NotFound, UsageError
from memvirt.introspect.ramlayout import choose
from memvirt.memory.elfdump import ElfDumpMemory
from memvirt.memory.fileio import open_image
from memvirt.memory.kdump import KdumpMemory
from memvirt.memory.procmem import ProcMemory
from memvirt.memory.ramfile import RamFileMemory
from memvirt.memory.rammap import (
    MACHINES,
    RamLayout,
    as_raw,
    machine_family,
    ram_map,
    ramfile_candidates,
    raw_candidates,
    regions_from_mtree,
)
from memvirt.memory.raw import RawMemory
from memvirt.memory.source import MAX_GPA, PAGE_SIZE, GuestMemory, Region
from memvirt.qemu.monitor import Monitor
from memvirt.qemu.vm import VM, vm_memory
from memvirt.virt import _load as _libvirt_load  # registers libvirt:NAME with VM.load

FORMATS = ("auto", "ramfile", "raw", "elf", "kdump")
FLAGS = "--machine pc|q35 picks the machine family, --ram-size the RAM size, --qmp SOCKET asks a running QEMU"


def sniff(path: Path) -> str:
    """``elf``, ``kdump`` (plain or makedumpfile-flattened, as QEMU 7.2 writes it) or ``raw``."""
    fd = open_image(path, "memory image")
    try:
        head = os.pread(fd, 12, 0)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from e
    finally:
        os.close(fd)
    if head[:4] == b"\x7fELF":
        return "elf"
    if head[:8] == b"KDUMP   " or head == b"makedumpfile":
        return "kdump"
    return "raw"


def _vm_ram_file(path: Path) -> GuestMemory | None:
    """A RAM file that belongs to a memvirt VM opens with that VM's RAM map."""
    real = os.path.realpath(path)
    for vm in VM.all():
        if vm.config.ram_path and os.path.realpath(vm.config.ram_path) == real:
            mem = RamFileMemory(path, vm.regions)
            mem.layout = f"recorded by memvirt VM {vm.name}"
            return mem
    return None


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from e


def _exists(path: Path) -> bool:
    """Whether ``path`` names something; a folder on the way that cannot be searched is the user's to fix."""
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        raise UsageError(f"cannot open {path}: {e.strerror or e}") from e
    return True


def qmp_layout(socket_path: str) -> tuple[RamLayout, int]:
    """The RAM map a running QEMU built (its memory-region tree) and its process id (the
    socket's peer), so a ``--qmp`` socket alone names the guest."""
    pid = _peer_pid(socket_path)
    with Monitor(Path(socket_path), socket_path) as mon:
        tree = mon.hmp("info mtree")
    regions = regions_from_mtree(tree)
    if not regions:
        raise BadImage(f"QEMU at {socket_path} has no ram-below-4g/ram-above-4g in its memory tree (not pc or q35?)")
    return RamLayout("from QEMU's memory tree (QMP)", regions), pid


def _peer_pid(socket_path: str) -> int:
    """The process listening on a unix socket: Linux hands the listener's credentials to a
    client at connect(), before the server accepts it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(socket_path)
        except OSError as e:
            raise UsageError(f"cannot reach QMP socket {socket_path}: {e.strerror or e}") from e
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    return int.from_bytes(creds[:4], "little")


def _check_machine(machine: str | None) -> str | None:
    if machine is None:
        return None
    if machine not in MACHINES:
        raise UsageError(f"--machine must be one of {', '.join(MACHINES)}")
    return machine_family(machine)


def _layouts(kinds: tuple[str, ...], size: int, ram_size: int | None, machine: str | None) -> list[RamLayout]:
    """Candidate maps of a file of ``size`` bytes read as each of ``kinds`` (``ramfile``, ``raw``)."""
    out: list[RamLayout] = []
    for kind in kinds:
        if ram_size is None:
            found = ramfile_candidates(size, machine) if kind == "ramfile" else raw_candidates(size, machine)
        else:
            found = []
            for fam in [machine] if machine else list(MACHINES):
                regions = ram_map(fam, ram_size)
                if kind == "raw":
                    found.append(RamLayout(f"{fam} with {ram_size >> 20} MiB", as_raw(regions), raw=True))
                else:
                    found.append(RamLayout(f"{fam} with {ram_size >> 20} MiB", regions))
        if kind == "ramfile" and ram_size is not None and ram_size != size:
            continue  # a RAM backend is exactly the RAM
        for c in found:
            # A map without a hole reads the same bytes as a RAM file and as a raw image.
            if all(o.regions != c.regions for o in out):
                out.append(c)
    return [c for c in out if max(r.offset + r.size for r in c.regions) <= size]


def _expect_size(path: Path, size: int, ram_size: int | None, kind: str) -> None:
    if ram_size is not None and kind == "ramfile" and size != ram_size:
        raise BadImage(f"{path} has {size} bytes but a RAM file of a {ram_size >> 20} MiB guest has {ram_size}")


def _reader(path: Path, layout: RamLayout) -> GuestMemory:
    return RawMemory(path, layout.regions) if layout.raw else RamFileMemory(path, layout.regions)


def _open_ram(
    path: Path, kinds: tuple[str, ...], ram_size: int | None, machine: str | None, qmp: str | None
) -> GuestMemory:
    """A RAM file or raw image, laid out by QEMU's memory tree (``qmp``), else by the guest kernel."""
    size = _file_size(path)
    if len(kinds) == 1:
        _expect_size(path, size, ram_size, kinds[0])
    if qmp is not None:
        layout, _ = qmp_layout(qmp)
        if kinds == ("raw",):
            layout = RamLayout(layout.name, as_raw(layout.regions), raw=True)
        mem = _reader(path, layout)
        mem.layout = layout.describe()
        return mem
    candidates = _layouts(kinds, size, ram_size, machine)
    if not candidates:
        sized = f"{ram_size >> 20} MiB " if ram_size else ""
        raise BadImage(f"{path} ({size} bytes) holds no RAM map of a {sized}{machine or 'pc or q35'} guest; {FLAGS}")
    if len(candidates) == 1 and machine is None:
        mem = _reader(path, candidates[0])
        mem.layout = candidates[0].describe()
        return mem
    what = f"{' or '.join('RAM file' if k == 'ramfile' else 'raw image' for k in kinds)} {path}"
    flat = RamLayout("flat", (Region(0, size, 0),), raw=kinds == ("raw",))
    mem, chosen = choose(candidates, lambda c: _reader(path, c), flat, what, FLAGS)
    mem.layout = f"{chosen.describe()}, checked against the guest kernel"
    return mem


def _open_pid(spec: str, ram_size: int | None, qmp: str | None) -> GuestMemory:
    try:
        pid = int(spec[4:])
    except ValueError as e:
        raise UsageError(f"bad process source {spec!r}: use pid:NUMBER") from e
    if qmp is None:
        return ProcMemory(pid, ram_size)
    layout, qemu_pid = qmp_layout(qmp)
    if qemu_pid != pid:
        raise UsageError(f"--qmp {qmp} belongs to process {qemu_pid}, not {pid}")
    mem = ProcMemory(pid, max(r.offset + r.size for r in layout.regions), layout.regions)
    mem.layout = layout.describe()
    return mem


def open_memory(
    spec: str,
    fmt: str = "auto",
    ram_size: int | None = None,
    machine: str | None = None,
    qmp: str | None = None,
) -> GuestMemory:
    """Open ``spec``: ``pid:N`` (a QEMU process), a file (dump, RAM file, raw image), or a VM name.

    ``fmt`` forces a file format; ``auto`` sniffs ELF and kdump headers and treats other files
    as a VM's RAM file when a memvirt VM owns it, else as a RAM file of a QEMU memvirt did not
    start, or a raw image (offset = guest-physical) when the guest kernel says so. The RAM map of
    a RAM file or raw image comes from ``qmp`` (a running QEMU's QMP socket), else from the
    candidates ``machine`` (``pc``/``q35``) and ``ram_size`` leave, the one the guest kernel
    agrees with. ``qmp`` alone (``spec`` ``qmp``) opens the process behind the socket.
    """
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    machine = _check_machine(machine)
    if spec == "qmp" and qmp is not None:
        spec = f"pid:{qmp_layout(qmp)[1]}"
    if spec.startswith("pid:"):
        return _open_pid(spec, ram_size, qmp)
    path = Path(spec)
    if _exists(path):
        if path.is_dir():
            raise UsageError(f"{path} is a directory, not a memory image")
        os.close(open_image(path, "memory image"))  # unreadable, a FIFO, a device: one line, before any reader
        kind = sniff(path) if fmt == "auto" else fmt
        if kind == "elf":
            return ElfDumpMemory(path)
        if kind == "kdump":
            return KdumpMemory(path)
        if fmt in ("auto", "ramfile") and machine is None and qmp is None and (owned := _vm_ram_file(path)) is not None:
            return owned
        # No header: a RAM backend (RAM back to back) or a raw image (holes in place); the
        # guest kernel tells them apart with the rest of the map.
        # A size no RAM backend has (not whole pages) is left to the raw reader's checks.
        size = _file_size(path)
        backend_like = 0 < size <= MAX_GPA and size % PAGE_SIZE == 0
        kinds = ("ramfile", "raw") if fmt == "auto" and backend_like else (kind,)
        return _open_ram(path, kinds, ram_size, machine, qmp)
    if "/" in spec or spec.endswith((".elf", ".kdump", ".raw", ".ram", ".img", ".dump")):
        raise NotFound(f"{spec} does not exist")
    if spec.startswith("libvirt:"):  # its errors name libvirt's own cause
        return vm_memory(_libvirt_load(spec))
    try:
        return vm_memory(VM.load(spec))
    except NotFound as e:
        raise NotFound(f"{spec!r} is neither a file nor a VM name") from e


def owning_vm(source: str) -> VM | None:
    """The memvirt VM a source names: by name, ``libvirt:NAME``, by QEMU pid, or by RAM file."""
    if source.startswith("libvirt:"):
        return VM.load(source)
    vms = {v.name: v for v in VM.all()}
    if source in vms:
        return vms[source]
    if source.startswith("pid:"):
        return next((v for v in vms.values() if str(v.config.pid) == source[4:]), None)
    if Path(source).exists():
        real = os.path.realpath(source)
        return next(
            (v for v in vms.values() if v.config.ram_path and os.path.realpath(v.config.ram_path) == real), None
        )
    return None


@contextmanager
def held_still(source: str, pause: bool) -> Iterator[dict[str, float | bool]]:
    """Hold the guest ``source`` names still while it is read: its VM's own pause (QMP, or
    libvirt's suspend for a domain), SIGSTOP/SIGCONT for another QEMU process; a dump or file
    needs nothing. Yields ``{"live": whether the read is of a running guest}``, plus
    ``pause_seconds`` once resumed.

    The bootstrap runs before the pause: what it reads (VMCOREINFO, kallsyms, BTF, the kernel's
    page tables for its image and vmemmap) does not change while a guest runs."""
    info: dict[str, float | bool] = {"live": False}
    vm = owning_vm(source)
    pid = int(source[4:]) if source.startswith("pid:") and source[4:].isdigit() else None
    if not pause and (vm is not None or pid is not None):
        info["live"] = True
        yield info
        return
    if vm is not None and vm.status() == "running":
        t = time.perf_counter()
        vm.pause()
        try:
            yield info
        finally:
            vm.resume()
            info["pause_seconds"] = time.perf_counter() - t
    elif vm is None and pid is not None:
        t = time.perf_counter()
        os.kill(pid, signal.SIGSTOP)
        try:
            yield info
        finally:
            os.kill(pid, signal.SIGCONT)
            info["pause_seconds"] = time.perf_counter() - t
    else:
        yield info
