"""The pmagent wire format in Python: the reference the C agent is tested against.

A frame is ``type:u8 flags:u8 zero:u16 length:u32 seq:u64`` (little-endian, as both agents are
x86-64), the payload, and a 32-byte tag: HMAC-SHA256 under the direction's key over header and
payload. Direction keys are HMAC-SHA256(key, label); ``seq`` counts frames per direction from 0.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from enum import IntEnum

HEADER = struct.Struct("<BBHIQ")
TAG = 32
MAX_FRAME = 8 << 20
OPEN = struct.Struct("<8sIIQ65s65s6x")  # C pads struct open_msg to 8 bytes
READY = struct.Struct("<Q")
HELLO = struct.Struct("<Q")
TO_TARGET = b"memvirt-pm source->target"
TO_SOURCE = b"memvirt-pm target->source"


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


class StreamError(Exception):
    """A frame that fails its MAC, its sequence or its framing."""


def direction_key(key: bytes, label: bytes) -> bytes:
    return hmac.new(key, label, hashlib.sha256).digest()


def encode(dkey: bytes, kind: int, payload: bytes, seq: int, flags: int = 0) -> bytes:
    head = HEADER.pack(kind, flags, 0, len(payload), seq)
    return head + payload + hmac.new(dkey, head + payload, hashlib.sha256).digest()


def decode(dkey: bytes, data: bytes, seq: int) -> tuple[int, bytes, bytes]:
    """(type, payload, rest) of the first frame in ``data``."""
    if len(data) < HEADER.size:
        raise StreamError("truncated header")
    kind, _flags, zero, length, fseq = HEADER.unpack_from(data)
    if zero or length > MAX_FRAME:
        raise StreamError("malformed frame")
    end = HEADER.size + length + TAG
    if len(data) < end:
        raise StreamError("truncated frame")
    want = hmac.new(dkey, data[:HEADER.size + length], hashlib.sha256).digest()
    if not hmac.compare_digest(want, data[end - TAG:end]):
        raise StreamError("bad MAC")
    if fseq != seq:
        raise StreamError("frame out of sequence")
    return kind, data[HEADER.size:HEADER.size + length], data[end:]


def open_payload(release: str, version: str, ram: int, scheme: int = 0, codec: int = 1) -> bytes:
    return OPEN.pack(b"MVPM1", scheme, codec, ram, release.encode(), version.encode())
