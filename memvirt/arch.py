"""Guest architectures: the facts about each that several layers need (image, qemu, introspect).

One table instead of ``if arch == ...`` scattered through the packages: the Debian architecture
name (package names, apt), the GNU cross compiler, the QEMU binary and machine, and where the
machine puts RAM. An x86 ``pc`` machine maps RAM from guest-physical 0 (split around the PCI
hole, :mod:`memvirt.memory.rammap`); QEMU's arm64 ``virt`` machine maps it in one piece at
1 GiB (``hw/arm/virt.c``, ``base_memmap[VIRT_MEM] = { GiB, ... }``; the flash, GIC and MMIO
devices sit below it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast, get_args

from memvirt.errors import UsageError

ArchName = Literal["amd64", "arm64"]
ARCHES: tuple[ArchName, ...] = get_args(ArchName)
HOST_ARCH: ArchName = "amd64"
"""The architecture memvirt's hosts run (docs/support.md): guests of it may use KVM."""


@dataclass(frozen=True)
class Arch:
    """What differs per guest architecture outside the kernel (the kernel's differences are
    read from its memory, :mod:`memvirt.introspect`)."""

    name: ArchName
    gnu_triplet: str
    """Cross compiler prefix for static guest programs (``""``: the host's own gcc)."""
    qemu: str
    machine: str
    cpu_tcg: str
    ram_base: int
    """Guest-physical address of the first byte of RAM."""
    console: str
    """The kernel's name for the first serial port (``console=``)."""
    pvpanic: str
    """QEMU's pvpanic device: an ISA port on x86 (0x505), a PCI device where there are no ports;
    ``memsnap --freeze`` writes to it to pause the VM at an instant of its choosing."""


AMD64 = Arch("amd64", "", "qemu-system-x86_64", "pc", "qemu64", 0, "ttyS0", "pvpanic")
# -cpu max: every feature TCG emulates, so the guest meets what it meets on current hardware
# (the RNG that seeds KASLR, pointer authentication). pauth-impdef=on (QEMU 6.1 on): TCG computes
# pointer signatures with a cheap hash instead of the architected QARMA cipher, which dominates
# TCG time in a kernel built with pointer authentication.
ARM64 = Arch(
    "arm64",
    "aarch64-linux-gnu",
    "qemu-system-aarch64",
    "virt",
    "max,pauth-impdef=on",
    1 << 30,
    "ttyAMA0",
    "pvpanic-pci",
)
_BY_NAME: dict[str, Arch] = {"amd64": AMD64, "arm64": ARM64}


def arch(name: str) -> Arch:
    """The :class:`Arch` called ``name`` (``amd64``, ``arm64``); anything else is a one-line error."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UsageError(f"unknown architecture {name!r}: choose one of {', '.join(ARCHES)}") from None


def arch_name(name: str) -> ArchName:
    """``name`` checked as an architecture name."""
    return cast(ArchName, arch(name).name)
