"""Open any memory source by what the user typed: a VM name, ``pid:N``, or a file."""

from __future__ import annotations

import os
from pathlib import Path

from memvirt.errors import BadImage, NotFound, UsageError
from memvirt.memory.fileio import open_image
from memvirt.memory.rammap import pc_ram_map
from memvirt.memory.source import GuestMemory, Region

FORMATS = ("auto", "ramfile", "raw", "elf", "kdump")


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
    from memvirt.qemu.vm import VM

    real = os.path.realpath(path)
    for vm in VM.all():
        if vm.config.ram_path and os.path.realpath(vm.config.ram_path) == real:
            from memvirt.memory.ramfile import RamFileMemory

            return RamFileMemory(path, vm.regions)
    return None


def _expect_size(path: Path, ram_size: int | None, what: str) -> None:
    if ram_size is None:
        return
    try:
        size = path.stat().st_size
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from e
    if what == "ramfile" and size != ram_size:
        raise BadImage(f"{path} has {size} bytes but a RAM file of a {ram_size >> 20} MiB guest has {ram_size}")
    need = max(r.end for r in pc_ram_map(ram_size))
    if what == "raw" and size < need:
        raise BadImage(f"{path} has {size} bytes; a raw image of a {ram_size >> 20} MiB guest needs {need}")


def _exists(path: Path) -> bool:
    """Whether ``path`` names something; a folder on the way that cannot be searched is the user's to fix."""
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        raise UsageError(f"cannot open {path}: {e.strerror or e}") from e
    return True


def open_memory(spec: str, fmt: str = "auto", ram_size: int | None = None) -> GuestMemory:
    """Open ``spec``: ``pid:N`` (a QEMU process), a file (dump, RAM file, raw image), or a VM name.

    ``fmt`` forces a file format; ``auto`` sniffs ELF and kdump headers and treats other files
    as a VM's RAM file when a memvirt VM owns it, else as a raw image (offset = guest-physical).
    ``ram_size`` (the guest's RAM) lays out RAM files and raw images as QEMU's pc machine does
    and rejects a file of the wrong size.
    """
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if spec.startswith("pid:"):
        from memvirt.memory.procmem import ProcMemory

        try:
            pid = int(spec[4:])
        except ValueError as e:
            raise UsageError(f"bad process source {spec!r}: use pid:NUMBER") from e
        return ProcMemory(pid)
    path = Path(spec)
    if _exists(path):
        if path.is_dir():
            raise UsageError(f"{path} is a directory, not a memory image")
        os.close(open_image(path, "memory image"))  # unreadable, a FIFO, a device: one line, before any reader
        kind = sniff(path) if fmt == "auto" else fmt
        if kind == "elf":
            from memvirt.memory.elfdump import ElfDumpMemory

            return ElfDumpMemory(path)
        if kind == "kdump":
            from memvirt.memory.kdump import KdumpMemory

            return KdumpMemory(path)
        if kind == "ramfile":
            from memvirt.memory.ramfile import RamFileMemory

            _expect_size(path, ram_size, "ramfile")
            return _vm_ram_file(path) or RamFileMemory(path, pc_ram_map(ram_size) if ram_size else None)
        if fmt == "auto" and (owned := _vm_ram_file(path)) is not None:
            return owned
        from memvirt.memory.raw import RawMemory

        _expect_size(path, ram_size, "raw")
        regions = tuple(Region(r.gpa, r.size, r.gpa) for r in pc_ram_map(ram_size)) if ram_size else None
        return RawMemory(path, regions)
    if "/" in spec or spec.endswith((".elf", ".kdump", ".raw", ".ram", ".img", ".dump")):
        raise NotFound(f"{spec} does not exist")
    from memvirt.qemu.vm import VM

    if spec.startswith("libvirt:"):  # its errors name libvirt's own cause
        return VM.load(spec).memory()
    try:
        return VM.load(spec).memory()
    except NotFound as e:
        raise NotFound(f"{spec!r} is neither a file nor a VM name") from e
