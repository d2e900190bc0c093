"""Kernel modules for the initramfs, with their dependencies read from each module's .modinfo.

Debian's image packages carry no ``modules.dep`` (depmod makes it at install time), so the
``depends=`` field every ``.ko`` carries is the source of truth. Compressed modules (``.ko.xz``,
``.ko.zst``) are unpacked because busybox ``insmod`` loads only plain ELF.
"""

from __future__ import annotations

import io
import lzma
from collections.abc import Iterable
from pathlib import Path

import zstandard
from elftools.elf.elffile import ELFFile

from memvirt.errors import MemvirtError

GUEST_MODULES = (
    "virtio_pci",
    "virtio_console",
    "qemu_fw_cfg",
    "virtio_net",
    "virtio_balloon",
    "virtio_blk",
    "zram",
    "zsmalloc",
    "lzo_rle",
    "lzo",
    "lz4",
)
"""What the guest init loads: command channel, VMCOREINFO export to QEMU dumps, network, balloon, disks, and
compressed swap in RAM for hibernating a machine more than half full (``memvirt pm``). zram asks for its
compressor by name through the crypto API, which .modinfo ``depends`` does not show, so the compressors are
listed (Debian builds lzo and lzo-rle into the kernel, lz4 as a module; built-in ones are skipped)."""

_SUFFIXES = (".ko", ".ko.xz", ".ko.zst")


def _norm(name: str) -> str:
    return name.replace("-", "_")


def index_modules(tree: Path) -> dict[str, Path]:
    """Module name -> file, for every module under ``tree``."""
    found: dict[str, Path] = {}
    for suffix in _SUFFIXES:
        for p in tree.rglob(f"*{suffix}"):
            found[_norm(p.name[: -len(suffix)])] = p
    return found


def module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def _depends(data: bytes, name: str) -> list[str]:
    elf = ELFFile(io.BytesIO(data))
    sec = elf.get_section_by_name(".modinfo")
    if sec is None:
        raise MemvirtError(f"module {name} has no .modinfo section")
    for field in sec.data().split(b"\0"):
        if field.startswith(b"depends="):
            return [_norm(d) for d in field[8:].decode().split(",") if d]
    return []


def resolve(tree: Path, wanted: Iterable[str], builtin: set[str] | None = None) -> list[tuple[str, bytes]]:
    """``wanted`` modules plus dependencies, in load order, as ``(name, elf bytes)``.

    Modules built into the kernel (``modules.builtin``) and ones the tree lacks are skipped:
    a kernel may have the feature built in.
    """
    index = index_modules(tree)
    builtin = builtin if builtin is not None else read_builtin(tree)
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name in builtin or name not in index:
            return
        seen.add(name)
        data = module_bytes(index[name])
        for dep in _depends(data, name):
            visit(dep)
        order.append((name, data))

    for w in wanted:
        visit(_norm(w))
    return order


def read_builtin(tree: Path) -> set[str]:
    f = tree / "modules.builtin"
    if not f.exists():
        return set()
    return {_norm(Path(line.strip()).name.split(".ko")[0]) for line in f.read_text().splitlines() if line.strip()}
