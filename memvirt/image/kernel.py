"""Guest kernels: Debian kernel packages fetched with ``apt-get download``, or a user's vmlinuz.

Packages are cached under ``cache_home()/debs`` and unpacked once under
``cache_home()/kernels/<release>``; nothing is written into the repository.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from memvirt.errors import MemvirtError, NotFound, UsageError
from memvirt.paths import cache_home

FLAVOURS = ("amd64", "cloud", "rt")
DEFAULT_SERIES = "6.1"


@dataclass(frozen=True)
class Kernel:
    """An unpacked guest kernel: its image and, for Debian kernels, its module tree."""

    release: str
    vmlinuz: Path
    modules: Path | None
    package: str | None = None

    @property
    def system_map(self) -> Path | None:
        """Debian ships System.map; memvirt never needs it, tests use it as ground truth."""
        p = self.vmlinuz.parent / f"System.map-{self.release}"
        return p if p.exists() else None


def _flavour_suffix(flavour: str) -> str:
    if flavour not in FLAVOURS:
        raise UsageError(f"unknown flavour {flavour!r}: choose one of {', '.join(FLAVOURS)}")
    return "amd64" if flavour == "amd64" else f"{flavour}-amd64"


def package_pattern(series: str, flavour: str) -> re.Pattern[str]:
    """Debian's image package names: 6.1 is ``linux-image-6.1.0-N-FLAV``, 6.12 ``linux-image-6.12.N+deb12-FLAV``."""
    suffix = re.escape(_flavour_suffix(flavour))
    s = re.escape(series)
    return re.compile(rf"^linux-image-{s}(?:\.0-\d+|\.\d+\+deb\d+|-\d+)-{suffix}$")


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", name))


def newest_package(series: str, flavour: str) -> str:
    """The newest Debian kernel package of a series and flavour that apt knows about."""
    if shutil.which("apt-cache") is None:
        raise MemvirtError("apt-cache not found: on a non-Debian host pass --kernel PATH to a vmlinuz")
    pat = package_pattern(series, flavour)
    out = subprocess.run(
        ["apt-cache", "search", "--names-only", f"^linux-image-{re.escape(series)}"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    names = [n for n in names if pat.match(n)]
    if not names:
        raise NotFound(
            f"no Debian kernel package for {series} ({flavour}) is known to apt; run 'apt-get update' "
            "or pass --kernel PATH"
        )
    return max(names, key=_version_key)


def _download(package: str) -> Path:
    debs = cache_home() / "debs"
    debs.mkdir(exist_ok=True)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if found:
        return found[-1]
    proc = subprocess.run(["apt-get", "download", package], cwd=debs, capture_output=True, text=True)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if proc.returncode != 0 or not found:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise MemvirtError(f"apt-get download {package} failed: {err}")
    return found[-1]


def fetch_debian_kernel(series: str = DEFAULT_SERIES, flavour: str = "amd64", package: str | None = None) -> Kernel:
    """Download (once) and unpack (once) the newest Debian kernel of ``series``/``flavour``."""
    package = package or newest_package(series, flavour)
    release = package.removeprefix("linux-image-")
    dest = cache_home() / "kernels" / release
    vmlinuz = dest / "boot" / f"vmlinuz-{release}"
    if not vmlinuz.exists():
        deb = _download(package)
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise MemvirtError(f"cannot unpack {deb.name}: {proc.stderr.strip()}")
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    modules = dest / "lib" / "modules" / release
    return Kernel(release, vmlinuz, modules if modules.is_dir() else None, package)


def user_kernel(path: str | Path, modules: str | Path | None = None) -> Kernel:
    """A user's own kernel image, optionally with its module tree (``/lib/modules/<release>``)."""
    p = Path(path)
    if not p.is_file():
        raise NotFound(f"kernel image {p} does not exist")
    head = p.read_bytes()[:0x300]
    if len(head) < 0x206 or head[0x202:0x206] != b"HdrS":
        raise UsageError(f"{p} is not an x86 Linux bzImage (no 'HdrS' boot header)")
    mods = Path(modules) if modules else None
    if mods is not None and not mods.is_dir():
        raise NotFound(f"module directory {mods} does not exist")
    release = mods.name if mods else p.name.removeprefix("vmlinuz-")
    return Kernel(release, p, mods)


def resolve_kernel(spec: str | None, flavour: str = "amd64", modules: str | None = None) -> Kernel:
    """``6.1``/``6.12`` (a Debian series), a Debian package name, or a path to a vmlinuz."""
    spec = spec or DEFAULT_SERIES
    if "/" in spec or Path(spec).is_file():
        return user_kernel(spec, modules)
    if spec.startswith("linux-image-"):
        return fetch_debian_kernel(package=spec)
    if not re.fullmatch(r"\d+\.\d+", spec):
        raise UsageError(f"--kernel takes a series like 6.1 or 6.12, a package name, or a path; got {spec!r}")
    return fetch_debian_kernel(spec, flavour)
