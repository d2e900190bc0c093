"""A private apt for Debian suites the host does not use (trixie, sid): kernels and their headers.

The host's apt knows only its own suite (bookworm here), yet users boot newer guests: sid's
Linux 7.2 is what ``linux-image-cloud-amd64`` installs today. Each suite gets its own
``sources.list``, lists, status and package cache under ``cache_home()/apt/<suite>``; apt-get and
apt-cache are pointed there with ``-o Dir::...`` options, so the host's ``/etc/apt`` sources and
``/var/lib/apt`` state are never read for it nor written. Releases are verified with the
Debian archive keyring (``/usr/share/keyrings/debian-archive-keyring.gpg``) as the host's are.

``suite=None`` means the host's own apt, unchanged from before.

Guests of another architecture (arm64) always use a private apt, with ``APT::Architecture``
set to theirs in its own folder ``cache_home()/apt/<suite>-<arch>``: the host's dpkg never
learns a foreign architecture (``dpkg --add-architecture`` would change what the host installs).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from memvirt.arch import HOST_ARCH
from memvirt.errors import MemvirtError, NotFound, UsageError
from memvirt.paths import cache_home

SUITES = ("bookworm", "trixie", "sid")
"""Suites memvirt can fetch kernels from; bookworm through the private apt too, for non-bookworm hosts."""
MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
MAX_LIST_AGE = 24 * 3600
"""Lists older than a day are refreshed: sid replaces its kernel packages every few weeks and
the old .debs vanish from the mirror."""
_DEB_TAG = {"12": "bookworm", "13": "trixie", "14": "sid"}


def check_suite(suite: str | None) -> str | None:
    if suite is not None and suite not in SUITES:
        raise UsageError(f"unknown Debian suite {suite!r}: choose one of {', '.join(SUITES)}")
    return suite


def suite_of_release(release: str) -> str | None:
    """The suite whose kernels carry ``release``'s ``+debN`` tag (``7.2.13+deb14-amd64`` is sid's),
    or None (``6.1.0-57-amd64``, a bookworm name: the host's apt)."""
    m = re.search(r"\+deb(\d+)", release)
    return _DEB_TAG.get(m.group(1)) if m else None


def private_suite(suite: str | None, arch: str) -> str | None:
    """The suite to use: the host's apt (None) only serves the host's architecture, so a foreign
    one gets bookworm's private apt when no suite is named."""
    return suite if suite is not None or arch == HOST_ARCH else "bookworm"


def _root(suite: str, arch: str) -> Path:
    return cache_home() / "apt" / (suite if arch == HOST_ARCH else f"{suite}-{arch}")


def apt_options(suite: str | None, arch: str = HOST_ARCH) -> list[str]:
    """The ``-o`` options that make apt-get/apt-cache use only ``suite``'s private state."""
    if suite is None:
        return []
    root = _root(suite, arch)
    foreign = [] if arch == HOST_ARCH else ["-o", f"APT::Architecture={arch}", "-o", f"APT::Architectures={arch}"]
    return [
        *foreign,
        "-o",
        f"Dir::Etc::sourcelist={root / 'sources.list'}",
        "-o",
        "Dir::Etc::sourceparts=-",
        "-o",
        f"Dir::State={root}",
        "-o",
        f"Dir::State::lists={root / 'lists'}",
        "-o",
        f"Dir::State::status={root / 'status'}",
        "-o",
        f"Dir::Cache={root / 'cache'}",
        "-o",
        "APT::Get::List-Cleanup=0",
        "-o",
        "Debug::NoLocking=1",
    ]


def ensure_lists(suite: str | None, arch: str = HOST_ARCH) -> None:
    """Write ``suite``'s sources.list and run ``apt-get update`` on its private state when the
    lists are missing or older than :data:`MAX_LIST_AGE`."""
    if suite is None:
        return
    check_suite(suite)
    if shutil.which("apt-get") is None:
        raise MemvirtError("apt-get not found: on a non-Debian host pass --kernel PATH to a vmlinuz")
    if not KEYRING.is_file():
        raise NotFound(f"{KEYRING} missing: install Debian's debian-archive-keyring package")
    root = _root(suite, arch)
    for sub in ("lists/partial", "cache/archives/partial"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "status").touch()
    src = root / "sources.list"
    opts = f"[arch={arch} signed-by={KEYRING}]"
    line = f"deb {opts} {MIRROR} {suite} main\n"
    if suite != "sid":  # a stable suite's kernel updates come through its security archive
        line += f"deb {opts} {SECURITY_MIRROR} {suite}-security main\n"
    stamp = root / "lists" / ".updated"
    if not src.is_file() or src.read_text() != line:
        src.write_text(line)
        stamp.unlink(missing_ok=True)
    if stamp.is_file() and time.time() - stamp.stat().st_mtime < MAX_LIST_AGE:
        return
    proc = subprocess.run(["apt-get", *apt_options(suite, arch), "-q", "update"], capture_output=True, text=True)
    if proc.returncode != 0 or "W: GPG error" in proc.stderr or "E:" in proc.stderr:
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith(("E:", "W:"))] or ["no output"]
        raise MemvirtError(f"apt-get update for Debian {suite} failed: {errors[0]}")
    stamp.touch()


def apt_cache(suite: str | None, *args: str, arch: str = HOST_ARCH) -> subprocess.CompletedProcess[str]:
    """``apt-cache ARGS`` on ``suite``'s private state (None: the host's)."""
    if shutil.which("apt-cache") is None:
        raise MemvirtError("apt-cache not found: on a non-Debian host pass --kernel PATH to a vmlinuz")
    ensure_lists(suite, arch)
    return subprocess.run(["apt-cache", *apt_options(suite, arch), *args], capture_output=True, text=True, check=False)


def _debs_of(folder: Path, package: str, arch: str) -> list[Path]:
    """Cached .debs of ``package`` for ``arch`` (or ``all``): ``busybox-static`` of amd64 and of
    arm64 share a package name and differ only in the file name's architecture."""
    return sorted(p for p in folder.glob(f"{package}_*.deb") if p.name.endswith((f"_{arch}.deb", "_all.deb")))


def download(package: str, suite: str | None, arch: str = HOST_ARCH) -> Path:
    """The package's .deb in ``cache_home()/debs``, fetched by ``apt-get download`` into a private
    folder first, so that concurrent callers never see half a file."""
    debs = cache_home() / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found = _debs_of(debs, package, arch)
    if found:
        return found[-1]
    ensure_lists(suite, arch)
    tmp = Path(tempfile.mkdtemp(prefix=".download.", dir=debs))
    try:
        proc = subprocess.run(
            ["apt-get", *apt_options(suite, arch), "download", package], cwd=tmp, capture_output=True, text=True
        )
        got = _debs_of(tmp, package, arch)
        if proc.returncode != 0 or not got:
            errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("E:")] or ["no output"]
            raise NotFound(f"apt-get download {package} failed: {errors[0]}")
        final = debs / got[-1].name
        os.replace(got[-1], final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def depends(package: str, suite: str | None, arch: str = HOST_ARCH) -> list[str] | None:
    """The packages ``package`` directly depends on, or None when apt does not know it."""
    proc = apt_cache(suite, "depends", package, arch=arch)
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    return re.findall(r"^\s*\|?(?:Pre)?Depends:\s*(\S+)\s*$", proc.stdout, re.M)
