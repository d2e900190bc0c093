"""A guest kernel's view of its own memory, bootstrapped from raw physical memory alone.

No debug symbols, no agent, no per-version tables: VMCOREINFO gives the symbols needed to walk
page tables and decode kallsyms, kallsyms gives the rest (``page_offset_base``, ``__start_BTF``),
and BTF gives every type layout. Each step checks what the previous one found against a second
source, so garbage input ends in a :class:`BadImage` naming the inconsistency, not a wrong answer.

x86-64 and arm64 guests differ in how the kernel image, the linear map and the page tables are
found (each explained where it is done); which one a guest is comes from its VMCOREINFO keys
(:attr:`Vmcoreinfo.arch`), and the rest is common. A kallsyms without data symbols (Debian's
arm64 kernels) is completed from the export table (:mod:`memvirt.introspect.ksymtab`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np

from memvirt.errors import BadImage, GuestStructureError
from memvirt.introspect import ksymtab
from memvirt.introspect.btf import Btf, BtfLayout, read_btf
from memvirt.introspect.kallsyms import KALLSYMS_TABLES, Kallsyms, Symbols, read_kallsyms
from memvirt.introspect.layout import Layout, LayoutMissing, TrackedLayout, VmcoreinfoLayout
from memvirt.introspect.pgtable import (
    KERNEL_IMAGE_SIZE,
    Arm64PageTable,
    PageTable,
    START_KERNEL_map,
    UnmappedAddress,
    Walker,
    kimg_to_phys,
    phys_addr_symbol,
)
from memvirt.introspect.vmcoreinfo import Vmcoreinfo, iter_vmcoreinfo, no_note
from memvirt.memory.source import GuestMemory

T = TypeVar("T")
LayoutSource = Literal["auto", "vmcoreinfo", "btf"]
# Direct map and vmemmap bases are randomized in PUD_SIZE steps (arch/x86/mm/kaslr.c) and are
# 1 GiB aligned without KASLR too.
_PUD_SIZE = 1 << 30
MAX_NOTES = 64
"""VMCOREINFO candidates checked: a few earlier boots may leave theirs in RAM, a guest filling
its RAM with fake notes must not cost a page-table check per page."""


@dataclass
class KernelView:
    """What the guest kernel knows about its own address space; see :meth:`open`."""

    mem: GuestMemory
    vmcoreinfo: Vmcoreinfo
    page_table: Walker
    symbols: Symbols | None
    page_offset_base: int
    vmemmap_base: int
    btf: Btf | None
    timings: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    _btf_candidates: list[int] = field(default_factory=list, repr=False)

    @classmethod
    def open(
        cls,
        mem: GuestMemory,
        hint_gpa: int | None = None,
        load_btf: bool = True,
        cached_symbols: Callable[[Vmcoreinfo, Callable[[int, int], np.ndarray]], Any] | None = None,
    ) -> KernelView:
        """Bootstrap from ``mem``; ``hint_gpa`` is a cached VMCOREINFO location to try first.

        ``cached_symbols(vmcoreinfo, read_va)`` may return the symbols a previous bootstrap of the same
        kernel build used (relocated for this boot); then kallsyms and BTF are not decoded.
        ``timings`` records seconds per step; ``notes`` says where each fact came from.
        """
        timings: dict[str, float] = {}
        notes: dict[str, str] = {}
        start = time.perf_counter()

        def step(name: str, fn: Callable[[], T]) -> T:
            t = time.perf_counter()
            try:
                return fn()
            finally:
                timings[name] = time.perf_counter() - t

        info, pt = _first_consistent_note(mem, hint_gpa, timings)
        notes["vmcoreinfo"] = f"note at GPA {info.gpa:#x}" if info.gpa is not None else "carried by the dump"
        symbols = cached_symbols(info, pt.read_va) if cached_symbols is not None else None
        if symbols is not None:
            notes["kallsyms"] = f"{len(symbols)} symbols from the build-id cache"
            load_btf = False
        btf_at: list[int] = []
        if symbols is None:
            decoded = step("kallsyms", lambda: _kallsyms(pt, info, notes))
            symbols = decoded
            if decoded is not None and "__per_cpu_offset" not in decoded:
                symbols, btf_at = step("ksymtab", lambda: _text_only_kallsyms(pt, info, decoded, notes))
        view = cls(mem, info, pt, symbols, 0, 0, None, timings, notes)
        view._btf_candidates = btf_at
        view.page_offset_base = step("direct_map", view._find_page_offset_base)
        view.vmemmap_base = step("vmemmap", view._find_vmemmap_base)
        if load_btf:
            view.btf = step("btf", view._load_btf)
        timings["total"] = time.perf_counter() - start
        return view

    # -- identity ----------------------------------------------------------------------------

    @property
    def release(self) -> str:
        return self.vmcoreinfo.osrelease

    @property
    def build_id(self) -> str | None:
        return self.vmcoreinfo.build_id

    @property
    def kaslr_offset(self) -> int:
        return self.vmcoreinfo.kerneloffset

    @property
    def phys_base(self) -> int:
        return self.vmcoreinfo.phys_base

    @property
    def pgtable_levels(self) -> int:
        return self.page_table.levels

    @property
    def vmcoreinfo_gpa(self) -> int | None:
        """Where the note was found: cache it (with the build id) to skip the search next time."""
        return self.vmcoreinfo.gpa

    # -- memory ------------------------------------------------------------------------------

    def translate(self, va: int) -> int:
        """Physical address of kernel virtual address ``va`` (page-table walk)."""
        return self.page_table.translate(va)

    def read_va(self, va: int, size: int) -> np.ndarray:
        return self.page_table.read_va(va, size)

    def read_u64_va(self, va: int) -> int:
        return int(self.read_va(va, 8).view("<u8")[0])

    def read_u32_va(self, va: int) -> int:
        return int(self.read_va(va, 4).view("<u4")[0])

    def read_cstr_va(self, va: int, max_len: int = 4096) -> bytes:
        """A NUL-terminated string at ``va`` (without the NUL), at most ``max_len`` bytes; reads
        page by page so that a short string near an unmapped page still reads."""
        out = b""
        while len(out) < max_len:
            n = min(max_len - len(out), 4096 - ((va + len(out)) & 0xFFF))
            chunk = self.read_va(va + len(out), n).tobytes()
            end = chunk.find(b"\0")
            if end >= 0:
                return out + chunk[:end]
            out += chunk
        return out

    def direct_map_pa(self, va: int) -> int:
        """``__pa()`` of a direct-map address: ``va - page_offset_base``, no walk."""
        pa = va - self.page_offset_base
        if not 0 <= pa < self._max_phys:
            raise UnmappedAddress(f"{va:#x} is not a direct-map address (page_offset_base {self.page_offset_base:#x})")
        return pa

    def phys_to_virt(self, pa: int) -> int:
        """``__va()``: the direct-map address of physical address ``pa``."""
        return pa + self.page_offset_base

    def flush(self) -> None:
        """Forget cached page tables: call after a running guest may have changed its mappings."""
        self.page_table.flush()

    @property
    def _max_phys(self) -> int:
        key = "NUMBER(MAX_PHYSMEM_BITS)"
        bits = self.vmcoreinfo.number("MAX_PHYSMEM_BITS") if key in self.vmcoreinfo else 52
        if not 32 <= bits <= 64:
            raise GuestStructureError(f"MAX_PHYSMEM_BITS is {bits}")
        return 1 << bits

    # -- symbols and types -------------------------------------------------------------------

    def symbol(self, name: str) -> int:
        """Address of kernel symbol ``name``: kallsyms first, then VMCOREINFO's ``SYMBOL()``."""
        if self.symbols is not None:
            addr = self.symbols.get(name)
            if addr is not None:
                return addr
        if self.vmcoreinfo.has_symbol(name):
            return self.vmcoreinfo.symbol(name)
        raise BadImage(f"no kernel symbol {name!r} in kallsyms or VMCOREINFO of {self.release}")

    def layout(self, source: LayoutSource = "auto") -> Layout:
        """Layout facts from VMCOREINFO, BTF, or ``auto``: VMCOREINFO first (the kernel's export
        contract, used by makedumpfile and crash), BTF for everything else."""
        vmci = VmcoreinfoLayout(self.vmcoreinfo)
        if source == "vmcoreinfo":
            return vmci
        if source == "btf":
            if self.btf is None:
                raise LayoutMissing(f"no BTF for {self.release}: {self.notes.get('btf', 'not loaded')}")
            return BtfLayout(self.btf)
        if source == "auto":
            return TrackedLayout(vmci, BtfLayout(self.btf)) if self.btf is not None else vmci
        raise ValueError(f"unknown layout source {source!r}: use auto, vmcoreinfo or btf")

    # -- bootstrap steps ---------------------------------------------------------------------

    def _find_page_offset_base(self) -> int:
        """Direct-map base: the ``page_offset_base`` variable (CONFIG_RANDOMIZE_MEMORY) when
        kallsyms has it, checked against ``va - pa`` of a direct-mapped object; else the latter."""
        derived = self._derive_page_offset_base()
        if self.vmcoreinfo.arch == "arm64":
            # arm64 has no page_offset_base variable: __phys_to_virt(pa) is
            # (pa - PHYS_OFFSET) | PAGE_OFFSET, PAGE_OFFSET = -(1 << VA_BITS) (memory.h, since
            # v5.4's 14c127c957c1 "arm64: mm: Flip kernel VA space"), i.e. pa + this base.
            formula = arm64_linear_base(self.vmcoreinfo)
            if derived is not None and derived != formula:
                raise BadImage(
                    f"PHYS_OFFSET and VA_BITS put the linear map at {formula:#x}, the page tables at "
                    f"{derived:#x}: inconsistent image"
                )
            if derived is None:
                self.notes["page_offset_base"] = "VMCOREINFO PHYS_OFFSET, VA_BITS"
            return formula
        if self.symbols is not None and "page_offset_base" in self.symbols:
            value = self.read_u64_va(self.symbols["page_offset_base"])
            if derived is not None and derived != value:
                raise BadImage(
                    f"page_offset_base is {value:#x} but the direct map puts it at {derived:#x}: inconsistent image"
                )
            self.notes["page_offset_base"] = "kallsyms page_offset_base"
            return value
        if derived is None:
            raise BadImage("cannot find the direct-map base: no page_offset_base, mem_section or node_data")
        return derived

    def _derive_page_offset_base(self) -> int | None:
        """``va - walk(va)`` for a memblock-allocated object: ``mem_section`` (SPARSEMEM_EXTREME)
        or the first node's ``pglist_data``."""
        info = self.vmcoreinfo
        candidates: list[tuple[str, int]] = []
        if info.has_symbol("mem_section") and not _in_kernel_image(info, info.symbol("mem_section")):
            candidates.append(("mem_section", info.symbol("mem_section")))
        if info.has_symbol("node_data"):
            try:
                candidates.append(("node_data[0]", self.read_u64_va(info.symbol("node_data"))))
            except BadImage:
                pass
        for what, va in candidates:
            try:
                base = va - self.translate(va)
            except BadImage:
                continue
            # x86 randomizes the direct map in PUD steps; arm64 puts pa at pa - PHYS_OFFSET from
            # PAGE_OFFSET, and PHYS_OFFSET is only ARM64_MEMSTART_ALIGN-aligned (32 MiB with
            # 16 KiB pages), so there the caller compares with the exact formula instead.
            if info.arch == "arm64" or base % _PUD_SIZE == 0:
                self.notes["page_offset_base"] = f"derived from {what}"
                return base % (1 << 64)
        return None

    def _find_vmemmap_base(self) -> int:
        """``struct page`` array base, cross-checked between the sources that have it.

        ``SYMBOL(vmemmap)`` (generic ``kernel/vmcore_info.c`` with SPARSEMEM_VMEMMAP: absent on
        Debian 6.1, present on 6.12), the ``vmemmap_base`` variable (CONFIG_RANDOMIZE_MEMORY),
        or section 0's ``section_mem_map``.
        """
        derived = self._derive_vmemmap_base()
        for what, get in (
            (
                "VMCOREINFO SYMBOL(vmemmap)",
                lambda: self.vmcoreinfo.symbol("vmemmap") if self.vmcoreinfo.has_symbol("vmemmap") else None,
            ),
            ("kallsyms vmemmap_base", self._vmemmap_base_variable),
        ):
            value = get()
            if value is None:
                continue
            if derived is not None and derived != value:
                raise BadImage(f"{what} is {value:#x} but mem_section says {derived:#x}: inconsistent image")
            self.notes["vmemmap_base"] = what
            return value
        if derived is None:
            raise BadImage("cannot find the struct page array (vmemmap): no vmemmap symbol and no usable mem_section")
        self.notes["vmemmap_base"] = "section_mem_map of the first RAM section"
        return derived

    def _vmemmap_base_variable(self) -> int | None:
        if self.symbols is None or "vmemmap_base" not in self.symbols:
            return None
        return self.read_u64_va(self.symbols["vmemmap_base"])

    def _derive_vmemmap_base(self) -> int | None:
        """The section of the first RAM frame encodes ``mem_map - section_nr_to_pfn(nr)``, which
        with SPARSEMEM_VMEMMAP is the base itself.

        That is section 0 on x86 (RAM from 0); arm64's ``virt`` RAM starts at 1 GiB, section 8
        with 128 MiB sections (``NUMBER(SECTION_SIZE_BITS)``). With SPARSEMEM_EXTREME
        ``mem_section`` is an array of root pointers to ``PAGE_SIZE / sizeof(struct
        mem_section)`` sections each (``SECTIONS_PER_ROOT``); otherwise the sections themselves,
        in the kernel image.
        """
        info = self.vmcoreinfo
        try:
            # In the guest's own page units: 16 KiB frames on an arm64-16k kernel.
            first_pfn = min((r.gpa for r in self.mem.regions), default=0) // info.page_size
            page_shift = info.page_size.bit_length() - 1
            nr = first_pfn >> (info.number("SECTION_SIZE_BITS") - page_shift) if first_pfn else 0
            size = info.size("mem_section") if nr else 0
            ms = info.symbol("mem_section")
            if _in_kernel_image(info, ms):
                entry = ms + nr * size
            else:
                per_root = info.page_size // size if nr else 1
                entry = self.read_u64_va(ms + 8 * (nr // per_root)) + (nr % per_root) * size
            coded = self.read_u64_va(entry + info.offset("mem_section.section_mem_map"))
        except (BadImage, ZeroDivisionError):
            return None
        # SECTION_MARKED_PRESENT | SECTION_HAS_MEM_MAP must be set; the low bits are flags.
        if coded & 0b11 != 0b11:
            return None
        base = coded & ~0xFFF
        if info.arch == "arm64":
            return base if _arm64_in_vmemmap(info, base + first_pfn * self._struct_page_size()) else None
        return base if base % _PUD_SIZE == 0 else None

    def _struct_page_size(self) -> int:
        return self.vmcoreinfo.size("page") if "SIZE(page)" in self.vmcoreinfo else 64

    def _load_btf(self) -> Btf | None:
        if self.symbols is not None and "__start_BTF" not in self.symbols and self._btf_candidates:
            return self._search_btf()
        if self.symbols is None or "__start_BTF" not in self.symbols:
            self.notes["btf"] = "kallsyms has no __start_BTF (kernel built without CONFIG_DEBUG_INFO_BTF?)"
            return None
        start = self.symbols["__start_BTF"]
        stop = self.symbols.get("__stop_BTF")
        btf = read_btf(self.read_va, start, stop, f"{self.release} at __start_BTF {start:#x}")
        self.notes["btf"] = f"__start_BTF {start:#x} (PA {self.translate(start):#x}), {btf.size} bytes"
        return btf

    def _search_btf(self) -> Btf | None:
        """The first BTF header in the image's read-only data that parses (see ksymtab.py)."""
        first: BadImage | None = None
        for start in self._btf_candidates:
            try:
                btf = read_btf(self.read_va, start, None, f"{self.release} at {start:#x}")
            except BadImage as e:
                first = first or e
                continue
            self.notes["btf"] = f"header at {start:#x} in read-only data (no __start_BTF in kallsyms), {btf.size} bytes"
            return btf
        self.notes["btf"] = f"no BTF header in the image's read-only data parses: {first}"
        return None


def _text_only_kallsyms(
    pt: Walker, info: Vmcoreinfo, syms: Symbols, notes: dict[str, str]
) -> tuple[Symbols, list[int]]:
    """kallsyms without data symbols (no CONFIG_KALLSYMS_ALL: Debian's arm64 kernels): the census's
    data symbols from the export table, and where BTF may start, both searched in the image's
    read-only data (:mod:`memvirt.introspect.ksymtab`)."""
    span = ksymtab.rodata_range(syms.get)
    if span is None:
        notes["ksymtab"] = "kallsyms has no data symbols and no _etext/__init_begin to search between"
        return syms, []
    data = pt.read_va(span[0], span[1] - span[0])
    want = [n for n in ksymtab.DATA_SYMBOLS if n not in syms and not info.has_symbol(n)]
    extra = ksymtab.exported(data, span[0], want)
    ksymtab.check_found(extra, lambda va: _in_kernel_image(info, va))
    notes["ksymtab"] = (
        f"kallsyms has no data symbols (no CONFIG_KALLSYMS_ALL): {', '.join(sorted(extra)) or 'none'} from "
        f"__ksymtab in {(span[1] - span[0]) >> 20} MiB of read-only data"
    )
    return ksymtab.MergedSymbols(syms, extra), ksymtab.find_btf(data, span[0])


def _in_kernel_image(info: Vmcoreinfo, va: int) -> bool:
    """Whether ``va`` is a kernel-image address (a static variable), not a linear-map one."""
    if info.arch == "arm64":
        return not arm64_is_linear(info, va)
    return START_KERNEL_map <= va < START_KERNEL_map + KERNEL_IMAGE_SIZE


def arm64_linear_base(info: Vmcoreinfo) -> int:
    """arm64: the linear map's ``va - pa``, ``PAGE_OFFSET - PHYS_OFFSET`` (see the caller)."""
    return (-(1 << info.va_bits) - info.number("PHYS_OFFSET")) % (1 << 64)


def arm64_is_linear(info: Vmcoreinfo, va: int) -> bool:
    """arm64 ``__is_lm_address()``: the linear map is ``[PAGE_OFFSET, PAGE_END)``,
    ``PAGE_END = -(1 << (VA_BITS_MIN - 1))`` with VA_BITS_MIN = min(VA_BITS, 48) (memory.h)."""
    page_offset = (-(1 << info.va_bits)) % (1 << 64)
    page_end = (-(1 << (min(info.va_bits, 48) - 1))) % (1 << 64)
    return page_offset <= va < page_end


def _arm64_in_vmemmap(info: Vmcoreinfo, va: int) -> bool:
    """arm64: ``va`` lies in ``[VMEMMAP_START, VMEMMAP_END)`` where VMCOREINFO has them (the
    ``NUMBER()`` lines since v5.x's crash_core.c); without them any page-aligned value passes."""
    if "NUMBER(VMEMMAP_START)" not in info or "NUMBER(VMEMMAP_END)" not in info:
        return True
    start, end = info.number("VMEMMAP_START") % (1 << 64), info.number("VMEMMAP_END") % (1 << 64)
    return start <= va < end


def _first_consistent_note(
    mem: GuestMemory, hint_gpa: int | None, timings: dict[str, float]
) -> tuple[Vmcoreinfo, Walker]:
    """The first VMCOREINFO whose page tables map its own kernel image, with those tables.

    A stale note (a cached GPA now holding an earlier boot's note, or one left in RAM by an
    earlier boot) names that boot's KASLR layout and fails the check; the search goes on.
    Times the search (``vmcoreinfo``) and the checks (``pgtable``) apart.
    """
    first_error: BadImage | None = None
    checking = 0.0
    t0 = time.perf_counter()
    try:
        for tried, (_gpa, info) in enumerate(iter_vmcoreinfo(mem, hint_gpa)):
            if tried == MAX_NOTES:
                raise GuestStructureError(
                    f"{MAX_NOTES} VMCOREINFO notes in {mem.describe()} and none maps its own "
                    f"kernel; the first said: {first_error}"
                )
            t = time.perf_counter()
            try:
                return info, _page_table(mem, info)
            except BadImage as e:
                first_error = first_error or e
            finally:
                checking += time.perf_counter() - t
        raise first_error or no_note(mem)
    finally:
        timings["vmcoreinfo"] = time.perf_counter() - t0 - checking
        timings["pgtable"] = checking


def _page_table(mem: GuestMemory, info: Vmcoreinfo) -> Walker:
    """The kernel's page tables, checked: the top table must map _stext and itself where the
    image's own linear mapping says."""
    if info.arch == "arm64":
        return _arm64_page_table(mem, info)
    return _x86_page_table(mem, info)


def _arm64_page_table(mem: GuestMemory, info: Vmcoreinfo) -> Arm64PageTable:
    """``swapper_pg_dir``, found through the image mapping (``__kimg_to_phys``: ``va -
    kimage_voffset``, both in VMCOREINFO), must map _stext and itself there.

    The walk's address size is what the CPU uses, ``64 - NUMBER(TCR_EL1_T1SZ)`` (v5.12 on), not
    the configured ``VA_BITS``: a 52-bit kernel (Debian's from 6.12, CONFIG_ARM64_LPA2) runs
    with 52 bits, 5 levels of 4 KiB and the LPA2 descriptor format where the CPU has FEAT_LPA2
    (QEMU's ``-cpu max``), and folds its top level to run with 48 where it has not. Whatever is
    wrong here (a 64 KiB kernel's offset TTBR1 on 48-bit hardware) fails the check below.
    """
    va_bits = info.va_bits
    t1sz = "NUMBER(TCR_EL1_T1SZ)"
    walk_bits = 64 - info.number("TCR_EL1_T1SZ") if t1sz in info else va_bits
    pa_bits = info.number("MAX_PHYSMEM_BITS") if "NUMBER(MAX_PHYSMEM_BITS)" in info else 48
    lpa2 = info.page_size != 65536 and walk_bits > 48
    voffset = info.kimage_voffset
    pgd = kimg_to_phys(info.symbol("swapper_pg_dir"), voffset)
    try:
        mem.region_of(pgd)
    except BadImage:
        raise BadImage(
            f"swapper_pg_dir does not translate: its physical address {pgd:#x} is not RAM in {mem.describe()}"
        ) from None
    pt = Arm64PageTable(mem, pgd, walk_bits, info.page_size, pa_bits, lpa2)
    for name in ("_stext", "swapper_pg_dir"):
        if not info.has_symbol(name):
            continue
        va = info.symbol(name)
        want = kimg_to_phys(va, voffset)
        try:
            got = pt.translate(va)
        except BadImage as e:
            raise BadImage(f"swapper_pg_dir does not translate {name}: {e}") from e
        if got != want:
            raise BadImage(f"swapper_pg_dir maps {name} to {got:#x}, kimage_voffset says {want:#x}: inconsistent image")
    return pt


def _x86_page_table(mem: GuestMemory, info: Vmcoreinfo) -> PageTable:
    """init_top_pgt must map _stext and itself where the image's linear mapping (phys_base) says."""
    if info.page_size != 4096:
        raise BadImage(f"VMCOREINFO PAGESIZE is {info.page_size}: not an x86-64 kernel")
    top = info.symbol("init_top_pgt")
    phys_base = info.phys_base
    pgd = phys_addr_symbol(top, phys_base)
    try:
        mem.region_of(pgd)
    except BadImage:
        raise BadImage(
            f"init_top_pgt does not translate: its physical address {pgd:#x} is not RAM in {mem.describe()}"
        ) from None
    pt = PageTable(mem, pgd, 5 if info.pgtable_l5_enabled else 4, _sme_mask(info))
    for name in ("_stext", "init_top_pgt"):
        if not info.has_symbol(name):
            continue
        va = info.symbol(name)
        want = phys_addr_symbol(va, phys_base)
        try:
            got = pt.translate(va)
        except BadImage as e:
            raise BadImage(f"init_top_pgt does not translate {name}: {e}") from e
        if got != want:
            raise BadImage(f"init_top_pgt maps {name} to {got:#x}, phys_base says {want:#x}: inconsistent image")
    return pt


def _sme_mask(info: Vmcoreinfo) -> int:
    """AMD SME's encryption bit is set in page-table entries, not part of the address."""
    return info.number("sme_mask") if "NUMBER(sme_mask)" in info else 0


def _kallsyms(pt: Walker, info: Vmcoreinfo, notes: dict[str, str]) -> Kallsyms | None:
    """kallsyms, checked against VMCOREINFO; None on kernels whose VMCOREINFO predates the
    kallsyms keys (v6.0), where ``symbol()`` falls back to VMCOREINFO alone."""
    missing = [n for n in KALLSYMS_TABLES if not info.has_symbol(n)]
    if not info.has_symbol("kallsyms_addresses") and not info.has_symbol("kallsyms_offsets"):
        missing.append("kallsyms_offsets")
    if missing:
        notes["kallsyms"] = f"VMCOREINFO lacks SYMBOL({missing[0]}): no kallsyms (kernel older than 6.0?)"
        return None
    syms = read_kallsyms(pt.read_va, info)
    # _stext is a text symbol, in kallsyms under any config; data symbols need KALLSYMS_ALL.
    if "_stext" not in syms:
        raise BadImage("kallsyms has no _stext: the tables are inconsistent")
    for name in ("_stext", "init_top_pgt", "swapper_pg_dir", "node_data"):
        if info.has_symbol(name) and name in syms and syms[name] != info.symbol(name):
            raise BadImage(
                f"kallsyms puts {name} at {syms[name]:#x}, VMCOREINFO at {info.symbol(name):#x}: inconsistent image"
            )
    notes["kallsyms"] = f"{len(syms)} symbols"
    return syms
