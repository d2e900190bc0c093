"""Small C hot loops shipped as source and built with the host's gcc on first use.

Like the guest programs, each library is compiled once and cached by source digest under
``cache_home()/native``. Without a compiler (or with ``MEMVIRT_NO_NATIVE=1``) :func:`build`
returns None and the caller uses its numpy version of the loop.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from importlib import resources

from memvirt.paths import cache_home


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
            return None
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            c = os.path.join(tmp, source)
            with open(c, "wb") as f:
                f.write(src)
            out = os.path.join(tmp, "lib.so")
            if subprocess.run([cc, opt, "-shared", "-fPIC", "-o", out, c], capture_output=True).returncode:
                return None
            os.replace(out, lib)
    return ctypes.CDLL(str(lib))
