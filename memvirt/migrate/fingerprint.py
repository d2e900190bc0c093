"""Per-page fingerprints (XXH64 of each 4 KiB page) for finding what changed since it was sent.

This host kernel has no soft-dirty bits, so a page is dirty when its fingerprint differs from the
one of the bytes the target holds. The hashing loop is C (``native/pagehash.c``, built with the
host's gcc on first use, like the census); without a compiler a numpy version that runs the same
XXH64 lanes across many pages at once gives identical values. Either releases the GIL per call,
so big ranges are hashed on two threads.
"""

from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import numpy as np
import xxhash

from memvirt.native import build

PAGE = 4096
ZERO_HASH = xxhash.xxh64_intdigest(bytes(PAGE))
"""The fingerprint of an all-zero page: what a hole in the target's RAM file holds."""
SKIPPED = 0
"""The fingerprint reported for a page that was not read (free page, file hole)."""
_P1, _P2, _P3, _P4 = (np.uint64(x) for x in (0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                                             0x85EBCA77C2B2AE63))
_INIT = tuple(np.uint64(x % (1 << 64)) for x in (0x9E3779B185EBCA87 + 0xC2B2AE3D27D4EB4F, 0xC2B2AE3D27D4EB4F, 0,
                                                 -0x9E3779B185EBCA87))
_THREADS = 2
_SPLIT = 8192


@cache
def _lib() -> ctypes.CDLL | None:
    dll = build("memvirt.migrate", "pagehash.c", "-O3")
    if dll is None:
        return None
    dll.hash_pages.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_void_p]
    dll.hash_pages.restype = None
    return dll


def native() -> bool:
    """Whether the C loop is in use."""
    return _lib() is not None


def _rotl(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


def _round(acc: np.ndarray, word: np.ndarray) -> np.ndarray:
    return _rotl(acc + word * _P2, 31) * _P1


def _numpy_hash(pages: np.ndarray) -> np.ndarray:
    """XXH64 of each row of an ``(n, 512)`` uint64 array, lanes vectorized across pages."""
    n = len(pages)
    v = [np.full(n, x, dtype=np.uint64) for x in _INIT]
    with np.errstate(over="ignore"):
        for s in range(0, 512, 4):
            for lane in range(4):
                v[lane] = _round(v[lane], pages[:, s + lane])
        h = _rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)
        for lane in range(4):
            h = (h ^ _round(np.zeros(n, dtype=np.uint64), v[lane])) * _P1 + _P4
        h = h + np.uint64(PAGE)
        h ^= h >> np.uint64(33)
        h *= _P2
        h ^= h >> np.uint64(29)
        h *= _P3
        h ^= h >> np.uint64(32)
    return h


def _hash_into(buf: np.ndarray, skip: np.ndarray | None, out: np.ndarray) -> None:
    lib = _lib()
    n = len(out)
    if lib is not None:
        lib.hash_pages(buf.ctypes.data, n, None if skip is None else skip.ctypes.data, out.ctypes.data)
        return
    words = buf[: n * PAGE].view("<u8").reshape(n, PAGE // 8)
    for a in range(0, n, 4096):
        b = min(n, a + 4096)
        out[a:b] = _numpy_hash(words[a:b])
    if skip is not None:
        out[skip.view(bool)] = SKIPPED


def hash_pages(buf: np.ndarray, skip: np.ndarray | None = None) -> np.ndarray:
    """XXH64 of every page of ``buf`` (uint8, a whole number of pages); ``skip`` (bool per page)
    marks pages not to read, which get :data:`SKIPPED`."""
    n = len(buf) // PAGE
    out = np.empty(n, dtype=np.uint64)
    sk = None if skip is None else np.ascontiguousarray(skip, dtype=np.uint8)
    if n < 2 * _SPLIT:
        _hash_into(buf, sk, out)
        return out
    bounds = np.linspace(0, n, _THREADS + 1).astype(int)
    with ThreadPoolExecutor(_THREADS) as pool:
        list(pool.map(lambda i: _hash_into(buf[bounds[i] * PAGE:], None if sk is None else sk[bounds[i]:bounds[i + 1]],
                                           out[bounds[i]:bounds[i + 1]]), range(_THREADS)))
    return out
