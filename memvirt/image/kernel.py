"""Guest kernels: Debian kernel packages fetched with ``apt-get download``, or a user's vmlinuz.

Packages are cached under ``cache_home()/debs`` and unpacked once under
``cache_home()/kernels/<release>``; nothing is written into the repository. Kernels of suites
the host does not use (trixie, sid) come through :mod:`memvirt.image.apt`'s private apt.

Two package layouts: up to 6.12 ``linux-image-RELEASE`` holds ``boot/vmlinuz-RELEASE`` and
``lib/modules/RELEASE``. Debian's 7.x packaging (sid, ``+deb14``) splits it: ``linux-image-*``
is an empty package depending on ``linux-binary-*`` (``usr/lib/modules/RELEASE/vmlinuz``) and
``linux-modules-*`` (the module tree, under ``usr/lib`` too). Both are unpacked into one folder.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from memvirt.arch import HOST_ARCH, ArchName, arch_name
from memvirt.errors import MemvirtError, NotFound, UsageError
from memvirt.image import apt
from memvirt.paths import cache_home

FLAVOURS = ("amd64", "arm64", "cloud", "rt", "16k")
"""``amd64``/``arm64``: the architecture's plain flavour; ``16k``: arm64's 16 KiB-page kernel."""
DEFAULT_SERIES = "6.1"


@dataclass(frozen=True)
class Kernel:
    """An unpacked guest kernel: its image and, for Debian kernels, its module tree."""

    release: str
    vmlinuz: Path
    modules: Path | None
    package: str | None = None
    suite: str | None = None
    arch: ArchName = HOST_ARCH

    @property
    def system_map(self) -> Path | None:
        """Debian ships System.map; memvirt never needs it, tests use it as ground truth."""
        p = self.vmlinuz.parent / f"System.map-{self.release}"
        return p if p.exists() else None


def _flavour_suffix(flavour: str, arch: str = HOST_ARCH) -> str:
    """Debian's package suffix: ``amd64``, ``cloud-amd64``, ``rt-arm64``; arm64's 16 KiB-page
    kernel is ``arm64-16k`` (trixie on)."""
    if flavour not in FLAVOURS:
        raise UsageError(f"unknown flavour {flavour!r}: choose one of {', '.join(FLAVOURS)}")
    if flavour in ("amd64", "arm64"):
        if flavour != arch:
            raise UsageError(f"flavour {flavour} is not a kernel for {arch}: use --flavour {arch}")
        return arch
    if flavour == "16k":
        if arch != "arm64":
            raise UsageError("flavour 16k (16 KiB pages) exists for arm64 only")
        return "arm64-16k"
    return f"{flavour}-{arch}"


def package_pattern(series: str, flavour: str, arch: str = HOST_ARCH) -> re.Pattern[str]:
    """Debian's image package names: 6.1 is ``linux-image-6.1.0-N-FLAV``, 6.12 ``linux-image-6.12.N+deb12-FLAV``."""
    suffix = re.escape(_flavour_suffix(flavour, arch))
    s = re.escape(series)
    return re.compile(rf"^linux-image-{s}(?:\.0-\d+|\.\d+\+deb\d+|-\d+)-{suffix}$")


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", name))


def newest_package(
    series: str, flavour: str, suite: str | None = None, arch: str = HOST_ARCH
) -> tuple[str, str | None]:
    """The newest Debian kernel package of a series and flavour, and the suite it came from.

    ``suite`` None: the host's apt first (bookworm's private apt for a foreign ``arch``), then
    trixie and sid through the private apt (a 7.2 is only in sid, a bookworm host knows no 6.12
    of trixie's)."""
    pat = package_pattern(series, flavour, arch)
    tried = [apt.check_suite(suite)] if suite else [apt.private_suite(None, arch), "trixie", "sid"]
    for s in tried:
        out = apt.apt_cache(s, "search", "--names-only", f"^linux-image-{re.escape(series)}", arch=arch).stdout
        names = [line.split()[0] for line in out.splitlines() if line.strip()]
        names = [n for n in names if pat.match(n)]
        if names:
            return max(names, key=_version_key), s
    where = f"Debian {suite}" if suite else "apt, Debian trixie or sid"
    raise NotFound(f"no Debian kernel package for {series} ({flavour}) in {where}; pass --kernel PATH")


def _parts(package: str, suite: str | None, arch: str = HOST_ARCH) -> list[str]:
    """The packages that hold a kernel: ``package``, plus ``linux-binary-*``/``linux-modules-*``
    when it is 7.x's empty meta package (see the module docstring)."""
    deps = apt.depends(package, suite, arch)
    if deps is None:
        where = f" (Debian {suite})" if suite else ""
        raise NotFound(f"{package} is unknown to apt{where}; run 'apt-get update' or pass --suite")
    return [package, *[d for d in deps if d.startswith(("linux-binary-", "linux-modules-"))]]


def fetch_debian_kernel(
    series: str = DEFAULT_SERIES,
    flavour: str = "amd64",
    package: str | None = None,
    suite: str | None = None,
    arch: str = HOST_ARCH,
) -> Kernel:
    """Download (once) and unpack (once) the newest Debian kernel of ``series``/``flavour``."""
    if package is None:
        package, suite = newest_package(series, flavour, suite, arch)
    elif suite is None:
        suite = apt.private_suite(apt.suite_of_release(package), arch)
    release = package.removeprefix("linux-image-")
    dest = cache_home() / "kernels" / release
    images = (dest / "boot" / f"vmlinuz-{release}", dest / "usr" / "lib" / "modules" / release / "vmlinuz")
    if not any(c.exists() for c in images):
        debs = [apt.download(p, suite, arch) for p in _parts(package, suite, arch)]
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for deb in debs:
            proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], capture_output=True, text=True)
            if proc.returncode != 0:
                shutil.rmtree(tmp, ignore_errors=True)
                raise MemvirtError(f"cannot unpack {deb.name}: {proc.stderr.strip()}")
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    vmlinuz = next((c for c in images if c.exists()), None)
    if vmlinuz is None:
        raise MemvirtError(f"{package} holds no vmlinuz (neither boot/ nor usr/lib/modules/{release}/)")
    trees = (dest / "lib" / "modules" / release, dest / "usr" / "lib" / "modules" / release)
    modules = next((m for m in trees if (m / "kernel").is_dir()), None)
    return Kernel(release, vmlinuz, modules, package, suite, arch_name(arch))


def user_kernel(path: str | Path, modules: str | Path | None = None, arch: str = HOST_ARCH) -> Kernel:
    """A user's own kernel image, optionally with its module tree (``/lib/modules/<release>``).

    x86 wants a bzImage (``HdrS`` at 0x202, ``Documentation/arch/x86/boot.rst``); arm64 an
    ``Image`` (magic ``ARM\\x64`` at 0x38, ``Documentation/arch/arm64/booting.rst``) or that
    gzipped, as Debian's arm64 ``vmlinuz`` is (QEMU unpacks it)."""
    p = Path(path)
    if not p.is_file():
        raise NotFound(f"kernel image {p} does not exist")
    head = p.read_bytes()[:0x300]
    if arch == "arm64":
        if head[:2] != b"\x1f\x8b" and head[0x38:0x3C] != b"ARM\x64":
            raise UsageError(f"{p} is not an arm64 Linux Image (no 'ARM\\x64' magic, not gzip)")
    elif len(head) < 0x206 or head[0x202:0x206] != b"HdrS":
        raise UsageError(f"{p} is not an x86 Linux bzImage (no 'HdrS' boot header)")
    mods = Path(modules) if modules else None
    if mods is not None and not mods.is_dir():
        raise NotFound(f"module directory {mods} does not exist")
    release = mods.name if mods else p.name.removeprefix("vmlinuz-")
    return Kernel(release, p, mods, arch=arch_name(arch))


def resolve_kernel(
    spec: str | None,
    flavour: str | None = None,
    modules: str | None = None,
    suite: str | None = None,
    arch: str = HOST_ARCH,
) -> Kernel:
    """``6.1``/``6.12``/``7.2`` (a Debian series), a Debian package name, or a path to a vmlinuz;
    ``suite`` (bookworm, trixie, sid) pins where a series or package is looked up; ``flavour``
    None is ``arch``'s plain one."""
    arch = arch_name(arch)
    flavour = flavour or arch
    spec = spec or DEFAULT_SERIES
    if "/" in spec or Path(spec).is_file():
        return user_kernel(spec, modules, arch)
    if spec.startswith("linux-image-"):
        return fetch_debian_kernel(package=spec, suite=apt.check_suite(suite), arch=arch)
    if not re.fullmatch(r"\d+\.\d+", spec):
        raise UsageError(f"--kernel takes a series like 6.1 or 6.12, a package name, or a path; got {spec!r}")
    return fetch_debian_kernel(spec, flavour, suite=apt.check_suite(suite), arch=arch)
