"""Per-page fingerprints (XXH3-64 of each 4 KiB page) for finding what changed since it was sent.

This host kernel has no soft-dirty bits, so a page is dirty when its fingerprint differs from the
one of the bytes the target holds, and the final round, with the guest paused, hashes every page
in use: the hash's speed is downtime. XXH3 runs at memory speed (about 0.12 s per GiB per core
here, XXH64 0.2 s). The hashing loop is C (``native/pagehash.c``, built with the host's gcc on
first use, like the census); without a compiler a numpy version that runs XXH3's accumulator
lanes across many pages at once gives identical values. Either releases the GIL per call, so big
ranges are hashed on two threads.
"""

from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import numpy as np
import xxhash

from memvirt.memory.source import PAGE_SIZE
from memvirt.native import build

ZERO_HASH = xxhash.xxh3_64_intdigest(bytes(PAGE_SIZE))
"""The fingerprint of an all-zero page: what a hole in the target's RAM file holds."""
SKIPPED = 0
"""The fingerprint reported for a page that was not read (free page, file hole)."""
_SECRET = bytes.fromhex(
    "b8fe6c3923a44bbe7c01812cf721ad1cded46de9839097db7240a4a4b7b3671fcb79e64eccc0e578825ad07dccff7221"
    "b8084674f743248ee03590e6813a264c3c2852bb91c300cb88d0658b1b532ea371644897a20df94e3819ef46a9deacd8"
    "a8fa763fe39c343ff9dcbbc7c70b4f1d8a51e04bcdb45931c89f7ec9d9787364eac5ac8334d3ebc3c581a0fffa1363eb"
    "170ddd51b7f0da49d316552629d4689e2b16be587d47a1fc8ff8b8d17ad031ce45cb3a8f95160428afd7fbcabb4b407e"
)
"""XXH3's default 192-byte secret (the algorithm's published constant)."""
_KEY = np.frombuffer(_SECRET, "<u8")
_LAST_KEY = np.frombuffer(_SECRET[121:185], "<u8")
_MERGE_KEY = np.frombuffer(_SECRET[11:75], "<u8")
_P32_1, _P32_2, _P32_3 = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D
_P64 = (0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5)
_INIT = np.array([_P32_3, _P64[0], _P64[1], _P64[2], _P64[3], _P32_2, _P64[4], _P32_1], dtype=np.uint64)
_M32 = np.uint64(0xFFFFFFFF)
_THREADS = 2
_SPLIT = 8192


@cache
def _lib() -> ctypes.CDLL | None:
    dll = build("memvirt.memory", "pagehash.c", "-O3")
    if dll is None:
        return None
    dll.hash_pages.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_void_p]
    dll.hash_pages.restype = None
    return dll


def native() -> bool:
    """Whether the C loop is in use."""
    return _lib() is not None


def _stripe(acc: np.ndarray, words: np.ndarray, key: np.ndarray) -> None:
    """XXH3's 64-byte accumulate step for every page at once: ``acc`` (8, n), ``words`` (n, 8)."""
    data = words.T
    dk = data ^ key[:, None]
    acc += (dk & _M32) * (dk >> np.uint64(32))
    acc[[1, 0, 3, 2, 5, 4, 7, 6]] += data


def _fold(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Low 64 bits xor high 64 bits of the 128-bit products ``a * b``."""
    a0, a1, b0, b1 = a & _M32, a >> np.uint64(32), b & _M32, b >> np.uint64(32)
    lo_lo, hi_lo, lo_hi = a0 * b0, a1 * b0, a0 * b1
    cross = (lo_lo >> np.uint64(32)) + (hi_lo & _M32) + lo_hi
    hi = a1 * b1 + (hi_lo >> np.uint64(32)) + (cross >> np.uint64(32))
    return hi ^ ((cross << np.uint64(32)) | (lo_lo & _M32))


def _numpy_hash(pages: np.ndarray) -> np.ndarray:
    """XXH3-64 of each row of an ``(n, 512)`` uint64 array (the long-input path for 4096 bytes:
    3 blocks of 16 stripes with a scramble after each, 15 more stripes, the last stripe, merge)."""
    n = len(pages)
    acc = np.repeat(_INIT[:, None], n, axis=1)
    with np.errstate(over="ignore"):
        for block in range(3):
            for s in range(16):
                w = block * 128 + s * 8
                _stripe(acc, pages[:, w : w + 8], _KEY[s : s + 8])
            acc ^= acc >> np.uint64(47)
            acc ^= _KEY[16:24, None]
            acc *= np.uint64(_P32_1)
        for s in range(15):
            _stripe(acc, pages[:, 384 + s * 8 : 392 + s * 8], _KEY[s : s + 8])
        _stripe(acc, pages[:, 504:512], _LAST_KEY)
        h = np.full(n, (PAGE_SIZE * _P64[0]) % (1 << 64), dtype=np.uint64)
        for i in range(4):
            h += _fold(acc[2 * i] ^ _MERGE_KEY[2 * i], acc[2 * i + 1] ^ _MERGE_KEY[2 * i + 1])
        h ^= h >> np.uint64(37)
        h *= np.uint64(0x165667919E3779F9)
        h ^= h >> np.uint64(32)
    return h


def _hash_into(buf: np.ndarray, skip: np.ndarray | None, out: np.ndarray) -> None:
    lib = _lib()
    n = len(out)
    if lib is not None:
        lib.hash_pages(buf.ctypes.data, n, None if skip is None else skip.ctypes.data, out.ctypes.data)
        return
    words = buf[: n * PAGE_SIZE].view("<u8").reshape(n, PAGE_SIZE // 8)
    for a in range(0, n, 4096):
        b = min(n, a + 4096)
        out[a:b] = _numpy_hash(words[a:b])
    if skip is not None:
        out[skip.view(bool)] = SKIPPED


def hash_pages(buf: np.ndarray, skip: np.ndarray | None = None) -> np.ndarray:
    """XXH3-64 of every page of ``buf`` (uint8, a whole number of pages); ``skip`` (bool per page)
    marks pages not to read, which get :data:`SKIPPED`."""
    n = len(buf) // PAGE_SIZE
    out = np.empty(n, dtype=np.uint64)
    sk = None if skip is None else np.ascontiguousarray(skip, dtype=np.uint8)
    if n < 2 * _SPLIT:
        _hash_into(buf, sk, out)
        return out
    bounds = np.linspace(0, n, _THREADS + 1).astype(int)
    with ThreadPoolExecutor(_THREADS) as pool:
        list(
            pool.map(
                lambda i: _hash_into(
                    buf[bounds[i] * PAGE_SIZE :],
                    None if sk is None else sk[bounds[i] : bounds[i + 1]],
                    out[bounds[i] : bounds[i + 1]],
                ),
                range(_THREADS),
            )
        )
    return out
