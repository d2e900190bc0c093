"""How pages travel: zero pages as run markers, duplicates as references, the rest compressed.

A DATA frame carries a batch of page runs and one compressed blob of their bytes:
``codec:u8 nruns:u32 starts:u64[n] lengths:u32[n] blob``. Compression is lz4 (fast, ~2:1) or
zstd level 1 (slower, denser); :class:`CodecChooser` picks per batch the one that moves pages
fastest given the compression speed it measured and the bandwidth the link showed, re-probing
now and then because the guest's content and the link change.
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

PAGE = 4096
NONE, LZ4, ZSTD = 0, 1, 2
NAMES = {NONE: "none", LZ4: "lz4", ZSTD: "zstd"}
CHOICES = ("auto", "lz4", "zstd", "none")
DATA_HEAD = struct.Struct("!BI")
PROBE_EVERY = 64
_zc = zstandard.ZstdCompressor(level=1)
_zd = zstandard.ZstdDecompressor()


def compress(codec: int, data: memoryview) -> bytes | memoryview:
    if codec == LZ4:
        return lz4.block.compress(data, store_size=False)
    if codec == ZSTD:
        return _zc.compress(data)
    return data


def decompress(codec: int, blob: memoryview, size: int) -> bytes:
    try:
        if codec == LZ4:
            out = lz4.block.decompress(blob, uncompressed_size=size)
        elif codec == ZSTD:
            out = _zd.decompress(blob, max_output_size=size)
        elif codec == NONE:
            out = bytes(blob)
        else:
            raise ProtocolError(f"malformed DATA frame: unknown codec {codec}")
    except (lz4.block.LZ4BlockError, zstandard.ZstdError) as e:
        raise ProtocolError(f"malformed DATA frame: {NAMES.get(codec)} data does not decompress ({e})") from None
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


def encode_data(codec: int, starts: np.ndarray, lengths: np.ndarray, blob: bytes | memoryview) -> list[bytes | memoryview]:
    """A DATA frame's payload, as pieces to join."""
    head = DATA_HEAD.pack(codec, len(starts))
    return [head, starts.astype(">u8").tobytes(), lengths.astype(">u4").tobytes(), blob]


def decode_data(payload: bytes) -> tuple[int, np.ndarray, np.ndarray, memoryview]:
    """(codec, run starts, run lengths, blob) of a DATA frame; malformed input raises ProtocolError."""
    if len(payload) < DATA_HEAD.size:
        raise ProtocolError("malformed DATA frame: too short")
    codec, n = DATA_HEAD.unpack_from(payload)
    end = DATA_HEAD.size + 12 * n
    if len(payload) < end:
        raise ProtocolError("malformed DATA frame: run table truncated")
    starts = np.frombuffer(payload, ">u8", n, DATA_HEAD.size).astype(np.int64)
    lengths = np.frombuffer(payload, ">u4", n, DATA_HEAD.size + 8 * n).astype(np.int64)
    return codec, starts, lengths, memoryview(payload)[end:]


def encode_pairs(a: np.ndarray, b: np.ndarray) -> bytes:
    """Two equal-length frame-number arrays (run starts and lengths, or dup targets and sources)."""
    return struct.pack("!I", len(a)) + a.astype(">u8").tobytes() + b.astype(">u8").tobytes()


def decode_pairs(payload: bytes, what: str) -> tuple[np.ndarray, np.ndarray]:
    if len(payload) < 4:
        raise ProtocolError(f"malformed {what} frame: too short")
    (n,) = struct.unpack_from("!I", payload)
    if len(payload) != 4 + 16 * n:
        raise ProtocolError(f"malformed {what} frame: {len(payload)} bytes for {n} pairs")
    a = np.frombuffer(payload, ">u8", n, 4).astype(np.int64)
    b = np.frombuffer(payload, ">u8", n, 4 + 8 * n).astype(np.int64)
    return a, b


@dataclass
class CodecChooser:
    """Picks the codec that moves a batch fastest: compress time + compressed bytes / bandwidth.

    Every :data:`PROBE_EVERY` batches (and on the first) it compresses one batch with each codec
    and keeps their speed and ratio; the link's bandwidth is what sending has shown so far.
    """

    mode: str = "auto"
    stats: dict[int, tuple[float, float]] = field(default_factory=dict)
    """codec -> (seconds per input byte, output bytes per input byte), last probe."""
    bandwidth: float = 1e9
    sent_bytes: int = 0
    send_seconds: float = 0.0
    batches: int = 0
    used: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in CHOICES:
            raise UsageError(f"--codec must be one of {', '.join(CHOICES)}, not {self.mode!r}")

    def note_send(self, nbytes: int, seconds: float) -> None:
        self.sent_bytes += nbytes
        self.send_seconds += seconds
        if self.send_seconds > 0.05:
            self.bandwidth = self.sent_bytes / self.send_seconds

    def encode(self, data: memoryview) -> tuple[int, bytes | memoryview]:
        """Compress one batch with the chosen codec; returns (codec, blob)."""
        fixed = {"lz4": LZ4, "zstd": ZSTD, "none": NONE}.get(self.mode)
        if fixed is not None:
            codec, blob = fixed, compress(fixed, data)
        elif self.batches % PROBE_EVERY == 0 or not self.stats:
            codec, blob = self._probe(data)
        else:
            codec = min(self.stats, key=self._cost)
            blob = compress(codec, data)
        self.batches += 1
        self.used[NAMES[codec]] = self.used.get(NAMES[codec], 0) + 1
        return codec, blob

    def _cost(self, codec: int) -> float:
        per_byte, ratio = self.stats[codec]
        return per_byte + ratio / self.bandwidth

    def _probe(self, data: memoryview) -> tuple[int, bytes | memoryview]:
        n = max(1, data.nbytes)
        blobs = {}
        for codec in (LZ4, ZSTD):
            t = time.perf_counter()
            blobs[codec] = compress(codec, data)
            self.stats[codec] = ((time.perf_counter() - t) / n, len(blobs[codec]) / n)
        self.stats[NONE] = (0.0, 1.0)
        best = min(self.stats, key=self._cost)
        return best, blobs.get(best, data)
