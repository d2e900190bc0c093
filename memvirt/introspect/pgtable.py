"""Kernel address translation: the kernel-image shortcut and page-table walkers (x86-64, arm64).

x86-64: the kernel image is mapped linearly at ``__START_KERNEL_map`` and loaded at ``phys_base``
(``arch/x86/include/asm/page_64.h``, ``__phys_addr_symbol``), which is enough to find the top
page table ``init_top_pgt``; everything else (direct map, vmemmap, vmalloc) is walked from it.

arm64: the image's shortcut is ``__kimg_to_phys(va) = va - kimage_voffset``
(``arch/arm64/include/asm/memory.h``), which finds ``swapper_pg_dir``, the root of the kernel's
(TTBR1) tables; :class:`Arm64PageTable` walks them for any translation granule (4, 16, 64 KiB).

Both walkers share :class:`Walker`: a cache of table pages and reads of kernel virtual memory
across mappings of any size.
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


class Walker:
    """What every page-table walker shares: the table cache and reads through :meth:`walk`.

    The cache keeps the last ``cache_pages`` tables read: a walk of nearby addresses costs
    no I/O. Call :meth:`flush` after the guest ran if its mappings may have changed.
    """

    levels: int

    def __init__(self, mem: GuestMemory, pgd_pa: int, table_bytes: int, cache_pages: int = 256):
        self.mem = mem
        self.pgd_pa = pgd_pa
        self._table_bytes = table_bytes
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
            t = memoryview(self.mem.read(pa, self._table_bytes).tobytes()).cast("Q")
        except BadImage as e:
            raise BadImage(f"page table at {pa:#x} is not readable: {e}") from e
        self._cache[pa] = t
        if len(self._cache) > self._cache_pages:
            self._cache.popitem(last=False)
        return t

    def walk(self, va: int) -> tuple[int, int]:
        """``(pa, mapping size)`` for ``va``; :class:`UnmappedAddress` if the tables do not map it."""
        raise NotImplementedError

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


class PageTable(Walker):
    """Walks the x86-64 page tables rooted at ``pgd_pa`` (4 or 5 levels)."""

    def __init__(self, mem: GuestMemory, pgd_pa: int, levels: int = 4, sme_mask: int = 0, cache_pages: int = 256):
        if levels not in (4, 5):
            raise BadImage(f"unsupported page-table depth {levels} (x86-64 has 4 or 5 levels)")
        super().__init__(mem, pgd_pa, 4096, cache_pages)
        self.levels = levels
        self._mask = PTE_PFN_MASK & ~sme_mask
        self._shifts = (48, 39, 30, 21, 12)[5 - levels :]
        self._va_bits = 57 if levels == 5 else 48

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


# arm64 translation table descriptors (Arm ARM D8.3, "Translation table descriptor formats";
# the kernel's names in arch/arm64/include/asm/pgtable-hwdef.h): bit 0 valid; bit 1 set means
# "table" above the last level and "page" at it, clear means "block" (a large leaf) above it.
_ARM64_VALID = 1 << 0
_ARM64_TABLE = 1 << 1
ARM64_GRANULES = (4096, 16384, 65536)


class Arm64PageTable(Walker):
    """Walks arm64 kernel (TTBR1) tables rooted at ``pgd_pa``, e.g. ``swapper_pg_dir``.

    The granule (``PAGESIZE``: 4, 16 or 64 KiB) decides everything, nothing assumes 4 KiB: a
    table is one granule of 8-byte descriptors, so each level resolves ``page_shift - 3`` bits,
    and ``va_bits`` of address need ``ceil((va_bits - page_shift) / (page_shift - 3))`` levels
    (arch/arm64/include/asm/pgtable-hwdef.h, ``ARM64_HW_PGTABLE_LEVELS``): 4 KiB with 48 bits is
    4 levels of 512 entries (leaves 4 KiB, blocks 2 MiB and 1 GiB), with 52 bits 5 (level -1
    resolves bits 51:48); 16 KiB with 47 or 48 bits is 3 or 4 levels of 2048 (leaves 16 KiB,
    blocks 32 MiB; the top table of a 48-bit one has 2 entries); 64 KiB with 48 bits 3 levels
    of 8192. The top level resolves what is left over.

    Output addresses (Arm ARM D8.3) are bits [47:page_shift] of a descriptor with 48-bit
    physical addresses. With 52-bit ones, 4 and 16 KiB granules use FEAT_LPA2's format
    (``lpa2``, TCR_EL1.DS=1: bits [49:page_shift], and bits 51:50 in descriptor bits 9:8, where
    shareability was; Debian's arm64 kernels from 6.12 on, CONFIG_ARM64_LPA2, on a CPU that has
    it), a 64 KiB granule FEAT_LPA's (bits 51:48 in descriptor bits 15:12).
    """

    def __init__(
        self,
        mem: GuestMemory,
        pgd_pa: int,
        va_bits: int,
        page_size: int,
        pa_bits: int = 48,
        lpa2: bool = False,
        cache_pages: int = 256,
    ):
        if page_size not in ARM64_GRANULES:
            raise BadImage(f"PAGESIZE {page_size} is not an arm64 translation granule (4, 16 or 64 KiB)")
        if not 36 <= va_bits <= 52:
            raise BadImage(f"VA_BITS {va_bits}: not an arm64 kernel address size (36 to 52 bits)")
        if pa_bits not in (48, 52) or (lpa2 and page_size == 65536):
            raise BadImage(f"{pa_bits}-bit physical addresses with {page_size >> 10} KiB pages are not arm64's")
        super().__init__(mem, pgd_pa, page_size, cache_pages)
        self.page_shift = page_size.bit_length() - 1
        self.va_bits = va_bits
        self.lpa2 = lpa2
        bits = self.page_shift - 3
        self.levels = -(-(va_bits - self.page_shift) // bits)
        self._shifts = tuple(self.page_shift + bits * (self.levels - 1 - i) for i in range(self.levels))
        self._index_masks = ((1 << (va_bits - self._shifts[0])) - 1,) + ((1 << bits) - 1,) * (self.levels - 1)
        # Arm numbers the last level 3 whatever the depth: a 3-level walk starts at level 1, a
        # 5-level one at level -1.
        self._first_level = 4 - self.levels
        low = 50 if lpa2 else 48
        self._oa_mask = ((1 << low) - 1) & ~(page_size - 1)
        # Where bits 51:50 (LPA2) or 51:48 (LPA, 64 KiB with 52-bit addresses) sit, if anywhere.
        self._oa_high = (8, 0b11, 50) if lpa2 else (12, 0xF, 48) if pa_bits == 52 else None

    def _oa(self, entry: int) -> int:
        oa = entry & self._oa_mask
        if self._oa_high is not None:
            at, mask, to = self._oa_high
            oa |= ((entry >> at) & mask) << to
        return oa

    def walk(self, va: int) -> tuple[int, int]:
        """``(pa, mapping size)`` for kernel address ``va``: a page, or a block of a middle level."""
        if va >> self.va_bits != (1 << (64 - self.va_bits)) - 1:
            raise UnmappedAddress(f"{va:#x} is not a kernel (TTBR1) address of a {self.va_bits}-bit address space")
        table = self.pgd_pa
        last = self.levels - 1
        for depth, shift in enumerate(self._shifts):
            entry = self._table(table)[(va >> shift) & self._index_masks[depth]]
            level = self._first_level + depth
            is_table = bool(entry & _ARM64_TABLE)
            # A block needs a level that can hold one: level 0 only with LPA2, never level -1
            # nor the last level, where bit 1 clear is reserved.
            no_block = depth == last or level < 0 or (level == 0 and not self.lpa2)
            if not entry & _ARM64_VALID or (not is_table and no_block):
                raise UnmappedAddress(f"virtual address {va:#x} is not mapped (level {level} descriptor {entry:#x})")
            if depth == last or not is_table:
                size = 1 << shift
                base = self._oa(entry) & ~(size - 1)
                return base | (va & (size - 1)), size
            table = self._oa(entry)
        raise AssertionError("unreachable")


def kimg_to_phys(va: int, kimage_voffset: int) -> int:
    """arm64 ``__kimg_to_phys()``: physical address of a kernel-image virtual address."""
    return (va - kimage_voffset) & ((1 << 64) - 1)
