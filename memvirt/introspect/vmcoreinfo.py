"""The kernel's VMCOREINFO note: finding it in raw guest memory and reading its keys.

The kernel writes VMCOREINFO (``KEY=VALUE`` lines: symbols, struct sizes and offsets, numbers)
into an ELF note at boot, for kdump. ``crash_save_vmcoreinfo_init()`` allocates the note with
``alloc_pages_exact()`` (``kernel/crash_core.c``; ``kernel/vmcore_info.c`` since commit
443cbaf9e2fd in v6.9), so the note header always sits at the start of a page: only page starts
need checking. The search compares one 8-byte column per page with numpy and skips what the
backing store never populated (holes of a RAM file, unmapped pages of a QEMU process).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from memvirt.errors import BadImage, MemvirtError
from memvirt.memory.pagemap import pagemap_backed
from memvirt.memory.source import PAGE_SHIFT, PAGE_SIZE, GuestMemory

NOTE_NAME = b"VMCOREINFO"
NOTE_HEADER = 12
# Note header (namesz=11, descsz, type=0) then the name padded to 4 bytes, then the text.
_NAME_FIELD = NOTE_NAME + b"\0\0"
_MAGIC = _NAME_FIELD + b"OSRELEASE="
# VMCOREINFO_BYTES is PAGE_SIZE: the text never exceeds one page.
_MAX_DESC = PAGE_SIZE
_NOTE_BYTES = NOTE_HEADER + len(_NAME_FIELD) + _MAX_DESC
# Bytes 8..15 and 16..23 of a page that starts with the note: b"\0\0\0\0VMCO", b"REINFO\0\0".
_WORD1 = int(np.frombuffer(b"\0\0\0\0" + _NAME_FIELD[:4], "<u8")[0])
_WORD2 = int(np.frombuffer(_NAME_FIELD[4:], "<u8")[0])
_SCAN_CHUNK = 16 << 20
_FOUR_GIB = 1 << 32
_LINE = re.compile(rb"^[A-Z_-]+(\([A-Za-z0-9_.]+\))?=[ -~]*$")
# A number as the kernel prints one: decimal, hex with or without 0x, optionally negative;
# at most 40 characters, so int() never meets a megabyte of digits.
_INT = re.compile(r"^\s*-?(0[xX])?[0-9a-fA-F]{1,32}\s*$")
BUILD_ID = re.compile(r"[0-9a-f]{40}")
"""``BUILD-ID`` as ``VMCOREINFO_BUILD_ID()`` prints it: the 20-byte GNU build id in hex."""


@dataclass(frozen=True)
class Vmcoreinfo:
    """The parsed VMCOREINFO text; typed accessors raise :class:`BadImage` naming a missing key.

    ``gpa`` is where the note was found (None when a dump carried it in its own headers).
    """

    text: str
    entries: dict[str, str] = field(repr=False)
    gpa: int | None = None
    source: str = ""

    @classmethod
    def parse(cls, data: bytes, gpa: int | None = None, source: str = "") -> Vmcoreinfo:
        """Parse raw ``KEY=VALUE`` lines; text that is not VMCOREINFO is a :class:`BadImage`."""
        where = f" in {source}" if source else ""
        text = data.split(b"\0", 1)[0]
        lines = [line for line in text.split(b"\n") if line]
        if not lines or not lines[0].startswith(b"OSRELEASE="):
            raise BadImage(f"VMCOREINFO{where} does not start with OSRELEASE=")
        bad = next((line for line in lines if not _LINE.match(line)), None)
        if bad is not None:
            raise BadImage(f"VMCOREINFO{where} has a malformed line {bad[:60]!r}")
        entries: dict[str, str] = {}
        for line in lines:
            key, _, value = line.decode("ascii").partition("=")
            entries.setdefault(key, value)
        return cls(text.decode("ascii"), entries, gpa, source)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def get(self, key: str) -> str:
        """The raw value of ``key`` (e.g. ``"SYMBOL(_stext)"``)."""
        try:
            return self.entries[key]
        except KeyError:
            raise BadImage(
                f"VMCOREINFO lacks {key}: kernel {self.entries.get('OSRELEASE', '?')} does not export it"
            ) from None

    def integer(self, key: str, base: int = 10) -> int:
        """The value of ``key`` as an integer; a value that is not one is a :class:`BadImage`
        (the guest writes these lines, so a ``ValueError`` must not escape)."""
        value = self.get(key)
        try:
            if not _INT.match(value):
                raise ValueError
            return _parse_number(value) if base == 0 else int(value, base)
        except ValueError:
            raise BadImage(f"VMCOREINFO {key} is {value[:40]!r}: not a number") from None

    def symbol(self, name: str) -> int:
        """``SYMBOL(name)``: a kernel virtual address (printed as bare hex)."""
        return self.integer(f"SYMBOL({name})", 16)

    def size(self, name: str) -> int:
        return self.integer(f"SIZE({name})")

    def offset(self, path: str) -> int:
        """``OFFSET(struct.member)``."""
        return self.integer(f"OFFSET({path})")

    def length(self, path: str) -> int:
        return self.integer(f"LENGTH({path})")

    def number(self, name: str) -> int:
        """``NUMBER(name)``: signed decimal, except a few the kernel prints as ``0x...`` hex
        (``NUMBER(VMALLOC_START)``: generic since it moved out of arm64/riscv code; present on
        Debian 6.12, absent on 6.1)."""
        return self.integer(f"NUMBER({name})", 0)

    def has_symbol(self, name: str) -> bool:
        return f"SYMBOL({name})" in self.entries

    @property
    def osrelease(self) -> str:
        return self.get("OSRELEASE")

    @property
    def build_id(self) -> str | None:
        """The vmlinux GNU build id, present since v5.9 (commit 0935288c6e00); None when absent
        or not what the kernel prints (``BUILD-ID=%20phN``: 40 lowercase hex digits), since
        the guest writes it and it names a host cache file."""
        value = self.entries.get("BUILD-ID")
        return value if value is not None and BUILD_ID.fullmatch(value) else None

    @property
    def page_size(self) -> int:
        return self.integer("PAGESIZE")

    @property
    def kerneloffset(self) -> int:
        """KASLR displacement of the kernel image (``KERNELOFFSET``, hex; x86 always prints it)."""
        return self.integer("KERNELOFFSET", 16)

    @property
    def phys_base(self) -> int:
        """``NUMBER(phys_base)``: signed, since a relocated image can load below its link address."""
        return self.number("phys_base")

    @property
    def pgtable_l5_enabled(self) -> bool:
        """Absent on kernels built without 5-level paging support, which then use 4 levels."""
        key = "NUMBER(pgtable_l5_enabled)"
        return bool(self.integer(key, 0)) if key in self.entries else False

    @property
    def arch(self) -> str:
        """``arm64`` or ``x86_64``, from the keys the architecture's own
        ``arch_crash_save_vmcoreinfo()`` writes: arm64's (``arch/arm64/kernel/crash_core.c``,
        ``vmcore_info.c`` since v6.9) always has ``NUMBER(kimage_voffset)``, x86-64's never."""
        return "arm64" if "NUMBER(kimage_voffset)" in self.entries else "x86_64"

    @property
    def kimage_voffset(self) -> int:
        """arm64: kernel-image virtual address minus physical address (``__kimg_to_phys``)."""
        return self.number("kimage_voffset") % (1 << 64)

    @property
    def va_bits(self) -> int:
        """arm64 ``NUMBER(VA_BITS)``: the configured kernel virtual address size."""
        bits = self.number("VA_BITS")
        if not 36 <= bits <= 52:
            raise BadImage(f"VMCOREINFO NUMBER(VA_BITS) is {bits}: not an arm64 address size")
        return bits

    @property
    def crashtime(self) -> int | None:
        """Seconds since the epoch at the crash; only a crash writes it, live memory has none."""
        return self.integer("CRASHTIME") if "CRASHTIME" in self.entries else None


def _parse_number(value: str) -> int:
    v = value.strip()
    neg = v.startswith("-")
    body = v[1:] if neg else v
    n = int(body, 16) if body.lower().startswith("0x") else int(body, 10)
    return -n if neg else n


def parse_note(page: bytes, gpa: int | None = None, source: str = "") -> Vmcoreinfo | None:
    """The VMCOREINFO note at the start of ``page`` (bytes from the header on), or None."""
    if len(page) < NOTE_HEADER + len(_MAGIC):
        return None
    namesz, descsz, ntype = struct.unpack_from("<III", page)
    if namesz != len(NOTE_NAME) + 1 or ntype != 0 or not 0 < descsz <= _MAX_DESC:
        return None
    start = NOTE_HEADER + len(_NAME_FIELD)
    if page[NOTE_HEADER:start] != _NAME_FIELD or len(page) < start + descsz:
        return None
    try:
        return Vmcoreinfo.parse(page[start : start + descsz], gpa, source)
    except (BadImage, UnicodeDecodeError):
        return None


def read_note_at(mem: GuestMemory, gpa: int) -> Vmcoreinfo | None:
    """The note at ``gpa`` if one is there: the cheap check of a cached location."""
    try:
        r = mem.region_of(gpa)
        size = min(_NOTE_BYTES, r.end - gpa)
        page = mem.read(gpa, size).tobytes()
    except BadImage:
        return None
    return parse_note(page, gpa, mem.describe())


def find_vmcoreinfo(mem: GuestMemory, hint_gpa: int | None = None) -> tuple[int | None, Vmcoreinfo]:
    """Locate and parse VMCOREINFO: ``(gpa, info)``; ``gpa`` is None when the dump carried it.

    Order: a cached ``hint_gpa`` (one page read), the note a dump carries in its headers, then a
    scan of page starts. Raises :class:`BadImage` ``"no VMCOREINFO note found in ..."``.
    """
    for found in iter_vmcoreinfo(mem, hint_gpa):
        return found
    raise no_note(mem)


def no_note(mem: GuestMemory) -> BadImage:
    return BadImage(f"no VMCOREINFO note found in {mem.describe()} (not a running Linux guest's memory?)")


def iter_vmcoreinfo(mem: GuestMemory, hint_gpa: int | None = None) -> Iterator[tuple[int | None, Vmcoreinfo]]:
    """Every VMCOREINFO candidate, most trusted first (see :func:`find_vmcoreinfo`).

    More than one can exist: a note from an earlier boot may survive in RAM after a reboot,
    with that boot's KASLR offsets. A caller that can check a candidate (does its page table
    map its own kernel?) takes the first that passes.
    """
    if hint_gpa is not None and (info := read_note_at(mem, hint_gpa)) is not None:
        yield hint_gpa, info
    carried = mem.vmcoreinfo
    if carried:
        try:
            info = Vmcoreinfo.parse(carried, None, mem.describe())
        except BadImage:
            info = None
        if info is not None:
            yield None, info
    for gpa in scan_note_pages(mem):
        if gpa != hint_gpa and (info := read_note_at(mem, gpa)) is not None:
            yield gpa, info


def scan_note_pages(mem: GuestMemory) -> Iterator[int]:
    """Guest-physical addresses of pages whose first 24 bytes look like a VMCOREINFO note.

    Reads populated ranges in 16 MiB chunks into one reused buffer and compares two 8-byte
    columns per page: the cost is the copy, not Python.
    """
    buf = np.empty(_SCAN_CHUNK, dtype=np.uint8)
    for start, n in search_chunks(mem):
        view = buf[:n]
        mem.read_into(start, view)
        words = view.view("<u8").reshape(-1, PAGE_SIZE // 8)
        hits = np.flatnonzero((words[:, 2] == _WORD2) & (words[:, 1] == _WORD1))
        for i in hits.tolist():
            yield start + (i << PAGE_SHIFT)


def search_chunks(mem: GuestMemory) -> list[tuple[int, int]]:
    """``(gpa, size)`` pieces of RAM worth scanning, most likely first.

    The note is an early page allocation from the highest zone, so RAM above 4 GiB
    (ZONE_NORMAL) goes first when the guest has any. Within a zone it sat near either end
    (measured over 15 boots of Debian 6.1/6.12: 4 GiB + 3 MiB and 5 GiB - 70 MiB on 4 GiB
    guests; 19, 24, 327-499 MiB on 512 MiB ones, depending on where KASLR put the kernel),
    so chunks go in order of their distance from the nearer end. Pages the backing store
    never populated hold zeros and are skipped.
    """
    ranges = _populated_ranges(mem)
    if ranges is None:
        ranges = [(r.gpa, r.end) for r in mem.regions]
    out: list[tuple[int, int]] = []
    for high in (True, False):
        group = [r for r in ranges if (r[0] >= _FOUR_GIB) == high]
        if not group:
            continue
        bottom, top = min(lo for lo, _ in group), max(hi for _, hi in group)
        chunks = [(start, min(_SCAN_CHUNK, hi - start)) for lo, hi in group for start in range(lo, hi, _SCAN_CHUNK)]
        out += sorted(chunks, key=lambda c: min(c[0] - bottom, top - c[0] - c[1]))
    return out


def _populated_ranges(mem: GuestMemory) -> list[tuple[int, int]] | None:
    present = _present_pfns(mem)
    if present is None:
        return None
    edges = np.flatnonzero(np.diff(np.concatenate(([False], present, [False])).astype(np.int8)))
    return [(int(a) << PAGE_SHIFT, int(b) << PAGE_SHIFT) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def _present_pfns(mem: GuestMemory) -> np.ndarray | None:
    """Boolean per guest frame: True where the backing store may hold non-zero data."""
    populated = getattr(mem, "populated_pfns", None)
    if callable(populated):
        return populated()
    pid = getattr(mem, "pid", None)
    if isinstance(pid, int) and mem.kind == "process memory":
        return _pagemap_present(pid, mem)
    return None


def _pagemap_present(pid: int, mem: GuestMemory) -> np.ndarray | None:
    """Present-or-swapped pages of the RAM mapping (readable without privileges: only the
    frame numbers are hidden); None where the pagemap can't be read."""
    try:
        return pagemap_backed(pid, mem)
    except (MemvirtError, OSError):
        return None
