"""The guest RAM maps QEMU builds for its x86 machine types, and how a RAM file lays them out.

QEMU keeps guest RAM in one block (a memory backend) and maps it into the guest's physical
address space in at most two pieces around the 32-bit PCI hole: ``ram-below-4g`` (block offset
0) and ``ram-above-4g`` (the rest of the block, at guest-physical 4 GiB). A backend's file holds
the two pieces back to back, so for a split guest the file offset is not the guest-physical
address. Where the split falls depends on the machine type (QEMU 7.2, unchanged since 2.x):

- ``pc`` (i440fx, ``hw/i386/pc_piix.c`` ``pc_init1``): all RAM below 4 GiB while it is under
  ``max-ram-below-4g`` (default 3.5 GiB, ``0xe0000000``); from 3.5 GiB on, only the first 3 GiB
  (``gigabyte_align``: 1 GiB-aligned host pages stay 1 GiB-aligned in the guest).
- ``q35`` (``hw/i386/pc_q35.c`` ``pc_q35_init``): all RAM below 4 GiB while it is under 2.75 GiB
  (``0xb0000000``; the rest of the hole holds MMCONFIG); from 2.75 GiB on, only the first 2 GiB.

``max-ram-below-4g`` can lower either split; :func:`ram_map` takes it when a caller knows it
(from QEMU's command line). A raw image keeps file offset == guest-physical address instead, so
its pieces lie at their guest-physical addresses with a sparse hole between them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from memvirt.arch import arch
from memvirt.errors import UsageError
from memvirt.memory.source import Region

GIB = 1 << 30
FOUR_GIB = 1 << 32
PC_MAX_RAM_BELOW_4G = 0xE0000000
PC_GIGABYTE_ALIGNED_LOWMEM = 0xC0000000
Q35_SPLIT_FROM = 0xB0000000
Q35_LOWMEM = 0x80000000
MACHINES = ("pc", "q35")


def machine_family(name: str) -> str:
    """``pc`` or ``q35`` for a QEMU machine type name (``pc-i440fx-7.2``, ``pc-q35-7.2``, ``q35``...)."""
    if name == "q35" or name.startswith("pc-q35"):
        return "q35"
    if name == "pc" or name.startswith(("pc-i440fx", "pc-")):
        return "pc"
    raise UsageError(f"unknown machine {name!r}: choose one of {', '.join(MACHINES)}")


def lowmem(machine: str, ram_size: int, max_ram_below_4g: int | None = None) -> int:
    """Bytes of RAM QEMU maps below 4 GiB for ``machine`` (see the module docstring)."""
    family = machine_family(machine)
    if family == "pc":
        low = max_ram_below_4g or PC_MAX_RAM_BELOW_4G
        if ram_size >= low:
            low = min(low, PC_GIGABYTE_ALIGNED_LOWMEM)
    else:
        low = Q35_LOWMEM if ram_size >= Q35_SPLIT_FROM else Q35_SPLIT_FROM
        low = min(low, max_ram_below_4g or FOUR_GIB)
    return min(low, ram_size)


def ram_map(machine: str, ram_size: int, max_ram_below_4g: int | None = None) -> tuple[Region, ...]:
    """Regions of ``machine`` with ``ram_size`` bytes of RAM, offsets into its RAM backend."""
    low = lowmem(machine, ram_size, max_ram_below_4g)
    if low == ram_size:
        return (Region(0, ram_size, 0),)
    return (Region(0, low, 0), Region(FOUR_GIB, ram_size - low, low))


def pc_ram_map(ram_size: int) -> tuple[Region, ...]:
    """Regions of a ``pc`` machine with ``ram_size`` bytes, offsets into its RAM backend."""
    return ram_map("pc", ram_size)


def machine_ram_map(arch_name: str, ram_size: int) -> tuple[Region, ...]:
    """The RAM map of the machine memvirt starts for an architecture (:mod:`memvirt.arch`):
    ``pc`` for amd64; arm64's ``virt`` has all RAM in one piece at ``ram_base`` (1 GiB)."""
    a = arch(arch_name)
    if a.machine == "pc":
        return pc_ram_map(ram_size)
    return (Region(a.ram_base, ram_size, 0),)


def as_raw(regions: tuple[Region, ...]) -> tuple[Region, ...]:
    """The same RAM as a raw image stores it: file offset == guest-physical address."""
    return tuple(Region(r.gpa, r.size, r.gpa) for r in regions)


@dataclass(frozen=True)
class RamLayout:
    """A candidate RAM map and the name a user sees for it (``mem info``, errors)."""

    name: str
    regions: tuple[Region, ...]
    raw: bool = False
    """Offsets are guest-physical addresses (a raw image), not RAM-block offsets (a RAM file)."""

    def describe(self) -> str:
        name = f"raw image, {self.name}" if self.raw else self.name
        if len(self.regions) == 1:
            return f"{name} ({self.regions[0].size >> 20} MiB from 0)"
        low, high = self.regions[0], self.regions[-1]
        return f"{name} ({low.size >> 20} MiB below 4 GiB, {high.size >> 20} MiB at 4 GiB)"


def ramfile_candidates(size: int, machine: str | None = None) -> list[RamLayout]:
    """The maps a RAM backend of ``size`` bytes can have: flat and each machine's split, distinct
    ones only (below both splits all three are the same map). ``machine`` keeps only its own."""
    families = [machine_family(machine)] if machine else list(MACHINES)
    out: list[RamLayout] = []
    if machine is None:
        out.append(RamLayout("flat", (Region(0, size, 0),)))
    for fam in families:
        regions = ram_map(fam, size)
        same = next((i for i, c in enumerate(out) if c.regions == regions), None)
        if same is None:
            out.append(RamLayout(fam if len(regions) > 1 else f"{fam} (no split)", regions))
        else:  # flat is also what this machine does with that much RAM: say so
            out[same] = RamLayout(f"{out[same].name}{'/' if '=' in out[same].name else '='}{fam}", regions)
    return out


def raw_candidates(size: int, machine: str | None = None) -> list[RamLayout]:
    """The maps a raw image of ``size`` bytes can have: flat, or each machine's split with the
    hole left in the file. A split map is only a candidate when its machine would split that much
    RAM (``ram_map`` of the implied RAM size gives the same regions)."""
    families = [machine_family(machine)] if machine else list(MACHINES)
    out: list[RamLayout] = [] if machine else [RamLayout("flat", (Region(0, size, 0),), raw=True)]
    if size <= FOUR_GIB:
        if machine:
            out.append(RamLayout(f"{machine_family(machine)} (no split)", (Region(0, size, 0),), raw=True))
        return out
    for fam in families:
        low = PC_GIGABYTE_ALIGNED_LOWMEM if fam == "pc" else Q35_LOWMEM
        ram = low + size - FOUR_GIB
        regions = as_raw(ram_map(fam, ram))
        if len(regions) == 2 and regions[-1].end == size:
            out.append(RamLayout(fam, regions, raw=True))
    return out


_MTREE_ALIAS = re.compile(
    r"^\s*([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, ram\): alias (ram-(?:below|above)-4g) @(\S+) ([0-9a-f]+)-([0-9a-f]+)",
    re.M,
)


def regions_from_mtree(text: str) -> tuple[Region, ...]:
    """The RAM map in QEMU's ``info mtree``: its ``ram-below-4g``/``ram-above-4g`` aliases say
    where each piece of the RAM block sits (guest-physical) and at which block offset.

    The tree repeats under every address space that includes system memory: pieces are
    deduplicated. An empty answer means QEMU keeps RAM in some other way (not an x86 pc/q35).
    """
    found = set()
    for m in _MTREE_ALIAS.finditer(text):
        gpa, last, _, _, off, off_last = m.groups()
        size = int(last, 16) - int(gpa, 16) + 1
        if size != int(off_last, 16) - int(off, 16) + 1:
            continue
        found.add(Region(int(gpa, 16), size, int(off, 16)))
    return tuple(sorted(found, key=lambda r: r.gpa))


def to_dict(regions: tuple[Region, ...]) -> list[dict[str, int]]:
    return [{"gpa": r.gpa, "size": r.size, "offset": r.offset} for r in regions]


def from_dict(items: list[dict[str, int]]) -> tuple[Region, ...]:
    return tuple(Region(int(i["gpa"]), int(i["size"]), int(i["offset"])) for i in items)
