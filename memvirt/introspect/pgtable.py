"""x86-64 kernel address translation: the kernel-image shortcut and a page-table walker.

The kernel image is mapped linearly at ``__START_KERNEL_map`` and loaded at ``phys_base``
(``arch/x86/include/asm/page_64.h``, ``__phys_addr_symbol``), which is enough to find the top
page table ``init_top_pgt``; everything else (direct map, vmemmap, vmalloc) is walked from it.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from memvirt.errors import BadImage, GuestStructureError, UnmappedAddress
from memvirt.memory.source import GuestMemory

# arch/x86/include/asm/page_64_types.h
START_KERNEL_map = 0xFFFFFFFF80000000
# KERNEL_IMAGE_SIZE: the image mapping is at most 1 GiB with KASLR.
KERNEL_IMAGE_SIZE = 1 << 30
PTRS_PER_TABLE = 512
_PAGE_PRESENT = 1 << 0
_PAGE_PSE = 1 << 7
# PTE_PFN_MASK with __PHYSICAL_MASK_SHIFT = 52 (arch/x86/include/asm/page_types.h).
PTE_PFN_MASK = ((1 << 52) - 1) & ~0xFFF
_LEVEL_NAMES = {39: "P4D", 30: "PUD", 21: "PMD", 12: "PTE"}


def phys_addr_symbol(va: int, phys_base: int) -> int:
    """``__pa_symbol()``: physical address of a kernel-image virtual address."""
    if not START_KERNEL_map <= va < START_KERNEL_map + KERNEL_IMAGE_SIZE:
        raise BadImage(f"{va:#x} is not a kernel-image address (outside __START_KERNEL_map + 1 GiB)")
    return va - START_KERNEL_map + phys_base


class PageTable:
    """Walks the page tables rooted at ``pgd_pa`` (4 or 5 levels), caching table pages.

    The cache keeps the last ``cache_pages`` tables read: a walk of nearby addresses costs
    no I/O. Call :meth:`flush` after the guest ran if its mappings may have changed.
    """

    def __init__(self, mem: GuestMemory, pgd_pa: int, levels: int = 4, sme_mask: int = 0, cache_pages: int = 256):
        if levels not in (4, 5):
            raise BadImage(f"unsupported page-table depth {levels} (x86-64 has 4 or 5 levels)")
        self.mem = mem
        self.pgd_pa = pgd_pa
        self.levels = levels
        self._mask = PTE_PFN_MASK & ~sme_mask
        self._shifts = (48, 39, 30, 21, 12)[5 - levels :]
        self._va_bits = 57 if levels == 5 else 48
        self._cache: OrderedDict[int, memoryview] = OrderedDict()
        self._cache_pages = cache_pages

    def flush(self) -> None:
        self._cache.clear()

    def _table(self, pa: int) -> memoryview:
        t = self._cache.get(pa)
        if t is not None:
            self._cache.move_to_end(pa)
            return t
        try:
            t = memoryview(self.mem.read(pa, 4096).tobytes()).cast("Q")
        except BadImage as e:
            raise BadImage(f"page table at {pa:#x} is not readable: {e}") from e
        self._cache[pa] = t
        if len(self._cache) > self._cache_pages:
            self._cache.popitem(last=False)
        return t

    def walk(self, va: int) -> tuple[int, int]:
        """``(pa, mapping size)`` for ``va``: the size is 4 KiB, 2 MiB or 1 GiB."""
        top = va >> (self._va_bits - 1)
        if top not in (0, (1 << (65 - self._va_bits)) - 1):
            raise UnmappedAddress(f"{va:#x} is not a canonical {self._va_bits}-bit virtual address")
        table = self.pgd_pa
        for depth, shift in enumerate(self._shifts):
            entry = self._table(table)[(va >> shift) & (PTRS_PER_TABLE - 1)]
            if not entry & _PAGE_PRESENT:
                level = "PGD" if depth == 0 else _LEVEL_NAMES[shift]
                raise UnmappedAddress(f"virtual address {va:#x} is not mapped ({level} entry {entry:#x})")
            size = 1 << shift
            if shift == 12 or (shift in (21, 30) and entry & _PAGE_PSE):
                base = entry & self._mask & ~(size - 1)
                return base | (va & (size - 1)), size
            table = entry & self._mask
        raise AssertionError("unreachable")

    def translate(self, va: int) -> int:
        """Physical address of ``va``; :class:`UnmappedAddress` if the tables do not map it."""
        return self.walk(va)[0]

    def check_size(self, va: int, size: int) -> None:
        """Sizes come from guest values: a read larger than the guest's RAM cannot be one of
        its structures, and must not make the host allocate it."""
        if not 0 <= size <= self.mem.ram_size:
            raise GuestStructureError(
                f"a read of {size} bytes at {va:#x} does not fit in the guest's {self.mem.ram_size >> 20} MiB of RAM"
            )

    def runs(self, va: int, size: int) -> list[tuple[int, int]]:
        """``[(pa, length), ...]`` covering ``[va, va + size)``, physically contiguous runs merged."""
        self.check_size(va, size)
        out: list[tuple[int, int]] = []
        pos = 0
        while pos < size:
            pa, leaf = self.walk(va + pos)
            n = min(size - pos, leaf - ((va + pos) & (leaf - 1)))
            if out and out[-1][0] + out[-1][1] == pa:
                out[-1] = (out[-1][0], out[-1][1] + n)
            else:
                out.append((pa, n))
            pos += n
        return out

    def read_va(self, va: int, size: int) -> np.ndarray:
        """Bytes ``[va, va + size)`` of kernel virtual memory, crossing pages as needed."""
        self.check_size(va, size)
        out = np.empty(size, dtype=np.uint8)
        pos = 0
        for pa, n in self.runs(va, size):
            self.mem.read_into(pa, out[pos : pos + n])
            pos += n
        return out
