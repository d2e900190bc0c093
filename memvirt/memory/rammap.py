"""The guest RAM map QEMU builds for a machine type.

On the ``pc`` (i440fx) machine QEMU puts RAM below the 32-bit PCI hole up to 3.5 GiB; when the
guest has that much or more, it keeps only the first 3 GiB below 4 GiB (gigabyte alignment)
and maps the rest at 4 GiB (QEMU ``hw/i386/pc_piix.c``, ``pc_init1``). A memory backend's file
holds the two parts back to back, so guest-physical 4 GiB is file offset 3 GiB.
"""

from __future__ import annotations

from memvirt.memory.source import Region

FOUR_GIB = 1 << 32
PC_MAX_RAM_BELOW_4G = 0xE0000000
PC_GIGABYTE_ALIGNED_LOWMEM = 0xC0000000


def pc_ram_map(ram_size: int) -> tuple[Region, ...]:
    """Regions of a ``pc`` machine with ``ram_size`` bytes, offsets into its RAM backend."""
    if ram_size < PC_MAX_RAM_BELOW_4G:
        return (Region(0, ram_size, 0),)
    low = PC_GIGABYTE_ALIGNED_LOWMEM
    return (Region(0, low, 0), Region(FOUR_GIB, ram_size - low, low))


def to_dict(regions: tuple[Region, ...]) -> list[dict[str, int]]:
    return [{"gpa": r.gpa, "size": r.size, "offset": r.offset} for r in regions]


def from_dict(items: list[dict[str, int]]) -> tuple[Region, ...]:
    return tuple(Region(int(i["gpa"]), int(i["size"]), int(i["offset"])) for i in items)
