"""The census's inner loops in C (``native/pageclass.c``), built on first use by
:mod:`memvirt.native`; without a compiler the census uses its numpy version of each loop (the same
results, a few times slower)."""

from __future__ import annotations

import ctypes
from functools import cache

from memvirt.native import build

SOURCE = "pageclass.c"


class LayoutStruct(ctypes.Structure):
    """Mirror of ``struct layout`` in pageclass.c."""

    _fields_ = (
        [
            (n, ctypes.c_uint64)
            for n in (
                "stride",
                "off_flags",
                "off_head",
                "off_mapping",
                "off_type",
                "off_private",
                "off_lru",
                "head_mask",
            )
        ]
        + [("top_byte", ctypes.c_int64), ("buddy", ctypes.c_uint64)]
        + [(n, ctypes.c_int64) for n in ("table", "slab_type", "slab_bit", "reserved_bit")]
        + [("max_order", ctypes.c_uint64)]
    )


@cache
def load() -> ctypes.CDLL | None:
    """The compiled library, or None where it cannot be built (``MEMVIRT_NO_NATIVE=1`` too)."""
    dll = build("memvirt.introspect", SOURCE)
    if dll is None:
        return None
    p, u64 = ctypes.c_void_p, ctypes.c_uint64
    dll.classify_block.argtypes = [ctypes.POINTER(LayoutStruct), p, u64, p, u64, u64, p, p, p, p, p, p, p]
    dll.classify_block.restype = None
    dll.mark_blocks.argtypes = [p, u64, p, p, u64, ctypes.c_uint8]
    dll.mark_blocks.restype = None
    dll.count_codes.argtypes = [p, u64, p, u64]
    dll.count_codes.restype = None
    dll.walk_list.argtypes = [p, u64, u64, u64, u64, u64, u64, p, u64, p]
    dll.walk_list.restype = ctypes.c_int64
    return dll
