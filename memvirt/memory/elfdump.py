"""A QEMU ``dump-guest-memory`` ELF core (format ``elf``, with or without paging).

QEMU labels the core EM_X86_64 only when a CPU is in long mode; a guest still in real or
protected mode (a paused VM, a 32-bit kernel) gets EM_386 in the same ELF64 layout, because the
BIOS ROM ends at 4 GiB, so both are accepted.

Every PT_LOAD stores a guest-physical range (``p_paddr``) verbatim at ``p_offset``, so a read is
one ``preadv`` per contiguous range. With ``paging: true`` QEMU writes one PT_LOAD per virtual
mapping; several may view the same physical bytes, so overlapping loads are folded into one
physical map. The headers are parsed with ``struct`` and numpy rather than a general ELF library
because a core with more than 65534 loads keeps its real program-header count in section 0
(``PN_XNUM``), and every bound must be checked against the file size to report truncation.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from memvirt.errors import BadImage
from memvirt.memory.fileio import FdMemory, open_image
from memvirt.memory.source import MAX_GPA, MAX_REGIONS, Region, check_regions

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_PHDR = np.dtype(
    [
        ("p_type", "<u4"),
        ("p_flags", "<u4"),
        ("p_offset", "<u8"),
        ("p_vaddr", "<u8"),
        ("p_paddr", "<u8"),
        ("p_filesz", "<u8"),
        ("p_memsz", "<u8"),
        ("p_align", "<u8"),
    ]
)
_NHDR = struct.Struct("<III")
ET_CORE = 4
EM_386 = 3
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
PN_XNUM = 0xFFFF
SHT_NULL = 0
SHT_NOBITS = 8
_MAX_SECTIONS = 4096
_MAX_NOTES = 16 << 20  # note bytes searched for VMCOREINFO, over all PT_NOTE segments together
_MAX_NOTE_SEGMENTS = 64  # PT_NOTE segments searched (QEMU and /proc/vmcore write one)
_PHDR_CHUNK = 1 << 18


def _align4(n: int) -> int:
    return (n + 3) & ~3


def find_note(notes: bytes, name: bytes) -> bytes | None:
    """The descriptor of the first ELF note called ``name`` in a note segment, or None.

    A malformed note ends the walk instead of failing: the notes are optional metadata and the
    memory is still readable without them.
    """
    pos = 0
    while pos + _NHDR.size <= len(notes):
        namesz, descsz, _type = _NHDR.unpack_from(notes, pos)
        name_at = pos + _NHDR.size
        desc_at = name_at + _align4(namesz)
        end = desc_at + _align4(descsz)
        if desc_at + descsz > len(notes):
            return None
        if notes[name_at : name_at + namesz].rstrip(b"\0") == name:
            return bytes(notes[desc_at : desc_at + descsz])
        pos = end
    return None


def merge_regions(gpa: np.ndarray, size: np.ndarray, offset: np.ndarray) -> tuple[Region, ...]:
    """Sorted, non-overlapping regions from possibly overlapping ``(gpa, size, offset)`` runs.

    Where two runs claim the same guest-physical bytes the first (lowest address, then longest)
    wins; neighbours that continue each other both in memory and in the file become one region.
    Vectorised, because a paging dump can hold millions of loads. Values must fit in int64.
    """
    gpa, size, offset = (np.asarray(a, dtype=np.int64) for a in (gpa, size, offset))
    order = np.lexsort((-size, gpa))
    g, s, o = gpa[order], size[order], offset[order]
    end = g + s
    covered = np.maximum.accumulate(end)
    before = np.r_[np.int64(-1), covered[:-1]]  # how far earlier runs already reach
    start = np.maximum(g, before)
    keep = (end > start) & (s > 0)
    o = (o + start - g)[keep]
    g, end = start[keep], end[keep]
    if len(g) == 0:
        return ()
    joins = np.r_[False, (g[1:] == end[:-1]) & (o[1:] == o[:-1] + (end[:-1] - g[:-1]))]
    first = np.flatnonzero(~joins)
    if len(first) > MAX_REGIONS:
        raise BadImage(f"{len(first)} separate RAM ranges; a machine has at most {MAX_REGIONS}")
    last = np.r_[first[1:], len(g)] - 1
    return tuple(
        Region(a, b - a, c) for a, b, c in zip(g[first].tolist(), end[last].tolist(), o[first].tolist(), strict=True)
    )


class ElfDumpMemory(FdMemory):
    """Guest-physical memory of an ELF core written by QEMU's ``dump-guest-memory``."""

    kind = "ELF dump"

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._fd = open_image(self.path, "ELF dump")
        self._vmcoreinfo: bytes | None = None
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    def _bad(self, problem: str) -> BadImage:
        return BadImage(f"ELF dump {self.path}: {problem}")

    def _need(self, offset: int, size: int, what: str) -> None:
        """Fail unless the file holds bytes ``[offset, offset + size)``: checked before anything is read."""
        if offset + size > self._size:
            raise self._bad(
                f"truncated: reading {what} needs bytes {offset:#x}-{offset + size:#x} but the file has {self._size:#x}"
            )

    def _read(self, offset: int, size: int, what: str) -> bytes:
        """Exactly ``size`` header bytes at ``offset``; a short file is reported as truncated."""
        self._need(offset, size, what)
        try:
            data = os.pread(self._fd, size, offset)
        except OSError as e:
            raise self._bad(f"cannot read {what}: {e.strerror}") from e
        if len(data) < size:
            raise self._bad(
                f"truncated: reading {what} needs bytes {offset:#x}-{offset + size:#x} but the file has {self._size:#x}"
            )
        return data

    def _parse(self) -> None:
        self._size = os.fstat(self._fd).st_size
        if self._size == 0:
            raise self._bad("the file is empty")
        if self._read(0, min(4, self._size), "the ELF magic") != b"\x7fELF":
            raise self._bad("not an ELF file (no \\x7fELF magic)")
        ident = self._read(0, 16, "the ELF identification")
        if ident[4] != 2 or ident[5] != 1:
            raise self._bad("not a little-endian ELF64 file (QEMU writes x86 dumps of a pc machine as ELF64)")
        _, e_type, e_machine, _ver, _entry, phoff, shoff, _flags, _ehsize, phentsize, phnum, shentsize, shnum, _ = (
            _EHDR.unpack(self._read(0, _EHDR.size, "the ELF header"))
        )
        if e_type != ET_CORE:
            raise self._bad(f"not a core file (e_type {e_type}, expected {ET_CORE})")
        if e_machine not in (EM_X86_64, EM_386):
            raise self._bad(f"not an x86 core (e_machine {e_machine}, expected {EM_X86_64} or {EM_386})")
        if phentsize != _PHDR.itemsize:
            raise self._bad(f"program headers are {phentsize} bytes, expected {_PHDR.itemsize}")
        if phnum == PN_XNUM:
            if shoff == 0 or shentsize != _SHDR.size:
                raise self._bad("e_phnum is PN_XNUM but there is no section header holding the real count")
            phnum = _SHDR.unpack(self._read(shoff, _SHDR.size, "section header 0"))[7]
        if phnum == 0:
            raise self._bad("no program headers")
        self._need(phoff, phnum * _PHDR.itemsize, f"{phnum} program headers")
        loads: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        notes: list[np.ndarray] = []
        for first in range(0, phnum, _PHDR_CHUNK):
            n = min(_PHDR_CHUNK, phnum - first)
            chunk = np.frombuffer(
                self._read(phoff + first * _PHDR.itemsize, n * _PHDR.itemsize, f"{phnum} program headers"), _PHDR
            )
            chunk = chunk[chunk["p_filesz"] > 0]
            self._check_segments(chunk)
            ld = chunk[chunk["p_type"] == PT_LOAD]
            loads.append(
                (ld["p_paddr"].astype(np.int64), ld["p_filesz"].astype(np.int64), ld["p_offset"].astype(np.int64))
            )
            if sum(map(len, notes)) < _MAX_NOTE_SEGMENTS:
                notes.append(chunk[chunk["p_type"] == PT_NOTE][:_MAX_NOTE_SEGMENTS].copy())
            del chunk, ld
        gpa, size, offset = (np.concatenate(col) for col in zip(*loads, strict=True))
        del loads
        if len(gpa) == 0:
            raise self._bad("no PT_LOAD segment: the dump holds no memory")
        if shoff and shentsize == _SHDR.size:
            self._check_sections(shoff, shnum)
        try:
            self.regions = merge_regions(gpa, size, offset)
        except BadImage as e:
            raise self._bad(str(e)) from e
        del gpa, size, offset
        check_regions(self.regions, f"ELF dump {self.path}")
        budget = _MAX_NOTES
        for note in np.concatenate(notes)[:_MAX_NOTE_SEGMENTS]:
            n = min(int(note["p_filesz"]), budget)
            if n <= 0:
                break
            budget -= n
            desc = find_note(self._read(int(note["p_offset"]), n, "the PT_NOTE segment"), b"VMCOREINFO")
            if desc is not None:
                self._vmcoreinfo = desc.rstrip(b"\0")
                break

    def _check_segments(self, phdrs: np.ndarray) -> None:
        """Fail on a segment whose bytes are cut off, or a PT_LOAD above the physical address space."""
        ends = phdrs["p_offset"] + phdrs["p_filesz"]
        past = np.flatnonzero((ends > self._size) | (ends < phdrs["p_offset"]))
        if len(past):
            p = phdrs[past[0]]
            what = "PT_NOTE" if p["p_type"] == PT_NOTE else f"segment for guest-physical {int(p['p_paddr']):#x}"
            raise self._bad(
                f"truncated: its {what} needs bytes up to {int(ends[past[0]]):#x} but the file has {self._size:#x}"
            )
        gpa_end = phdrs["p_paddr"] + phdrs["p_filesz"]
        high = np.flatnonzero(
            (phdrs["p_type"] == PT_LOAD) & ((gpa_end > np.uint64(MAX_GPA)) | (gpa_end < phdrs["p_paddr"]))
        )
        if len(high):
            p = phdrs[high[0]]
            raise self._bad(
                f"a PT_LOAD at guest-physical {int(p['p_paddr']):#x} ({int(p['p_filesz'])} bytes) lies above "
                "the 52-bit physical address space"
            )

    def _check_sections(self, shoff: int, shnum: int) -> None:
        """Fail if a section's bytes are cut off: QEMU 7.2 ends the core with ``.shstrtab``, so a
        dump short by even a few bytes is caught although every PT_LOAD is intact."""
        if shnum == 0:
            shnum = _SHDR.unpack(self._read(shoff, _SHDR.size, "section header 0"))[5]
        shnum = min(shnum, _MAX_SECTIONS)
        table = self._read(shoff, shnum * _SHDR.size, f"{shnum} section headers")
        for i in range(shnum):
            _name, sh_type, _flags, _addr, offset, size, *_ = _SHDR.unpack_from(table, i * _SHDR.size)
            if sh_type not in (SHT_NULL, SHT_NOBITS) and size and offset + size > self._size:
                raise self._bad(
                    f"truncated: section {i} needs bytes up to {offset + size:#x} but the file has {self._size:#x}"
                )

    @property
    def vmcoreinfo(self) -> bytes | None:
        return self._vmcoreinfo

    def describe(self) -> str:
        return f"ELF dump {self.path}"
