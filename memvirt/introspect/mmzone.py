"""Nodes, zones and the buddy allocator's bookkeeping (``include/linux/mmzone.h``).

Everything here is read through a :class:`~memvirt.introspect.layout.Layout`, so the same code
serves every kernel whose layout source knows ``struct zone`` and ``struct per_cpu_pages``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from memvirt.errors import BadImage
from memvirt.introspect.kernel import KernelView
from memvirt.introspect.layout import Layout, LayoutMissing

# x86-64: a PMD maps 2 MiB, so a PMD-sized THP is order 9 (arch/x86/include/asm/pgtable_64_types.h).
HPAGE_PMD_ORDER = 21 - 12


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
    if info.has_symbol("node_data"):
        length = int(info.get("LENGTH(node_data)")) if "LENGTH(node_data)" in info else 1
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
    if not 0 < nr <= 8192:
        raise BadImage(f"nr_cpu_ids is {nr}: the kernel's CPU bookkeeping does not add up")
    return _bitmap(kv, kv.symbol("__cpu_online_mask"), nr)


def per_cpu_ptr(kv: KernelView, ptr: int, cpu: int) -> int:
    """``per_cpu_ptr()``: a ``__percpu`` pointer plus that CPU's ``__per_cpu_offset``."""
    return ptr + kv.read_u64_va(kv.symbol("__per_cpu_offset") + 8 * cpu)


def _read_str(kv: KernelView, va: int, limit: int = 32) -> str:
    raw = kv.read_va(va, limit).tobytes()
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def for_each_zone(kv: KernelView, layout: Layout) -> Iterator[Zone]:
    """Every populated zone of every online node, with its free and per-cpu counts."""
    zone_size = layout.struct_size("zone")
    nzones = layout.array_length("pglist_data", "node_zones")
    node_zones = layout.member_offset("pglist_data", "node_zones")
    orders = layout.array_length("zone", "free_area")
    free_area = layout.member_offset("zone", "free_area")
    free_area_size = layout.struct_size("free_area")
    nr_free = layout.member_offset("free_area", "nr_free")
    vm_stat = layout.member_offset("zone", "vm_stat")
    nr_free_pages = layout.enum_value("zone_stat_item", "NR_FREE_PAGES")
    off = {m: layout.member_offset("zone", m) for m in ("zone_start_pfn", "spanned_pages", "present_pages",
                                                        "managed_pages", "name", "per_cpu_pageset")}
    cpus = for_each_online_cpu(kv)
    for nid, pgdat in for_each_online_pgdat(kv):
        raw = kv.read_va(pgdat + node_zones, zone_size * nzones)
        for z in range(nzones):
            zb = raw[z * zone_size : (z + 1) * zone_size]

            def u64(o: int, zb: np.ndarray = zb) -> int:
                return int(zb[o : o + 8].view("<u8")[0])

            spanned = u64(off["spanned_pages"])
            if spanned == 0:
                continue
            frees = [u64(free_area + o * free_area_size + nr_free) for o in range(orders)]
            zone = Zone(
                node=nid, index=z, name=_read_str(kv, u64(off["name"])),
                va=pgdat + node_zones + z * zone_size, start_pfn=u64(off["zone_start_pfn"]), spanned=spanned,
                present=u64(off["present_pages"]), managed=u64(off["managed_pages"]), nr_free=frees,
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
        nlists = layout.array_length("per_cpu_pages", "lists")
        pcptypes = layout.enum_value("migratetype", "MIGRATE_PCPTYPES")
        thp_lists = next(t for t in range(pcptypes) if (nlists - t) % pcptypes == 0)
        low = nlists - thp_lists
        orders = tuple(p // pcptypes if p < low else HPAGE_PMD_ORDER for p in range(nlists))
        return cls(
            count=layout.member_offset("per_cpu_pages", "count"),
            lists=layout.member_offset("per_cpu_pages", "lists"),
            nlists=nlists, list_head_size=layout.struct_size("list_head"), orders=orders,
        )


def pcp_lru_offset(layout: Layout) -> int:
    """Offset of the list_head a per-cpu list links pages by: ``page.pcp_list`` where the
    kernel names it (6.1 and later), else ``page.lru``; both share one slot."""
    for member in ("pcp_list", "lru"):
        try:
            return layout.member_offset("page", member)
        except LayoutMissing:
            continue
    raise LayoutMissing("no offset for page.pcp_list or page.lru")
