"""Introspection of hostile guest memory, without QEMU: a synthetic kernel whose page census
works (built on the bootstrap tests' synthetic image), then cycles, huge counts, oversize
lengths, self-referencing BTF and a forged BUILD-ID written into it. Every case must end in
success or one line of :class:`MemvirtError` (``guest kernel structures do not add up: ...``
where the guest's structures are at fault), within a memory and a time ceiling.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import resource
import signal
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli import assert_one_line_error, memvirt
from test_introspect_bootstrap import (
    BTF_VA,
    DECOY_PA,
    NOTE_PA,
    PGD_PA,
    PHYS_BASE,
    POB,
    PRESENT,
    VMEMMAP,
    BtfBuilder,
    PatchedMemory,
    Synthetic,
    build_synthetic,
    kpa,
    note,
    synthetic_btf,
    vmcoreinfo_text,
)

from memvirt.errors import GuestStructureError, MemvirtError
from memvirt.introspect import Introspector, buildcache, native
from memvirt.introspect.btf import ARRAY, PTR, STRUCT, TYPEDEF, Btf, BtfLayout
from memvirt.introspect.census import CODE, PageScanner
from memvirt.introspect.kallsyms import kallsyms_expand_symbols
from memvirt.introspect.kernel import KernelView
from memvirt.introspect.pgtable import PageTable
from memvirt.introspect.vmcoreinfo import Vmcoreinfo
from memvirt.memory.source import GuestMemory, Region

MiB = 1 << 20
PREFIX = GuestStructureError.PREFIX
NATIVE = native.load()
"""Built once here, before a test points MEMVIRT_CACHE elsewhere."""

# -- a synthetic kernel with a page census -----------------------------------------------------
# Physical placement (the direct map is PA + POB): the node's pglist_data where the bootstrap
# image's node_data[0] points, one CPU's per_cpu_pages, a zone name, and the struct pages of
# all 4096 frames (64 bytes each) behind vmemmap's first 64 PTEs.
PGDAT_PA = 0xA02000
PCP_PA = 0xA03000
NAME_PA = 0xA03800
PAGES_PA = 0xC00000
PTE_VM = PGD_PA + 0x6000
CPU_VA = 0xFFFFFFFF81000000 + 0x180400  # nr_cpu_ids, __cpu_online_mask, __per_cpu_offset[]
ZONE = {
    "free_area": 0,
    "zone_start_pfn": 176,
    "spanned_pages": 184,
    "present_pages": 192,
    "managed_pages": 200,
    "name": 208,
    "per_cpu_pageset": 216,
    "vm_stat": 224,
}
ZONE_SIZE = 256
BUDDY = 0xFFFFFF7F  # PAGE_BUDDY_MAPCOUNT_VALUE -129 as a u32
RELEASE = "synthetic-6.99"  # not a Debian release: no layout source goes looking for its headers


def census_lines(**override: str) -> list[str]:
    """VMCOREINFO lines that give every fact the census asks for (SIZE/OFFSET/LENGTH/NUMBER)."""
    facts = {
        "SYMBOL(nr_cpu_ids)": f"{CPU_VA:x}",
        "SYMBOL(__cpu_online_mask)": f"{CPU_VA + 8:x}",
        "SYMBOL(__per_cpu_offset)": f"{CPU_VA + 16:x}",
        "OFFSET(page.flags)": "0",
        "OFFSET(page.mapping)": "24",
        "OFFSET(page.private)": "40",
        "NUMBER(PG_head_mask)": "65536",
        "NUMBER(PG_reserved)": "10",
        "SIZE(pglist_data)": "512",
        "OFFSET(pglist_data.node_zones)": "0",
        "LENGTH(pglist_data.node_zones)": "2",
        "SIZE(zone)": str(ZONE_SIZE),
        "SIZE(free_area)": "16",
        "OFFSET(free_area.nr_free)": "8",
        **{f"OFFSET(zone.{k})": str(v) for k, v in ZONE.items()},
        "NUMBER(NR_FREE_PAGES)": "0",
        "SIZE(list_head)": "16",
        "NUMBER(MIGRATE_PCPTYPES)": "3",
        "OFFSET(per_cpu_pages.count)": "0",
        "OFFSET(per_cpu_pages.lists)": "8",
        "LENGTH(per_cpu_pages.lists)": "3",
    }
    facts.update(override)
    return [f"{k}={v}" for k, v in facts.items() if v is not None]


def page_pa(pfn: int) -> int:
    return PAGES_PA + 64 * pfn


def lru_va(pfn: int) -> int:
    return VMEMMAP + 64 * pfn + 8


def pcp_head_va(i: int) -> int:
    return POB + PCP_PA + 8 + 16 * i


def all_lines(s: Synthetic, lines: list[str]) -> list[str]:
    """The bootstrap image's VMCOREINFO lines (release renamed), with ``lines`` added or replacing."""
    base = vmcoreinfo_text(s.sym, PHYS_BASE, RELEASE).decode().splitlines()
    keys = {line.split("=", 1)[0] for line in lines}
    return [line for line in base if line.split("=", 1)[0] not in keys] + lines


def note_page(lines: list[str]) -> bytes:
    data = note(("\n".join(lines) + "\n").encode())
    assert len(data) <= 4096
    return data + bytes(4096 - len(data))


def put_vmcoreinfo(s: Synthetic, lines: list[str]) -> None:
    s.put(NOTE_PA, note_page(all_lines(s, lines)))


def census_synthetic(**override: str) -> Synthetic:
    """The bootstrap tests' image, plus one node, one populated zone of all 4096 frames, one
    CPU: buddy blocks at frame 0x800 (order 3) and 0x900 (order 0), frames 0xA00 and 0xA01 on
    the CPU's first per-cpu list."""
    s = build_synthetic()
    for i in range(64):
        s.pte(PTE_VM, i, (PAGES_PA + 4096 * i) | PRESENT)
    s.put(PAGES_PA, bytes(64 * 4096))
    s.put(kpa(CPU_VA), struct.pack("<IIQQ", 1, 0, 1, 0))
    s.put(NAME_PA, b"Normal\0")
    zone = PGDAT_PA
    s.put(zone, bytes(2 * ZONE_SIZE))
    for key, value in (
        ("zone_start_pfn", 0),
        ("spanned_pages", 4096),
        ("present_pages", 4096),
        ("managed_pages", 4000),
        ("name", POB + NAME_PA),
        ("per_cpu_pageset", POB + PCP_PA),
        ("vm_stat", 9),
    ):
        s.u64(zone + ZONE[key], value)
    s.u64(zone + 16 * 0 + 8, 1)
    s.u64(zone + 16 * 3 + 8, 1)
    for pfn, order in ((0x800, 3), (0x900, 0)):
        s.put(page_pa(pfn) + 48, struct.pack("<I", BUDDY))
        s.u64(page_pa(pfn) + 40, order)
    s.u64(PCP_PA, 2)
    s.u64(PCP_PA + 8, lru_va(0xA00))
    s.u64(page_pa(0xA00) + 8, lru_va(0xA01))
    s.u64(page_pa(0xA01) + 8, pcp_head_va(0))
    for i in (1, 2):
        s.u64(PCP_PA + 8 + 16 * i, pcp_head_va(i))
    put_vmcoreinfo(s, census_lines(**override))
    return s


class ImageMemory(GuestMemory):
    """Guest memory held in a bytes object: a fuzz case costs no file and no copy."""

    kind = "synthetic image"

    def __init__(self, data: bytes | bytearray):
        self.data = memoryview(bytes(data))
        self.regions = (Region(0, len(data), 0),)

    def _fill(self, offset: int, out: memoryview) -> None:
        out[:] = self.data[offset : offset + len(out)]


def census(mem: GuestMemory, use_native: bool = True, live: bool = False) -> Any:
    kv = KernelView.open(mem, hint_gpa=NOTE_PA)
    scanner = PageScanner(kv, kv.layout("vmcoreinfo"))
    if not use_native:
        scanner.native = None
    return scanner.scan(live=live)


# -- memory and time ceilings -------------------------------------------------------------------


def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmSize")


def bounded(fn: Callable[[], Any], mem: int = 512 * MiB, seconds: float = 30) -> tuple[str, Any]:
    """Run ``fn`` in a forked child whose address space may grow by at most ``mem`` and which
    is killed after ``seconds``: ``("ok", result)`` or ``(exception class, message, is a
    MemvirtError)``. An allocation sized by a guest value fails there as a MemoryError."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            limit = _vm_size() + mem
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            try:
                out: tuple[str, Any] = ("ok", fn())
            except BaseException as e:
                out = (type(e).__name__, str(e)[:2000], isinstance(e, MemvirtError))
            data = pickle.dumps(out)
        except BaseException as e:
            data = pickle.dumps((type(e).__name__, f"cannot report: {e}", False))
        with os.fdopen(w, "wb") as f:
            f.write(data)
        os._exit(0)
    os.close(w)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, _status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.02)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
        raise AssertionError(f"the case ran longer than {seconds} s")
    with os.fdopen(r, "rb") as f:
        data = f.read()
    assert data, "the child died without a report (a crash in native code?)"
    return pickle.loads(data)


def test_the_ceilings_hold() -> None:
    """The harness itself: an allocation past the ceiling fails, a hang is cut short."""
    assert bounded(lambda: np.ones(1 << 31, dtype=np.uint8).sum(), 256 * MiB, 20)[0] == "MemoryError"
    assert bounded(lambda: int(np.ones(1 << 20, dtype=np.uint8).sum()), 256 * MiB, 20) == ("ok", 1 << 20)
    with pytest.raises(AssertionError, match="longer than 1 s"):
        bounded(lambda: time.sleep(30), 256 * MiB, 1)


def assert_structure_error(outcome: tuple[str, Any], *needles: str) -> str:
    """One line, a GuestStructureError, naming what does not add up."""
    assert outcome[0] == "GuestStructureError", outcome
    message = outcome[1]
    assert message.startswith(PREFIX) and "\n" not in message, message
    for n in needles:
        assert n in message, (n, message)
    return message


# -- the census of the synthetic kernel ---------------------------------------------------------


@pytest.fixture(scope="module")
def good() -> bytes:
    return bytes(census_synthetic().mem)


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "numpy"])
def test_synthetic_census(good: bytes, use_native: bool) -> None:
    """The honest image counts exactly what it was built with (so the hostile cases below
    fail for their one change, not for a broken baseline)."""
    if use_native and NATIVE is None:
        pytest.skip("no C compiler: the native census is not built")
    c = census(ImageMemory(good), use_native)
    assert c.counts["free"] == 9 and c.counts["free_pcp"] == 2 and c.counts["kernel"] == 4096 - 11
    assert list(np.flatnonzero(c.classes == CODE["free_pcp"])) == [0xA00, 0xA01]
    assert [(z.name, z.free_pages, z.nr_free_pages, z.pcp) for z in c.zones] == [("Normal", 9, 9, {0: 2})]


def patched(base: bytes, patches: dict[int, bytes]) -> PatchedMemory:
    return PatchedMemory(ImageMemory(base), patches)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v & (2**64 - 1))


HUGE_COUNT = u64(0x7FFFFFFF)
BOTH = [0xA00, 0xA01]
PCP_CASES = {
    # (patches, what the error names, the frames a live scan still calls free_pcp): a list that
    # does not lead back to its head contributes no frame, in the C walk and in numpy alike.
    # A cycle: the second page links back to the first, and the count says 2**31 - 1 pages.
    "cycle": ({page_pa(0xA01) + 8: u64(lru_va(0xA00)), PCP_PA: HUGE_COUNT}, "per-cpu list 0 of cpu 0", []),
    # A page that links to itself.
    "self-loop": ({page_pa(0xA00) + 8: u64(lru_va(0xA00)), PCP_PA: HUGE_COUNT}, "per-cpu list 0 of cpu 0", []),
    # Two lists sharing pages: list 1 enters list 0 (and so never reaches its own head).
    "shared": ({PCP_PA + 8 + 16: u64(lru_va(0xA01))}, "per-cpu list 1 of cpu 0", BOTH),
    # A link that leaves the struct page array, and one into the middle of a struct page.
    "outside": ({page_pa(0xA00) + 8: u64(VMEMMAP + 64 * 5000 + 8)}, "per-cpu list 0", []),
    "misaligned": ({page_pa(0xA00) + 8: u64(lru_va(0xA01) + 4)}, "per-cpu list 0", []),
    # An honest list with a count of 2**31 - 1, and a negative count.
    "huge count": ({PCP_PA: HUGE_COUNT}, "pcp count 2147483647, lists hold 2", BOTH),
    "negative count": ({PCP_PA: u64(0xFFFFFFFF)}, "per-cpu list 0", []),
}


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "numpy"])
@pytest.mark.parametrize("case", list(PCP_CASES))
def test_hostile_pcp_lists(good: bytes, case: str, use_native: bool) -> None:
    if use_native and NATIVE is None:
        pytest.skip("no C compiler: the native census is not built")
    patches, needle, free_pcp = PCP_CASES[case]
    assert_structure_error(bounded(lambda: census(patched(good, patches), use_native), 256 * MiB, 20), needle)

    def live() -> tuple[list[str], list[int]]:
        c = census(patched(good, patches), use_native, live=True)
        return c.warnings, np.flatnonzero(c.classes == CODE["free_pcp"]).tolist()

    # A live scan races with the guest: the same lists give warnings, never a hang or a crash.
    outcome = bounded(live, 256 * MiB, 20)
    assert outcome[0] == "ok" and any(needle in w for w in outcome[1][0]), outcome
    assert outcome[1][1] == free_pcp, outcome


BUDDY_CASES = {
    # The census never follows the buddy free lists (so a cycle in them cannot trap it): it
    # counts buddy pages from struct page, and the counts in the zone must agree.
    "nr_free huge": ({PGDAT_PA + 8: u64(2**63)}, "zone 0:Normal: free lists say"),
    "order huge": ({page_pa(0x900) + 40: u64(2**40)}, "buddy pages with an order outside 0..10"),
    "order 63": ({page_pa(0x900) + 40: u64(63)}, "buddy pages with an order outside"),
    "cycle in free_list": ({PGDAT_PA + 0: u64(POB + PGDAT_PA), PGDAT_PA + 16 * 3: u64(POB + PGDAT_PA + 48)}, None),
}


@pytest.mark.parametrize("case", list(BUDDY_CASES))
def test_hostile_buddy(good: bytes, case: str) -> None:
    patches, needle = BUDDY_CASES[case]
    outcome = bounded(lambda: census(patched(good, patches)).counts, 256 * MiB, 20)
    if needle is None:
        assert outcome[0] == "ok" and outcome[1]["free"] == 9, outcome
    else:
        assert_structure_error(outcome, needle)


LAYOUT_CASES = {
    "LENGTH(node_data)": (
        {"LENGTH(node_data)": str(10**15), "SYMBOL(node_online_map)": f"{CPU_VA + 8:x}"},
        "LENGTH(node_data) is 1000000000000000",
    ),
    "LENGTH(zone.free_area)": ({"LENGTH(zone.free_area)": str(2**40)}, "LENGTH(zone.free_area)"),
    "LENGTH(pglist_data.node_zones)": ({"LENGTH(pglist_data.node_zones)": str(2**31)}, "node_zones"),
    "SIZE(zone)": ({"SIZE(zone)": str(2**44)}, "sizeof(struct zone)"),
    "SIZE(page) zero": ({"SIZE(page)": "0"}, "sizeof(struct page) is 0"),
    "SIZE(page) huge": ({"SIZE(page)": str(2**33)}, "sizeof(struct page)"),
    "OFFSET(page.flags) outside": ({"OFFSET(page.flags)": str(1 << 20)}, "OFFSET(page.flags)"),
    "OFFSET(page.lru) outside": ({"OFFSET(page.lru)": "60"}, "is 60, outside 0..56"),
    "OFFSET(zone.vm_stat) outside": ({"OFFSET(zone.vm_stat)": str(2**50)}, "vm_stat"),
    "LENGTH(per_cpu_pages.lists)": ({"LENGTH(per_cpu_pages.lists)": str(2**32)}, "per_cpu_pages.lists"),
    "MIGRATE_PCPTYPES zero": ({"NUMBER(MIGRATE_PCPTYPES)": "0"}, "MIGRATE_PCPTYPES is 0"),
    "pcp orders": ({"LENGTH(per_cpu_pages.lists)": "64", "NUMBER(MIGRATE_PCPTYPES)": "1"}, "order of a per-cpu list"),
    "PG_reserved bit": ({"NUMBER(PG_reserved)": "200"}, "PG_reserved is bit 200"),
}


@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_hostile_layout_numbers(case: str) -> None:
    """Sizes, lengths and offsets are guest values: each is bounded before anything is sized by it."""
    override, needle = LAYOUT_CASES[case]
    image = bytes(census_synthetic(**override).mem)
    assert_structure_error(bounded(lambda: census(ImageMemory(image)).counts, 256 * MiB, 20), needle)


def test_many_fake_notes(good: bytes) -> None:
    """A guest that fills pages with VMCOREINFO notes of no consistent kernel costs at most
    64 page-table checks, then one line."""
    decoy = good[DECOY_PA : DECOY_PA + 4096]  # another boot's KASLR
    patches = {NOTE_PA: bytes(4096)} | {0xD00000 + 4096 * i: decoy for i in range(200)}
    outcome = bounded(lambda: KernelView.open(patched(good, patches)), 256 * MiB, 20)
    assert_structure_error(outcome, "64 VMCOREINFO notes", "none maps its own kernel")


def test_hostile_physmem_bits() -> None:
    """``1 << MAX_PHYSMEM_BITS`` with a 30-digit hex exponent would never finish."""
    image = bytes(census_synthetic(**{"NUMBER(MAX_PHYSMEM_BITS)": "0x" + "f" * 30}).mem)
    outcome = bounded(lambda: KernelView.open(ImageMemory(image), hint_gpa=NOTE_PA).direct_map_pa(POB), 256 * MiB, 10)
    assert_structure_error(outcome, "MAX_PHYSMEM_BITS")


def test_hostile_cpu_and_zone_counts(good: bytes) -> None:
    """A zone spanning more frames than a pfn has bits, and 8192 online CPUs with one zone
    each is fine, but not times 256 zones."""
    zone_spanned = PGDAT_PA + ZONE["spanned_pages"]
    assert_structure_error(
        bounded(lambda: census(patched(good, {zone_spanned: u64(2**62)})), 256 * MiB, 20), "spanned pages"
    )
    many = {kpa(CPU_VA): struct.pack("<I", 8192), kpa(CPU_VA + 8): b"\xff" * 1024}
    outcome = bounded(lambda: census(patched(good, many)), 256 * MiB, 30)
    assert outcome[0] in ("GuestStructureError", "BadImage", "UnmappedAddress") and outcome[2], outcome


def test_not_a_number_is_one_line() -> None:
    """VMCOREINFO values are text the guest wrote: a non-number is a BadImage, not a ValueError."""
    image = bytes(census_synthetic(**{"SIZE(page)": "sixty-four"}).mem)
    outcome = bounded(lambda: census(ImageMemory(image)), 256 * MiB, 20)
    assert outcome[0] == "BadImage" and "SIZE(page)" in outcome[1] and "not a number" in outcome[1], outcome
    info = Vmcoreinfo.parse(b"OSRELEASE=x\nKERNELOFFSET=zz\nNUMBER(a)=" + b"9" * 3000 + b"\n")
    for call in (lambda: info.kerneloffset, lambda: info.number("a")):
        with pytest.raises(MemvirtError, match="not a number"):
            call()


def test_oversize_reads_are_refused(good: bytes) -> None:
    """A read sized by a guest value cannot exceed the guest's RAM (here 16 MiB)."""
    pt = PageTable(ImageMemory(good), PGD_PA)
    outcome = bounded(lambda: pt.read_va(POB, 1 << 40), 256 * MiB, 10)
    assert_structure_error(outcome, "does not fit in the guest's 16 MiB of RAM")


def test_cli_one_line_on_hostile_image(tmp_path: Path) -> None:
    """What a user sees: ``memvirt inspect`` of an image with a pcp cycle and a huge count."""
    s = census_synthetic()
    s.put(page_pa(0xA01) + 8, u64(lru_va(0xA00)))
    s.put(PCP_PA, HUGE_COUNT)
    path = s.write(tmp_path / "hostile.raw")
    env_cache = os.environ.get("MEMVIRT_CACHE")
    os.environ["MEMVIRT_CACHE"] = str(tmp_path / "cache")
    try:
        proc = memvirt("inspect", str(path), "--layouts", "vmcoreinfo", timeout=120)
    finally:
        if env_cache is None:
            del os.environ["MEMVIRT_CACHE"]
        else:
            os.environ["MEMVIRT_CACHE"] = env_cache
    assert_one_line_error(proc, 2, "guest kernel structures do not add up", "per-cpu list 0 of cpu 0")


# -- BTF and kallsyms ---------------------------------------------------------------------------


def self_referencing_btf(kind: str) -> Btf:
    b = BtfBuilder()
    t_int = b.add(1, "int", 4, [(1 << 24) | 32])
    if kind == "anonymous member of itself":
        # struct loop { int x; struct loop; } (id 2 names itself as an anonymous member)
        b.add(STRUCT, "loop", 8, [b.s("x"), t_int, 0, b.s(""), 2, 32], vlen=2)
    elif kind == "pointer to itself":
        b.add(STRUCT, "loop", 8, [b.s("p"), 3, 0], vlen=1)
        b.add(PTR, "", 3)
    elif kind == "array of itself":
        b.add(STRUCT, "loop", 8, [b.s("a"), 3, 0], vlen=1)
        b.add(ARRAY, "", 0, [3, t_int, 4])
    elif kind == "typedef cycle":
        b.add(STRUCT, "loop", 8, [b.s("t"), 3, 0], vlen=1)
        b.add(TYPEDEF, "t1", 4)
        b.add(TYPEDEF, "t2", 3)
    elif kind == "fan-out":
        # Five levels of 300 anonymous members each: 300**5 paths to a member that is not there.
        prev = t_int
        for level in range(5):
            b.add(STRUCT, f"l{level}" if level == 4 else "", 8, [w for _ in range(300) for w in (0, prev, 0)], vlen=300)
            prev = b.count
        b.add(STRUCT, "loop", 8, [0, prev, 0], vlen=1)
    return Btf(b.blob(), kind)


@pytest.mark.parametrize(
    "kind", ["anonymous member of itself", "pointer to itself", "array of itself", "typedef cycle", "fan-out"]
)
def test_self_referencing_btf(kind: str) -> None:
    def lookups() -> list[Any]:
        lay = BtfLayout(self_referencing_btf(kind))
        out: list[Any] = []
        for call in (
            lambda: lay.member_offset("loop", "nope"),
            lambda: lay.struct_size("loop"),
            lambda: [lay.btf.type_name(t) for t in range(len(lay.btf))],
            lambda: lay.member_type("loop", {"array of itself": "a", "typedef cycle": "t"}.get(kind, "p")),
            lambda: lay.struct_size("t1"),
            lambda: lay.member_offset("loop", "t.x"),
        ):
            try:
                out.append(call())
            except GuestStructureError as e:
                out.append(str(e))
            except MemvirtError as e:
                out.append(f"{type(e).__name__}: {e}")
        return out

    outcome = bounded(lookups, 256 * MiB, 20)
    assert outcome[0] == "ok", outcome
    assert any(isinstance(x, str) and x.startswith(PREFIX) for x in outcome[1]), outcome


def test_btf_repeated_names() -> None:
    """BTF strings are deduplicated; a million copies of a name would cost a pass over all
    types each."""
    b = BtfBuilder()
    b.add(STRUCT, "page", 8)
    b.strings += b"page\0" * 1_000_000
    outcome = bounded(lambda: BtfLayout(Btf(b.blob(), "repeats")).struct_size("page"), 256 * MiB, 10)
    assert_structure_error(outcome, "repeats the string 'page'")


def test_memsnap_garbage_is_a_guest_error() -> None:
    """The demo compares with figures the guest prints: garbage there is a GuestError."""
    from memvirt.errors import GuestError
    from memvirt.introspect.groundtruth import parse_snapshot

    for text in (
        "==> /proc/zoneinfo <==\nNode 0, zone Normal\n count: lots\n",
        "==> /proc/vmstat <==\nnr_free_pages 1 2\n",
        "==> /proc/vmstat <==\nnr_free_pages x\n",
    ):
        with pytest.raises(GuestError, match="memsnap output does not parse"):
            parse_snapshot(text)
    big = "==> /proc/vmstat <==\n" + "nr_x 1\n" * 200_000
    t = time.perf_counter()
    assert parse_snapshot(big).vmstat == {"nr_x": 1} and time.perf_counter() - t < 5


def test_kallsyms_expansion_is_bounded() -> None:
    """256 tokens of 65000 bytes each and 1000 symbols of 100 codes would expand to 6.5 GB."""
    tokens = [b"a" * 65000] * 256
    blob = np.frombuffer(b"".join(bytes([100]) + bytes(100) for _ in range(1000)), dtype=np.uint8)
    starts = np.arange(0, len(blob), 101, dtype=np.int32)
    outcome = bounded(lambda: kallsyms_expand_symbols(blob, starts, tokens), 512 * MiB, 20)
    assert outcome[0] == "BadImage" and "expand to" in outcome[1], outcome


# -- the build-id cache -------------------------------------------------------------------------


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MEMVIRT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "introspect"


def intro(image: bytes) -> Introspector:
    i = Introspector(ImageMemory(image), layouts="vmcoreinfo", hint_gpa=NOTE_PA)
    return i


def test_build_id_cache_round_trip(good: bytes, cache: Path) -> None:
    first = intro(good)
    reference = first.scan()
    again = intro(good)
    assert again.cached and again.kernel.btf is None
    assert np.array_equal(again.scan().classes, reference.classes)
    entries = list(cache.iterdir())
    assert len(entries) == 1 and entries[0].name.startswith("00112233445566778899aabbccddeeff00112233-")
    assert entries[0].stat().st_mode & 0o777 == 0o600 and cache.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize(
    "build_id",
    [
        "../../x/vm",
        "../../../escaped",
        "00112233445566778899AABBCCDDEEFF00112233",
        "0011",
        "00112233445566778899aabbccddeeff00112233/../../x",
    ],
)
def test_build_id_traversal(build_id: str, cache: Path, tmp_path: Path) -> None:
    """A BUILD-ID that is not 40 lowercase hex digits names no file: nothing is written."""
    s = census_synthetic()
    put_vmcoreinfo(s, [*census_lines(), f"BUILD-ID={build_id}"])
    i = intro(bytes(s.mem))
    assert i.kernel.build_id is None
    i.scan()
    written = [p for p in tmp_path.rglob("*") if p.is_file()] + list(tmp_path.parent.glob("escaped*"))
    assert written == [] and not cache.exists(), written


def test_content_digest_is_the_same_for_every_boot(good: bytes) -> None:
    """Another boot moves the image by its KASLR offset and relocates kallsyms_relative_base:
    same digest. Another byte in the tables: another digest."""
    kv = KernelView.open(ImageMemory(good), hint_gpa=NOTE_PA)
    info, btf = kv.vmcoreinfo, (kv.symbol("__start_BTF"), kv.symbol("__stop_BTF"))
    digest = buildcache.content_digest(info, kv.read_va, btf)
    shift = 0x1E00000
    moved = Vmcoreinfo.parse(
        "".join(
            f"{k}={int(v, 16) + shift:x}\n"
            if k.startswith("SYMBOL(kallsyms")
            else f"KERNELOFFSET={shift:x}\n"
            if k == "KERNELOFFSET"
            else f"{k}={v}\n"
            for k, v in info.entries.items()
        ).encode()
    )
    base_va = info.symbol("kallsyms_relative_base")

    def read_moved(va: int, n: int, flip: int | None = None) -> np.ndarray:
        out = kv.read_va(va - shift, n).copy()
        rel = base_va + shift - va
        if 0 <= rel <= n - 8:
            out[rel : rel + 8].view("<u8")[0] += np.uint64(shift)
        if flip is not None and 0 <= flip - va < n:
            out[flip - va] ^= 1
        return out

    assert buildcache.content_digest(moved, read_moved, (btf[0] + shift, btf[1] + shift)) == digest
    names = info.symbol("kallsyms_names") + shift + 3
    assert (
        buildcache.content_digest(moved, lambda va, n: read_moved(va, n, names), (btf[0] + shift, btf[1] + shift))
        != digest
    )
    assert (
        buildcache.content_digest(
            moved, lambda va, n: read_moved(va, n, btf[0] + shift + 40), (btf[0] + shift, btf[1] + shift)
        )
        != digest
    )


def test_build_id_cache_without_kaslr_offset(good: bytes, cache: Path) -> None:
    """A census whose VMCOREINFO has no usable KERNELOFFSET is not cached, and still answers."""
    intro(good).scan()
    s = census_synthetic()
    put_vmcoreinfo(s, [*census_lines(), "KERNELOFFSET=zz"])
    i = intro(bytes(s.mem))
    assert not i.cached and i.scan().counts["free_pcp"] == 2


def test_build_id_poisoning(good: bytes, cache: Path) -> None:
    """A guest claiming the honest kernel's build id, with its zone's vm_stat elsewhere (its own
    census is consistent): its cached facts must never reach the honest VM."""
    hostile = census_synthetic(**{"OFFSET(zone.vm_stat)": "232"})
    hostile.u64(PGDAT_PA + 232, 9)
    hostile.u64(PGDAT_PA + 224, 0xBAD)
    hostile = bytes(hostile.mem)
    assert intro(hostile).scan().zones[0].nr_free_pages == 9
    victim = intro(good)
    assert not victim.cached, "the hostile guest's entry was taken for the honest kernel's"
    assert victim.scan().zones[0].nr_free_pages == 9
    again = intro(good)
    assert again.cached and again.scan().zones[0].nr_free_pages == 9
    # The hostile guest comes back and bootstraps again: the honest entry stays untouched.
    names = {p.name: p.read_bytes() for p in cache.iterdir()}
    intro(hostile).scan()
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == names


def test_shelf_shares_a_build_within_a_process(good: bytes, cache: Path) -> None:
    """An in-process shelf (memvirtd's): the second VM of a build bootstraps from the first's
    census, without kallsyms or BTF, and counts the same; nothing goes to the folder."""
    shelf = buildcache.Shelf(folder=False)
    first = Introspector(ImageMemory(good), layouts="vmcoreinfo", hint_gpa=NOTE_PA, shelf=shelf)
    reference = first.scan()
    second = Introspector(ImageMemory(good), layouts="vmcoreinfo", hint_gpa=NOTE_PA, shelf=shelf)
    assert second.cached and second.kernel.btf is None and len(shelf) == 1
    assert np.array_equal(second.scan().classes, reference.classes)
    assert not cache.exists()


def test_shelf_poisoning(good: bytes, cache: Path) -> None:
    """The hostile guest of :func:`test_build_id_poisoning` first on a shared shelf: the honest
    VM does not take its facts, gets an entry of its own, and the hostile one's stays its own."""
    shelf = buildcache.Shelf(folder=False)
    hostile = census_synthetic(**{"OFFSET(zone.vm_stat)": "232"})
    hostile.u64(PGDAT_PA + 232, 9)
    hostile.u64(PGDAT_PA + 224, 0xBAD)
    bad = bytes(hostile.mem)

    def on_shelf(image: bytes) -> Introspector:
        return Introspector(ImageMemory(image), layouts="vmcoreinfo", hint_gpa=NOTE_PA, shelf=shelf)

    on_shelf(bad).scan()
    victim = on_shelf(good)
    assert not victim.cached and victim.scan().zones[0].nr_free_pages == 9
    assert len(shelf) == 2
    again = on_shelf(good)
    assert again.cached and again.scan().zones[0].nr_free_pages == 9
    assert on_shelf(bad).cached


def test_build_id_same_vmcoreinfo_other_btf(good: bytes, cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Same VMCOREINFO, other BTF bytes: another content digest, so the entries live side by
    side and each guest only accepts the one derived from its own bytes."""
    s = census_synthetic()
    btf = bytearray(synthetic_btf())
    btf[btf.rindex(b"double")] = ord("D")
    s.put(kpa(BTF_VA), bytes(btf))
    other = bytes(s.mem)
    intro(other).scan()
    with caplog.at_level(logging.WARNING, logger="memvirt.introspect.buildcache"):
        victim = intro(good)
    assert not victim.cached and "kallsyms or BTF bytes differ" in caplog.text
    victim.scan()
    assert len(list(cache.iterdir())) == 2
    assert intro(good).cached and intro(other).cached


def test_build_id_cache_checks_entries(good: bytes, cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A stored entry is checked against the guest's own VMCOREINFO, and read only if it is a
    private regular file; a second store never overwrites it."""
    intro(good).scan()
    (entry,) = cache.iterdir()
    original = entry.read_text()
    # A fact VMCOREINFO also states, changed in the file: ignored, with a warning.
    entry.write_text(original.replace('"SIZE(zone)": 256', '"SIZE(zone)": 512'))
    with caplog.at_level(logging.WARNING, logger="memvirt.introspect.buildcache"):
        assert not intro(good).cached
    assert "SIZE(zone) is 512 in the cache, VMCOREINFO says 256" in caplog.text
    # Write once: the census above did not replace the entry.
    assert '"SIZE(zone)": 512' in entry.read_text()
    entry.write_text(original)
    assert intro(good).cached
    entry.chmod(0o644)
    assert not intro(good).cached
    entry.chmod(0o600)
    link = cache / "elsewhere.json"
    entry.rename(link)
    entry.symlink_to(link)
    assert not intro(good).cached
    entry.unlink()
    link.rename(entry)
    # Garbage in the file: ignored, not a crash.
    for junk in ("[]", "{", '{"version": 2}', original.replace('"facts": {', '"facts": {"x": "y", ')):
        entry.write_text(junk)
        assert not intro(good).cached
    # An entry folder open to others is made private again.
    cache.chmod(0o777)
    intro(good)
    assert cache.stat().st_mode & 0o777 == 0o700


# -- fuzzing ------------------------------------------------------------------------------------


def _mutated_note(rng: random.Random, lines: list[str]) -> bytes:
    lines = list(lines)
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(lines))
        key = lines[i].split("=", 1)[0]
        value = rng.choice(
            [
                "0",
                "-1",
                "1",
                "4096",
                str(2**63),
                str(2**64 - 1),
                "0x" + "f" * 16,
                "zz",
                "",
                "9" * 40,
                str(rng.randrange(-(2**32), 2**32)),
                f"{rng.getrandbits(64):x}",
            ]
        )
        lines[i] = f"{key}={value}" if rng.random() < 0.95 else "GARBAGE LINE"
    return note_page(lines)


def _fuzz_cases(n: int, seed: int) -> list[tuple[str, dict[int, bytes] | bytes]]:
    """``(what, patches)`` over the census image, or ``("btf", blob)``."""
    rng = random.Random(seed)
    base = census_synthetic()
    lines = all_lines(base, census_lines())
    btf = synthetic_btf()
    hot = [PGDAT_PA + o for o in range(0, 2 * ZONE_SIZE, 8)] + [PCP_PA + o for o in range(0, 56, 8)]
    hot += [page_pa(p) + o for p in (0x800, 0x900, 0xA00, 0xA01) for o in (0, 8, 24, 40, 48)]
    hot += [kpa(CPU_VA) + o for o in (0, 8, 16)] + [PGD_PA + 8 * i for i in range(512)]
    hot += [PTE_VM + 8 * i for i in range(64)]
    hot += [
        kpa(base.sym[n]) + o
        for n in (
            "kallsyms_num_syms",
            "kallsyms_names",
            "kallsyms_token_index",
            "kallsyms_token_table",
            "kallsyms_offsets",
            "kallsyms_markers",
        )
        for o in (0, 8, 64, 504)
    ]
    values = [
        0,
        1,
        2**63,
        2**64 - 1,
        0x7FFFFFFF,
        VMEMMAP,
        POB + PCP_PA,
        lru_va(0xA00),
        pcp_head_va(0),
        4_000_000,
        0xFFFF_FFFF_FFFF_FF7F,
    ]
    cases: list[tuple[str, dict[int, bytes] | bytes]] = []
    for _ in range(n):
        what = rng.choice(["vmcoreinfo", "memory", "memory", "btf"])
        if what == "vmcoreinfo":
            cases.append((what, {NOTE_PA: _mutated_note(rng, lines)}))
        elif what == "memory":
            patches = {}
            for _ in range(rng.randint(1, 4)):
                at = rng.choice(hot)
                v = rng.choice(values) if rng.random() < 0.6 else rng.getrandbits(64)
                patches[at] = u64(v)
            cases.append((what, patches))
        else:
            blob = bytearray(btf)
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(24, len(blob) - 4)
                blob[i : i + 4] = struct.pack(
                    "<I",
                    rng.choice(
                        [0, 1, 2, 3, 0xFFFFFFFF, rng.getrandbits(32), (rng.randrange(20) << 24) | rng.randrange(4)]
                    ),
                )
            cases.append((what, bytes(blob)))
    return cases


def _run_case(good: bytes, what: str, case: dict[int, bytes] | bytes) -> str:
    try:
        if what == "btf":
            assert isinstance(case, bytes)
            lay = BtfLayout(Btf(case, "fuzz"))
            for struct_name, path in (("page", "lru.next"), ("page", "_mapcount"), ("zone", "free_area[2]._mapcount")):
                lay.member_offset(struct_name, path)
            lay.struct_size("zone")
            lay.enum_value("", "PG_lru")
            [lay.btf.type_name(t) for t in range(len(lay.btf))]
        else:
            assert isinstance(case, dict)
            census(patched(good, case), use_native=NATIVE is not None and len(case) % 2 == 0)
        return "ok"
    except MemvirtError as e:
        assert "\n" not in str(e), str(e)
        return "error"


def test_fuzz_hostile_images(good: bytes) -> None:
    """A fixed seed, 1000 mutations of VMCOREINFO, kernel memory (zones, per-cpu lists, struct
    pages, page tables) and BTF: each ends in success or a MemvirtError, in bounded memory
    (the whole loop runs under an address-space ceiling) and time (per case and in all)."""
    cases = _fuzz_cases(1000, seed=14)

    def run() -> dict[str, Any]:
        tally: dict[str, int] = {}
        slowest = 0.0
        for what, case in cases:
            t = time.perf_counter()
            try:
                outcome = _run_case(good, what, case)
            except Exception as e:
                return {"escaped": f"{what} {case!r:.300}: {type(e).__name__}: {e}"}
            slowest = max(slowest, time.perf_counter() - t)
            tally[f"{what} {outcome}"] = tally.get(f"{what} {outcome}", 0) + 1
        return {"tally": tally, "slowest": slowest}

    outcome = bounded(run, 512 * MiB, 120)
    assert outcome[0] == "ok", outcome
    result = outcome[1]
    assert "escaped" not in result, result["escaped"]
    assert result["slowest"] < 2.0, result
    tally = result["tally"]
    # The mutations must reach deep enough to matter: some cases pass, some fail, of each kind.
    for what in ("vmcoreinfo", "memory", "btf"):
        assert tally.get(f"{what} ok", 0) and tally.get(f"{what} error", 0), tally
