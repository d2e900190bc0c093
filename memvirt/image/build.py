"""Build a bootable guest image: kernel + busybox initramfs with memvirt's init and programs.

An image is a folder under ``cache_home()/images/<name>`` holding ``vmlinuz``, ``initrd.img``
and ``image.json``. Its name is the kernel release plus a digest of everything that went into
the initramfs, so a change to the guest programs builds a new image instead of reusing a stale one.

An image is of one architecture, its kernel's (``image.json`` ``arch``; older ones are amd64).
For a foreign one (arm64 on an x86 host) busybox is Debian's ``busybox-static`` of that
architecture and the guest programs are cross-compiled (``aarch64-linux-gnu-gcc``) against the
static libraries of that architecture's ``-dev`` packages, all fetched through the private apt
(:mod:`memvirt.image.apt`) and unpacked under ``cache_home()/sysroot/<arch>``, never installed.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from elftools.elf.elffile import ELFFile

from memvirt.arch import HOST_ARCH, ArchName, arch
from memvirt.errors import MemvirtError, NotFound
from memvirt.image import apt
from memvirt.image import modules as kmod
from memvirt.image.cpio import CpioWriter
from memvirt.image.kernel import Kernel, resolve_kernel
from memvirt.paths import cache_home

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
GUEST_DIR = "memvirt.image"
GUEST_HEADERS = ("common.h",)
"""Headers the guest programs include (copied beside them; part of the image's digest)."""


@dataclass(frozen=True)
class Image:
    """A built guest image."""

    name: str
    path: Path
    release: str
    kernel_package: str | None
    modules: list[str]
    programs: list[str]
    arch: ArchName = HOST_ARCH

    @property
    def vmlinuz(self) -> Path:
        return self.path / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.path / "initrd.img"

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def _guest_file(name: str) -> bytes:
    return resources.files(GUEST_DIR).joinpath("guest", name).read_bytes()


def _static_busybox(arch_: str = HOST_ARCH) -> Path:
    if arch_ != HOST_ARCH:
        return _foreign_root(arch_, ("busybox-static",)) / "bin" / "busybox"
    for c in BUSYBOX_CANDIDATES:
        p = Path(c)
        if p.exists():
            with p.open("rb") as f:
                if not any(seg["p_type"] == "PT_INTERP" for seg in ELFFile(f).iter_segments()):
                    return p
    raise NotFound("no static busybox found: install Debian's busybox-static package")


def _program_list() -> list[tuple[str, str, list[str]]]:
    """(name, source, link flags) per line of ``programs.txt``: ``NAME SOURCE [FLAGS...]``."""
    text = _guest_file("programs.txt").decode()
    rows = [line.split() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return [(r[0], r[1], r[2:]) for r in rows]


FOREIGN_DEV_PACKAGES = ("liblz4-dev", "libzstd-dev", "libssl-dev", "libxxhash-dev")
"""Debian ``-dev`` packages of a foreign architecture a cross build unpacks (headers and static
libraries): pmagent's ``-llz4 -lzstd -lcrypto``, and xxhash, which it uses header-only."""


def _foreign_root(arch_: str, packages: tuple[str, ...]) -> Path:
    """``cache_home()/sysroot/<arch>`` with ``packages`` of that architecture unpacked into it
    (``dpkg-deb -x``: nothing is installed, the host's dpkg never hears of the architecture)."""
    root = cache_home() / "sysroot" / arch_
    root.mkdir(parents=True, exist_ok=True)
    suite = apt.private_suite(None, arch_)
    for package in packages:
        stamp = root / f".{package}"
        deb = apt.download(package, suite, arch_)
        if stamp.is_file() and stamp.read_text() == deb.name:
            continue
        proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise MemvirtError(f"cannot unpack {deb.name}: {proc.stderr.strip()}")
        stamp.write_text(deb.name)
    return root


def _compiler(arch_: str) -> tuple[str, list[str]]:
    """The C compiler for ``arch_`` and the flags that point it at the foreign sysroot."""
    a = arch(arch_)
    if not a.gnu_triplet:
        cc = shutil.which("gcc") or shutil.which("cc")
        if cc is None:
            raise NotFound("no C compiler found: install Debian's gcc and libc6-dev")
        return cc, []
    cc = shutil.which(f"{a.gnu_triplet}-gcc")
    if cc is None:
        raise NotFound(f"no {a.gnu_triplet}-gcc: install Debian's gcc-{a.gnu_triplet.replace('_', '-')}")
    root = _foreign_root(arch_, FOREIGN_DEV_PACKAGES)
    inc, lib = root / "usr" / "include", root / "usr" / "lib" / a.gnu_triplet
    return cc, [f"-I{inc}", f"-I{inc / a.gnu_triplet}", f"-L{lib}"]


def _compile_programs(workdir: Path, arch_: str = HOST_ARCH) -> dict[str, bytes]:
    """Compile the guest workload programs statically: the guest has no libc of its own."""
    cc, sysroot = _compiler(arch_)
    out: dict[str, bytes] = {}
    for header in GUEST_HEADERS:
        (workdir / header).write_bytes(_guest_file(header))
    for name, source, flags in _program_list():
        src = workdir / source
        src.write_bytes(_guest_file(source))
        binary = workdir / name
        proc = subprocess.run(
            [cc, "-O2", "-static", "-s", "-Wall", "-Wextra", *sysroot, "-o", str(binary), str(src), *flags],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise MemvirtError(f"compiling guest program {name} failed: {proc.stderr.strip()[-500:]}")
        out[name] = binary.read_bytes()
    return out


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()[:12]


def build_image(kernel: Kernel, force: bool = False) -> Image:
    """Build (or reuse) the image for ``kernel`` (of its architecture)."""
    busybox = _static_busybox(kernel.arch).read_bytes()
    guest_sources = [_guest_file(n) for n in ("init", "memvirt-agent", "programs.txt", *GUEST_HEADERS)]
    guest_sources += [_guest_file(src) for _, src, _ in _program_list()]
    mods = kmod.resolve(kernel.modules, kmod.GUEST_MODULES) if kernel.modules else []
    name = f"{kernel.release}-{_digest(busybox, kernel.vmlinuz.read_bytes(), *guest_sources, *(m for _, m in mods))}"
    dest = cache_home() / "images" / name
    meta = dest / "image.json"
    if meta.exists() and not force:
        return load_image(dest)

    with tempfile.TemporaryDirectory() as tmp:
        programs = _compile_programs(Path(tmp), kernel.arch)
    cpio = CpioWriter()
    for d in ("bin", "dev", "proc", "sys", "tmp", "run", "etc", "etc/memvirt", "lib", "lib/modules"):
        cpio.dir(d)
    cpio.file("bin/busybox", busybox, 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", _guest_file("init"), 0o755)
    cpio.file("bin/memvirt-agent", _guest_file("memvirt-agent"), 0o755)
    for pname, data in programs.items():
        cpio.file(f"bin/{pname}", data, 0o755)
    for mname, data in mods:
        cpio.file(f"lib/modules/{mname}.ko", data)
    cpio.file("etc/memvirt/modules", "".join(f"{m}\n" for m, _ in mods).encode())

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmpdest = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=dest.parent))
    (tmpdest / "initrd.img").write_bytes(gzip.compress(cpio.finish(), compresslevel=6))
    shutil.copyfile(kernel.vmlinuz, tmpdest / "vmlinuz")
    image = Image(name, dest, kernel.release, kernel.package, [m for m, _ in mods], sorted(programs), kernel.arch)
    (tmpdest / "image.json").write_text(json.dumps(image.to_json(), indent=2))
    shutil.rmtree(dest, ignore_errors=True)
    try:
        tmpdest.rename(dest)
    except OSError:
        shutil.rmtree(tmpdest, ignore_errors=True)
        if not meta.exists():
            raise
    return image


def load_image(path: Path) -> Image:
    try:
        d = json.loads((path / "image.json").read_text())
    except FileNotFoundError as e:
        raise NotFound(f"{path} is not a memvirt image (no image.json)") from e
    d["path"] = Path(d["path"]) if Path(d["path"]).exists() else path
    return Image(**d)


def list_images() -> list[Image]:
    root = cache_home() / "images"
    return [load_image(p) for p in sorted(root.glob("*")) if (p / "image.json").exists()]


def default_image(
    kernel: str | None = None, flavour: str | None = None, modules: str | None = None, arch_: str = HOST_ARCH
) -> Image:
    """The image for a kernel spec (default: newest Debian 6.1 of the host's architecture), built if needed."""
    return build_image(resolve_kernel(kernel, flavour, modules, arch=arch_))


def find_image(spec: str | None, arch_: str = HOST_ARCH) -> Image:
    """An image by folder path, by name (or unique name prefix), or by kernel spec (a series or
    package is looked up for ``arch_``)."""
    if spec is None:
        return default_image(arch_=arch_)
    p = Path(spec)
    if (p / "image.json").exists():
        return load_image(p)
    matches = [i for i in list_images() if i.name == spec]
    if len(matches) == 1:
        return matches[0]
    return default_image(spec, arch_=arch_)
