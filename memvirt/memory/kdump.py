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

A dump is untrusted input: every allocation is bounded by bytes the file really holds (a
flattened file's logical size can be far larger), so header fields cannot make memvirt allocate
more than a small multiple of the file, and a header that does not add up is a BadImage.

A dumped page's descriptor index is the number of dumped pages before it, computed for any set
of pfns at once from per-64-bit-word popcounts of the 2nd bitmap.
"""

from __future__ import annotations

import os
import struct
import zlib
from array import array
from collections.abc import Callable
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from memvirt.errors import BadImage
from memvirt.memory.fileio import FdMemory, open_image, read_image_into
from memvirt.memory.source import MAX_GPA, MAX_REGIONS, PAGE_SHIFT, PAGE_SIZE, Region, check_regions

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
_BITMAP_CHUNK = 1 << 16  # bitmap bytes unpacked at a time (512 Ki pfns)
_RECORD_BUF = 1 << 20  # flattened-file bytes read at a time while indexing its records
_MAX_LOGICAL = 1 << 62  # a flattened record placing data beyond this is corrupt
_MAX_VMCOREINFO = 1 << 20  # the kernel's note is one page (VMCOREINFO_BYTES)
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
        read_image_into(self._fd, offset, out, self._what)

    def covered(self, start: int, end: int) -> int:
        """How many bytes of ``[start, end)`` the file holds."""
        return max(0, min(end, self.size) - start)

    def extent(self, start: int, end: int) -> int:
        """Where the bytes the file holds in ``[start, end)`` stop (``start`` if none)."""
        return max(start, min(end, self.size))


def _disjoint_pieces(lo: np.ndarray, hi: np.ndarray, fpos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Records ``[lo, hi)`` stored at ``fpos``, in file order, as sorted disjoint pieces where a later
    record wins over the earlier ones it overlaps (as ``makedumpfile -R`` replays them).

    A read then costs a binary search however many records there are. Records that overlap
    nothing pass through as they are; overlapping ones are cut at every record boundary and each
    piece goes to the latest record covering it, found with a segment tree built level by level in
    numpy: O(n log n) time and a few arrays of n, whatever the overlaps.
    """
    if len(lo) == 0:
        return lo, hi, fpos
    order = np.argsort(lo, kind="stable")
    slo, shi = lo[order], hi[order]
    reach = np.maximum.accumulate(shi)
    starts_cluster = np.r_[True, slo[1:] >= reach[:-1]]
    single = starts_cluster & np.r_[starts_cluster[1:], True]
    out_lo, out_hi, out_rec = [slo[single]], [shi[single]], [order[single]]
    multi = np.flatnonzero(~single)
    if len(multi):
        rec = order[multi]
        bounds = np.unique(np.r_[slo[multi], shi[multi]])
        nseg = len(bounds) - 1
        size = 1 << max(0, (nseg - 1).bit_length())
        tree = np.full(2 * size, -1, dtype=np.int64)  # node -> latest record covering all of it
        left = np.searchsorted(bounds, slo[multi]) + size
        right = np.searchsorted(bounds, shi[multi]) + size
        while len(left):  # the canonical nodes of every record's range, one tree level per pass
            odd = (left & 1).astype(bool)
            np.maximum.at(tree, left[odd], rec[odd])
            left = left + odd
            odd = (right & 1).astype(bool)
            right = right - odd
            np.maximum.at(tree, right[odd], rec[odd])
            left, right = left >> 1, right >> 1
            live = left < right
            left, right, rec = left[live], right[live], rec[live]
        for level in range(1, size.bit_length()):  # push each node's winner down to its leaves
            nodes = np.arange(1 << level, 2 << level)
            tree[nodes] = np.maximum(tree[nodes], tree[nodes >> 1])
        win = tree[size : size + nseg]
        has = win >= 0
        seg_lo, seg_hi, win = bounds[:-1][has], bounds[1:][has], win[has]
        first = np.flatnonzero(np.r_[True, (win[1:] != win[:-1]) | (seg_lo[1:] != seg_hi[:-1])])
        out_lo.append(seg_lo[first])
        out_hi.append(seg_hi[np.r_[first[1:], len(win)] - 1])
        out_rec.append(win[first])
    plo, phi, prec = np.concatenate(out_lo), np.concatenate(out_hi), np.concatenate(out_rec)
    by = np.argsort(plo, kind="stable")
    plo, phi, prec = plo[by], phi[by], prec[by]
    return plo, phi, fpos[prec] + plo - lo[prec]


class _FlattenedFile:
    """A flattened dump seen as the logical file its records describe.

    Bytes no record covers read as zeros; where records overlap the later one wins, as when
    makedumpfile ``-R`` replays them. The records are indexed once as sorted disjoint pieces.
    """

    flattened = True

    def __init__(self, fd: int, size: int, what: str):
        self._fd, self._what = fd, what
        los, lens, poss = array("q"), array("q"), array("q")  # 8 bytes per record: <= 1.5x the file
        buf, buf_at = b"", 0
        pos = FLAT_HEADER_SIZE
        while True:
            if pos + _FLAT_RECORD.size > size:
                raise BadImage(
                    f"{what}: truncated: the flattened records stop at byte {pos:#x} without their end marker"
                )
            if pos + _FLAT_RECORD.size > buf_at + len(buf):
                buf, buf_at = os.pread(fd, _RECORD_BUF, pos), pos
                if len(buf) < _FLAT_RECORD.size:
                    raise BadImage(f"{what}: truncated: the file ends inside the flattened record at byte {pos:#x}")
            off, n = _FLAT_RECORD.unpack_from(buf, pos - buf_at)
            if off == -1 and n == -1:
                break
            if off < 0 or n < 0 or off + n > _MAX_LOGICAL:
                raise BadImage(f"{what}: corrupt flattened record at byte {pos:#x} (offset {off}, size {n})")
            if pos + _FLAT_RECORD.size + n > size:
                raise BadImage(
                    f"{what}: truncated: the flattened record at byte {pos:#x} needs {n} bytes, "
                    f"the file ends {size - pos - _FLAT_RECORD.size} bytes later"
                )
            if n:
                los.append(off)
                lens.append(n)
                poss.append(pos + _FLAT_RECORD.size)
            pos += _FLAT_RECORD.size + n
        lo = np.frombuffer(los, dtype=np.int64)
        self._lo, self._hi, self._fpos = _disjoint_pieces(
            lo, lo + np.frombuffer(lens, dtype=np.int64), np.frombuffer(poss, dtype=np.int64)
        )
        self.size = int(self._hi[-1]) if len(self._hi) else 0

    def _clipped(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """The records' ranges cut to ``[start, end)``, sorted by start, empty ones dropped."""
        lo = np.clip(self._lo, start, end)
        hi = np.clip(self._hi, start, end)
        keep = hi > lo
        return lo[keep], hi[keep]

    def covered(self, start: int, end: int) -> int:
        """How many bytes of ``[start, end)`` some record holds."""
        lo, hi = self._clipped(start, end)
        return int((hi - lo).sum())

    def extent(self, start: int, end: int) -> int:
        """Where the bytes records hold in ``[start, end)`` stop (``start`` if none)."""
        _, hi = self._clipped(start, end)
        return int(hi.max()) if len(hi) else start

    def read(self, offset: int, out: memoryview) -> None:
        end = offset + len(out)
        if end > self.size:
            raise BadImage(f"{self._what} ends at logical byte {self.size:#x}; expected {end - self.size} more bytes")
        hit = np.arange(np.searchsorted(self._hi, offset, "right"), np.searchsorted(self._lo, end, "left"))
        starts = np.maximum(self._lo[hit], offset)
        stops = np.minimum(self._hi[hit], end)
        if int((stops - starts).sum()) != len(out):
            np.frombuffer(out, dtype=np.uint8)[:] = 0
        for s, e, p in zip(
            starts.tolist(), stops.tolist(), (self._fpos[hit] + starts - self._lo[hit]).tolist(), strict=True
        ):
            read_image_into(self._fd, p, out[s - offset : e - offset], self._what)


def _snappy_checked(data: memoryview) -> bytes:
    """A raw snappy block that declares one page: bindings allocate the declared length first."""
    length = shift = 0
    for byte in bytes(data[:5]):
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
    if length != PAGE_SIZE:
        raise ValueError(f"the block declares {length} bytes, not one page")
    return bytes(data)


def _optional_decompressor(flag: int) -> Callable[[memoryview], bytes] | None:
    """A page decompressor for LZO or snappy if a binding is installed; they are not dependencies."""
    if flag == COMPRESSED_LZO:
        try:
            import lzo
        except ImportError:
            return None
        return lambda data: lzo.decompress(bytes(data), False, PAGE_SIZE)
    if flag == COMPRESSED_SNAPPY:
        try:
            import cramjam

            return lambda data: bytes(cramjam.snappy.decompress_raw(_snappy_checked(data)))
        except ImportError:
            pass
        try:
            import snappy
        except ImportError:
            return None
        return lambda data: snappy.uncompress(_snappy_checked(data))
    return None


def _zstd_decompressor() -> Callable[[memoryview], bytes]:
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    return lambda data: dctx.decompress(bytes(data), max_output_size=PAGE_SIZE)


class KdumpMemory(FdMemory):
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
        self._fd = open_image(self.path, "kdump dump")
        self._vmcoreinfo: bytes | None = None
        self._decompressors: dict[int, Callable[[memoryview], bytes] | None] = {COMPRESSED_ZLIB: zlib.decompress}
        try:
            self._parse()
        except OSError as e:
            self.close()
            raise self._bad(f"cannot read it: {e.strerror}") from e
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

        if max_mapnr > MAX_GPA >> PAGE_SHIFT:
            raise self._bad(f"max_mapnr {max_mapnr:#x} is beyond the 52-bit physical address space")
        bitmap_at = (1 + sub_hdr_size) * block_size
        bitmap_len = bitmap_blocks * block_size // 2
        desc_at = bitmap_at + bitmap_blocks * block_size
        if desc_at > self._file.size:
            raise self._truncated("the page bitmaps", desc_at)
        nbits = min(max_mapnr, bitmap_len * 8)
        # Bits past the last byte of the 1st bitmap the file holds are 0 (QEMU leaves the tail of
        # a flattened bitmap unwritten), so they are not counted; what is counted must be there.
        nbits = min(nbits, (self._file.extent(bitmap_at, bitmap_at + (nbits + 7) // 8) - bitmap_at) * 8)
        nbytes = (nbits + 7) // 8
        for which, at in (("1st", bitmap_at), ("2nd", bitmap_at + bitmap_len)):
            have = self._file.covered(at, at + nbytes)
            if have < nbytes:
                raise self._bad(
                    f"the {which} page bitmap is incomplete: the flattened records hold {have} of its {nbytes} bytes"
                )
        starts, ends = self._bitmap_runs(bitmap_at, nbits)
        if len(starts) == 0:
            raise self._bad("the 1st bitmap is empty: the dump holds no memory")
        self.regions = tuple(
            Region(s << PAGE_SHIFT, (e - s) << PAGE_SHIFT, s << PAGE_SHIFT)
            for s, e in zip(starts.tolist(), ends.tolist(), strict=True)
        )
        check_regions(self.regions, f"kdump dump {self.path}")
        self._starts, self._ends = starts, ends

        dumped = np.zeros((nbytes + 7) // 8 * 8, dtype=np.uint8)
        self._file.read(bitmap_at + bitmap_len, dumped.data[:nbytes])
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

    def _bitmap_runs(self, at: int, nbits: int) -> tuple[np.ndarray, np.ndarray]:
        """First and end pfns of the runs of ones in the 1st bitmap, unpacked a chunk at a time.

        Refuses more runs than :data:`MAX_REGIONS` as soon as it sees them: each becomes a Region.
        """
        starts: list[np.ndarray] = []
        ends: list[np.ndarray] = []
        count, prev = 0, np.uint8(0)
        buf = bytearray(min(_BITMAP_CHUNK, (nbits + 7) // 8))
        for first in range(0, nbits, _BITMAP_CHUNK * 8):
            n = min(_BITMAP_CHUNK * 8, nbits - first)
            view = memoryview(buf)[: (n + 7) // 8]
            self._file.read(at + first // 8, view)
            bits = np.unpackbits(np.frombuffer(view, np.uint8), bitorder="little", count=n)
            edges = np.flatnonzero(np.diff(bits, prepend=prev))
            rising = bits[edges] == 1
            starts.append(edges[rising] + first)
            ends.append(edges[~rising] + first)
            count += len(edges)
            if count > 2 * MAX_REGIONS + 1:
                raise self._bad(f"the 1st bitmap has more than {MAX_REGIONS} runs of pages; a machine has fewer")
            prev = bits[-1]
        if prev:
            ends.append(np.array([nbits]))
        if not starts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(starts).astype(np.int64), np.concatenate(ends).astype(np.int64)

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
            if vmci_size > _MAX_VMCOREINFO:
                raise self._bad(f"its VMCOREINFO note claims {vmci_size} bytes; the kernel writes one page")
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
        self._file.read(self._desc_at + k0 * PAGE_DESC.itemsize, buf.data.cast("B"))
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
        for gap in (_DATA_GAP, 0):  # bridging gaps saves reads, unless gaps would be most of the buffer
            breaks = np.flatnonzero(lo[1:] > hi[:-1] + gap) + 1
            first, last = np.r_[0, breaks], np.r_[breaks, len(lo)] - 1
            span_lo, span_len = lo[first], hi[last] - lo[first]
            if int(span_len.sum()) <= 2 * len(lo) * PAGE_SIZE:
                break
        base = np.r_[0, np.cumsum(span_len)[:-1]]
        buf = np.empty(max(int(span_len.sum()), PAGE_SIZE), dtype=np.uint8)
        view = buf.data
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
            raise self._bad(f"pfn {pfn:#x} does not decompress ({name}: {e})") from e
        if len(page) != PAGE_SIZE:
            raise self._bad(f"pfn {pfn:#x} decompresses to {len(page)} bytes, not {PAGE_SIZE}")
        return np.frombuffer(page, dtype=np.uint8)

    @property
    def vmcoreinfo(self) -> bytes | None:
        return self._vmcoreinfo

    def describe(self) -> str:
        return f"kdump dump {self.path}" + (" (flattened)" if self.flattened else "")

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
