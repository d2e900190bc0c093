"""Free buddy blocks of a guest, found live and re-verified while the guest is paused.

A block whose head page still carries the buddy page type is on a free list: the allocator
clears the type (``del_page_from_free_list``) before it hands any page of it out, so none of its
pages belongs to anyone. That holds only when no CPU is half-way through a free-list update,
which the zone's ``lock`` guards: the re-check also requires every zone lock to be free at the
pause (vCPUs stopped between instructions could otherwise leave a head typed before its order
is written). Per-cpu free lists are left alone: they hold few pages, recycled at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memvirt.errors import MemvirtError, UsageError
from memvirt.introspect import Introspector
from memvirt.introspect.census import Census

PAGE_POISON = 0xAA
"""The byte the guest fills free pages with under ``page_poison=1`` (include/linux/poison.h)."""
POISON_ARGS = ("page_poison=1", "page_poison=on", "page_poison=y")


@dataclass
class FreeBlocks:
    """Buddy blocks ``[heads[i], heads[i] + 2**orders[i])``."""

    heads: np.ndarray
    orders: np.ndarray

    def __len__(self) -> int:
        return len(self.heads)

    @property
    def sizes(self) -> np.ndarray:
        return np.left_shift(1, self.orders)

    @property
    def pages(self) -> int:
        return int(self.sizes.sum())

    def take(self, index: np.ndarray | slice) -> FreeBlocks:
        return FreeBlocks(self.heads[index], self.orders[index])

    def mask(self, n: int) -> np.ndarray:
        """Boolean array over ``n`` frames: True inside a block."""
        delta = np.zeros(n + 1, dtype=np.int32)
        np.add.at(delta, self.heads, 1)
        np.add.at(delta, np.minimum(self.heads + self.sizes, n), -1)
        return np.cumsum(delta[:n]) > 0

    def runs(self) -> tuple[np.ndarray, np.ndarray]:
        """Maximal runs of frames ``(starts, ends)`` covered by the blocks, in frame order."""
        order = np.argsort(self.heads, kind="stable")
        s, e = self.heads[order], self.heads[order] + self.sizes[order]
        if len(s) == 0:
            return s, e
        brk = np.flatnonzero(s[1:] != e[:-1]) + 1
        return s[np.concatenate(([0], brk))], e[np.concatenate((brk - 1, [len(s) - 1]))]


class FreePageOracle:
    """Knows, for one booted guest kernel, where free blocks are and whether they still are."""

    def __init__(self, intro: Introspector):
        """Raises ``LayoutMissing`` when the layout cannot place the zone locks."""
        self.intro = intro
        self.kv = intro.kernel
        self.mem = intro.kernel.mem
        self.scanner = intro.scanner
        layout = intro.layout
        self.lock_off = layout.member_offset("zone", "lock")
        lock_size = layout.struct_size("spinlock")
        if lock_size != 4:
            raise UsageError(
                f"the guest's spinlock_t is {lock_size} bytes, not a plain queued spinlock (PREEMPT_RT or lock "
                "debugging): memvirt cannot tell whether a free list is being changed, so it will not discard"
            )
        self.lock_pas: list[int] = []
        # Looked up now, not at the poisoning check: a bootstrap records (for the build-id cache
        # or a shared shelf) the symbols asked before its first census.
        try:
            self._cmdline_ptr: int | None = self.kv.symbol("saved_command_line")
        except MemvirtError:
            self._cmdline_ptr = None

    def scan(self) -> tuple[Census, FreeBlocks]:
        """A live census and its buddy blocks (candidates only: the guest keeps running)."""
        census = self.intro.scan(live=True)
        self.lock_pas = [self.kv.translate(z.va + self.lock_off) for z in census.zones]
        return census, FreeBlocks(census.buddy_heads, census.buddy_orders)

    def locks_free(self) -> bool:
        """No zone's free lists are being changed (call with the guest paused)."""
        return all(int(self.mem.read(pa, 4).view("<u4")[0]) == 0 for pa in self.lock_pas)

    def still_free(self, blocks: FreeBlocks) -> FreeBlocks:
        """The part of ``blocks`` still free now (call paused, after :meth:`locks_free`): heads that
        still carry the buddy type, each cut to the smaller of its old and new order."""
        if len(blocks) == 0:
            return blocks
        ok, order = self.scanner.buddy_heads_now(blocks.heads)
        return FreeBlocks(blocks.heads[ok], np.minimum(order[ok], blocks.orders[ok]))

    def check_no_poisoning(self, free: FreeBlocks, populated: np.ndarray) -> None:
        """Refuse a guest that poisons free pages: it checks the poison when it allocates them, and a
        discarded page reads as zeros. (``init_on_free`` is fine: it wants free pages zero.)"""
        try:
            if self._cmdline_ptr is None:
                raise UsageError("no saved_command_line")
            cmdline = self.kv.read_cstr_va(self.kv.read_u64_va(self._cmdline_ptr), 4096).decode(errors="replace")
        except Exception:
            cmdline = ""
        if any(arg in cmdline.split() for arg in POISON_ARGS):
            raise UsageError("the guest runs with page_poison=1: discarded free pages would read as corruption")
        pfns = np.flatnonzero(free.mask(len(populated)) & populated)
        if len(pfns) == 0:
            return
        sample = pfns[np.linspace(0, len(pfns) - 1, min(64, len(pfns))).astype(np.int64)]
        pages = self.mem.read_pages(sample)
        if len(sample) >= 8 and (pages == PAGE_POISON).all(axis=1).mean() > 0.9:
            raise UsageError(
                "the guest's free pages are filled with the page-poison byte 0xaa: it checks them, "
                "so memvirt will not discard them"
            )
