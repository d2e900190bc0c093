"""Nodes, zones and the buddy allocator's bookkeeping (``include/linux/mmzone.h``).

Everything here is read through a :class:`~memvirt.introspect.layout.Layout`, so the same code
serves every kernel whose layout source knows ``struct zone`` and ``struct per_cpu_pages``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from memvirt.errors import GuestStructureError
from memvirt.introspect.kernel import KernelView
from memvirt.introspect.layout import Layout, LayoutMissing

# x86-64: a PMD maps 2 MiB, so a PMD-sized THP is order 9 (arch/x86/include/asm/pgtable_64_types.h).
HPAGE_PMD_ORDER = 21 - 12
# Upper bounds on what the guest's layout and counts may claim, far above any real kernel's
# (MAX_NUMNODES is 1 << NODES_SHIFT, at most 1024 on x86-64; MAX_NR_ZONES is at most 6;
# NR_PAGE_ORDERS is 11 on x86-64 and at most ~20 anywhere; struct zone is ~1.5 KiB), so a
# guest cannot make memvirt allocate or loop by a number it chose.
MAX_NODES = 1024
MAX_ZONES = 16
MAX_ORDERS = 32
MAX_STRUCT = 1 << 16
MAX_PCP_LISTS = 64
MAX_POPULATED_ZONES = 256
"""Populated zones in all, and (times 256) zone-CPU pairs whose per-cpu lists are walked: a
64-node, 256-CPU guest fits; a guest cannot make the census loop 1024 nodes x 8192 CPUs."""
# A page frame number fits in 52 - 12 bits (__PHYSICAL_MASK_SHIFT on x86-64).
MAX_PFN = 1 << 40


def check_range(what: str, value: int, low: int, high: int) -> int:
    """``value`` if ``low <= value <= high``, else the one-line "do not add up" error."""
    if not low <= value <= high:
        raise GuestStructureError(f"{what} is {value}, outside {low}..{high}")
    return value


@dataclass
class Zone:
    """One ``struct zone`` and what its free lists and per-cpu lists hold."""

    node: int
    index: int
    name: str
    va: int
    start_pfn: int
    spanned: int
    present: int
    managed: int
    nr_free: list[int]
    nr_free_pages: int
    pcp: dict[int, int] = field(default_factory=dict)
    pcp_va: dict[int, int] = field(default_factory=dict)

    @property
    def free_pages(self) -> int:
        """Pages in the buddy free lists: sum of ``nr_free[order] << order``."""
        return sum(n << o for o, n in enumerate(self.nr_free))

    @property
    def key(self) -> str:
        return f"{self.node}:{self.name}"


def _bitmap(kv: KernelView, va: int, nbits: int) -> list[int]:
    words = kv.read_va(va, ((nbits + 63) // 64) * 8).view("<u8")
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:nbits]
    return np.flatnonzero(bits).tolist()


def for_each_online_pgdat(kv: KernelView) -> Iterator[tuple[int, int]]:
    """``(nid, struct pglist_data *)`` for every online node.

    NUMA kernels keep ``node_data[]`` and ``node_online_map``; others one ``contig_page_data``.
    """
    info = kv.vmcoreinfo
    if info.has_symbol("node_data") or (kv.symbols is not None and "node_data" in kv.symbols):
        # x86 exports LENGTH(node_data) (MAX_NUMNODES); arm64 exports neither it nor node_data
        # (found in its export table, ksymtab.py). A nodemask_t is at least one unsigned long
        # whose bits past MAX_NUMNODES stay clear, so its first 64 bits name every online node.
        length = (
            check_range("LENGTH(node_data)", info.length("node_data"), 1, MAX_NODES)
            if "LENGTH(node_data)" in info
            else min(64, MAX_NODES)
        )
        online = _bitmap(kv, kv.symbol("node_online_map"), length) if info.has_symbol("node_online_map") else [0]
        base = kv.symbol("node_data")
        for nid in online:
            pgdat = kv.read_u64_va(base + 8 * nid)
            if pgdat:
                yield nid, pgdat
    else:
        yield 0, kv.symbol("contig_page_data")


def for_each_online_cpu(kv: KernelView) -> list[int]:
    nr = kv.read_u32_va(kv.symbol("nr_cpu_ids"))
    check_range("nr_cpu_ids", nr, 1, 8192)
    return _bitmap(kv, kv.symbol("__cpu_online_mask"), nr)


def per_cpu_ptr(kv: KernelView, ptr: int, cpu: int) -> int:
    """``per_cpu_ptr()``: a ``__percpu`` pointer plus that CPU's ``__per_cpu_offset``, modulo 2**64.

    Up to 6.14 x86-64 per-cpu pointers were small offsets into a zero-based per-cpu section and
    ``__per_cpu_offset`` the areas' addresses. Commit 9d7de2aa8b41 ("x86/percpu/64: Use relative
    percpu offsets", Brian Gerst, v6.15; its series also removed CONFIG_KALLSYMS_ABSOLUTE_PERCPU
    in 01157ddc58dc) links per-cpu variables at
    kernel-image addresses as every other arch does, so pointer plus offset exceeds 2**64 as a
    Python int (measured on 7.2.13) and must wrap as the kernel's unsigned long sum does.
    """
    return (ptr + kv.read_u64_va(kv.symbol("__per_cpu_offset") + 8 * cpu)) & ((1 << 64) - 1)


def _read_str(kv: KernelView, va: int, limit: int = 32) -> str:
    raw = kv.read_va(va, limit).tobytes()
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def for_each_zone(kv: KernelView, layout: Layout) -> Iterator[Zone]:
    """Every populated zone of every online node, with its free and per-cpu counts."""
    zone_size = check_range("sizeof(struct zone)", layout.struct_size("zone"), 8, MAX_STRUCT)
    nzones = check_range(
        "LENGTH(pglist_data.node_zones)", layout.array_length("pglist_data", "node_zones"), 1, MAX_ZONES
    )
    node_zones = check_range(
        "OFFSET(pglist_data.node_zones)", layout.member_offset("pglist_data", "node_zones"), 0, MAX_STRUCT
    )
    orders = check_range("LENGTH(zone.free_area)", layout.array_length("zone", "free_area"), 1, MAX_ORDERS)
    free_area = layout.member_offset("zone", "free_area")
    free_area_size = check_range("sizeof(struct free_area)", layout.struct_size("free_area"), 8, MAX_STRUCT)
    nr_free = check_range(
        "OFFSET(free_area.nr_free)", layout.member_offset("free_area", "nr_free"), 0, free_area_size - 8
    )
    check_range("OFFSET(zone.free_area)", free_area, 0, zone_size - orders * free_area_size)
    vm_stat = layout.member_offset("zone", "vm_stat")
    nr_free_pages = layout.enum_value("zone_stat_item", "NR_FREE_PAGES")
    check_range("OFFSET(zone.vm_stat[NR_FREE_PAGES])", vm_stat + 8 * nr_free_pages, 0, zone_size - 8)
    off = {
        m: check_range(f"OFFSET(zone.{m})", layout.member_offset("zone", m), 0, zone_size - 8)
        for m in ("zone_start_pfn", "spanned_pages", "present_pages", "managed_pages", "name", "per_cpu_pageset")
    }
    cpus = for_each_online_cpu(kv)
    populated = 0
    for nid, pgdat in for_each_online_pgdat(kv):
        raw = kv.read_va(pgdat + node_zones, zone_size * nzones)
        for z in range(nzones):
            zb = raw[z * zone_size : (z + 1) * zone_size]

            def u64(o: int, zb: np.ndarray = zb) -> int:
                return int(zb[o : o + 8].view("<u8")[0])

            spanned = u64(off["spanned_pages"])
            if spanned == 0:
                continue
            populated += 1
            check_range("the number of populated zones", populated, 1, MAX_POPULATED_ZONES)
            check_range("populated zones times online CPUs", populated * len(cpus), 1, MAX_POPULATED_ZONES << 8)
            start = check_range(f"node {nid} zone {z} start pfn", u64(off["zone_start_pfn"]), 0, MAX_PFN)
            check_range(f"node {nid} zone {z} spanned pages", spanned, 0, MAX_PFN - start)
            frees = [u64(free_area + o * free_area_size + nr_free) for o in range(orders)]
            zone = Zone(
                node=nid,
                index=z,
                name=_read_str(kv, u64(off["name"])),
                va=pgdat + node_zones + z * zone_size,
                start_pfn=start,
                spanned=spanned,
                present=u64(off["present_pages"]),
                managed=u64(off["managed_pages"]),
                nr_free=frees,
                nr_free_pages=np_i64(u64(vm_stat + 8 * nr_free_pages)),
            )
            pageset = u64(off["per_cpu_pageset"])
            for cpu in cpus:
                zone.pcp_va[cpu] = per_cpu_ptr(kv, pageset, cpu)
            yield zone


def np_i64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


@dataclass(frozen=True)
class PcpLayout:
    """Where ``struct per_cpu_pages`` keeps its count and lists, and each list's page order.

    The list index encodes (order, migratetype): ``pindex = order * MIGRATE_PCPTYPES + mt``
    for orders up to PAGE_ALLOC_COSTLY_ORDER, then the lists for PMD-sized THPs
    (``mm/page_alloc.c``, ``order_to_pindex``/``pindex_to_order``): one on Linux 6.1, one per
    movable/unmovable on 6.12. The number of THP lists is the one (0 to MIGRATE_PCPTYPES - 1)
    that leaves the low-order lists a multiple of MIGRATE_PCPTYPES, so nothing here depends on
    a version.
    """

    count: int
    lists: int
    nlists: int
    list_head_size: int
    orders: tuple[int, ...]

    @classmethod
    def from_layout(cls, layout: Layout) -> PcpLayout:
        nlists = check_range(
            "LENGTH(per_cpu_pages.lists)", layout.array_length("per_cpu_pages", "lists"), 1, MAX_PCP_LISTS
        )
        pcptypes = check_range("MIGRATE_PCPTYPES", layout.enum_value("migratetype", "MIGRATE_PCPTYPES"), 1, nlists)
        thp_lists = next(t for t in range(pcptypes) if (nlists - t) % pcptypes == 0)
        low = nlists - thp_lists
        orders = tuple(p // pcptypes if p < low else HPAGE_PMD_ORDER for p in range(nlists))
        check_range("the order of a per-cpu list", max(orders), 0, MAX_ORDERS - 1)
        list_head = check_range("sizeof(struct list_head)", layout.struct_size("list_head"), 8, 64)
        lists = check_range(
            "OFFSET(per_cpu_pages.lists)", layout.member_offset("per_cpu_pages", "lists"), 0, MAX_STRUCT
        )
        count = check_range(
            "OFFSET(per_cpu_pages.count)",
            layout.member_offset("per_cpu_pages", "count"),
            0,
            lists + nlists * list_head - 4,
        )
        return cls(count=count, lists=lists, nlists=nlists, list_head_size=list_head, orders=orders)


def pcp_lru_offset(layout: Layout) -> int:
    """Offset of the list_head a per-cpu list links pages by: ``page.pcp_list`` where the
    kernel names it (6.1 and later), else ``page.lru``; both share one slot."""
    for member in ("pcp_list", "lru"):
        try:
            return layout.member_offset("page", member)
        except LayoutMissing:
            continue
    raise LayoutMissing("no offset for page.pcp_list or page.lru")
