"""The census's inner loops in C (``native/pageclass.c``), compiled on first use.

Like the guest programs, the library is built with the host's gcc and cached by source digest
under ``cache_home()/native``; without a compiler, :func:`load` returns None and the census uses
its numpy version of each loop (the same results, a few times slower).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import cache
from importlib import resources

from memvirt.paths import cache_home

SOURCE = "pageclass.c"


class LayoutStruct(ctypes.Structure):
    """Mirror of ``struct layout`` in pageclass.c."""

    _fields_ = [(n, ctypes.c_uint64) for n in (
        "stride", "off_flags", "off_head", "off_mapping", "off_type", "off_private", "off_lru", "head_mask",
    )] + [("top_byte", ctypes.c_int64), ("buddy", ctypes.c_uint64)] + [
        (n, ctypes.c_int64) for n in ("table", "slab_type", "slab_bit", "reserved_bit")
    ] + [("max_order", ctypes.c_uint64)]


@cache
def load() -> ctypes.CDLL | None:
    """The compiled library, or None where it cannot be built (``MEMVIRT_NO_NATIVE=1`` too)."""
    if os.environ.get("MEMVIRT_NO_NATIVE"):
        return None
    src = resources.files("memvirt.introspect").joinpath("native", SOURCE).read_bytes()
    digest = hashlib.sha256(src).hexdigest()[:16]
    lib = cache_home() / "native" / f"pageclass-{digest}.so"
    if not lib.exists():
        cc = shutil.which("gcc") or shutil.which("cc")
        if cc is None:
            return None
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            c = os.path.join(tmp, SOURCE)
            with open(c, "wb") as f:
                f.write(src)
            out = os.path.join(tmp, "lib.so")
            proc = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", out, c], capture_output=True)
            if proc.returncode != 0:
                return None
            os.replace(out, lib)
    dll = ctypes.CDLL(str(lib))
    p, u64 = ctypes.c_void_p, ctypes.c_uint64
    dll.classify_block.argtypes = [ctypes.POINTER(LayoutStruct), p, u64, p, u64, u64, p, p, p, p, p, p, p]
    dll.classify_block.restype = None
    dll.mark_blocks.argtypes = [p, u64, p, p, u64, ctypes.c_uint8]
    dll.mark_blocks.restype = None
    dll.count_codes.argtypes = [p, u64, p, u64]
    dll.count_codes.restype = None
    dll.walk_list.argtypes = [p, u64, u64, u64, u64, u64, u64, p, u64]
    dll.walk_list.restype = ctypes.c_int64
    return dll
