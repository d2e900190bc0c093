"""Classify every guest page frame from the guest kernel's own struct page array.

One bulk read of ``vmemmap`` (``sizeof(struct page)`` bytes per frame: 64 MiB for a 4 GiB
guest) into a buffer reused across scans, then numpy over columns of it: no per-page Python.
Free pages are the buddy heads (page type ``PG_buddy``) expanded by their order (kept in
``page->private``), plus the pages on the per-cpu lists (walked from ``zone->per_cpu_pageset``).
A tail page of a compound page takes the class of its head (``compound_head`` bit 0; how the
rest of that word names the head changed in 7.x, see :func:`compound_head_pfns`).

``slab`` counts what the kernel's ``Slab:`` figure counts: slab pages, and the pages of large
kmalloc allocations (``kmalloc_large``), which bypass the slab caches but are charged to
``NR_SLAB_UNRECLAIMABLE_B`` (mm/slab_common.c, 6.1 and 6.12). They carry no page type before
Linux 6.16's ``PGTY_large_kmalloc``; they are the compound pages with no mapping, type or
destructor-bearing owner, which is what the rule below picks (it matched ``Slab:`` to the page
on 6.1 and 6.12 guests).
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from memvirt.errors import BadImage, GuestStructureError
from memvirt.introspect import pageclass
from memvirt.introspect.kernel import KernelView
from memvirt.introspect.layout import Layout, LayoutMissing
from memvirt.introspect.mmzone import MAX_ORDERS, PcpLayout, Zone, check_range, for_each_zone, pcp_lru_offset
from memvirt.introspect.pageflags import PageTypes
from memvirt.introspect.pgtable import UnmappedAddress
from memvirt.memory.source import PAGE_SHIFT, PAGE_SIZE, GuestMemory

CLASSES = ("unbacked", "reserved", "free", "free_pcp", "page_cache", "anon", "slab", "page_table", "kernel")
"""Per-page classes, in the order of their codes in :attr:`Census.classes`."""
CODE = {name: i for i, name in enumerate(CLASSES)}
PAGE_MAPPING_ANON = 0x1
"""Bit 0 of ``page->mapping``: an anon_vma, not an address_space. The kernel calls it
``FOLIO_MAPPING_ANON`` since "mm: rename PAGE_MAPPING_* to FOLIO_MAPPING_*" (David Hildenbrand,
v6.17 merge window); the bit did not move, so both names mean the same here."""
BLOCK_PAGES = 16384
"""Struct pages classified per block: 1 MiB of them at 64 bytes each, so a block stays in cache."""
PAGE_MAPPING_FLAGS = 0x3


def compound_head_pfns(words: np.ndarray, tails: np.ndarray, vmemmap: int, struct_page_size: int) -> np.ndarray:
    """The head frame of each tail page from its ``compound_head`` word (bit 0 set), as int64.

    Up to 6.x the word is the head's ``struct page`` address + 1. Kiryl Shutsemau's "mm: rework
    compound_head() for power-of-2 sizeof(struct page)" (7.x, from the series whose "mm: Rename
    the 'compound_head' field in the 'struct page' to 'compound_info'" renamed the member; the mm
    tree rebased it under several ids before it landed, e.g. aef265da2f50 in linux-next, so
    cite it by title; measured on Debian sid's 7.2.13: tails hold 0xffffffffffffff81 for
    order 1, ...ff01 for order 2) stores instead a mask + 1 when CONFIG_HUGETLB_PAGE_OPTIMIZE_VMEMMAP
    and ``sizeof(struct page)`` is a power of two (``compound_info_has_mask()``): the head is
    the tail's own ``struct page`` address ANDed with the mask. Told apart per word, from the
    data: a mask is ``~(2**k - 1)``, whose negation is a power of two; no vmemmap address is.
    So neither the version nor the config has to be known.
    """
    v = words - np.uint64(1)
    neg = ~v + np.uint64(1)
    mask = (v != 0) & ((neg & (neg - np.uint64(1))) == 0)
    own = np.uint64(vmemmap) + tails.astype(np.uint64) * np.uint64(struct_page_size)
    at = np.where(mask, own & v, v)
    return (at - np.uint64(vmemmap)).astype(np.int64) // struct_page_size


@dataclass
class Census:
    """The guest kernel's view of every page frame at one moment."""

    release: str
    classes: np.ndarray
    counts: dict[str, int]
    zones: list[Zone]
    layout_source: str
    live: bool
    zero: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    buddy_heads: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    """Head frames of the buddy blocks on the free lists (per-cpu lists not included)."""
    buddy_orders: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    """Order of each block in :attr:`buddy_heads` (the block is ``2**order`` frames)."""
    page_size: int = PAGE_SIZE
    """The guest's page size: a frame (an index of :attr:`classes`) is this many bytes."""

    @property
    def free_mask(self) -> np.ndarray:
        """Frames whose content the guest does not care about (buddy or per-cpu free)."""
        return (self.classes == CODE["free"]) | (self.classes == CODE["free_pcp"])

    def to_json(self) -> dict[str, Any]:
        pages = dict(self.counts)
        return {
            "kernel": {"release": self.release},
            "page_size": self.page_size,
            "pages": pages,
            "zones": [
                {
                    "node": z.node,
                    "name": z.name,
                    "start_pfn": z.start_pfn,
                    "spanned": z.spanned,
                    "present": z.present,
                    "managed": z.managed,
                    "free": z.free_pages,
                    "pcp": sum(z.pcp.values()),
                }
                for z in self.zones
            ],
            "layout_source": self.layout_source,
            "live": self.live,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "warnings": self.warnings,
        }


def _off(layout: Layout, struct: str, *members: str) -> int:
    for m in members:
        try:
            return layout.member_offset(struct, m)
        except LayoutMissing:
            continue
    raise LayoutMissing(f"no offset for any of {struct}.{'/'.join(members)}")


class PageScanner:
    """Reads and classifies the struct page array of one booted guest kernel."""

    def __init__(self, kv: KernelView, layout: Layout, any_page_size: bool = False):
        """``any_page_size``: the caller reads :attr:`Census.page_size` (``inspect`` does).

        The scan works in the guest's own frames, whatever its page size (arm64: 4, 16 or
        64 KiB): frame numbers come from ``struct page`` addresses and the free lists, so they are
        the kernel's. The capabilities built on the census (reclaim, migration, dedup) index RAM
        in 4 KiB frames and so get a census only of a 4 KiB-page guest.
        """
        self.page_size = kv.vmcoreinfo.page_size
        if self.page_size != PAGE_SIZE and not any_page_size:
            raise BadImage(
                f"{kv.release} uses {self.page_size >> 10} KiB pages: only inspect counts them, the rest of "
                "memvirt works in 4 KiB frames"
            )
        if self.page_size < PAGE_SIZE or self.page_size % PAGE_SIZE:
            raise BadImage(f"{kv.release} has a page size of {self.page_size} bytes")
        self.kv = kv
        self.layout = layout
        self.struct_page_size = check_range("sizeof(struct page)", layout.struct_size("page"), 16, 4096)
        if self.struct_page_size % 8:
            raise GuestStructureError(f"sizeof(struct page) is {self.struct_page_size}: not a multiple of 8")
        # Every field is read inside its struct page (the C loop trusts these offsets).
        words = self.struct_page_size - 8

        def field(what: str, off: int, last: int = words) -> int:
            return check_range(f"OFFSET(page.{what})", off, 0, last)

        self.col = {
            "flags": field("flags", _off(layout, "page", "flags")) // 8,
            # 7.x renamed the member compound_info (and VMCOREINFO stopped exporting its offset).
            "head": field("compound_head", _off(layout, "page", "compound_head", "compound_info", "lru")) // 8,
            "mapping": field("mapping", _off(layout, "page", "mapping")) // 8,
            "private": field("private", _off(layout, "page", "private")) // 8,
        }
        self.type_off = field("page_type", _off(layout, "page", "page_type", "_mapcount"), self.struct_page_size - 4)
        self.head_mask = check_range("PG_head_mask", self._head_mask(kv, layout), 0, (1 << 64) - 1)
        self.types = PageTypes.detect(kv.vmcoreinfo, layout)
        self.pcp = PcpLayout.from_layout(layout)
        self.lru = field("lru", pcp_lru_offset(layout))
        self.orders = check_range("LENGTH(zone.free_area)", layout.array_length("zone", "free_area"), 1, MAX_ORDERS)
        self.max_pfn = max((r.end for r in kv.mem.regions), default=0) // self.page_size
        self.runs = self._vmemmap_runs()
        self.block = np.empty((BLOCK_PAGES, self.struct_page_size), dtype=np.uint8)
        self.lru_next = np.zeros(self.max_pfn, dtype=np.uint64)
        self.native = pageclass.load()
        if self.native is not None:
            self._native_layout = self._layout_struct()

    def _layout_struct(self) -> pageclass.LayoutStruct:
        t = self.types
        return pageclass.LayoutStruct(
            stride=self.struct_page_size,
            off_flags=self.col["flags"] * 8,
            off_head=self.col["head"] * 8,
            off_mapping=self.col["mapping"] * 8,
            off_type=self.type_off,
            off_private=self.col["private"] * 8,
            off_lru=self.lru,
            head_mask=self.head_mask,
            top_byte=int(t.top_byte),
            buddy=t.buddy,
            table=-1 if t.table is None else t.table,
            slab_type=-1 if t.slab_type is None else t.slab_type,
            slab_bit=-1 if t.slab_flag is None else t.slab_flag,
            reserved_bit=-1 if t.reserved_flag is None else t.reserved_flag,
            max_order=self.orders,
        )

    @staticmethod
    def _head_mask(kv: KernelView, layout: Layout) -> int:
        if "NUMBER(PG_head_mask)" in kv.vmcoreinfo:
            return kv.vmcoreinfo.number("PG_head_mask")
        return 1 << layout.enum_value("pageflags", "PG_head")

    def _vmemmap_runs(self) -> list[tuple[int, int, int]]:
        """``(first_pfn, end_pfn, pa)`` runs of struct pages for the source's RAM frames."""
        runs: list[tuple[int, int, int]] = []
        per = self.struct_page_size
        for first, end in self._pfn_ranges():
            pfn = first
            while pfn < end:
                va = self.kv.vmemmap_base + pfn * per
                try:
                    pa, leaf = self.kv.page_table.walk(va)
                except UnmappedAddress:
                    step = self.page_size  # vmemmap is mapped in the guest's pages at least
                    pfn = ((va // step + 1) * step - self.kv.vmemmap_base + per - 1) // per
                    continue
                leaf_end = (va // leaf + 1) * leaf
                last = min(end, (leaf_end - self.kv.vmemmap_base) // per)
                if last <= pfn:
                    raise BadImage(
                        "struct page straddles a vmemmap mapping boundary: sizeof(struct page) does not divide it"
                    )
                if runs and runs[-1][1] == pfn and runs[-1][2] + (pfn - runs[-1][0]) * per == pa:
                    runs[-1] = (runs[-1][0], last, runs[-1][2])
                else:
                    runs.append((pfn, last, pa))
                pfn = last
        if not runs:
            raise BadImage("no struct page of any RAM frame is mapped: vmemmap_base is wrong")
        return runs

    def _pfn_ranges(self) -> list[tuple[int, int]]:
        """RAM as ``[(first, end), ...]`` in the guest's frames (RAM ranges are whole pages)."""
        return [(r.gpa // self.page_size, r.end // self.page_size) for r in self.kv.mem.regions]

    def struct_page_pa(self, pfns: np.ndarray) -> np.ndarray:
        """Guest-physical address of each frame's struct page (frames must be RAM)."""
        first = np.array([r[0] for r in self.runs], dtype=np.int64)
        end = np.array([r[1] for r in self.runs], dtype=np.int64)
        pa = np.array([r[2] for r in self.runs], dtype=np.int64)
        i = np.searchsorted(first, pfns, side="right") - 1
        if (i < 0).any() or (pfns >= end[np.maximum(i, 0)]).any():
            raise GuestStructureError("a frame lies outside the guest's struct page array")
        return pa[i] + (pfns - first[i]) * self.struct_page_size

    def buddy_heads_now(self, heads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Re-read only the struct pages of ``heads``: which still carry the buddy page type, and
        the order each one's ``private`` holds now (a few reads, for a re-check while paused)."""
        mem = self.kv.mem
        pas = self.struct_page_pa(heads)

        def fields(offset: int, size: int) -> np.ndarray:
            at = pas + offset
            frames = np.unique(np.concatenate((at >> PAGE_SHIFT, (at + size - 1) >> PAGE_SHIFT)))
            pages = mem.read_pages(frames).reshape(-1)
            byte = at[:, None] + np.arange(size)
            row = np.searchsorted(frames, byte >> PAGE_SHIFT)
            return np.ascontiguousarray(pages[row * PAGE_SIZE + (byte & (PAGE_SIZE - 1))])

        ptype = fields(self.type_off, 4).view("<u4")[:, 0]
        priv = fields(self.col["private"] * 8, 8).view("<u8")[:, 0]
        ok = self.types.is_buddy(ptype) & (priv < np.uint64(self.orders))
        return ok, priv.astype(np.int64)

    def _blocks(self) -> Iterator[tuple[int, int, int]]:
        """``(first_pfn, end_pfn, pa)`` pieces of the runs small enough to stay in cache."""
        for pfn0, pfn1, pa in self.runs:
            for p in range(pfn0, pfn1, BLOCK_PAGES):
                yield p, min(p + BLOCK_PAGES, pfn1), pa + (p - pfn0) * self.struct_page_size

    def _block(self, mem: GuestMemory, p0: int, p1: int, pa: int) -> np.ndarray:
        """Struct pages of frames ``[p0, p1)``: mapped in place where the source allows (a RAM
        file), else copied into the reused block buffer."""
        n = p1 - p0
        view = mem.view(pa, n * self.struct_page_size)
        if view is not None:
            return view.reshape(n, self.struct_page_size)
        blk = self.block[:n]
        mem.read_into(pa, blk.reshape(-1))
        return blk

    def _classify_native(self, blk: np.ndarray, p0: int, p1: int, classes: np.ndarray) -> tuple[np.ndarray, ...]:
        n = p1 - p0
        blk = np.ascontiguousarray(blk)
        b_idx, b_priv = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.uint64)
        t_idx, t_head = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.uint64)
        nb, nt = ctypes.c_uint64(), ctypes.c_uint64()
        assert self.native is not None  # only called when the helper loaded
        self.native.classify_block(
            ctypes.byref(self._native_layout),
            blk.ctypes.data,
            n,
            classes.ctypes.data,
            p0,
            self.kv.vmemmap_base,
            self.lru_next[p0:].ctypes.data,
            b_idx.ctypes.data,
            b_priv.ctypes.data,
            ctypes.byref(nb),
            t_idx.ctypes.data,
            t_head.ctypes.data,
            ctypes.byref(nt),
        )
        return b_idx[: nb.value], b_priv[: nb.value], t_idx[: nt.value], t_head[: nt.value]

    def _classify_numpy(self, blk: np.ndarray, p0: int, p1: int, classes: np.ndarray) -> tuple[np.ndarray, ...]:
        buddy, tails, heads = self._own_classes(blk, classes[p0:p1])
        self.lru_next[p0:p1] = blk.view(np.uint64)[:, self.lru // 8]
        return buddy, blk.view(np.uint64)[buddy, self.col["private"]], tails, heads

    def _own_classes(self, blk: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Classes of one block of struct pages from their own fields; returns the block-relative
        indices of buddy heads and of tail pages, and the tails' compound_head words."""
        w = blk.view(np.uint64)
        c = self.col
        ptype = blk.view(np.uint32)[:, self.type_off // 4]
        flags = w[:, c["flags"]]
        mapping = w[:, c["mapping"]]
        t = self.types
        out.fill(CODE["kernel"])
        out[(mapping != 0) & ((mapping & np.uint64(PAGE_MAPPING_FLAGS)) == 0)] = CODE["page_cache"]
        out[(mapping & np.uint64(PAGE_MAPPING_ANON)) != 0] = CODE["anon"]
        out[((flags & np.uint64(self.head_mask)) != 0) & (mapping == 0)] = CODE["slab"]
        if t.table is not None:
            out[t.is_table(ptype)] = CODE["page_table"]
        slab = t.is_slab(flags, ptype)
        if slab is not None:
            out[slab] = CODE["slab"]
        reserved = t.is_reserved(flags)
        if reserved is not None:
            out[reserved] = CODE["reserved"]
        head = w[:, c["head"]]
        tails = np.flatnonzero(head & np.uint64(1))
        return np.flatnonzero(t.is_buddy(ptype)), tails, head[tails]

    def scan(self, live: bool = False, content: bool = False) -> Census:
        """Classify every frame. ``live``: the guest runs, so the walk is racy: inconsistencies
        become warnings instead of errors."""
        t: dict[str, float] = {}
        t0 = time.perf_counter()
        warnings: list[str] = []
        classes = np.full(self.max_pfn, CODE["unbacked"], dtype=np.uint8)
        buddy_pfns, buddy_orders, tail_pfns, tail_heads = [], [], [], []
        mem = self.kv.mem
        blocks = list(self._blocks())
        classify = self._classify_native if self.native is not None else self._classify_numpy

        def one(block: tuple[int, int, int]) -> tuple[np.ndarray, ...]:
            return classify(self._block(mem, *block), block[0], block[1], classes)

        parts = [one(b) for b in blocks]
        for (p0, _, _), (buddy, orders, tails, heads) in zip(blocks, parts, strict=True):
            buddy_pfns.append(buddy + p0)
            buddy_orders.append(orders)
            tail_pfns.append(tails + p0)
            tail_heads.append(heads)
        t["read_classify"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        tails = np.concatenate(tail_pfns)
        if len(tails):
            hp = compound_head_pfns(np.concatenate(tail_heads), tails, self.kv.vmemmap_base, self.struct_page_size)
            ok = (hp >= 0) & (hp < tails)
            if not ok.all():
                self._inconsistent(live, warnings, f"{int((~ok).sum())} tail pages do not point at a head before them")
                tails, hp = tails[ok], hp[ok]
            classes[tails] = classes[hp]
        self.buddy_heads = np.concatenate(buddy_pfns)
        self.buddy_orders = np.concatenate(buddy_orders).astype(np.int64)
        self._buddy(live, warnings)
        zones = list(for_each_zone(self.kv, self.layout))
        self._check_zones(zones, live, warnings)
        pcp_heads, pcp_orders = self._pcp(zones, live, warnings)
        self._mark(classes, pcp_heads, pcp_orders, CODE["free_pcp"])
        self._mark(classes, self.buddy_heads, self.buddy_orders, CODE["free"])
        t["free_lists"] = time.perf_counter() - t1
        counts = self._count(classes)
        census = Census(
            release=self.kv.release,
            classes=classes,
            counts={name: int(counts[i]) for i, name in enumerate(CLASSES)},
            zones=zones,
            layout_source=self.layout.source,
            live=live,
            timings=t,
            warnings=warnings,
            buddy_heads=self.buddy_heads.copy(),
            buddy_orders=self.buddy_orders.copy(),
            page_size=self.page_size,
        )
        for m in self.types.missing():
            warnings.append(f"not classified: {m}")
        t["scan"] = time.perf_counter() - t0
        if content:
            t3 = time.perf_counter()
            census.zero = zero_pages(self.kv.mem, self.max_pfn, self.page_size)
            allocated = ~census.free_mask & (classes != CODE["unbacked"])
            census.counts["zero"] = int((census.zero & allocated).sum())
            t["content"] = time.perf_counter() - t3
        return census

    def _inconsistent(self, live: bool, warnings: list[str], what: str) -> None:
        if not live:
            raise GuestStructureError(what)
        warnings.append(f"live scan raced with the guest: {what}")

    def _mark(self, classes: np.ndarray, heads: np.ndarray, orders: np.ndarray, code: int) -> None:
        """Give ``[head, head + 2**order)`` of every block the class ``code``."""
        if self.native is not None:
            heads = np.ascontiguousarray(heads, dtype=np.int64)
            orders = np.ascontiguousarray(orders, dtype=np.int64)
            self.native.mark_blocks(
                classes.ctypes.data, len(classes), heads.ctypes.data, orders.ctypes.data, len(heads), code
            )
        else:
            classes[_expand(heads, orders, len(classes))] = code

    def _count(self, classes: np.ndarray) -> np.ndarray:
        """Pages per class. Frames below the first RAM frame are left out: they are no hole in
        the guest's RAM but what the machine puts below it (arm64 ``virt``: devices, RAM from
        1 GiB), so ``unbacked`` counts holes between RAM ranges only, as on x86."""
        below = min((first for first, _ in self._pfn_ranges()), default=0)
        if self.native is None:
            counts = np.bincount(classes, minlength=len(CLASSES))
        else:
            counts = np.zeros(len(CLASSES), dtype=np.uint64)
            self.native.count_codes(classes.ctypes.data, len(classes), counts.ctypes.data, len(CLASSES))
        counts[CODE["unbacked"]] -= below
        return counts

    def _buddy(self, live: bool, warnings: list[str]) -> None:
        heads, order = self.buddy_heads, self.buddy_orders
        bad = (order < 0) | (order >= self.orders) | (heads + (1 << np.clip(order, 0, 30)) > self.max_pfn)
        if bad.any():
            self._inconsistent(
                live, warnings, f"{int(bad.sum())} buddy pages with an order outside 0..{self.orders - 1}"
            )
            heads, order = heads[~bad], order[~bad]
        self.buddy_heads, self.buddy_orders = heads, order

    def _check_zones(self, zones: list[Zone], live: bool, warnings: list[str]) -> None:
        """Each zone's free lists (``nr_free``) must count exactly the buddy pages in its span."""
        for z in zones:
            inzone = (self.buddy_heads >= z.start_pfn) & (self.buddy_heads < z.start_pfn + z.spanned)
            per_order = np.bincount(self.buddy_orders[inzone], minlength=self.orders)
            if per_order.tolist() != z.nr_free:
                self._inconsistent(
                    live,
                    warnings,
                    f"zone {z.key}: free lists say {z.nr_free}, struct pages say {per_order.tolist()} per order",
                )
            if z.free_pages > z.managed:
                self._inconsistent(live, warnings, f"zone {z.key}: {z.free_pages} free pages > {z.managed} managed")

    def _pcp(self, zones: list[Zone], live: bool, warnings: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Walk every per-cpu free list, following ``lru.next`` through the page array copy.
        Returns the blocks' first frames and orders.

        The guest writes the links and the counts: a frame met twice (a cycle, or two lists
        sharing pages) ends that list as broken, so all walks together take at most one step
        per frame of RAM, whatever ``pcp->count`` says."""
        heads: list[int] = []
        orders: list[int] = []
        found: list[np.ndarray] = []
        found_orders: list[np.ndarray] = []
        p = self.pcp
        lru_next = self.lru_next
        vbase = self.kv.vmemmap_base
        visited = np.zeros(self.max_pfn, dtype=np.uint8)
        for z in zones:
            for cpu, va in z.pcp_va.items():
                raw = self.kv.read_va(va, p.lists + p.nlists * p.list_head_size)
                count = int(raw[p.count : p.count + 4].view("<i4")[0])
                z.pcp[cpu] = count
                # A list holds at most `count` blocks (one more is walked, to report the count), and
                # no more than the guest has frames.
                limit = min(max(count, 0), self.max_pfn)
                seen = 0
                for i in range(p.nlists):
                    head_va = va + p.lists + i * p.list_head_size
                    nxt = int(raw[p.lists + i * p.list_head_size :][:8].view("<u8")[0])
                    if self.native is not None:
                        pfns = self._walk_native(nxt, head_va, limit, visited)
                        if pfns is None:
                            self._inconsistent(
                                live, warnings, f"per-cpu list {i} of cpu {cpu} in zone {z.key} is broken"
                            )
                            continue
                        found.append(pfns)
                        found_orders.append(np.full(len(pfns), p.orders[i], dtype=np.int64))
                        seen += len(pfns) << p.orders[i]
                        continue
                    walked: list[int] = []
                    while nxt != head_va:
                        pfn, rem = divmod(nxt - self.lru - vbase, self.struct_page_size)
                        if rem or not 0 <= pfn < self.max_pfn or len(walked) > limit or visited[pfn]:
                            self._inconsistent(
                                live, warnings, f"per-cpu list {i} of cpu {cpu} in zone {z.key} is broken"
                            )
                            break
                        visited[pfn] = 1
                        walked.append(pfn)
                        nxt = lru_next.item(pfn)
                    else:
                        # Only a list that reaches its head again counts (as in the C walk).
                        heads += walked
                        orders += [p.orders[i]] * len(walked)
                        seen += len(walked) << p.orders[i]
                if seen != count:
                    self._inconsistent(live, warnings, f"cpu {cpu} zone {z.key}: pcp count {count}, lists hold {seen}")
        found.append(np.array(heads, dtype=np.int64))
        found_orders.append(np.array(orders, dtype=np.int64))
        return np.concatenate(found), np.concatenate(found_orders)

    def _walk_native(self, first: int, sentinel: int, limit: int, visited: np.ndarray) -> np.ndarray | None:
        out = np.empty(limit + 1, dtype=np.int64)
        assert self.native is not None  # only called when the helper loaded
        n = self.native.walk_list(
            self.lru_next.ctypes.data,
            self.max_pfn,
            first,
            sentinel,
            self.kv.vmemmap_base,
            self.lru,
            self.struct_page_size,
            out.ctypes.data,
            len(out),
            visited.ctypes.data,
        )
        return None if n < 0 else out[:n]


def _expand(heads: np.ndarray, orders: np.ndarray, n: int) -> np.ndarray:
    """Mark ``[head, head + 2**order)`` for every head (blocks never overlap), with one
    cumulative sum: +1 where a block starts, -1 where it ends."""
    delta = np.zeros(n + 1, dtype=np.int8)
    delta[heads] = 1
    np.subtract.at(delta, np.minimum(heads + (1 << orders), n), 1)
    return np.cumsum(delta[:n], dtype=np.int8).view(bool)


def zero_pages(mem, max_pfn: int, page_size: int = PAGE_SIZE) -> np.ndarray:
    """All-zero frames of ``page_size`` (``max_pfn`` of them); holes of a sparse RAM file count
    as zero without being read. A bigger guest page is zero when all its 4 KiB frames are."""
    ratio = page_size // PAGE_SIZE
    if ratio > 1:
        return np.asarray(zero_pages(mem, max_pfn * ratio).reshape(max_pfn, ratio).all(axis=1))
    zero = np.zeros(max_pfn, dtype=bool)
    populated = mem.populated_pfns() if hasattr(mem, "populated_pfns") else None
    for gpa, chunk in mem.chunks(32 << 20):
        first = gpa >> PAGE_SHIFT
        n = len(chunk) >> PAGE_SHIFT
        if populated is not None and not populated[first : first + n].any():
            zero[first : first + n] = True
            continue
        zero[first : first + n] = ~chunk.view(np.uint64).reshape(n, -1).any(axis=1)
    return zero
