"""The pmagent wire format in Python: the reference the C agent is tested against.

A frame is ``type:u8 flags:u8 zero:u16 length:u32 seq:u64`` (little-endian, as both agents are
x86-64), the payload encrypted with ChaCha20-Poly1305 under the direction's key, and its 16-byte
tag; the header is the associated data and the nonce is ``seq`` (u64 little-endian, 4 zero
bytes), counted per direction from 0 by each end, so a dropped, replayed or reordered frame fails.
Direction keys are HMAC-SHA256(key, label); the disk scheme's stream uses HMAC(direction key,
"disk"). The host's verdict after an uncertain outcome is :func:`verdict_block`.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from enum import IntEnum

import xxhash
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from memvirt.errors import StreamError

HEADER = struct.Struct("<BBHIQ")
TAG = 16
MAX_FRAME = 8 << 20
PAGE = 4096
OPEN = struct.Struct("<8sIIQ65s65s6x")  # C pads struct open_msg to 8 bytes
READY = struct.Struct("<Q")
HELLO = struct.Struct("<Q")
END = struct.Struct("<Q16s")
DISK = struct.Struct("<Q")
DATA_HEAD = struct.Struct("<IIII")  # npages, nref, clen, rawlit
TO_TARGET = b"memvirt-pm source->target"
TO_SOURCE = b"memvirt-pm target->source"
VERDICT_LABEL = b"memvirt-pm verdict"
VERDICT_MAGIC = b"MVPMVRD1"
ZERO, LITERAL, REF = 1, 0, 2
"""Page kinds in a DATA frame (``K_LIT``, ``K_ZERO``, ``K_REF`` in pmagent.c)."""


class Frame(IntEnum):
    """Frame types (``enum`` in pmagent.c, same order)."""

    OPEN = 1
    READY = 2
    PAGES = 3
    PRECOPY_END = 4
    HELLO = 5
    DATA = 6
    END = 7
    DISK = 8
    ACK = 9
    ERR = 10


class Codec(IntEnum):
    NONE = 0
    LZ4 = 1
    ZSTD = 2


def direction_key(key: bytes, label: bytes) -> bytes:
    return hmac.new(key, label, hashlib.sha256).digest()


def disk_key(dkey: bytes) -> bytes:
    return hmac.new(dkey, b"disk", hashlib.sha256).digest()


def _nonce(seq: int) -> bytes:
    return struct.pack("<Q", seq) + bytes(4)


def encode(dkey: bytes, kind: int, payload: bytes, seq: int, flags: int = 0, length: int | None = None) -> bytes:
    """One sealed frame; ``length`` overrides the header's length field (tests of bad framing)."""
    head = HEADER.pack(kind, flags, 0, len(payload) if length is None else length, seq)
    return head + ChaCha20Poly1305(dkey).encrypt(_nonce(seq), payload, head)


def decode(dkey: bytes, data: bytes, seq: int) -> tuple[int, bytes, bytes]:
    """(type, payload, rest) of the first frame in ``data``."""
    if len(data) < HEADER.size:
        raise StreamError("truncated header")
    kind, _flags, zero, length, fseq = HEADER.unpack_from(data)
    if zero or length > MAX_FRAME:
        raise StreamError("malformed frame")
    if fseq != seq:
        raise StreamError("frame out of sequence")
    end = HEADER.size + length + TAG
    if len(data) < end:
        raise StreamError("truncated frame")
    try:
        payload = ChaCha20Poly1305(dkey).decrypt(_nonce(seq), data[HEADER.size : end], data[: HEADER.size])
    except InvalidTag as e:
        raise StreamError("bad tag") from e
    return kind, payload, data[end:]


def open_payload(release: str, version: str, ram: int, scheme: int = 0, codec: int = 1) -> bytes:
    return OPEN.pack(b"MVPM1", scheme, codec, ram, release.encode(), version.encode())


def data_payload(kinds: bytes, refs: list[int], literal: bytes, compressed: bytes) -> bytes:
    """A DATA frame's payload: head, one kind byte per page, references, compressed literals."""
    head = DATA_HEAD.pack(len(kinds), len(refs), len(compressed), len(literal))
    return head + kinds + struct.pack(f"<{len(refs)}I", *refs) + compressed


def image_checksum(pages: list[bytes]) -> bytes:
    """XXH3-128 (canonical) over each page's XXH3-64, zero pages included, as both agents compute it."""
    return xxhash.xxh3_128(b"".join(struct.pack("<Q", xxhash.xxh3_64_intdigest(p)) for p in pages)).digest()


def verdict_block(key: bytes, thaw: bool) -> bytes:
    """Block 0 of the source's verdict device: ``MVPMVRD1``, ``T`` (thaw) or ``O`` (power off), and
    HMAC-SHA256 under HMAC(key, "memvirt-pm verdict"), so a verdict of another migration is ignored."""
    body = VERDICT_MAGIC + (b"T" if thaw else b"O")
    vkey = hmac.new(key, VERDICT_LABEL, hashlib.sha256).digest()
    return (body + hmac.new(vkey, body, hashlib.sha256).digest()).ljust(4096, b"\0")
