"""The probe: what memvirt asks of a kernel's headers, one unit per header so a header that does
not compile loses only its own facts."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass
from memvirt.introspect.headers.base import FORMAT, _front_end_flags

# Public headers, each its own unit so that one that does not compile loses only its own facts.
_HEADERS = (
    "linux/types.h",
    "linux/list.h",
    "linux/mm_types.h",
    "linux/mmzone.h",
    "linux/page-flags.h",
    "linux/mm.h",
    "linux/sched.h",
    "linux/slab.h",
    "linux/vmalloc.h",
    "linux/utsname.h",
    "linux/dev_printk.h",
    "linux/vmstat.h",
    "linux/memcontrol.h",
    "linux/pagemap.h",
    "linux/fs.h",
    "linux/xarray.h",
    "linux/maple_tree.h",
    "linux/rmap.h",
    "linux/swap.h",
    "linux/pid.h",
    "linux/hugetlb.h",
    "linux/nodemask.h",
)

# Headers a full source tree has and Debian's header packages do not; looked up in the source
# tree itself (``-idirafter``), so they can never shadow a public header. ``slub_def.h`` (until
# v6.7) has inline helpers that need ``struct slab`` from ``mm/slab.h``: without the real one a
# stand-in with just the fields those helpers touch lets the header compile. The stand-in is
# only ever reached through pointers, so it never enters the recorded layouts.
_PRIVATE_UNITS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "mm/slab.h",
        (
            '#if __has_include("mm/slab.h")\n#include "mm/slab.h"\nstruct slab *memvirt_s_slab;\n'
            "struct kmem_cache_node *memvirt_s_kmem_cache_node;\n#else\n#error no mm/slab.h\n#endif",
            "#if __has_include(<linux/slub_def.h>) && defined(CONFIG_SLUB)\n"
            "struct slab { unsigned int objects; };\n"
            "static inline void *slab_address(const struct slab *slab) { return (void *)slab; }\n"
            "#include <linux/slub_def.h>\n#endif",
        ),
    ),
    (
        "kernel/printk/printk_ringbuffer.h",
        (
            '#if __has_include("kernel/printk/printk_ringbuffer.h")\n'
            '#include "kernel/printk/printk_ringbuffer.h"\n#endif',
        ),
    ),
)

# Types whose layout is recorded: ``struct`` tags, then typedef names.
STRUCTS = (
    "page",
    "folio",
    "zone",
    "pglist_data",
    "free_area",
    "per_cpu_pages",
    "per_cpu_zonestat",
    "per_cpu_nodestat",
    "lruvec",
    "list_head",
    "hlist_head",
    "hlist_node",
    "mem_section",
    "mem_section_usage",
    "address_space",
    "inode",
    "kmem_cache",
    "kmem_cache_cpu",
    "task_struct",
    "mm_struct",
    "vm_area_struct",
    "anon_vma",
    "xarray",
    "xa_node",
    "maple_tree",
    "maple_node",
    "maple_range_64",
    "maple_arange_64",
    "rb_root",
    "rb_node",
    "uts_namespace",
    "new_utsname",
    "vmap_area",
    "vm_struct",
    "dev_printk_info",
    "printk_ringbuffer",
    "prb_desc_ring",
    "prb_desc",
    "prb_data_blk_lpos",
    "printk_info",
    "prb_data_ring",
    "pid",
    "upid",
    "zonelist",
    "zoneref",
    "swap_info_struct",
    "page_counter",
    "mem_cgroup",
    "hstate",
    "callback_head",
)
TYPEDEFS = (
    "nodemask_t",
    "atomic_t",
    "atomic_long_t",
    "atomic64_t",
    "spinlock_t",
    "pgd_t",
    "p4d_t",
    "pud_t",
    "pmd_t",
    "pte_t",
    "pgprot_t",
    "swp_entry_t",
    "cpumask_t",
    "refcount_t",
)
# Enums recorded whole (every enumerator also becomes a :meth:`HeadersLayout.constant`).
ENUMS = (
    "pageflags",
    "pagetype",
    "zone_type",
    "migratetype",
    "node_stat_item",
    "zone_stat_item",
    "numa_stat_item",
    "lru_list",
    "pageblock_bits",
    "compound_dtor_id",
    "zone_watermarks",
    "vm_event_item",
    "memcg_stat_item",
    "kmalloc_cache_type",
    "zone_flags",
    "pgdat_flags",
    "node_states",
    "mapping_flags",
    "pid_type",
    "maple_type",
    "stat_item",
    "lru_status",
)
# Macros and enumerators of unnamed enums (which DWARF only carries if something uses them).
CONSTANTS = (
    # page types: 6.1 keeps inverted bits under PAGE_TYPE_BASE, 6.12 an enum in the top byte
    "PAGE_TYPE_BASE",
    "PAGE_MAPCOUNT_RESERVE",
    "PG_buddy",
    "PG_offline",
    "PG_table",
    "PG_guard",
    "PG_head_mask",
    "PAGE_TYPE_SHIFT",
    "PAGE_MAPPING_ANON",
    "PAGE_MAPPING_MOVABLE",
    "PAGE_MAPPING_KSM",
    "PAGE_MAPPING_FLAGS",
    "FOLIO_MAPPING_ANON",  # PAGE_MAPPING_ANON's name since "mm: rename PAGE_MAPPING_* to FOLIO_MAPPING_*" (v6.17)
    "NR_PAGEFLAGS",
    "__NR_PAGEFLAGS",
    # buddy allocator and per-cpu lists
    "MAX_ORDER",
    "MAX_PAGE_ORDER",
    "NR_PAGE_ORDERS",
    "MAX_ORDER_NR_PAGES",
    "PAGE_ALLOC_COSTLY_ORDER",
    "NR_PCP_LISTS",
    "NR_LOWORDER_PCP_LISTS",
    "NR_PCP_THP",
    "MIGRATE_PCPTYPES",
    "MIGRATE_TYPES",
    "pageblock_order",
    "NR_PAGEBLOCK_BITS",
    "MAX_NR_ZONES",
    "__MAX_NR_ZONES",
    "NR_VM_ZONE_STAT_ITEMS",
    "NR_VM_NODE_STAT_ITEMS",
    "NR_VM_NUMA_EVENT_ITEMS",
    "NR_LRU_LISTS",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "HPAGE_PMD_ORDER",
    "HUGETLB_PAGE_ORDER",
    # page->flags fields
    "ZONES_SHIFT",
    "ZONES_WIDTH",
    "ZONES_PGSHIFT",
    "ZONES_MASK",
    "NODES_SHIFT",
    "NODES_WIDTH",
    "NODES_PGSHIFT",
    "NODES_MASK",
    "SECTIONS_WIDTH",
    "SECTIONS_PGSHIFT",
    "SECTIONS_MASK",
    "LAST_CPUPID_WIDTH",
    "LAST_CPUPID_PGSHIFT",
    "KASAN_TAG_WIDTH",
    "LRU_GEN_WIDTH",
    "LRU_REFS_WIDTH",
    "LRU_GEN_PGOFF",
    "LRU_REFS_PGOFF",
    "MAX_NR_GENS",
    # sparse memory model
    "SECTION_SIZE_BITS",
    "MAX_PHYSMEM_BITS",
    "PFN_SECTION_SHIFT",
    "PAGES_PER_SECTION",
    "SECTIONS_SHIFT",
    "SECTIONS_PER_ROOT",
    "NR_SECTION_ROOTS",
    "NR_MEM_SECTIONS",
    "SECTION_MARKED_PRESENT",
    "SECTION_HAS_MEM_MAP",
    "SECTION_IS_ONLINE",
    "SECTION_IS_EARLY",
    "SECTION_TAINT_ZONE_DEVICE",
    "SECTION_MAP_LAST_BIT",
    "SECTION_MAP_MASK",
    "SECTION_NID_SHIFT",
    "MAX_NUMNODES",
    "NR_CPUS",
    # x86-64 address space and page tables
    "__PAGE_OFFSET_BASE_L4",
    "__PAGE_OFFSET_BASE_L5",
    "__START_KERNEL_map",
    "__PHYSICAL_START",
    "KERNEL_IMAGE_SIZE",
    "__VMEMMAP_BASE_L4",
    "__VMALLOC_BASE_L4",
    "__PHYSICAL_MASK_SHIFT",
    "__VIRTUAL_MASK_SHIFT",
    "PTRS_PER_PTE",
    "PTRS_PER_PMD",
    "PTRS_PER_PUD",
    "PTRS_PER_P4D",
    "PMD_SHIFT",
    "PUD_SHIFT",
    "P4D_SHIFT",
    "PGDIR_SHIFT",
    "_PAGE_BIT_PRESENT",
    "_PAGE_PRESENT",
    "_PAGE_PSE",
    "_PAGE_NX",
    "_PAGE_PROTNONE",
    "THREAD_SIZE",
    # slab, tasks, mm counters, xarray, maple tree
    "KMALLOC_SHIFT_LOW",
    "KMALLOC_SHIFT_HIGH",
    "KMALLOC_MIN_SIZE",
    "NR_KMALLOC_TYPES",
    "TASK_COMM_LEN",
    "MM_FILEPAGES",
    "MM_ANONPAGES",
    "MM_SWAPENTS",
    "MM_SHMEMPAGES",
    "NR_MM_COUNTERS",
    "XA_CHUNK_SHIFT",
    "XA_CHUNK_SIZE",
    "MAPLE_NODE_SLOTS",
    "MAPLE_RANGE64_SLOTS",
    "MAPLE_ARANGE64_SLOTS",
    "MAPLE_NODE_MASK",
    "HUGETLB_PAGE_DTOR",
)

_PRELUDE = """\
/* memvirt layout probe: every fact on its own lines, so that gcc's errors name the facts a
 * kernel lacks. Generated by memvirt.introspect.headers; do not edit. */
struct memvirt_const { unsigned long long value; int negative; };
#define MEMVIRT_CONST(n) \\
    const struct memvirt_const memvirt_c_##n = { (unsigned long long)(n), (n) < 0 };
"""
_VAR_STRUCT = "memvirt_s_"
_VAR_TYPEDEF = "memvirt_t_"
_VAR_ENUM = "memvirt_e_"
_VAR_CONST = "memvirt_c_"


@dataclass(frozen=True)
class Unit:
    """One fact of the probe: C text alternatives, tried in order until one compiles."""

    fact: str
    alternatives: tuple[str, ...]


@cache
def probe_units() -> tuple[Unit, ...]:
    """The probe, as units (headers first, then types, enums and constants)."""
    units = [Unit(f"header <{h}>", (f"#if __has_include(<{h}>)\n#include <{h}>\n#endif",)) for h in _HEADERS]
    units += [Unit(f"header {name}", alts) for name, alts in _PRIVATE_UNITS]
    units += [Unit(f"struct {s}", (f"struct {s} *{_VAR_STRUCT}{s};",)) for s in STRUCTS]
    units += [Unit(f"typedef {t}", (f"{t} *{_VAR_TYPEDEF}{t};",)) for t in TYPEDEFS]
    units += [Unit(f"enum {e}", (f"enum {e} {_VAR_ENUM}{e};",)) for e in ENUMS]
    units += [Unit(c, (f"MEMVIRT_CONST({c})",)) for c in CONSTANTS]
    return tuple(units)


@cache
def probe_key() -> str:
    """Identifies the probe and the JSON format: a cached layout from another probe is stale."""
    text = json.dumps([FORMAT, _PRELUDE, [(u.fact, u.alternatives) for u in probe_units()], _front_end_flags()])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def render_probe(choice: dict[int, int]) -> tuple[str, list[int]]:
    """The probe's C text with unit ``i`` as alternative ``choice[i]`` (left out when absent),
    and for every line the unit it belongs to (-1 for the prelude)."""
    lines = _PRELUDE.splitlines()
    owner = [-1] * len(lines)
    for i, unit in enumerate(probe_units()):
        if i not in choice:
            continue
        text = unit.alternatives[choice[i]].splitlines()
        lines += text
        owner += [i] * len(text)
    return "\n".join(lines) + "\n", owner
