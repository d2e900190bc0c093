"""Layout facts from the guest kernel's own source headers, for kernels without BTF.

A small C probe that names the types and constants memvirt needs is compiled by the host gcc
against the kernel's headers, with the kernel's own configuration (``autoconf.h`` through
``kconfig.h``) and the front-end flags kbuild uses (the set ``make M=dir V=1`` prints, minus
code generation and warning options, which cannot change a layout). The compiler then does the
layout work; its DWARF (pyelftools) gives struct sizes, member offsets, array lengths and enum
values, and each probed macro's value is read from the object's ``.rodata``.

One probe serves every kernel version: each fact sits on its own lines, and where gcc rejects a
fact (``PG_table`` is a macro in 6.1 and gone in 6.12, ``MAX_PHYSMEM_BITS`` is a run-time value
with 5-level paging) those lines are dropped and the probe recompiled. What was dropped, with
gcc's reason, is kept so that a missing fact's :class:`LayoutMissing` says why.

Debian's headers come in two packages: ``linux-headers-<release>`` (generated headers and
``.config``) and the ``-common`` package with the source headers it includes. Both are fetched
with ``apt-get download`` and unpacked with ``dpkg-deb -x`` into the cache, never installed.
Private headers under ``mm/`` and ``kernel/`` are not shipped: ``struct kmem_cache`` (in
``mm/slab.h`` since v6.8) and the printk ring buffer are only found in a full source tree given
to :meth:`HeadersLayout.from_tree`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import struct as cstruct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memvirt.errors import HeadersError, HeadersNotFound, ProbeCompileError
from memvirt.introspect.layout import LayoutMissing
from memvirt.paths import cache_home

if TYPE_CHECKING:
    from elftools.dwarf.die import DIE
    from elftools.elf.elffile import ELFFile

# Bump when the JSON written by :func:`parse_probe_object` changes shape.
FORMAT = 1
_MAX_ROUNDS = 10
_RELEASE = re.compile(r"^[0-9][A-Za-z0-9.+~_-]*$")
_PATH_PART = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)$")
_TAG_PREFIX = re.compile(r"^(struct|union|enum)\s+")


# ---------------------------------------------------------------------------------------------
# The probe: what memvirt asks of the headers.

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


# ---------------------------------------------------------------------------------------------
# Kernel trees.


@dataclass(frozen=True)
class HeaderTree:
    """A prepared kernel tree: ``objtree`` has ``.config`` and generated headers, ``srctree`` the
    source headers (the same directory unless the tree was built with ``O=`` or split by Debian)."""

    objtree: Path
    srctree: Path
    release: str

    @property
    def describe(self) -> str:
        return f"kernel headers of {self.release} in {self.objtree}"


def open_tree(path: str | Path) -> HeaderTree:
    """Check that ``path`` is a prepared x86 kernel tree and find its source half and release."""
    obj = Path(path).resolve()
    if not (obj / "include" / "generated" / "autoconf.h").is_file():
        raise HeadersNotFound(
            f"{obj} is not a prepared kernel tree (no include/generated/autoconf.h): run 'make modules_prepare' there"
        )
    src = _source_tree(obj)
    if not (src / "arch" / "x86" / "include").is_dir() or not (src / "include" / "linux" / "kconfig.h").is_file():
        raise HeadersNotFound(f"{src} lacks arch/x86/include or include/linux/kconfig.h: not an x86 kernel source tree")
    return HeaderTree(obj, src, _tree_release(obj))


def _source_tree(obj: Path, root: Path | None = None) -> Path:
    """kbuild's ``O=`` builds leave a ``source`` link; Debian's arch package has a Makefile that
    includes the ``-common`` package's (an absolute path, re-rooted under ``root`` when unpacked)."""
    link = obj / "source"
    if link.is_dir():
        return link.resolve()
    makefile = obj / "Makefile"
    if makefile.is_file():
        for line in makefile.read_text(errors="replace").splitlines():
            m = re.match(r"^\s*include\s+(\S+)/Makefile\s*$", line)
            if not m:
                continue
            target = Path(m[1])
            cands = [target, obj.parent / target.name]
            if root is not None and target.is_absolute():
                cands.insert(0, root / target.relative_to(target.anchor))
            for cand in cands:
                if (cand / "include").is_dir():
                    return cand.resolve()
    return obj


def _tree_release(obj: Path) -> str:
    """``UTS_RELEASE`` (Debian's ``include/config/kernel.release`` holds the upstream version)."""
    uts = obj / "include" / "generated" / "utsrelease.h"
    if uts.is_file():
        m = re.search(r'UTS_RELEASE\s+"([^"]+)"', uts.read_text(errors="replace"))
        if m:
            return m[1]
    rel = obj / "include" / "config" / "kernel.release"
    if rel.is_file() and rel.read_text().strip():
        return rel.read_text().strip()
    raise HeadersNotFound(f"{obj} has no include/generated/utsrelease.h: not a prepared kernel tree")


def debian_tree(release: str) -> HeaderTree:
    """Download (once) and unpack (once) Debian's headers for ``release`` into the cache."""
    if not _RELEASE.match(release):
        raise HeadersNotFound(f"{release!r} is not a kernel release like 6.1.0-56-amd64")
    dest = cache_home() / "headers" / release
    obj = dest / "usr" / "src" / f"linux-headers-{release}"
    ready = obj / "include" / "generated" / "autoconf.h"
    if not ready.is_file():
        packages = debian_header_packages(release)
        with _locked(dest.parent / f".{release}.lock"):
            if not ready.is_file():
                _unpack_debian(packages, dest)
    src = _source_tree(obj, root=dest)
    if src == obj:
        raise HeadersError(f"linux-headers-{release} in {dest} does not point at its -common package's headers")
    return HeaderTree(obj, src, release)


def _unpack_debian(packages: list[str], dest: Path) -> None:
    """``dpkg-deb -x`` the header packages into a private folder, renamed into place at the end."""
    debs = [_apt_download(p) for p in packages]
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=_mkdir(dest.parent)))
    try:
        for deb in debs:
            proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise HeadersError(f"cannot unpack {deb.name}: {_first_line(proc.stderr)}")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def debian_header_packages(release: str) -> list[str]:
    """``linux-headers-<release>`` and the ``-common`` package(s) it takes its headers from.

    ``linux-kbuild-*`` (fixdep, modpost) and the compiler packages it also depends on are not
    needed: the probe is compiled with gcc directly.
    """
    if shutil.which("apt-cache") is None or shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise HeadersError(
            f"apt-get/dpkg-deb not found: cannot fetch linux-headers-{release}; pass a prepared tree to "
            "HeadersLayout.from_tree"
        )
    package = f"linux-headers-{release}"
    proc = subprocess.run(["apt-cache", "depends", package], capture_output=True, text=True)
    if proc.returncode != 0:
        raise HeadersNotFound(f"{package} is unknown to apt ({_first_line(proc.stderr)}); run 'apt-get update'")
    deps = re.findall(r"^\s*\|?Depends:\s*(linux-headers-\S*common\S*)\s*$", proc.stdout, re.M)
    return [package, *dict.fromkeys(deps)]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path``: concurrent processes (pytest-xdist, several CLIs) build a
    release's cache once instead of unpacking over each other."""
    _mkdir(path.parent)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _apt_download(package: str) -> Path:
    """The package's .deb in ``cache_home()/debs``, downloaded there by ``apt-get download``
    into a private folder first, so that concurrent callers never see half a file."""
    debs = _mkdir(cache_home() / "debs")
    found = sorted(debs.glob(f"{package}_*.deb"))
    if found:
        return found[-1]
    tmp = Path(tempfile.mkdtemp(prefix=".download.", dir=debs))
    try:
        proc = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        got = sorted(tmp.glob(f"{package}_*.deb"))
        if proc.returncode != 0 or not got:
            errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("E:")] or [_first_line(proc.stderr)]
            raise HeadersNotFound(f"apt-get download {package} failed: {errors[0]}")
        final = debs / got[-1].name
        os.replace(got[-1], final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else "no output"


# ---------------------------------------------------------------------------------------------
# Compiling.


def _front_end_flags() -> list[str]:
    """The part of kbuild's C flags (6.1 and 6.12 ``make V=1``) that the front end and the
    type layout can see, with ``-g``, ``-w`` (only errors are wanted) and no code generation
    options (retpolines, ``-pg``, stack protector, alignment of code).

    ``-O2`` as kbuild has it, not ``-O0``: 6.12's ``WARN_ON()`` in always-inline helpers passes
    a parameter to an ``asm`` "i" constraint, which only constant propagation makes legal.
    """
    return [
        "-D__KERNEL__",
        '-DKBUILD_MODFILE="memvirt/probe"',
        '-DKBUILD_BASENAME="probe"',
        '-DKBUILD_MODNAME="probe"',
        "-D__KBUILD_MODNAME=kmod_probe",
        "-fshort-wchar",
        "-fno-common",
        "-fno-PIE",
        "-fno-strict-aliasing",
        "-m64",
        "-mno-sse",
        "-mno-mmx",
        "-mno-sse2",
        "-mno-3dnow",
        "-mno-avx",
        "-mno-80387",
        "-mno-fp-ret-in-387",
        "-mno-red-zone",
        "-mcmodel=kernel",
        "-fno-asynchronous-unwind-tables",
        "-w",
        "-g",
        "-O2",
        "-c",
    ]


def kernel_cflags(tree: HeaderTree) -> list[str]:
    """gcc flags for compiling against ``tree``: kbuild's include order and forced includes,
    its ``-std`` and char signedness (``-funsigned-char`` since v6.2), then the front-end set."""
    s, o = tree.srctree, tree.objtree
    incs = [
        s / "arch/x86/include",
        o / "arch/x86/include/generated",
        s / "include",
        o / "include",
        s / "arch/x86/include/uapi",
        o / "arch/x86/include/generated/uapi",
        s / "include/uapi",
        o / "include/generated/uapi",
    ]
    flags = ["-nostdinc", *(f"-I{p}" for p in incs), f"-idirafter{s}"]
    for h in ("compiler-version.h", "kconfig.h", "compiler_types.h"):
        if (s / "include" / "linux" / h).is_file():
            flags += ["-include", str(s / "include" / "linux" / h)]
    top = s / "Makefile"
    text = top.read_text(errors="replace") if top.is_file() else ""
    std = re.search(r"-std=(gnu\w+)", text)
    flags.append(f"-std={std[1] if std else 'gnu11'}")
    if re.search(r"^KBUILD_CFLAGS\s*\+=.*-funsigned-char", text, re.M):
        flags.append("-funsigned-char")
    return flags + _front_end_flags()


def _config(tree: HeaderTree) -> dict[str, str]:
    cfg: dict[str, str] = {}
    path = tree.objtree / ".config"
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            k, sep, v = line.partition("=")
            if sep and k.startswith("CONFIG_"):
                cfg[k] = v.strip('"')
    return cfg


def find_compiler(tree: HeaderTree) -> str:
    """The gcc the kernel was built with if the host has it (``gcc-12`` for Debian 12 kernels),
    else any gcc: struct layout is the x86-64 ABI's, not the compiler version's."""
    cfg = _config(tree)
    if any(
        (k.startswith("CONFIG_RANDSTRUCT") and not k.endswith("_NONE") or k == "CONFIG_GCC_PLUGIN_RANDSTRUCT")
        and v == "y"
        for k, v in cfg.items()
    ):
        raise HeadersError(
            f"{tree.release} is built with CONFIG_RANDSTRUCT: its struct layouts come from a gcc plugin's seed, "
            "not the headers"
        )
    major = int(cfg.get("CONFIG_GCC_VERSION", "0") or 0) // 10000
    names = [f"x86_64-linux-gnu-gcc-{major}", f"gcc-{major}"] if major else []
    for name in [*names, "x86_64-linux-gnu-gcc", "gcc"]:
        if path := shutil.which(name):
            return path
    raise HeadersError(f"no gcc found to compile the layout probe for {tree.release}: install gcc")


@dataclass
class ProbeResult:
    """An object file of the probe, and the facts gcc refused (``{fact: first error line}``)."""

    obj: Path
    dropped: dict[str, str]
    rounds: int
    compiler: str


def compile_probe(tree: HeaderTree, workdir: Path) -> ProbeResult:
    """Compile the probe against ``tree``, dropping the units gcc rejects, until it compiles."""
    cc = find_compiler(tree)
    flags = kernel_cflags(tree)
    units = probe_units()
    choice = {i: 0 for i in range(len(units))}
    dropped: dict[str, str] = {}
    src = workdir / "memvirt_probe.c"
    obj = workdir / "memvirt_probe.o"
    first_error = ""
    for rounds in range(1, _MAX_ROUNDS + 1):
        text, owner = render_probe(choice)
        src.write_text(text)
        proc = subprocess.run(
            [cc, *flags, "-o", obj.name, src.name],
            capture_output=True,
            text=True,
            cwd=workdir,
            env={**os.environ, "LC_ALL": "C"},
        )
        if proc.returncode == 0:
            return ProbeResult(obj, dropped, rounds, cc)
        blamed, first = blame_errors(proc.stderr, src.name, owner)
        first_error = first_error or first
        if not blamed:
            raise ProbeCompileError(
                f"gcc cannot compile the layout probe against {tree.describe}: {first or _first_line(proc.stderr)}"
            )
        for i, reason in blamed.items():
            if choice[i] + 1 < len(units[i].alternatives):
                choice[i] += 1
            else:
                del choice[i]
                dropped[units[i].fact] = reason
    raise ProbeCompileError(
        f"gcc still rejects the layout probe for {tree.describe} after {_MAX_ROUNDS} rounds: {first_error}"
    )


_DIAG = re.compile(
    r"^(?P<file>[^:\s][^:]*):(?P<line>\d+):(?:\d+:)? (?P<kind>fatal error|error|warning|note): (?P<msg>.*)$"
)
_INCLUDED = re.compile(r"^(?:In file included|\s+) from (?P<file>[^:]+):(?P<line>\d+)[:,]$")


def blame_errors(stderr: str, probe_name: str, owner: list[int]) -> tuple[dict[int, str], str]:
    """Which probe units gcc's errors point at: ``({unit: message}, first error line)``.

    An error in the probe blames its line; an error in a header blames the probe line that the
    message's "in expansion of macro" notes name, else the probe line the header was included
    from. Errors that cannot be tied to a unit blame nothing (the caller gives up).
    """
    blamed: dict[int, str] = {}
    first = ""
    include_root: int | None = None
    pending: tuple[str, int | None, list[int]] | None = None

    def settle() -> None:
        if pending is None:
            return
        msg, root, lines = pending
        for ln in lines or ([root] if root is not None else []):
            if 0 < ln <= len(owner) and owner[ln - 1] >= 0:
                blamed.setdefault(owner[ln - 1], msg)

    for raw in stderr.splitlines():
        if raw.startswith("In file included from"):
            include_root = None
        if m := _INCLUDED.match(raw):
            if Path(m["file"]).name == probe_name:
                include_root = int(m["line"])
            continue
        if raw.startswith(("In file included from", " ")):
            continue
        if raw.startswith(f"{probe_name}:") and not _DIAG.match(raw):
            include_root = None
            continue
        m = _DIAG.match(raw)
        if m is None:
            continue
        in_probe = Path(m["file"]).name == probe_name
        if m["kind"] in ("error", "fatal error"):
            settle()
            first = first or raw.strip()
            msg = f"{m['msg']}" if in_probe else f"{m['msg']} ({m['file'].rsplit('/include/', 1)[-1]})"
            pending = (msg, None if in_probe else include_root, [int(m["line"])] if in_probe else [])
            if in_probe:
                include_root = None
        elif m["kind"] == "note" and pending is not None and in_probe:
            pending[2].append(int(m["line"]))
    settle()
    return blamed, first


# ---------------------------------------------------------------------------------------------
# Reading the object.


def parse_probe_object(path: Path) -> dict[str, Any]:
    """Types, enums and constants of a compiled probe, as JSON-ready data.

    ``types`` is a list; members and typedefs refer to other entries by index. Only what a
    recorded type holds by value is followed (pointers are kept as their C spelling), so the
    table stays small although gcc emits most of the kernel's types for a pointer to
    ``task_struct``.
    """
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        elf = ELFFile(f)
        constants = _constant_symbols(elf)
        cu = next(elf.get_dwarf_info().iter_CUs())
        reader = _TypeReader()
        enums: dict[str, dict[str, int]] = {}
        for die in cu.get_top_DIE().iter_children():
            if die.tag == "DW_TAG_enumeration_type":
                values = _enumerators(die)
                name = _name(die)
                if name and values:
                    enums.setdefault(name, values)
                for k, v in values.items():
                    constants.setdefault(k, v)
            elif die.tag == "DW_TAG_variable":
                name = _name(die) or ""
                target = _attr_die(die, "DW_AT_type")
                if target is None:
                    continue
                if name.startswith((_VAR_STRUCT, _VAR_TYPEDEF)) and target.tag == "DW_TAG_pointer_type":
                    pointee = _attr_die(target, "DW_AT_type")
                    if pointee is not None:
                        reader.root(pointee)
    return {
        "types": reader.types,
        "names": reader.names,
        "declared": sorted(reader.declared),
        "enums": enums,
        "constants": constants,
    }


def _name(die: DIE) -> str | None:
    a = die.attributes.get("DW_AT_name")
    return a.value.decode("utf-8", "replace") if a is not None else None


def _attr_die(die: DIE, attr: str) -> DIE | None:
    return die.get_DIE_from_attribute(attr) if attr in die.attributes else None


def _int_attr(die: DIE, attr: str, default: int = 0) -> int:
    a = die.attributes.get(attr)
    return int(a.value) if a is not None and isinstance(a.value, int) else default


def _constant_symbols(elf: ELFFile) -> dict[str, int]:
    """Each ``MEMVIRT_CONST(name)``: a ``{u64 value; int negative}`` in ``.rodata``."""
    from elftools.elf.sections import SymbolTableSection

    out: dict[str, int] = {}
    symtab = elf.get_section_by_name(".symtab")
    if not isinstance(symtab, SymbolTableSection):
        return out
    data: dict[int, bytes] = {}
    for sym in symtab.iter_symbols():
        if not sym.name.startswith(_VAR_CONST) or not isinstance(sym["st_shndx"], int):
            continue
        shndx = sym["st_shndx"]
        if shndx not in data:
            data[shndx] = elf.get_section(shndx).data()
        value, negative = cstruct.unpack_from("<Qi", data[shndx], sym["st_value"])
        out[sym.name[len(_VAR_CONST) :]] = value - (1 << 64) if negative else value
    return out


def _enumerators(die: DIE) -> dict[str, int]:
    """``{name: value}``; gcc writes non-negative values as unsigned data forms, so those are
    sign-extended only when the enum's underlying type is signed and the top bit is set."""
    base = _attr_die(die, "DW_AT_type")
    signed = base is not None and _int_attr(base, "DW_AT_encoding") in (0x05, 0x06)
    out: dict[str, int] = {}
    for child in die.iter_children():
        if child.tag != "DW_TAG_enumerator":
            continue
        a = child.attributes["DW_AT_const_value"]
        v = int(a.value)
        width = {"DW_FORM_data1": 8, "DW_FORM_data2": 16, "DW_FORM_data4": 32, "DW_FORM_data8": 64}.get(a.form)
        if signed and width and v >> (width - 1):
            v -= 1 << width
        out[_name(child) or ""] = v
    return out


class _TypeReader:
    """Turns DWARF types into the compact table :class:`HeadersLayout` reads."""

    def __init__(self) -> None:
        self.types: list[dict[str, Any]] = []
        self.names: dict[str, int] = {}
        self.declared: list[str] = []
        self._index: dict[int, int] = {}

    def root(self, die: DIE) -> None:
        idx = self.read(die)
        t = self.types[idx]
        if t["k"] == "typedef":
            self.names.setdefault(t["name"], idx)
        elif "decl" in t:
            self.declared.append(f"{t['k']} {t['name']}")

    def read(self, die: DIE | None) -> int:
        """Index of ``die``'s entry (qualifiers are looked through), reading it if new."""
        while die is not None and die.tag in (
            "DW_TAG_const_type",
            "DW_TAG_volatile_type",
            "DW_TAG_restrict_type",
            "DW_TAG_atomic_type",
        ):
            die = _attr_die(die, "DW_AT_type")
        key = -1 if die is None else die.offset
        if key in self._index:
            return self._index[key]
        idx = len(self.types)
        self._index[key] = idx
        self.types.append({"k": "void"})
        if die is not None:
            self.types[idx] = self._entry(die)
        return idx

    def _entry(self, die: DIE) -> dict[str, Any]:
        tag = die.tag
        if tag in ("DW_TAG_structure_type", "DW_TAG_union_type"):
            kind = "struct" if tag == "DW_TAG_structure_type" else "union"
            name = _name(die) or ""
            if "DW_AT_declaration" in die.attributes:
                return {"k": kind, "name": name, "decl": 1}
            entry: dict[str, Any] = {"k": kind, "name": name, "size": _int_attr(die, "DW_AT_byte_size"), "m": []}
            if name:
                self.names.setdefault(f"{kind} {name}", self._index[die.offset])
            entry["m"] = [self._member(m) for m in die.iter_children() if m.tag == "DW_TAG_member"]
            return entry
        if tag == "DW_TAG_typedef":
            return {"k": "typedef", "name": _name(die) or "", "t": self.read(_attr_die(die, "DW_AT_type"))}
        if tag == "DW_TAG_array_type":
            dims = [self._count(s) for s in die.iter_children() if s.tag == "DW_TAG_subrange_type"] or [0]
            elem = self.read(_attr_die(die, "DW_AT_type"))
            for n in reversed(dims[1:]):
                self.types.append({"k": "array", "t": elem, "n": n})
                elem = len(self.types) - 1
            return {"k": "array", "t": elem, "n": dims[0]}
        if tag == "DW_TAG_base_type":
            return {"k": "base", "name": _name(die) or "", "size": _int_attr(die, "DW_AT_byte_size")}
        if tag == "DW_TAG_enumeration_type":
            return {"k": "enum", "name": _name(die) or "", "size": _int_attr(die, "DW_AT_byte_size", 4)}
        if tag == "DW_TAG_pointer_type":
            return {"k": "ptr", "name": _spell(_attr_die(die, "DW_AT_type")) + " *"}
        return {"k": "func", "name": _spell(die)}

    def _member(self, die: DIE) -> list[Any]:
        """``[name, bit offset, type, bit size]``; bitfields in either DWARF encoding."""
        byte = _int_attr(die, "DW_AT_data_member_location")
        bits = _int_attr(die, "DW_AT_bit_size")
        if "DW_AT_data_bit_offset" in die.attributes:
            bit = _int_attr(die, "DW_AT_data_bit_offset")
        elif bits and "DW_AT_bit_offset" in die.attributes:
            storage = _int_attr(die, "DW_AT_byte_size") * 8
            bit = byte * 8 + storage - _int_attr(die, "DW_AT_bit_offset") - bits
        else:
            bit = byte * 8
        return [_name(die) or "", bit, self.read(_attr_die(die, "DW_AT_type")), bits]

    @staticmethod
    def _count(sub: DIE) -> int:
        if "DW_AT_count" in sub.attributes:
            return _int_attr(sub, "DW_AT_count")
        if "DW_AT_upper_bound" in sub.attributes and isinstance(sub.attributes["DW_AT_upper_bound"].value, int):
            return _int_attr(sub, "DW_AT_upper_bound") + 1
        return 0


def _spell(die: DIE | None, depth: int = 0) -> str:
    """A C spelling of a type, without reading its members (for pointer targets)."""
    if die is None:
        return "void"
    if depth > 16:
        return "..."
    tag = str(die.tag)
    name = _name(die)
    inner = _attr_die(die, "DW_AT_type")
    if tag in ("DW_TAG_structure_type", "DW_TAG_union_type", "DW_TAG_enumeration_type"):
        return f"{tag[7:-5].replace('structure', 'struct').replace('enumeration', 'enum')} {name or '(anon)'}"
    if tag in ("DW_TAG_base_type", "DW_TAG_typedef"):
        return name or "?"
    if tag == "DW_TAG_pointer_type":
        return _spell(inner, depth + 1) + " *"
    if tag in ("DW_TAG_const_type", "DW_TAG_volatile_type", "DW_TAG_restrict_type", "DW_TAG_atomic_type"):
        return f"{tag[7:-5]} {_spell(inner, depth + 1)}"
    if tag == "DW_TAG_array_type":
        return _spell(inner, depth + 1) + "[]"
    if tag == "DW_TAG_subroutine_type":
        return f"{_spell(inner, depth + 1)} (*)(...)"
    return tag[7:]


# ---------------------------------------------------------------------------------------------
# The layout.


@dataclass(frozen=True)
class _Member:
    type: int
    bit_offset: int
    bit_size: int


class HeadersLayout:
    """The :class:`~memvirt.introspect.layout.Layout` protocol answered from kernel headers.

    Build one with :meth:`for_release` (a Debian kernel) or :meth:`from_tree` (a prepared tree);
    both cache the parsed probe as JSON, so only the first call per kernel compiles anything.
    """

    source = "headers"

    def __init__(self, data: dict[str, Any], release: str, origin: str):
        self.release = release
        self.origin = origin
        self.meta: dict[str, Any] = data.get("meta", {})
        self._types: list[dict[str, Any]] = data["types"]
        self._names: dict[str, int] = data["names"]
        self._enums: dict[str, dict[str, int]] = data["enums"]
        self._constants: dict[str, int] = data["constants"]
        self._dropped: dict[str, str] = data.get("dropped", {})
        self._declared = frozenset(data.get("declared", ()))

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def for_release(cls, release: str, refresh: bool = False) -> HeadersLayout:
        """Layout of Debian kernel ``release`` (``6.1.0-56-amd64``, ``6.12.117+deb12-cloud-amd64``)."""
        release = release.removeprefix("linux-image-").removeprefix("linux-headers-")
        if not _RELEASE.match(release):
            raise HeadersNotFound(f"{release!r} is not a kernel release like 6.1.0-56-amd64")
        path = cache_home() / "layouts" / f"headers-{release}.json"
        key = probe_key()
        origin = f"linux-headers-{release}"
        if not refresh and (data := _load(path, key)) is not None:
            return cls(data, release, origin)
        t0 = time.perf_counter()
        tree = debian_tree(release)
        fetched = time.perf_counter() - t0
        with _locked(path.with_name(f".{path.name}.lock")):
            if refresh or (data := _load(path, key)) is None:
                data = _build(tree, key, {"fetch": fetched})
                _store(path, data)
        return cls(data, release, origin)

    @classmethod
    def from_tree(cls, path: str | Path, refresh: bool = False) -> HeadersLayout:
        """Layout from a user's prepared kernel tree (``/lib/modules/$(uname -r)/build``, a
        ``make modules_prepare``'d source tree, or its ``O=`` build directory)."""
        tree = open_tree(path)
        stamp = (tree.objtree / "include" / "generated" / "autoconf.h").stat()
        key = hashlib.sha256(f"{probe_key()} {tree.objtree} {stamp.st_mtime_ns} {stamp.st_size}".encode()).hexdigest()[
            :16
        ]
        where = hashlib.sha256(str(tree.objtree).encode()).hexdigest()[:8]
        cached = cache_home() / "layouts" / f"headers-{tree.release}-{where}.json"
        origin = str(tree.objtree)
        if not refresh and (data := _load(cached, key)) is not None:
            return cls(data, tree.release, origin)
        data = _build(tree, key, {})
        _store(cached, data)
        return cls(data, tree.release, origin)

    # -- the Layout protocol ---------------------------------------------------------------------

    def struct_size(self, name: str) -> int:
        return self._sizeof(self._struct(name))

    def member_offset(self, struct: str, path: str) -> int:
        m = self._member(struct, path)
        if m.bit_size or m.bit_offset % 8:
            raise LayoutMissing(
                f"{self._where}: {struct}.{path} is a bitfield at bit {m.bit_offset}: it has no byte offset"
            )
        return m.bit_offset // 8

    def array_length(self, struct: str, path: str) -> int:
        """Elements of the array member at ``path``; 0 for a flexible array member."""
        t = self._types[self._resolve(self._member(struct, path).type)]
        if t["k"] != "array":
            raise LayoutMissing(f"{self._where}: {struct}.{path} is not an array")
        return int(t["n"])

    def enum_value(self, enum: str, name: str) -> int:
        """Enumerator ``name`` of ``enum``; with an empty ``enum``, any probed constant."""
        if not enum:
            return self.constant(name)
        bare = _TAG_PREFIX.sub("", enum)
        values = self._enums.get(bare)
        if values is None:
            raise LayoutMissing(f"{self._where} have no enum {bare!r}{self._why(f'enum {bare}')}")
        if name not in values:
            raise LayoutMissing(f"{self._where}: enum {bare} has no enumerator {name!r}")
        return values[name]

    def has_member(self, struct: str, path: str) -> bool:
        try:
            self._member(struct, path)
        except LayoutMissing:
            return False
        return True

    # -- beyond the protocol ---------------------------------------------------------------------

    def constant(self, name: str) -> int:
        """A probed macro (``PG_table``, ``NR_PCP_LISTS``) or any enumerator (``PG_lru``, ``NR_FREE_PAGES``)."""
        if name in self._constants:
            return self._constants[name]
        raise LayoutMissing(f"{self._where} do not define {name!r}{self._why(name)}")

    def constants(self) -> dict[str, int]:
        """Every constant known: probed macros and the enumerators of all enums gcc emitted."""
        return dict(self._constants)

    def enumerators(self, enum: str) -> dict[str, int]:
        bare = _TAG_PREFIX.sub("", enum)
        if bare not in self._enums:
            raise LayoutMissing(f"{self._where} have no enum {bare!r}{self._why(f'enum {bare}')}")
        return dict(self._enums[bare])

    def member_bit_offset(self, struct: str, path: str) -> int:
        return self._member(struct, path).bit_offset

    def member_bit_size(self, struct: str, path: str) -> int:
        """Width of a bitfield member; 0 for an ordinary member."""
        return self._member(struct, path).bit_size

    def member_size(self, struct: str, path: str) -> int:
        return self._sizeof(self._member(struct, path).type)

    def member_type(self, struct: str, path: str) -> str:
        """The C spelling of the member's type (``struct list_head``, ``struct page *``)."""
        return self._spell(self._member(struct, path).type)

    def members(self, struct: str) -> list[str]:
        """Names of the members of ``struct``, those of anonymous structs and unions included."""
        out: list[str] = []

        def walk(idx: int) -> None:
            for name, _bit, mtype, _bits in self._types[idx].get("m", ()):
                if name:
                    out.append(name)
                elif self._types[self._resolve(mtype)]["k"] in ("struct", "union"):
                    walk(self._resolve(mtype))

        walk(self._struct(struct))
        return out

    def structs(self) -> list[str]:
        """Names of every complete struct, union and typedef recorded."""
        return sorted(self._names)

    @property
    def dropped(self) -> dict[str, str]:
        """Probe facts gcc rejected for this kernel, with its first error for each."""
        return dict(self._dropped)

    # -- internals -------------------------------------------------------------------------------

    @property
    def _where(self) -> str:
        return f"kernel headers of {self.release}"

    def _why(self, fact: str) -> str:
        reason = self._dropped.get(fact)
        return f" (gcc: {reason})" if reason else ""

    def _struct(self, name: str) -> int:
        bare = _TAG_PREFIX.sub("", name.strip())
        for key in (f"struct {bare}", f"union {bare}", bare):
            if key in self._names:
                return self._resolve(self._names[key])
        if f"struct {bare}" in self._declared or f"union {bare}" in self._declared:
            raise LayoutMissing(
                f"{self._where} declare {bare!r} but do not define it: its definition is in a .c "
                "file or a private header (mm/, kernel/) that header packages do not ship"
            )
        raise LayoutMissing(
            f"{self._where} have no struct, union or typedef {bare!r}{self._why(f'struct {bare}')}"
            f"{self._why(f'typedef {bare}')}"
        )

    def _resolve(self, idx: int) -> int:
        for _ in range(64):
            t = self._types[idx]
            if t["k"] != "typedef":
                return idx
            idx = t["t"]
        raise LayoutMissing(f"{self._where}: typedef cycle at {self._types[idx].get('name')!r}")

    def _sizeof(self, idx: int) -> int:
        t = self._types[self._resolve(idx)]
        k = t["k"]
        if k == "array":
            return int(t["n"]) * self._sizeof(t["t"])
        if k == "ptr":
            return 8
        if "decl" in t or "size" not in t:
            raise LayoutMissing(f"{self._where}: {self._spell(idx)} has no size here (declared, not defined)")
        return int(t["size"])

    def _find(self, idx: int, name: str) -> _Member | None:
        """Member ``name`` of an aggregate, looking through anonymous structs and unions."""
        for mname, bit, mtype, bits in self._types[idx].get("m", ()):
            if mname == name:
                return _Member(mtype, bit, bits)
            if not mname and self._types[self._resolve(mtype)]["k"] in ("struct", "union"):
                inner = self._find(self._resolve(mtype), name)
                if inner is not None:
                    return _Member(inner.type, bit + inner.bit_offset, inner.bit_size)
        return None

    def _member(self, struct: str, path: str) -> _Member:
        """The member at ``path`` (``"lru.next"``, ``"free_area[2].nr_free"``) of ``struct``."""
        idx = self._struct(struct)
        t = self._types[idx]
        if "decl" in t:
            raise LayoutMissing(f"{self._where} only declare {struct!r}")
        found = _Member(idx, 0, 0)
        for part in path.split("."):
            m = _PATH_PART.match(part)
            if m is None:
                raise ValueError(f"bad member path {path!r}")
            cur = self._resolve(found.type)
            inner = self._find(cur, m[1]) if self._types[cur]["k"] in ("struct", "union") else None
            if inner is None:
                raise LayoutMissing(f"{self._where}: {struct} has no member {path!r}")
            bit, mtype = found.bit_offset + inner.bit_offset, inner.type
            for index in re.findall(r"\[(\d+)\]", m[2]):
                arr = self._types[self._resolve(mtype)]
                if arr["k"] != "array":
                    raise LayoutMissing(f"{self._where}: {struct}.{path} is not an array at [{index}]")
                if int(index) >= arr["n"]:
                    raise LayoutMissing(f"{self._where}: {struct}.{path}: index {index} beyond {arr['n']} elements")
                bit += 8 * int(index) * self._sizeof(arr["t"])
                mtype = arr["t"]
            found = _Member(mtype, bit, inner.bit_size)
        return found

    def _spell(self, idx: int) -> str:
        t = self._types[idx]
        k = t["k"]
        if k in ("struct", "union", "enum"):
            return f"{k} {t['name'] or '(anon)'}"
        if k == "array":
            return f"{self._spell(t['t'])}[{t['n']}]"
        return t.get("name", k)


def _build(tree: HeaderTree, key: str, timings: dict[str, float]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="memvirt-probe-") as tmp:
        t0 = time.perf_counter()
        result = compile_probe(tree, Path(tmp))
        t1 = time.perf_counter()
        data = parse_probe_object(result.obj)
        t2 = time.perf_counter()
    if "struct page" not in data["names"]:
        reason = result.dropped.get("struct page") or result.dropped.get("header <linux/mm_types.h>") or "not emitted"
        raise ProbeCompileError(f"the layout probe found no struct page in {tree.describe}: {reason}")
    data["dropped"] = result.dropped
    data["meta"] = {
        "key": key,
        "format": FORMAT,
        "release": tree.release,
        "objtree": str(tree.objtree),
        "srctree": str(tree.srctree),
        "compiler": result.compiler,
        "rounds": result.rounds,
        "timings": {**timings, "compile": t1 - t0, "parse": t2 - t1},
    }
    return data


def _load(path: Path, key: str) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("meta", {}).get("key") != key:
        return None
    return data


def _store(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, separators=(",", ":")))
    os.replace(tmp, path)
