"""Kernel header trees: a prepared tree, or Debian's two header packages fetched with apt-get
download and unpacked into the cache."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from memvirt.errors import HeadersError, HeadersNotFound, NotFound
from memvirt.image import apt
from memvirt.paths import cache_home

if TYPE_CHECKING:
    pass
from memvirt.introspect.headers.base import _RELEASE


@dataclass(frozen=True)
class HeaderTree:
    """A prepared kernel tree: ``objtree`` has ``.config`` and generated headers, ``srctree`` the
    source headers (the same directory unless the tree was built with ``O=`` or split by Debian)."""

    objtree: Path
    srctree: Path
    release: str

    @property
    def describe(self) -> str:
        return f"kernel headers of {self.release} in {self.objtree}"


def open_tree(path: str | Path) -> HeaderTree:
    """Check that ``path`` is a prepared x86 kernel tree and find its source half and release."""
    obj = Path(path).resolve()
    if not (obj / "include" / "generated" / "autoconf.h").is_file():
        raise HeadersNotFound(
            f"{obj} is not a prepared kernel tree (no include/generated/autoconf.h): run 'make modules_prepare' there"
        )
    src = _source_tree(obj)
    if not (src / "arch" / "x86" / "include").is_dir() or not (src / "include" / "linux" / "kconfig.h").is_file():
        raise HeadersNotFound(f"{src} lacks arch/x86/include or include/linux/kconfig.h: not an x86 kernel source tree")
    return HeaderTree(obj, src, _tree_release(obj))


def _source_tree(obj: Path, root: Path | None = None) -> Path:
    """kbuild's ``O=`` builds leave a ``source`` link; Debian's arch package has a Makefile that
    includes the ``-common`` package's (an absolute path, re-rooted under ``root`` when unpacked)."""
    link = obj / "source"
    if link.is_dir():
        return link.resolve()
    makefile = obj / "Makefile"
    if makefile.is_file():
        for line in makefile.read_text(errors="replace").splitlines():
            m = re.match(r"^\s*include\s+(\S+)/Makefile\s*$", line)
            if not m:
                continue
            target = Path(m[1])
            cands = [target, obj.parent / target.name]
            if root is not None and target.is_absolute():
                cands.insert(0, root / target.relative_to(target.anchor))
            for cand in cands:
                if (cand / "include").is_dir():
                    return cand.resolve()
    return obj


def _tree_release(obj: Path) -> str:
    """``UTS_RELEASE`` (Debian's ``include/config/kernel.release`` holds the upstream version)."""
    uts = obj / "include" / "generated" / "utsrelease.h"
    if uts.is_file():
        m = re.search(r'UTS_RELEASE\s+"([^"]+)"', uts.read_text(errors="replace"))
        if m:
            return m[1]
    rel = obj / "include" / "config" / "kernel.release"
    if rel.is_file() and rel.read_text().strip():
        return rel.read_text().strip()
    raise HeadersNotFound(f"{obj} has no include/generated/utsrelease.h: not a prepared kernel tree")


def debian_tree(release: str) -> HeaderTree:
    """Download (once) and unpack (once) Debian's headers for ``release`` into the cache."""
    if not _RELEASE.match(release):
        raise HeadersNotFound(f"{release!r} is not a kernel release like 6.1.0-56-amd64")
    dest = cache_home() / "headers" / release
    obj = dest / "usr" / "src" / f"linux-headers-{release}"
    ready = obj / "include" / "generated" / "autoconf.h"
    if not ready.is_file():
        packages = debian_header_packages(release)
        with _locked(dest.parent / f".{release}.lock"):
            if not ready.is_file():
                _unpack_debian(packages, dest)
    src = _source_tree(obj, root=dest)
    if src == obj:
        raise HeadersError(f"linux-headers-{release} in {dest} does not point at its -common package's headers")
    return HeaderTree(obj, src, release)


def _unpack_debian(packages: list[str], dest: Path) -> None:
    """``dpkg-deb -x`` the header packages into a private folder, renamed into place at the end."""
    suite = apt.suite_of_release(dest.name)
    try:
        debs = [apt.download(p, suite) for p in packages]
    except NotFound as e:
        raise HeadersNotFound(str(e)) from e
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=_mkdir(dest.parent)))
    try:
        for deb in debs:
            proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise HeadersError(f"cannot unpack {deb.name}: {_first_line(proc.stderr)}")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def debian_header_packages(release: str) -> list[str]:
    """``linux-headers-<release>`` and the ``-common`` package(s) it takes its headers from.

    ``linux-kbuild-*`` (fixdep, modpost) and the compiler packages it also depends on are not
    needed: the probe is compiled with gcc directly.
    """
    if shutil.which("apt-cache") is None or shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise HeadersError(
            f"apt-get/dpkg-deb not found: cannot fetch linux-headers-{release}; pass a prepared tree to "
            "HeadersLayout.from_tree"
        )
    package = f"linux-headers-{release}"
    # The headers of that exact build: a +deb13/+deb14 release's come from trixie's/sid's archive
    # through the private apt (memvirt.image.apt), never from whatever the host's apt has.
    suite = apt.suite_of_release(release)
    deps = apt.depends(package, suite)
    if deps is None:
        where = f"Debian {suite}" if suite else "apt"
        raise HeadersNotFound(f"{package} is unknown to {where}; run 'apt-get update'")
    common = [d for d in deps if re.fullmatch(r"linux-headers-\S*common\S*", d)]
    return [package, *dict.fromkeys(common)]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path``: concurrent processes (pytest-xdist, several CLIs) build a
    release's cache once instead of unpacking over each other."""
    _mkdir(path.parent)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else "no output"
