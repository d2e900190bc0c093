"""Choose KVM when it really runs guests here, TCG otherwise.

``/dev/kvm`` existing proves nothing: on some hosts KVM opens fine but the guest dies at its
first instructions. So decide by trying: boot the guest kernel under KVM with no root device and
look for its banner on the serial port. The answer is cached per host kernel and QEMU binary.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

from memvirt.arch import AMD64, HOST_ARCH, arch
from memvirt.errors import NotFound
from memvirt.paths import cache_home

QEMU = AMD64.qemu
PROBE_SECONDS = 20
_DEBIAN_PACKAGE = {"qemu-system-x86_64": "qemu-system-x86", "qemu-system-aarch64": "qemu-system-arm"}


def qemu_binary(arch_name: str = HOST_ARCH) -> str:
    """The QEMU for ``arch_name``'s guests; ``$MEMVIRT_QEMU`` overrides the host architecture's."""
    want = arch(arch_name).qemu
    if arch_name == HOST_ARCH:
        want = os.environ.get("MEMVIRT_QEMU", want)
    path = shutil.which(want)
    if path is None:
        raise NotFound(f"{want} not found: install Debian's {_DEBIAN_PACKAGE.get(want, want)} package")
    return path


def _probe_kvm(kernel: Path) -> bool:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    argv = [
        qemu_binary(),
        "-accel",
        "kvm",
        "-m",
        "128M",
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
        "-kernel",
        str(kernel),
        "-append",
        "console=ttyS0 panic=-1 loglevel=7",
    ]
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=PROBE_SECONDS, stdin=subprocess.DEVNULL)
        out = proc.stdout
    except subprocess.TimeoutExpired as e:
        out = e.stdout or b""
    return b"Linux version" in out


def choose_accel(kernel: Path, arch_name: str = HOST_ARCH) -> str:
    """``kvm`` or ``tcg``; ``$MEMVIRT_ACCEL`` overrides the probe. A guest of another
    architecture than the host's runs under TCG: KVM runs only the host's instruction set."""
    if arch_name != HOST_ARCH:
        return "tcg"
    forced = os.environ.get("MEMVIRT_ACCEL")
    if forced:
        return forced
    qemu = qemu_binary()
    key = f"{platform.release()}|{qemu}|{os.stat(qemu).st_mtime_ns}"
    cache = cache_home() / "accel.json"
    try:
        known = json.loads(cache.read_text())
    except (FileNotFoundError, ValueError):
        known = {}
    if key not in known:
        known[key] = "kvm" if _probe_kvm(kernel) else "tcg"
        cache.write_text(json.dumps(known, indent=2))
    return known[key]
