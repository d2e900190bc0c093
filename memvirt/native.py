"""Small C hot loops shipped as source and built with the host's gcc on first use.

Like the guest programs, each library is compiled once and cached by source digest under
``cache_home()/native``. Without a compiler (or with ``MEMVIRT_NO_NATIVE=1``) :func:`build`
returns None and the caller uses its numpy version of the loop; a missing compiler or a failed
build is logged once per library (a warning: the numpy loops are several times slower).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from importlib import resources

from memvirt.paths import cache_home

log = logging.getLogger(__name__)
_warned: set[str] = set()


def _fallback(source: str, why: str) -> None:
    if source not in _warned:
        _warned.add(source)
        log.warning("C helper %s not built (%s): using the slower numpy version", source, why)


def build(package: str, source: str, opt: str = "-O2") -> ctypes.CDLL | None:
    """Load ``<package>/native/<source>`` as a shared library, compiling it if needed."""
    if os.environ.get("MEMVIRT_NO_NATIVE"):
        return None
    src = resources.files(package).joinpath("native", source).read_bytes()
    stem = source.removesuffix(".c")
    lib = cache_home() / "native" / f"{stem}-{hashlib.sha256(src + opt.encode()).hexdigest()[:16]}.so"
    if not lib.exists():
        cc = shutil.which("gcc") or shutil.which("cc")
        if cc is None:
            _fallback(source, "no gcc or cc on PATH")
            return None
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            c = os.path.join(tmp, source)
            with open(c, "wb") as f:
                f.write(src)
            out = os.path.join(tmp, "lib.so")
            proc = subprocess.run([cc, opt, "-shared", "-fPIC", "-o", out, c], capture_output=True, text=True)
            if proc.returncode:
                errors = [line for line in proc.stderr.splitlines() if "error" in line]
                _fallback(source, f"{cc} failed: {errors[0].strip() if errors else 'exit ' + str(proc.returncode)}")
                return None
            os.replace(out, lib)
    return ctypes.CDLL(str(lib))
