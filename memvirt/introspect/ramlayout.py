"""Which RAM map a RAM file or raw image has, asked of the guest kernel inside it.

A QEMU RAM backend's file holds the RAM below the PCI hole and the RAM above 4 GiB back to
back; nothing in the file says where one ends (see :mod:`memvirt.memory.rammap`). Each candidate
map (flat, the ``pc`` split, the ``q35`` split) is put to the kernel, which knows its own RAM:

1. VMCOREINFO's ``init_top_pgt`` must translate ``_stext`` and itself through the candidate (the
   page tables are read through the map, so a wrong map reads garbage once they sit above the
   split).
2. The kernel's nodes (``node_start_pfn + node_spanned_pages``, in VMCOREINFO since v2.6.24)
   must end where the map's RAM ends, less what the firmware keeps for itself (SeaBIOS reserves
   the top 128 KiB below the PCI hole, so a guest without RAM above 4 GiB ends there): the
   splits move the top of RAM by 1 or 2 GiB, so this tells the maps of one RAM file apart even
   when the kernel sits below every split.
3. When more than one map still fits (a raw image keeps file offset == guest-physical, so every
   candidate ends at the file's end), the kernel's e820 table (``e820_table``, from kallsyms)
   must put its RAM inside the map's regions and fill each of them.

The note is searched once, through the file as it is (offset == address); each candidate only
re-reads the few pages its checks need.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from memvirt.errors import BadImage, MemvirtError
from memvirt.introspect.kallsyms import read_kallsyms
from memvirt.introspect.kernel import MAX_NOTES, KernelView, _page_table
from memvirt.introspect.layout import VmcoreinfoLayout
from memvirt.introspect.mmzone import for_each_online_pgdat
from memvirt.introspect.pgtable import Walker
from memvirt.introspect.vmcoreinfo import Vmcoreinfo, read_note_at, scan_note_pages
from memvirt.memory.rammap import RamLayout
from memvirt.memory.source import PAGE_SHIFT, GuestMemory, Region

E820_TYPE_RAM = 1
E820_MAX_ENTRIES = 128 + 3 * 1024
"""``E820_MAX_ENTRIES`` is ``128 + 3 * MAX_NUMNODES`` (arch/x86/include/asm/e820/types.h):
a guest cannot make memvirt read more."""
E820_ENTRY = np.dtype([("addr", "<u8"), ("size", "<u8"), ("type", "<u4")])
"""``struct e820_entry`` is packed (20 bytes); ``struct e820_table`` is ``u32 nr_entries`` and
the entries right after it."""
E820_SLACK = 64 << 20
"""RAM of a region the kernel's map may leave out: the BIOS's low 1 MiB and its tables at the top
of low RAM (SeaBIOS reserves 128 KiB there); far below the 512 MiB by which candidate maps differ."""

Opener = Callable[[RamLayout], GuestMemory]


class NoLayoutFits(BadImage):
    """No candidate RAM map agrees with the guest kernel (or several do and nothing decides)."""


@dataclass
class Fit:
    """A candidate that passed checks 1 and 2, with what the kernel said."""

    layout: RamLayout
    mem: GuestMemory
    info: Vmcoreinfo
    pt: Walker


def note_offsets(mem: GuestMemory) -> list[int]:
    """Backing offsets of VMCOREINFO candidates, ``mem`` mapped flat (offset == address)."""
    out = []
    for gpa in scan_note_pages(mem):
        out.append(gpa)
        if len(out) == MAX_NOTES:
            break
    return out


def _to_gpa(regions: tuple[Region, ...], offset: int) -> int | None:
    for r in regions:
        if r.offset <= offset < r.offset + r.size:
            return r.gpa + offset - r.offset
    return None


def node_end_pfn(mem: GuestMemory, info: Vmcoreinfo, pt: Walker) -> int:
    """One past the last page frame any online node spans."""
    kv = KernelView(mem, info, pt, None, 0, 0, None)
    layout = VmcoreinfoLayout(info)
    start_off = layout.member_offset("pglist_data", "node_start_pfn")
    span_off = layout.member_offset("pglist_data", "node_spanned_pages")
    end = 0
    for _, pgdat in for_each_online_pgdat(kv):
        end = max(end, kv.read_u64_va(pgdat + start_off) + kv.read_u64_va(pgdat + span_off))
    return end


def check(layout: RamLayout, mem: GuestMemory, offsets: list[int]) -> Fit | str:
    """A :class:`Fit`, or why the kernel disagrees with ``layout`` (checks 1 and 2)."""
    why = "no VMCOREINFO note lies in its RAM"
    for off in offsets:
        gpa = _to_gpa(layout.regions, off)
        if gpa is None:
            continue
        info = read_note_at(mem, gpa)
        if info is None:
            continue
        try:
            pt = _page_table(mem, info)
        except BadImage as e:
            why = str(e)
            continue
        try:
            end = node_end_pfn(mem, info, pt)
        except MemvirtError as e:
            return f"its kernel's nodes do not read: {e}"
        if not mem.max_pfn - (E820_SLACK >> PAGE_SHIFT) < end <= mem.max_pfn:
            return f"the kernel's RAM ends at {end << PAGE_SHIFT:#x}, the map's at {mem.max_pfn << PAGE_SHIFT:#x}"
        return Fit(layout, mem, info, pt)
    return why


def e820_fits(fit: Fit) -> str | None:
    """None if the kernel's e820 RAM lies in ``fit``'s regions and fills them (check 3), else why."""
    try:
        syms = read_kallsyms(fit.pt.read_va, fit.info)
        sym = syms.get("e820_table")
        if sym is None:
            return "kallsyms has no e820_table"
        table = int(fit.pt.read_va(sym, 8).view("<u8")[0])
        n = int(fit.pt.read_va(table, 4).view("<u4")[0])
        if not 0 < n <= E820_MAX_ENTRIES:
            return f"the kernel's e820 table claims {n} entries"
        entries = np.frombuffer(fit.pt.read_va(table + 4, n * E820_ENTRY.itemsize).tobytes(), dtype=E820_ENTRY)
    except MemvirtError as e:
        return f"the kernel's e820 table does not read: {e}"
    ram = [(int(a), int(a) + int(s)) for a, s, t in entries.tolist() if t == E820_TYPE_RAM and s]
    regions = fit.layout.regions
    for lo, hi in ram:
        if not any(r.gpa <= lo and hi <= r.end for r in regions):
            return f"the kernel's e820 RAM {lo:#x}-{hi:#x} is not inside the map"
    for r in regions:
        covered = sum(max(0, min(hi, r.end) - max(lo, r.gpa)) for lo, hi in ram)
        if covered < r.size - E820_SLACK:
            return f"the kernel's e820 has only {covered >> 20} MiB of RAM in {r.gpa:#x}-{r.end:#x}"
    return None


def choose(
    candidates: list[RamLayout], open_with: Opener, flat: RamLayout, what: str, flags: str
) -> tuple[GuestMemory, RamLayout]:
    """Open ``what`` with the candidate the guest kernel agrees with; one line naming every
    candidate tried, why each failed, and ``flags`` (what decides instead) if none does.
    ``flat`` (offset == address) is how the file is searched for VMCOREINFO notes."""
    with open_with(flat) as probe:
        offsets = note_offsets(probe)
    if not offsets:
        if len(candidates) == 1:
            return open_with(candidates[0]), candidates[0]
        names = ", ".join(c.describe() for c in candidates)
        raise NoLayoutFits(f"{what}: no VMCOREINFO note to tell its RAM map apart ({names}); {flags}")
    fits: list[Fit] = []
    reasons: list[str] = []
    for cand in candidates:
        mem = open_with(cand)
        got = check(cand, mem, offsets)
        if isinstance(got, Fit):
            fits.append(got)
        else:
            mem.close()
            reasons.append(f"{cand.describe()}: {got}")
    if len(fits) > 1:
        verdicts = [(fit, e820_fits(fit)) for fit in fits]
        if any(why is None for _, why in verdicts):
            for fit, why in verdicts:
                if why is not None:
                    fit.mem.close()
                    reasons.append(f"{fit.layout.describe()}: {why}")
            fits = [fit for fit, why in verdicts if why is None]
    if len(fits) == 1:
        return fits[0].mem, fits[0].layout
    for fit in fits:
        fit.mem.close()
    if fits:
        names = ", ".join(f.layout.describe() for f in fits)
        raise NoLayoutFits(f"{what}: the guest kernel agrees with more than one RAM map ({names}); {flags}")
    raise NoLayoutFits(f"{what}: no RAM map fits its guest kernel (tried {'; '.join(reasons)}); {flags}")
