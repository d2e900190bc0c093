"""How pages travel: zero pages as run markers, duplicates as references, the rest compressed.

A DATA frame carries a batch of page runs and one compressed blob of their bytes:
``codec:u8 nruns:u32 starts:u64[n] lengths:u32[n] blob``. Compression is lz4 (fast, ~2:1) or
zstd level 1 (slower, denser) or none; :class:`CodecChooser` keeps the one under which pages
moved fastest in timed trials, trying the others again now and then because the guest's content
and the link change. On a link faster than the compressor (loopback, 10 GbE on a slow core)
that is no compression at all.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field

import lz4.block
import numpy as np
import zstandard

from memvirt.errors import UsageError
from memvirt.migrate.protocol import ProtocolError

NONE, LZ4, ZSTD = 0, 1, 2
NAMES = {NONE: "none", LZ4: "lz4", ZSTD: "zstd"}
CHOICES = ("auto", "lz4", "zstd", "none")
DATA_HEAD = struct.Struct("!BI")
TRIAL = 4
"""Batches a codec runs for before its pace is taken."""
EXPLORE_EVERY = 16
"""Every this many trials another codec is tried again."""
_zc = zstandard.ZstdCompressor(level=1)
_zd = zstandard.ZstdDecompressor()


def compress(codec: int, data: memoryview) -> bytes | memoryview:
    if codec == LZ4:
        return lz4.block.compress(data, store_size=False)
    if codec == ZSTD:
        return _zc.compress(data)
    return data


def decompress(codec: int, blob: memoryview, size: int) -> bytes | memoryview:
    try:
        if codec == LZ4:
            out = lz4.block.decompress(blob, uncompressed_size=size)
        elif codec == ZSTD:
            out = _zd.decompress(blob, max_output_size=size)
        elif codec == NONE:
            out = blob
        else:
            raise ProtocolError(f"malformed DATA frame: unknown codec {codec}")
    except (lz4.block.LZ4BlockError, zstandard.ZstdError) as e:
        raise ProtocolError(f"malformed DATA frame: {NAMES.get(codec)} data does not decompress ({e})") from e
    if len(out) != size:
        raise ProtocolError(f"malformed DATA frame: {len(out)} bytes decompressed, {size} announced")
    return out


def runs(pfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted frame numbers -> (run starts, run lengths), vectorized."""
    if len(pfns) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    breaks = np.flatnonzero(np.diff(pfns) != 1) + 1
    starts = pfns[np.concatenate(([0], breaks))]
    lengths = np.diff(np.concatenate(([0], breaks, [len(pfns)])))
    return starts.astype(np.int64), lengths.astype(np.int64)


def expand(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(run starts, lengths) -> every frame number, vectorized."""
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, np.int64)
    offs = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + (np.arange(total) - offs)


def encode_data(
    codec: int, starts: np.ndarray, lengths: np.ndarray, blob: bytes | memoryview
) -> list[bytes | bytearray | memoryview]:
    """A DATA frame's payload, as pieces to join."""
    head = DATA_HEAD.pack(codec, len(starts))
    return [head, starts.astype(">u8").tobytes(), lengths.astype(">u4").tobytes(), blob]


def decode_data(payload: bytes | memoryview) -> tuple[int, np.ndarray, np.ndarray, memoryview]:
    """(codec, run starts, run lengths, blob) of a DATA frame; malformed input raises ProtocolError.
    Starts and lengths are the peer's numbers as uint64, unchecked: bound them before any sum."""
    if len(payload) < DATA_HEAD.size:
        raise ProtocolError("malformed DATA frame: too short")
    codec, n = DATA_HEAD.unpack_from(payload)
    end = DATA_HEAD.size + 12 * n
    if len(payload) < end:
        raise ProtocolError("malformed DATA frame: run table truncated")
    starts = np.frombuffer(payload, ">u8", n, DATA_HEAD.size).astype(np.uint64)
    lengths = np.frombuffer(payload, ">u4", n, DATA_HEAD.size + 8 * n).astype(np.uint64)
    return codec, starts, lengths, memoryview(payload)[end:]


def encode_pairs(a: np.ndarray, b: np.ndarray) -> bytes:
    """Two equal-length frame-number arrays (run starts and lengths, or dup targets and sources)."""
    return struct.pack("!I", len(a)) + a.astype(">u8").tobytes() + b.astype(">u8").tobytes()


def decode_pairs(payload: bytes | memoryview, what: str) -> tuple[np.ndarray, np.ndarray]:
    """The two uint64 arrays of :func:`encode_pairs`, unchecked (bound them before any sum)."""
    if len(payload) < 4:
        raise ProtocolError(f"malformed {what} frame: too short")
    (n,) = struct.unpack_from("!I", payload)
    if len(payload) != 4 + 16 * n:
        raise ProtocolError(f"malformed {what} frame: {len(payload)} bytes for {n} pairs")
    a = np.frombuffer(payload, ">u8", n, 4).astype(np.uint64)
    b = np.frombuffer(payload, ">u8", n, 4 + 8 * n).astype(np.uint64)
    return a, b


@dataclass
class CodecChooser:
    """Picks the codec under which pages move fastest end to end, by trying them.

    Compressing, sealing and sending overlap (:class:`~memvirt.migrate.protocol.SendQueue`) and
    the receiver decompresses on its own CPU, so no single cost predicts the pace: the chooser
    runs each codec for a trial of :data:`TRIAL` batches and times them (input bytes per second
    of wall time, the whole pipeline). After each codec has had one trial it keeps the fastest,
    giving another codec a trial every :data:`EXPLORE_EVERY` trials because the guest's content
    and the link change. On a link faster than the compressor (loopback, fast LAN on a slow
    core) that is no compression at all; on a slow link, zstd.
    """

    mode: str = "auto"
    rates: dict[int, float] = field(default_factory=dict)
    """codec -> input bytes per second over its last trial."""
    used: dict[str, int] = field(default_factory=dict)
    _codec: int = LZ4
    _start: float | None = None
    _bytes: int = 0
    _count: int = 0
    _trials: int = 0
    _tried_at: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in CHOICES:
            raise UsageError(f"--codec must be one of {', '.join(CHOICES)}, not {self.mode!r}")
        if self.mode != "auto":
            self._codec = {"lz4": LZ4, "zstd": ZSTD, "none": NONE}[self.mode]

    def pause(self) -> None:
        """The pages stop flowing for a while (a round ends): the running trial is dropped."""
        self._start = None

    def encode(self, data: memoryview) -> tuple[int, bytes | memoryview]:
        """Compress one batch with the chosen codec; returns (codec, blob)."""
        if self.mode == "auto":
            self._time(time.perf_counter())
        blob = compress(self._codec, data)
        self._bytes += data.nbytes
        self._count += 1
        self.used[NAMES[self._codec]] = self.used.get(NAMES[self._codec], 0) + 1
        return self._codec, blob

    def _time(self, now: float) -> None:
        if self._start is not None and self._count >= TRIAL:
            self.rates[self._codec] = self._bytes / max(now - self._start, 1e-9)
            self._tried_at[self._codec] = self._trials
            self._trials += 1
            self._start = None
        if self._start is None:
            self._codec = self._next()
            self._start, self._bytes, self._count = now, 0, 0

    def _next(self) -> int:
        untried = [c for c in (LZ4, NONE, ZSTD) if c not in self.rates]
        if untried:
            return untried[0]
        best = max(self.rates, key=lambda c: self.rates[c])
        if self._trials % EXPLORE_EVERY == 0:
            return min((c for c in self.rates if c != best), key=lambda c: self._tried_at.get(c, -1))
        return best
