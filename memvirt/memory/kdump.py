"""A kdump-compressed ("diskdump") memory dump, as QEMU's ``dump-guest-memory`` and makedumpfile write it.

Layout (all little-endian, ``block_size`` = 4096)::

    block 0                  disk_dump_header ("KDUMP   ", block_size, sub_hdr_size, bitmap_blocks, ...)
    block 1                  kdump_sub_header (phys_base, vmcoreinfo offset/size, max_mapnr_64, ...)
    1 + sub_hdr_size         1st bitmap: one bit per pfn that exists
                             2nd bitmap: one bit per pfn that was dumped
    ... + bitmap_blocks      page descriptors, one per dumped pfn in pfn order (offset, size, flags)
                             page data, each page compressed on its own or stored raw

QEMU before 8.2 always writes the *flattened* variant meant for pipes: a 4096-byte
``makedumpfile`` header, then ``(offset, size)`` big-endian records that place data at offsets
of the logical file above, and a ``(-1, -1)`` end marker. Both variants are read in place: a
flattened file is indexed once, never reassembled.

A dumped page's descriptor index is the number of dumped pages before it, computed for any set
of pfns at once from per-64-bit-word popcounts of the 2nd bitmap.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from memvirt.errors import BadImage, NotFound
from memvirt.memory.fileio import pread_into
from memvirt.memory.source import PAGE_SHIFT, PAGE_SIZE, GuestMemory, Region

KDUMP_SIGNATURE = b"KDUMP   "
FLAT_SIGNATURE = b"makedumpfile"
FLAT_HEADER_SIZE = 4096
COMPRESSED_ZLIB = 0x1
COMPRESSED_LZO = 0x2
COMPRESSED_SNAPPY = 0x4
COMPRESSED_INCOMPLETE = 0x8
COMPRESSED_ZSTD = 0x20
COMPRESSED_ANY = COMPRESSED_ZLIB | COMPRESSED_LZO | COMPRESSED_SNAPPY | COMPRESSED_ZSTD

_DISK_HEADER = struct.Struct("<8sI390s22sIIIIIIIIII")
_SUB_HEADER = struct.Struct("<QIIQQQQQQQQQQQ")
_FLAT_RECORD = struct.Struct(">qq")
PAGE_DESC = np.dtype([("offset", "<u8"), ("size", "<u4"), ("flags", "<u4"), ("page_flags", "<u8")])
_DESC_CHUNK = 1 << 20
_DESC_GAP = 1024
_DATA_GAP = 64 << 10
_FORMAT_NAMES = {
    COMPRESSED_ZLIB: "kdump-zlib",
    COMPRESSED_LZO: "kdump-lzo",
    COMPRESSED_SNAPPY: "kdump-snappy",
    COMPRESSED_ZSTD: "kdump-zstd",
}


class _PlainFile:
    """The dump file itself: logical offset equals file offset."""

    flattened = False

    def __init__(self, fd: int, size: int, what: str):
        self._fd, self.size, self._what = fd, size, what

    def read(self, offset: int, out: memoryview) -> None:
        pread_into(self._fd, offset, out, self._what)


class _FlattenedFile:
    """A flattened dump seen as the logical file its records describe.

    Bytes no record covers read as zeros; where records overlap the later one wins, as when
    makedumpfile ``-R`` replays them.
    """

    flattened = True

    def __init__(self, fd: int, size: int, what: str):
        self._fd, self._what = fd, what
        los: list[int] = []
        lens: list[int] = []
        poss: list[int] = []
        pos = FLAT_HEADER_SIZE
        while True:
            if pos + _FLAT_RECORD.size > size:
                raise BadImage(
                    f"{what}: truncated: the flattened records stop at byte {pos:#x} without their end marker"
                )
            off, n = _FLAT_RECORD.unpack(os.pread(fd, _FLAT_RECORD.size, pos))
            if off == -1 and n == -1:
                break
            if off < 0 or n < 0:
                raise BadImage(f"{what}: corrupt flattened record at byte {pos:#x} (offset {off}, size {n})")
            if pos + _FLAT_RECORD.size + n > size:
                raise BadImage(
                    f"{what}: truncated: the flattened record at byte {pos:#x} needs {n} bytes, "
                    f"the file ends {size - pos - _FLAT_RECORD.size} bytes later"
                )
            los.append(off)
            lens.append(n)
            poss.append(pos + _FLAT_RECORD.size)
            pos += _FLAT_RECORD.size + n
        lo = np.array(los, dtype=np.int64)
        hi = lo + np.array(lens, dtype=np.int64)
        fpos = np.array(poss, dtype=np.int64)
        order = np.argsort(lo, kind="stable")
        self._disjoint = bool(len(lo) < 2 or np.all(lo[order][1:] >= np.maximum.accumulate(hi[order])[:-1]))
        if self._disjoint:
            lo, hi, fpos = lo[order], hi[order], fpos[order]
        self._lo, self._hi, self._fpos = lo, hi, fpos
        self.size = int(hi.max()) if len(hi) else 0

    def read(self, offset: int, out: memoryview) -> None:
        end = offset + len(out)
        if end > self.size:
            raise BadImage(f"{self._what} ends at logical byte {self.size:#x}; expected {end - self.size} more bytes")
        if self._disjoint:
            hit = np.arange(np.searchsorted(self._hi, offset, "right"), np.searchsorted(self._lo, end, "left"))
        else:
            hit = np.flatnonzero((self._lo < end) & (self._hi > offset))
        starts = np.maximum(self._lo[hit], offset)
        stops = np.minimum(self._hi[hit], end)
        if not self._disjoint or int((stops - starts).sum()) != len(out):
            np.frombuffer(out, dtype=np.uint8)[:] = 0
        for s, e, p in zip(
            starts.tolist(), stops.tolist(), (self._fpos[hit] + starts - self._lo[hit]).tolist(), strict=True
        ):
            pread_into(self._fd, p, out[s - offset : e - offset], self._what)


def _runs(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end indices of the runs of ones in a 0/1 array."""
    edges = np.flatnonzero(np.diff(bits, prepend=np.uint8(0), append=np.uint8(0)))
    return edges[0::2], edges[1::2]


def _optional_decompressor(flag: int) -> Callable[[memoryview], bytes] | None:
    """A page decompressor for LZO or snappy if a binding is installed; they are not dependencies."""
    if flag == COMPRESSED_LZO:
        try:
            import lzo  # type: ignore[import-not-found]
        except ImportError:
            return None
        return lambda data: lzo.decompress(bytes(data), False, PAGE_SIZE)
    if flag == COMPRESSED_SNAPPY:
        try:
            import cramjam  # type: ignore[import-not-found]

            return lambda data: bytes(cramjam.snappy.decompress_raw(bytes(data)))
        except ImportError:
            pass
        try:
            import snappy  # type: ignore[import-not-found]
        except ImportError:
            return None
        return lambda data: snappy.uncompress(bytes(data))
    return None


def _zstd_decompressor() -> Callable[[memoryview], bytes]:
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    return lambda data: dctx.decompress(bytes(data), max_output_size=PAGE_SIZE)


class KdumpMemory(GuestMemory):
    """Guest-physical memory of a kdump-compressed dump, flattened or not.

    Regions are the runs of pfns in the 1st bitmap, with ``offset`` equal to ``gpa``: reads are
    resolved by pfn through the page descriptors. Pages that exist but were not dumped (absent
    from the 2nd bitmap, e.g. makedumpfile's excluded zero pages) read as zeros.

    ``phys_base`` is the sub header's value as written. QEMU 7.2 derives it by parsing the
    guest's decimal ``NUMBER(phys_base)`` VMCOREINFO line as hex, so for QEMU dumps trust the
    VMCOREINFO text instead.
    """

    kind = "kdump dump"

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise NotFound(f"kdump dump {self.path} does not exist") from None
        except PermissionError:
            raise BadImage(f"no permission to read kdump dump {self.path}") from None
        self._vmcoreinfo: bytes | None = None
        self._decompressors: dict[int, Callable[[memoryview], bytes] | None] = {COMPRESSED_ZLIB: zlib.decompress}
        try:
            self._parse()
        except OSError as e:
            self.close()
            raise self._bad(f"cannot read it: {e.strerror}") from None
        except BaseException:
            self.close()
            raise

    def _bad(self, problem: str) -> BadImage:
        return BadImage(f"kdump dump {self.path}: {problem}")

    def _truncated(self, what: str, end: int) -> BadImage:
        size = "its flattened records end" if self.flattened else "the file ends"
        incomplete = " (makedumpfile marked it incomplete)" if self.status & COMPRESSED_INCOMPLETE else ""
        return self._bad(
            f"truncated: {what} needs bytes up to {end:#x}, but {size} at {self._file.size:#x}{incomplete}"
        )

    def _read(self, offset: int, size: int) -> bytes:
        buf = bytearray(size)
        self._file.read(offset, memoryview(buf))
        return bytes(buf)

    def _parse(self) -> None:
        size = os.fstat(self._fd).st_size
        if size == 0:
            raise self._bad("the file is empty")
        head = os.pread(self._fd, 32, 0)
        what = f"kdump dump {self.path}"
        self.status = 0
        if head.startswith(FLAT_SIGNATURE):
            if size < FLAT_HEADER_SIZE:
                raise self._bad(f"truncated: the file has {size} bytes, less than its flattened header")
            kind, version = struct.unpack(">qq", head[16:32])
            if kind != 1:
                raise self._bad(f"makedumpfile header of unknown type {kind} (version {version})")
            self._file: _PlainFile | _FlattenedFile = _FlattenedFile(self._fd, size, what)
        else:
            self._file = _PlainFile(self._fd, size, what)
        self.flattened = self._file.flattened
        sig = self._read(0, min(8, self._file.size))
        if sig != KDUMP_SIGNATURE:
            if head.startswith(b"\x7fELF"):
                raise self._bad("this is an ELF core, not a kdump-compressed dump; open it as elf")
            raise self._bad(f"not a kdump-compressed dump (starts with {sig!r}, expected {KDUMP_SIGNATURE!r})")
        if self._file.size < _DISK_HEADER.size:
            raise self._truncated("the disk_dump_header", _DISK_HEADER.size)
        header = self._read(0, _DISK_HEADER.size)
        fields = _DISK_HEADER.unpack(header)
        self.header_version = fields[1]
        self.status, block_size, sub_hdr_size, bitmap_blocks, max_mapnr = fields[4:9]
        if block_size != PAGE_SIZE:
            if struct.unpack_from("<I", header, 416)[0] == PAGE_SIZE:
                raise self._bad("it has the 32-bit header layout (an i386 dump), which is not supported")
            raise self._bad(f"block_size is {block_size}; only {PAGE_SIZE}-byte pages are supported")
        if bitmap_blocks == 0:
            raise self._bad("bitmap_blocks is 0: the dump has no page bitmaps")
        self.phys_base = 0
        if sub_hdr_size:
            self._parse_sub_header(block_size, sub_hdr_size)
            max_mapnr = self._max_mapnr_64 or max_mapnr
        for flag in (COMPRESSED_LZO, COMPRESSED_SNAPPY):
            if self.status & flag and self._decompressor(flag) is None:
                raise self._bad(
                    f"{_FORMAT_NAMES[flag]} is not supported (no Python binding installed); dump with kdump-zlib"
                )

        bitmap_at = (1 + sub_hdr_size) * block_size
        bitmap_len = bitmap_blocks * block_size // 2
        desc_at = bitmap_at + bitmap_blocks * block_size
        if desc_at > self._file.size:
            raise self._truncated("the page bitmaps", desc_at)
        nbits = min(max_mapnr, bitmap_len * 8)
        nbytes = (nbits + 7) // 8
        exists = np.unpackbits(np.frombuffer(self._read(bitmap_at, nbytes), np.uint8), bitorder="little", count=nbits)
        starts, ends = _runs(exists)
        if len(starts) == 0:
            raise self._bad("the 1st bitmap is empty: the dump holds no memory")
        self.regions = tuple(
            Region(s << PAGE_SHIFT, (e - s) << PAGE_SHIFT, s << PAGE_SHIFT)
            for s, e in zip(starts.tolist(), ends.tolist(), strict=True)
        )
        self._starts, self._ends = starts, ends

        dumped = np.zeros((nbytes + 7) // 8 * 8, dtype=np.uint8)
        dumped[:nbytes] = np.frombuffer(self._read(bitmap_at + bitmap_len, nbytes), np.uint8)
        if nbits % 8:
            dumped[nbytes - 1] &= (1 << (nbits % 8)) - 1
        self._nbits = nbits
        self._words = dumped.view("<u8")
        self._rank = np.zeros(len(self._words) + 1, dtype=np.int64)
        np.cumsum(np.bitwise_count(self._words), out=self._rank[1:])
        self._desc_at = desc_at
        self._ndumped = int(self._rank[-1])
        if desc_at + self._ndumped * PAGE_DESC.itemsize > self._file.size:
            raise self._truncated(f"the {self._ndumped} page descriptors", desc_at + self._ndumped * PAGE_DESC.itemsize)
        for k0 in range(0, self._ndumped, _DESC_CHUNK):
            k1 = min(k0 + _DESC_CHUNK, self._ndumped)
            desc = self._read_desc_range(k0, k1)
            bad = self._first_bad(desc)
            if bad is not None:
                raise self._desc_error(desc[bad], self._select(k0 + bad))

    def _parse_sub_header(self, block_size: int, sub_hdr_size: int) -> None:
        """phys_base, VMCOREINFO and the 64-bit max_mapnr from the kdump_sub_header."""
        end = block_size + _SUB_HEADER.size
        if end > self._file.size:
            raise self._truncated("the kdump_sub_header", end)
        sub = _SUB_HEADER.unpack(self._read(block_size, _SUB_HEADER.size))
        self.phys_base = sub[0]
        vmci_at, vmci_size = sub[5], sub[6]
        self._max_mapnr_64 = sub[13] if self.header_version >= 6 else 0
        if self.header_version >= 3 and vmci_size:
            if vmci_at + vmci_size > self._file.size:
                raise self._truncated("the VMCOREINFO note", vmci_at + vmci_size)
            self._vmcoreinfo = self._read(vmci_at, vmci_size).rstrip(b"\0")

    def _decompressor(self, flag: int) -> Callable[[memoryview], bytes] | None:
        if flag not in self._decompressors:
            self._decompressors[flag] = (
                _zstd_decompressor() if flag == COMPRESSED_ZSTD else _optional_decompressor(flag)
            )
        return self._decompressors[flag]

    def _first_bad(self, desc: np.ndarray) -> int | None:
        """Index of the first descriptor that is corrupt or points past the end, if any."""
        flags = desc["flags"]
        size = desc["size"].astype(np.int64)
        compressed = (flags & COMPRESSED_ANY) != 0
        bad = (
            (size == 0)
            | (size > PAGE_SIZE)
            | ((flags & ~np.uint32(COMPRESSED_ANY)) != 0)
            | (~compressed & (size != PAGE_SIZE))
            | (np.bitwise_count(flags & COMPRESSED_ANY) > 1)
            | (desc["offset"] > np.uint64(self._file.size - 1))
            | (desc["offset"].astype(np.int64) + size > self._file.size)
        )
        hits = np.flatnonzero(bad)
        return int(hits[0]) if len(hits) else None

    def _desc_error(self, d: np.void, pfn: int) -> BadImage:
        offset, size, flags = int(d["offset"]), int(d["size"]), int(d["flags"])
        if offset + size > self._file.size and 0 < size <= PAGE_SIZE:
            return self._truncated(f"the data of pfn {pfn:#x} ({size} bytes at {offset:#x})", offset + size)
        return self._bad(
            f"corrupt page descriptor for pfn {pfn:#x} (offset {offset:#x}, size {size}, flags {flags:#x})"
        )

    def _select(self, k: int) -> int:
        """The pfn of the ``k``-th dumped page (for error messages)."""
        w = int(np.searchsorted(self._rank, k, "right")) - 1
        bits = np.flatnonzero(np.unpackbits(self._words[w : w + 1].view(np.uint8), bitorder="little"))
        return w * 64 + int(bits[k - int(self._rank[w])])

    def _read_desc_range(self, k0: int, k1: int) -> np.ndarray:
        buf = np.empty(k1 - k0, dtype=PAGE_DESC)
        self._file.read(self._desc_at + k0 * PAGE_DESC.itemsize, memoryview(buf).cast("B"))
        return buf

    def _descriptors(self, idx: np.ndarray) -> np.ndarray:
        """Descriptors ``idx`` (any order), read as a few contiguous runs of the table."""
        uniq, inverse = np.unique(idx, return_inverse=True)
        breaks = np.flatnonzero(np.diff(uniq) > _DESC_GAP) + 1
        got = np.empty(len(uniq), dtype=PAGE_DESC)
        for s, e in zip(np.r_[0, breaks].tolist(), np.r_[breaks, len(uniq)].tolist(), strict=True):
            first = int(uniq[s])
            got[s:e] = self._read_desc_range(first, int(uniq[e - 1]) + 1)[uniq[s:e] - first]
        return got[inverse]

    def _decode(self, pfns: np.ndarray, out: np.ndarray) -> None:
        """Fill ``out[i]`` with page ``pfns[i]``: zeros if not dumped, else its decompressed data."""
        inside = (pfns >= 0) & (pfns < self._nbits)
        word = np.where(inside, pfns >> 6, 0)
        bit = (pfns & 63).astype(np.uint64)
        w = self._words[word]
        dumped = inside & (((w >> bit) & np.uint64(1)) != 0)
        out[~dumped] = 0
        rows = np.flatnonzero(dumped)
        if len(rows) == 0:
            return
        below = w[rows] & ((np.uint64(1) << bit[rows]) - np.uint64(1))
        desc = self._descriptors(self._rank[word[rows]] + np.bitwise_count(below))
        bad = self._first_bad(desc)
        if bad is not None:
            raise self._desc_error(desc[bad], int(pfns[rows[bad]]))

        offset = desc["offset"].astype(np.int64)
        size = desc["size"].astype(np.int64)
        order = np.argsort(offset, kind="stable")
        lo = offset[order]
        hi = np.maximum.accumulate(lo + size[order])
        breaks = np.flatnonzero(lo[1:] > hi[:-1] + _DATA_GAP) + 1
        first, last = np.r_[0, breaks], np.r_[breaks, len(lo)] - 1
        span_lo, span_len = lo[first], hi[last] - lo[first]
        base = np.r_[0, np.cumsum(span_len)[:-1]]
        buf = np.empty(max(int(span_len.sum()), PAGE_SIZE), dtype=np.uint8)
        view = memoryview(buf)
        for b, s, n in zip(base.tolist(), span_lo.tolist(), span_len.tolist(), strict=True):
            self._file.read(s, view[b : b + n])
        span = np.repeat(np.arange(len(first)), last - first + 1)
        pos = np.empty(len(lo), dtype=np.int64)
        pos[order] = base[span] + lo - span_lo[span]

        flags = desc["flags"] & COMPRESSED_ANY
        raw = (flags == 0) | (size == PAGE_SIZE)
        if raw.any():
            out[rows[raw]] = sliding_window_view(buf, PAGE_SIZE)[pos[raw]]
        packed = np.flatnonzero(~raw)
        for i, p, n, f in zip(
            packed.tolist(), pos[packed].tolist(), size[packed].tolist(), flags[packed].tolist(), strict=True
        ):
            out[rows[i]] = self._inflate(view[p : p + n], f, int(pfns[rows[i]]))

    def _inflate(self, data: memoryview, flag: int, pfn: int) -> np.ndarray:
        name = _FORMAT_NAMES[flag]
        fn = self._decompressor(flag)
        if fn is None:
            raise self._bad(
                f"{name} is not supported (pfn {pfn:#x} needs it; no Python binding installed); dump with kdump-zlib"
            )
        try:
            page = fn(data)
        except Exception as e:  # each codec raises its own error type
            raise self._bad(f"pfn {pfn:#x} does not decompress ({name}: {e})") from None
        if len(page) != PAGE_SIZE:
            raise self._bad(f"pfn {pfn:#x} decompresses to {len(page)} bytes, not {PAGE_SIZE}")
        return np.frombuffer(page, dtype=np.uint8)

    @property
    def vmcoreinfo(self) -> bytes | None:
        return self._vmcoreinfo

    def describe(self) -> str:
        return f"kdump dump {self.path}" + (" (flattened)" if self.flattened else "")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def read_pages(self, pfns: np.ndarray) -> np.ndarray:
        pfns = np.asarray(pfns, dtype=np.int64).reshape(-1)
        out = np.empty((len(pfns), PAGE_SIZE), dtype=np.uint8)
        if len(pfns) == 0:
            return out
        at = np.searchsorted(self._starts, pfns, "right") - 1
        ram = (at >= 0) & (pfns < self._ends[np.maximum(at, 0)])
        if not ram.all():
            pfn = int(pfns[np.flatnonzero(~ram)[0]])
            raise BadImage(f"guest-physical address {pfn << PAGE_SHIFT:#x} is not RAM in this {self.kind}")
        self._decode(pfns, out)
        return out

    def _fill(self, offset: int, out: memoryview) -> None:
        if len(out) == 0:
            return
        first = offset >> PAGE_SHIFT
        pfns = np.arange(first, ((offset + len(out) - 1) >> PAGE_SHIFT) + 1, dtype=np.int64)
        dst = np.frombuffer(out, dtype=np.uint8)
        if offset % PAGE_SIZE == 0 and len(out) % PAGE_SIZE == 0:
            self._decode(pfns, dst.reshape(-1, PAGE_SIZE))
            return
        pages = np.empty((len(pfns), PAGE_SIZE), dtype=np.uint8)
        self._decode(pfns, pages)
        skip = offset - (first << PAGE_SHIFT)
        dst[:] = pages.reshape(-1)[skip : skip + len(out)]
