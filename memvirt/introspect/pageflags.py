"""How a kernel marks what a struct page is: flag bits and page types (``page-flags.h``).

Page types live in ``page->page_type`` (sharing the slot of ``_mapcount``). Two encodings exist,
and the kernel's own ``PAGE_BUDDY_MAPCOUNT_VALUE`` (in VMCOREINFO) tells which one a guest uses:

- Linux 4.18 to 6.11: a type is one bit *cleared* in an otherwise all-ones word
  (``PageType(page, flag)``: ``(page_type & (PAGE_TYPE_BASE | flag)) == PAGE_TYPE_BASE``), so
  ``PAGE_BUDDY_MAPCOUNT_VALUE == ~PG_buddy`` (-129 on 6.1). Slab is the ``PG_slab`` flag bit;
  ``PG_table`` is a macro found only in the kernel's headers.
- Linux 6.12 and later: the type is the top byte (``enum pagetype``, ``PGTY_buddy = 0xf0``),
  the low 24 bits are free for the type's owner, so ``PAGE_BUDDY_MAPCOUNT_VALUE`` has its low
  24 bits clear (-268435456 on 6.12). Slab is ``PGTY_slab`` (``PAGE_SLAB_MAPCOUNT_VALUE``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memvirt.errors import BadImage, GuestStructureError
from memvirt.introspect.layout import Layout, LayoutMissing
from memvirt.introspect.vmcoreinfo import Vmcoreinfo

U32 = 0xFFFFFFFF


def constant(layout: Layout, name: str) -> int | None:
    """A macro value (e.g. ``PG_table``) from a layout source that probed macros (kernel headers)."""
    fn = getattr(layout, "constant", None)
    if fn is None:
        return None
    try:
        return int(fn(name))
    except LayoutMissing:
        return None


def _enum(layout: Layout, enum: str, name: str) -> int | None:
    try:
        return layout.enum_value(enum, name)
    except LayoutMissing:
        return None


@dataclass(frozen=True)
class PageTypes:
    """Tests for buddy, slab, page-table and reserved pages, over numpy arrays of struct page fields."""

    top_byte: bool
    buddy: int
    table: int | None
    slab_type: int | None
    slab_flag: int | None
    reserved_flag: int | None

    @classmethod
    def detect(cls, info: Vmcoreinfo, layout: Layout) -> PageTypes:
        if "NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)" not in info:
            raise BadImage("VMCOREINFO lacks NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE): cannot tell free pages")
        buddy = info.number("PAGE_BUDDY_MAPCOUNT_VALUE") & U32
        reserved = _enum(layout, "pageflags", "PG_reserved")
        if reserved is None:
            reserved = constant(layout, "PG_reserved")
        if buddy & 0x00FFFFFF == 0:
            slab = info.number("PAGE_SLAB_MAPCOUNT_VALUE") & U32 if "NUMBER(PAGE_SLAB_MAPCOUNT_VALUE)" in info else None
            table = _enum(layout, "pagetype", "PGTY_table")
            if table is None:
                table = constant(layout, "PGTY_table")
            return cls(True, buddy >> 24, table, None if slab is None else slab >> 24, None, reserved)
        table_bit = constant(layout, "PG_table")
        slab_flag = info.number("PG_slab") if "NUMBER(PG_slab)" in info else _enum(layout, "pageflags", "PG_slab")
        return cls(False, buddy, None if table_bit is None else ~table_bit & U32, None, slab_flag, reserved)

    def __post_init__(self) -> None:
        """Flag numbers index a 64-bit word (a shift by more is undefined in the C census)."""
        for what, bit in (("PG_slab", self.slab_flag), ("PG_reserved", self.reserved_flag)):
            if bit is not None and not 0 <= bit < 64:
                raise GuestStructureError(f"{what} is bit {bit} of a 64-bit page flags word")

    def _is_type(self, page_type: np.ndarray, value: int) -> np.ndarray:
        if self.top_byte:
            return (page_type >> 24) == value
        return page_type == value

    def is_buddy(self, page_type: np.ndarray) -> np.ndarray:
        return self._is_type(page_type, self.buddy)

    def is_table(self, page_type: np.ndarray) -> np.ndarray | None:
        return None if self.table is None else self._is_type(page_type, self.table)

    def is_slab(self, flags: np.ndarray, page_type: np.ndarray) -> np.ndarray | None:
        if self.slab_type is not None:
            return self._is_type(page_type, self.slab_type)
        if self.slab_flag is not None:
            return (flags >> np.uint64(self.slab_flag)) & np.uint64(1) == 1
        return None

    def is_reserved(self, flags: np.ndarray) -> np.ndarray | None:
        if self.reserved_flag is None:
            return None
        return (flags >> np.uint64(self.reserved_flag)) & np.uint64(1) == 1

    def missing(self) -> list[str]:
        """Classes this layout cannot tell apart (they fall into ``kernel``)."""
        out = []
        if self.table is None:
            out.append("page_table (needs PG_table/PGTY_table: use --layouts headers)")
        if self.slab_type is None and self.slab_flag is None:
            out.append("slab")
        if self.reserved_flag is None:
            out.append("reserved (needs PG_reserved from BTF or headers)")
        return out
