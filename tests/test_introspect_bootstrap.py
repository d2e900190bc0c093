"""Bootstrapping the guest kernel's view from raw memory: VMCOREINFO, page tables, kallsyms, BTF.

Ground truth comes from the guests themselves (``uname -r``, ``/proc/version``, ``/proc/kallsyms``
read as root, ``/sys/kernel/btf/vmlinux``): Debian's ``System.map`` is a one-line stub pointing
at the -dbg package. A synthetic image (a note, page tables with 1 GiB / 2 MiB / 4 KiB leaves,
kallsyms tables and a BTF blob built here) covers what a real guest cannot be made to show:
corruptions, a stale note, a big symbol, every BTF kind.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from memvirt.errors import BadImage
from memvirt.image.build import Image
from memvirt.introspect.btf import Btf, BtfLayout
from memvirt.introspect.kernel import KernelView
from memvirt.introspect.layout import LayoutMissing, VmcoreinfoLayout, layout_fact, layout_facts
from memvirt.introspect.pgtable import PageTable, START_KERNEL_map, UnmappedAddress
from memvirt.introspect.vmcoreinfo import Vmcoreinfo, find_vmcoreinfo
from memvirt.memory.raw import RawMemory
from memvirt.memory.source import GuestMemory, Region
from memvirt.qemu.vm import VM, start_vm, vm_memory

MiB = 1 << 20
GiB = 1 << 30

# -- a synthetic kernel image ----------------------------------------------------------------

K_VA = 0xFFFFFFFF81000000
IMG_PA = 0x200000
PHYS_BASE = IMG_PA - (K_VA - START_KERNEL_map)
POB = 0xFFFF888000000000
VMEMMAP = 0xFFFFEA0000000000
PGD_PA = 0x300000
NOTE_PA = 0x900000
DECOY_PA = 0x800000
SECTIONS_PA = 0xA00000
BANNER = b"Linux version 6.99.0-synthetic (test) #1 SMP\n"
BANNER_VA = K_VA + 2 * MiB - 20
KALLSYMS_VA = K_VA + 0x280000
BTF_VA = K_VA + 0x380000
PRESENT = 0x63
LARGE = 0xE3


def kpa(va: int) -> int:
    return va - START_KERNEL_map + PHYS_BASE


def idx(va: int, shift: int) -> int:
    return (va >> shift) & 511


class BtfBuilder:
    """Writes a BTF blob the way pahole does: header, type records, deduplicated strings."""

    def __init__(self) -> None:
        self.strings = bytearray(b"\0")
        self.offsets: dict[str, int] = {"": 0}
        self.words: list[int] = []
        self.count = 0

    def s(self, name: str) -> int:
        if name not in self.offsets:
            self.offsets[name] = len(self.strings)
            self.strings += name.encode() + b"\0"
        return self.offsets[name]

    def add(
        self, kind: int, name: str, size_type: int, tail: tuple[int, ...] | list[int] = (), vlen: int = 0, flag: int = 0
    ) -> int:
        self.words += [self.s(name), (flag << 31) | (kind << 24) | vlen, size_type, *tail]
        self.count += 1
        return self.count

    def blob(self) -> bytes:
        types = struct.pack(f"<{len(self.words)}I", *[w & 0xFFFFFFFF for w in self.words])
        header = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(self.strings))
        return header + types + bytes(self.strings)


def synthetic_btf() -> bytes:
    """One type of every kind; ``struct page`` has an anonymous union and a bitfield."""
    b = BtfBuilder()
    t_int = b.add(1, "int", 4, [(1 << 24) | 32])
    t_ulong = b.add(1, "unsigned long", 8, [64])
    t_lh_ptr = b.add(2, "", 4)  # forward reference to struct list_head (id 4)
    t_lh = b.add(4, "list_head", 16, [b.s("next"), t_lh_ptr, 0, b.s("prev"), t_lh_ptr, 64], vlen=2)
    t_anon_s = b.add(4, "", 16, [b.s("compound_head"), t_ulong, 0, b.s("pad"), t_ulong, 64], vlen=2)
    t_union = b.add(5, "", 16, [b.s("lru"), t_lh, 0, b.s(""), t_anon_s, 0], vlen=2)
    t_atomic = b.add(8, "atomic_t", t_int)
    t_page = b.add(
        4,
        "page",
        64,
        [
            b.s("flags"),
            t_ulong,
            0,
            b.s(""),
            t_union,
            64,
            b.s("bf"),
            t_int,
            (3 << 24) | 197,
            b.s("_mapcount"),
            t_atomic,
            384,
        ],
        vlen=4,
        flag=1,
    )
    t_arr = b.add(3, "", 0, [t_page, t_int, 11])
    b.add(4, "zone", 11 * 64 + 8, [b.s("free_area"), t_arr, 0, b.s("nr"), t_ulong, 11 * 64 * 8], vlen=2)
    b.add(6, "pageflags", 4, [b.s("PG_lru"), 4, b.s("PG_slab"), 9], vlen=2)
    b.add(19, "big", 8, [b.s("NEG"), (-5) & 0xFFFFFFFF, 0xFFFFFFFF, b.s("HUGE"), 0, 1 << 8], vlen=2, flag=1)
    t_const = b.add(10, "", t_atomic)
    b.add(9, "", t_const)
    b.add(11, "", t_lh_ptr)
    b.add(18, "user", t_lh_ptr)
    b.add(7, "fwd_s", 0)
    t_proto = b.add(13, "", t_int, [b.s("a"), t_int, b.s("b"), t_ulong], vlen=2)
    b.add(12, "foo", t_proto, vlen=1)
    t_var = b.add(14, "v", t_int, [1])
    b.add(15, ".data", 4, [t_var, 0, 4], vlen=1)
    b.add(16, "double", 8)
    b.add(17, "tag", t_page, [0xFFFFFFFF])
    return b.blob()


TOKENS_MULTI = ["fill_", "_per_cpu_", "kallsyms", "init_", "page_", "vmemmap", "Tsym", "__"]
SYMBOL_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_."


def kallsyms_tokens() -> list[bytes]:
    """Printable symbol characters stand for themselves; other codes are multi-character tokens."""
    multis = iter(TOKENS_MULTI)
    out = []
    for code in range(256):
        if 0x20 < code < 0x7F and chr(code) in SYMBOL_CHARS:
            out.append(chr(code).encode())
        else:
            out.append((next(multis, None) or f"~{code:02x}").encode())
    return out


def kallsyms_encode(text: str, tokens: list[bytes]) -> bytes:
    """Greedy longest-token encoding (the kernel's is different, but any encoding expands back)."""
    multi = sorted(
        ((t.decode(), c) for c, t in enumerate(tokens) if len(t) > 1 and not t.startswith(b"~")),
        key=lambda x: -len(x[0]),
    )
    single = {t.decode(): c for c, t in enumerate(tokens) if len(t) == 1}
    out = bytearray()
    i = 0
    while i < len(text):
        for tok, code in multi:
            if text.startswith(tok, i):
                out.append(code)
                i += len(tok)
                break
        else:
            out.append(single[text[i]])
            i += 1
    return bytes(out)


@dataclass
class Synthetic:
    """A 16 MiB raw image of a made-up x86-64 kernel, and what its parts should decode to."""

    mem: bytearray = field(default_factory=lambda: bytearray(16 * MiB))
    symbols: list[tuple[str, str, int]] = field(default_factory=list)
    sym: dict[str, int] = field(default_factory=dict)
    btf: bytes = b""

    def put(self, pa: int, data: bytes) -> None:
        self.mem[pa : pa + len(data)] = data

    def u64(self, pa: int, value: int) -> None:
        self.put(pa, struct.pack("<Q", value & (2**64 - 1)))

    def pte(self, table: int, index: int, value: int) -> None:
        self.u64(table + 8 * index, value)

    def write(self, path: Path) -> Path:
        path.write_bytes(bytes(self.mem))
        return path


def vmcoreinfo_text(sym: dict[str, int], phys_base: int, release: str = "6.99.0-synthetic") -> bytes:
    lines = [
        f"OSRELEASE={release}",
        "BUILD-ID=00112233445566778899aabbccddeeff00112233",
        "PAGESIZE=4096",
        f"SYMBOL(_stext)={K_VA:x}",
        f"SYMBOL(init_top_pgt)={sym['init_top_pgt']:x}",
        f"SYMBOL(mem_section)={POB + SECTIONS_PA:x}",
        "LENGTH(mem_section)=2048",
        "SIZE(mem_section)=16",
        "OFFSET(mem_section.section_mem_map)=0",
        f"SYMBOL(node_data)={sym['node_data']:x}",
        "SIZE(page)=64",
        "OFFSET(page.lru)=8",
        "OFFSET(page._mapcount)=48",
        "LENGTH(zone.free_area)=11",
        "NUMBER(PG_slab)=9",
        "NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)=-129",
        "NUMBER(MAX_PHYSMEM_BITS)=46",
        "NUMBER(VMALLOC_START)=0xffffc90000000000",
        *(
            f"SYMBOL({n})={sym[n]:x}"
            for n in (
                "kallsyms_names",
                "kallsyms_num_syms",
                "kallsyms_token_table",
                "kallsyms_token_index",
                "kallsyms_offsets",
                "kallsyms_relative_base",
            )
        ),
        f"NUMBER(phys_base)={phys_base}",
        "NUMBER(pgtable_l5_enabled)=0",
        "NUMBER(sme_mask)=0",
        "KERNELOFFSET=0",
    ]
    return ("\n".join(lines) + "\n").encode()


def note(text: bytes) -> bytes:
    return struct.pack("<III", 11, len(text), 0) + b"VMCOREINFO\0\0" + text


def build_synthetic() -> Synthetic:
    s = Synthetic()
    # Page tables: kernel image with 2 MiB leaves (one with the PAT bit 12 and NX set, which
    # are not address bits), direct map with a 1 GiB leaf, vmemmap with two scattered 4 KiB pages.
    pud_k, pmd_k, pud_dm, pud_vm, pmd_vm, pte_vm = (PGD_PA + 0x1000 * i for i in range(1, 7))
    s.pte(PGD_PA, idx(K_VA, 39), pud_k | PRESENT)
    s.pte(pud_k, idx(K_VA, 30), pmd_k | PRESENT)
    for i in range(3):
        extra = (1 << 12) | (1 << 63) if i == 1 else 0
        s.pte(pmd_k, idx(K_VA, 21) + i, (IMG_PA + i * 2 * MiB) | LARGE | extra)
    s.pte(PGD_PA, idx(POB, 39), pud_dm | PRESENT)
    s.pte(pud_dm, idx(POB, 30), 0 | LARGE)
    s.pte(PGD_PA, idx(VMEMMAP, 39), pud_vm | PRESENT)
    s.pte(pud_vm, idx(VMEMMAP, 30), pmd_vm | PRESENT)
    s.pte(pmd_vm, idx(VMEMMAP, 21), pte_vm | PRESENT)
    s.pte(pte_vm, 0, 0xB00000 | PRESENT)
    s.pte(pte_vm, 1, 0xB05000 | PRESENT)
    s.put(0xB00000 + 4090, b"ABCDEF")
    s.put(0xB05000, b"GHIJKL")
    # Sparse memory: mem_section roots, then section 0 with SECTION_MARKED_PRESENT|HAS_MEM_MAP.
    s.u64(SECTIONS_PA, POB + SECTIONS_PA + 0x1000)
    s.u64(SECTIONS_PA + 0x1000, VMEMMAP | 0b11)
    sym = {
        "_stext": K_VA,
        "init_top_pgt": K_VA + (PGD_PA - IMG_PA),
        "page_offset_base": K_VA + 0x180000,
        "vmemmap_base": K_VA + 0x180008,
        "node_data": K_VA + 0x180200,
        "linux_banner": BANNER_VA,
    }
    s.u64(kpa(sym["page_offset_base"]), POB)
    s.u64(kpa(sym["vmemmap_base"]), VMEMMAP)
    s.u64(kpa(sym["node_data"]), POB + 0xA02000)
    s.put(kpa(BANNER_VA), BANNER + b"\0")
    s.btf = synthetic_btf()
    s.put(kpa(BTF_VA), s.btf)
    symbols = [
        ("A", "fixed_percpu_data", 0),
        ("A", "__per_cpu_start", 0),
        ("A", "__per_cpu_end", 0x35000),
        ("T", "_stext", K_VA),
        ("T", "_text", K_VA),
        ("t", "helper", K_VA + 0x100),
        ("t", "helper", K_VA + 0x200),
        ("D", "init_top_pgt", sym["init_top_pgt"]),
        ("D", "page_offset_base", sym["page_offset_base"]),
        ("D", "vmemmap_base", sym["vmemmap_base"]),
        ("D", "node_data", sym["node_data"]),
        ("D", "linux_banner", BANNER_VA),
        ("R", "__start_BTF", BTF_VA),
        ("R", "__stop_BTF", BTF_VA + len(s.btf)),
        ("t", "x" * 200, BTF_VA + 0x10000),
    ]
    symbols += [("t", f"fill_{i}", BTF_VA + 0x20000 + 16 * i) for i in range(600)]
    s.symbols = symbols
    place_kallsyms(s, sym)
    s.sym = sym
    s.put(NOTE_PA, note(vmcoreinfo_text(sym, PHYS_BASE)))
    # A note from an "earlier boot": other KASLR, its init_top_pgt lands on an empty page.
    s.put(DECOY_PA, note(vmcoreinfo_text(sym, PHYS_BASE + 0x400000)))
    return s


def place_kallsyms(s: Synthetic, sym: dict[str, int]) -> None:
    """Lay the tables out as Debian's 6.1 does: offsets, base, count, names, markers,
    seqs_of_names, token table, token index (each 8-byte aligned)."""
    tokens = kallsyms_tokens()
    num = len(s.symbols)
    names = bytearray()
    markers = []
    for i, (typ, name, _addr) in enumerate(s.symbols):
        if i % 256 == 0:
            markers.append(len(names))
        code = kallsyms_encode(typ + name, tokens)
        n = len(code)
        names += bytes([n]) if n < 0x80 else bytes([(n & 0x7F) | 0x80, n >> 7])
        names += code
    relative_base = min(a for t, _n, a in s.symbols if t != "A")
    offsets = [a if t == "A" else relative_base - 1 - a for t, _n, a in s.symbols]
    token_table = bytearray()
    token_index = []
    for t in tokens:
        token_index.append(len(token_table))
        token_table += t + b"\0"
    pos = KALLSYMS_VA

    def place(name: str, data: bytes) -> None:
        nonlocal pos
        sym[name] = pos
        s.put(kpa(pos), data)
        pos = (pos + len(data) + 7) & ~7

    place("kallsyms_offsets", struct.pack(f"<{num}i", *offsets))
    place("kallsyms_relative_base", struct.pack("<Q", relative_base))
    place("kallsyms_num_syms", struct.pack("<I", num))
    place("kallsyms_names", bytes(names))
    place("kallsyms_markers", struct.pack(f"<{len(markers)}I", *markers) + bytes(3 * num))
    place("kallsyms_token_table", bytes(token_table))
    place("kallsyms_token_index", struct.pack("<256H", *token_index))


@pytest.fixture(scope="module")
def synthetic() -> Synthetic:
    return build_synthetic()


def open_synthetic(s: Synthetic, tmp_path: Path, patch: Callable[[Synthetic], None] | None = None) -> KernelView:
    if patch is not None:
        s = Synthetic(bytearray(s.mem), s.symbols, s.sym, s.btf)
        patch(s)
    return KernelView.open(RawMemory(s.write(tmp_path / "synthetic.raw")))


def test_synthetic_bootstrap(synthetic: Synthetic, tmp_path: Path) -> None:
    kv = open_synthetic(synthetic, tmp_path)
    assert kv.vmcoreinfo_gpa == NOTE_PA, "the decoy note at a lower address must be passed over"
    assert (kv.release, kv.kaslr_offset, kv.phys_base, kv.pgtable_levels) == ("6.99.0-synthetic", 0, PHYS_BASE, 4)
    assert kv.page_offset_base == POB and kv.vmemmap_base == VMEMMAP
    assert set(kv.timings) >= {"vmcoreinfo", "pgtable", "kallsyms", "direct_map", "vmemmap", "btf", "total"}
    # Translation through every leaf size, masking PAT/NX bits of a 2 MiB leaf.
    assert kv.translate(K_VA + 2 * MiB + 0x1234) == IMG_PA + 2 * MiB + 0x1234
    assert kv.translate(POB + 0x123456) == 0x123456
    assert kv.translate(VMEMMAP + 4096 + 7) == 0xB05007
    assert kv.read_va(VMEMMAP + 4090, 12).tobytes() == b"ABCDEFGHIJKL"
    assert kv.read_va(BANNER_VA, len(BANNER)).tobytes() == BANNER == kv.read_cstr_va(BANNER_VA)
    assert kv.direct_map_pa(POB + 0x5000) == 0x5000
    for bad in (POB - 4096, 0xFFFF800000000000, 0x0000800000000000):
        with pytest.raises(UnmappedAddress):
            kv.translate(bad)
    with pytest.raises(UnmappedAddress, match="not a direct-map address"):
        kv.direct_map_pa(K_VA)
    # kallsyms: every symbol, a two-byte ("big") length, duplicates, absolute per-cpu symbols.
    ks = kv.symbols
    assert ks is not None and len(ks) == len(synthetic.symbols)
    assert list(zip(ks.types, ks.names, ks.addresses.tolist(), strict=True)) == synthetic.symbols
    assert ks["x" * 200] == BTF_VA + 0x10000 and ks["helper"] == K_VA + 0x100 and ks["__per_cpu_end"] == 0x35000
    assert ks.symbolize(K_VA + 0x180) == ("helper", 0x80)
    assert kv.symbol("kallsyms_names") == synthetic.sym["kallsyms_names"], "falls back to VMCOREINFO"
    with pytest.raises(BadImage, match="no kernel symbol 'nope'"):
        kv.symbol("nope")
    assert kv.btf is not None and kv.layout("btf").member_offset("page", "lru.next") == 8


@pytest.mark.parametrize(
    ("what", "patch", "message"),
    [
        ("no PGD entry", lambda s: s.pte(PGD_PA, idx(K_VA, 39), 0), "init_top_pgt does not translate _stext"),
        ("no notes", lambda s: (s.put(NOTE_PA, bytes(4096)), s.put(DECOY_PA, bytes(4096))), "no VMCOREINFO note found"),
        ("only the stale note", lambda s: s.put(NOTE_PA, bytes(4096)), "init_top_pgt does not translate"),
        ("bad BTF magic", lambda s: s.put(kpa(BTF_VA), b"\0\0"), "BTF header invalid"),
        ("BTF size", lambda s: s.put(kpa(BTF_VA) + 16, struct.pack("<I", 1 << 20)), "BTF header invalid"),
        (
            "kallsyms count",
            lambda s: s.put(kpa(s.sym["kallsyms_num_syms"]), struct.pack("<I", 1 << 30)),
            "kallsyms_num_syms",
        ),
        ("kallsyms names", lambda s: s.put(kpa(s.sym["kallsyms_names"]), b"\x7f" * 64), "inconsistent"),
        ("page_offset_base", lambda s: s.u64(kpa(s.sym["page_offset_base"]), POB + GiB), "page_offset_base is"),
        ("vmemmap_base", lambda s: s.u64(kpa(s.sym["vmemmap_base"]), VMEMMAP + GiB), "mem_section says"),
    ],
)
def test_synthetic_inconsistencies(
    synthetic: Synthetic, tmp_path: Path, what: str, patch: Callable[[Synthetic], None], message: str
) -> None:
    with pytest.raises(BadImage, match=message) as err:
        open_synthetic(synthetic, tmp_path, patch)
    assert "\n" not in str(err.value), what


def test_btf_parser_all_kinds() -> None:
    btf = Btf(synthetic_btf(), "synthetic")
    assert len(btf) == 24 and [btf.type_name(t) for t in (3, 7, 14, 18)] == [
        "struct list_head *",
        "atomic_t",
        "volatile const atomic_t",
        "int (*)(...)",
    ]
    lay = BtfLayout(btf)
    assert lay.struct_size("page") == lay.struct_size("struct page") == 64
    assert lay.struct_size("atomic_t") == 4
    assert lay.member_offset("page", "lru") == lay.member_offset("page", "lru.next") == 8
    assert lay.member_offset("page", "lru.prev") == 16 and lay.member_offset("page", "compound_head") == 8
    assert lay.member_offset("page", "_mapcount") == 48 and lay.member_type("page", "_mapcount") == "atomic_t"
    assert lay.member_bit_offset("page", "bf") == 197
    with pytest.raises(LayoutMissing, match="bitfield"):
        lay.member_offset("page", "bf")
    assert lay.array_length("zone", "free_area") == 11 and lay.member_type("zone", "free_area") == "struct page[11]"
    assert lay.member_offset("zone", "free_area[2]._mapcount") == 2 * 64 + 48
    assert lay.member_offset("zone", "nr") == 11 * 64
    assert lay.enum_value("pageflags", "PG_slab") == 9 and lay.enum_value("", "PG_lru") == 4
    assert lay.enumerators("big") == {"NEG": -5, "HUGE": 1 << 40}
    assert lay.has_member("page", "lru.next") and not lay.has_member("page", "nope")
    for call, message in [
        (lambda: lay.struct_size("nope"), "no struct, union or typedef named 'nope'"),
        (lambda: lay.member_offset("page", "lru.nope"), "has no member 'lru.nope'"),
        (lambda: lay.enum_value("pageflags", "PG_nope"), "no enumerator 'PG_nope'"),
        (lambda: lay.enum_value("", "PG_nope"), "no enumerator named 'PG_nope'"),
        (lambda: lay.member_offset("zone", "free_area[11]"), "beyond 11 elements"),
    ]:
        with pytest.raises(LayoutMissing, match=re.escape(message)):
            call()


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda b: b"\0\0" + b[2:], "magic"),
        (lambda b: b[:8] + struct.pack("<I", len(b)) + b[12:], "types"),
        (lambda b: b[:24] + b[24:28] + struct.pack("<I", 25 << 24) + b[32:], "unknown kind|overrun"),
        (lambda b: b[:12] + struct.pack("<I", struct.unpack_from("<I", b, 12)[0] - 4) + b[16:], "overrun"),
        (lambda b: b[:-1] + b"x", "NUL-delimited"),
    ],
)
def test_btf_rejects_corruption(corrupt: Callable[[bytes], bytes], message: str) -> None:
    with pytest.raises(BadImage, match=message):
        Btf(corrupt(synthetic_btf()), "synthetic")


def test_pgtable_five_levels(tmp_path: Path) -> None:
    """5-level paging (pgtable_l5_enabled), which TCG's qemu64 CPU cannot show: a PML5 walk
    to a 4 KiB page and a 1 GiB leaf, and 57-bit canonical addresses."""
    image = bytearray(64 * 4096)
    va = 0xFF11000000000000 + 0x40201000 + 0x123
    tables = [0x1000, 0x2000, 0x3000, 0x4000, 0x5000]
    for (table, nxt), shift in zip(zip(tables, [*tables[1:], 0x7000], strict=True), (48, 39, 30, 21, 12), strict=True):
        image[table + 8 * idx(va, shift) : table + 8 * idx(va, shift) + 8] = struct.pack("<Q", nxt | PRESENT)
    huge = 0xFF11000000000000 + 5 * GiB
    image[0x3000 + 8 * idx(huge, 30) : 0x3000 + 8 * idx(huge, 30) + 8] = struct.pack("<Q", 3 * GiB | LARGE)
    image[0x7123:0x7126] = b"L5!"
    path = tmp_path / "l5.raw"
    path.write_bytes(bytes(image))
    pt = PageTable(RawMemory(path), 0x1000, levels=5)
    assert pt.translate(va) == 0x7123 and pt.read_va(va, 3).tobytes() == b"L5!"
    assert pt.walk(huge + 0x1234) == (3 * GiB + 0x1234, GiB)
    with pytest.raises(UnmappedAddress, match="canonical 57-bit"):
        pt.translate(0x0100000000000000)
    with pytest.raises(UnmappedAddress, match="PUD entry"):
        pt.translate(va + GiB)
    with pytest.raises(UnmappedAddress, match="canonical 48-bit"):
        PageTable(RawMemory(path), 0x1000, levels=4).translate(va)


def test_vmcoreinfo_parsing() -> None:
    info = Vmcoreinfo.parse(
        vmcoreinfo_text(
            {
                n: 1
                for n in (
                    "init_top_pgt",
                    "node_data",
                    "kallsyms_names",
                    "kallsyms_num_syms",
                    "kallsyms_token_table",
                    "kallsyms_token_index",
                    "kallsyms_offsets",
                    "kallsyms_relative_base",
                )
            },
            -262144000,
        )
    )
    assert info.phys_base == -262144000 and info.number("VMALLOC_START") == 0xFFFFC90000000000
    assert info.number("PAGE_BUDDY_MAPCOUNT_VALUE") == -129 and info.pgtable_l5_enabled is False
    assert info.symbol("_stext") == K_VA and info.build_id.startswith("0011") and info.crashtime is None
    with pytest.raises(
        BadImage, match=re.escape("VMCOREINFO lacks OFFSET(page.compound_dtor): kernel 6.99.0-synthetic")
    ):
        info.offset("page.compound_dtor")
    lay = VmcoreinfoLayout(info)
    assert layout_fact(lay, "SIZE(page)") == 64 and layout_fact(lay, "LENGTH(zone.free_area)") == 11
    with pytest.raises(LayoutMissing, match=re.escape("VMCOREINFO lacks SIZE(zone)")):
        layout_fact(lay, "SIZE(zone)")
    assert "SIZE(zone)" not in layout_facts(lay, required=False)
    for bad in (b"", b"PAGESIZE=4096\n", b"OSRELEASE=x\nthis is not a key\n"):
        with pytest.raises(BadImage, match="VMCOREINFO"):
            Vmcoreinfo.parse(bad)


def test_cached_note_location(synthetic: Synthetic, tmp_path: Path) -> None:
    mem = RawMemory(synthetic.write(tmp_path / "s.raw"))
    assert find_vmcoreinfo(mem, hint_gpa=NOTE_PA)[0] == NOTE_PA
    assert find_vmcoreinfo(mem, hint_gpa=NOTE_PA + 4096)[0] == DECOY_PA, "a wrong hint falls back to the search"
    assert KernelView.open(mem, hint_gpa=DECOY_PA).vmcoreinfo_gpa == NOTE_PA, "a stale hinted note is rejected"


# -- real guests -----------------------------------------------------------------------------

TRUTH_SYMBOLS = (
    "init_top_pgt",
    "node_data",
    "_stext",
    "__start_BTF",
    "__stop_BTF",
    "linux_banner",
    "page_offset_base",
    "vmemmap_base",
    "__per_cpu_end",
    "mem_section",
)


@dataclass
class Truth:
    """What the guest says about itself."""

    release: str
    version: str
    btf_md5: str
    lines: dict[int, tuple[str, str, int]]
    named: dict[str, int]


def guest_truth(vm: VM, sample_every: int) -> Truth:
    """One command: release, banner, BTF digest and a sample of /proc/kallsyms (line NR is core
    kallsyms index NR-1: /proc/kallsyms lists core symbols first, in table order)."""
    phase = random.randrange(sample_every)
    names = "|".join(TRUTH_SYMBOLS)
    script = (
        "uname -r; echo @@; cat /proc/version; echo @@; md5sum /sys/kernel/btf/vmlinux; echo @@; "
        f"awk 'NF == 3 && (NR % {sample_every} == {phase} || $3 ~ /^({names})$/) {{ print NR, $0 }}' /proc/kallsyms"
    )
    release, version, md5, table = vm.exec(script, timeout=120).check("reading ground truth").text.split("@@\n")
    lines = {}
    named = {}
    for line in table.splitlines():
        nr, addr, typ, name = line.split()
        lines[int(nr) - 1] = (typ, name, int(addr, 16))
        named.setdefault(name, int(addr, 16))
    return Truth(release.strip(), version.strip(), md5.split()[0], lines, named)


@pytest.fixture(scope="module")
def guest61(image: Image) -> Iterator[VM]:
    vm = start_vm("h3-introspect61", image, memory=512 * MiB, ram="shared")
    try:
        yield vm
    finally:
        vm.stop()


@pytest.fixture(scope="module")
def truth61(guest61: VM) -> Truth:
    return guest_truth(guest61, 450)


@pytest.fixture(scope="module")
def view61(guest61: VM) -> KernelView:
    return KernelView.open(vm_memory(guest61))


def check_against_guest(kv: KernelView, truth: Truth) -> None:
    assert kv.release == truth.release
    assert kv.read_cstr_va(kv.symbol("linux_banner")).decode().strip() == truth.version
    ks = kv.symbols
    assert ks is not None
    for name in TRUTH_SYMBOLS:
        if name in truth.named:
            assert ks[name] == truth.named[name], name
    assert len(truth.lines) >= 150
    for i, (typ, name, addr) in truth.lines.items():
        assert (ks.types[i], ks.names[i], int(ks.addresses[i])) == (typ, name, addr), i
    start, stop = ks["__start_BTF"], ks["__stop_BTF"]
    assert hashlib.md5(kv.read_va(start, stop - start).tobytes()).hexdigest() == truth.btf_md5


@pytest.mark.guest
def test_bootstrap_matches_guest_61(view61: KernelView, truth61: Truth) -> None:
    kv = view61
    check_against_guest(kv, truth61)
    assert kv.symbol("_stext") == kv.vmcoreinfo.symbol("_stext") == truth61.named["_stext"]
    assert kv.symbols is not None and kv.symbols.type_of("__per_cpu_end") == "A"
    # The direct map and the walk agree, and the struct page array is mapped.
    ms = kv.vmcoreinfo.symbol("mem_section")
    assert kv.direct_map_pa(ms) == kv.translate(ms)
    assert kv.page_offset_base % GiB == 0 and kv.vmemmap_base % GiB == 0
    assert kv.read_u64_va(kv.symbol("page_offset_base")) == kv.page_offset_base
    kv.translate(kv.vmemmap_base)
    assert kv.btf is not None and f"PA {kv.translate(kv.symbol('__start_BTF')):#x}" in kv.notes["btf"]
    assert kv.timings["total"] < 5


@pytest.mark.guest
def test_btf_agrees_with_vmcoreinfo_61(view61: KernelView) -> None:
    btf = kv_layout_btf(view61)
    vmci = view61.layout("vmcoreinfo")
    checked = 0
    for key in view61.vmcoreinfo.entries:
        m = re.match(r"^(SIZE|OFFSET|LENGTH)\((\w+)(?:\.(\w+))?\)$", key)
        if m is None or (m[1] == "LENGTH" and m[3] is None):
            continue
        assert layout_fact(btf, key) == layout_fact(vmci, key), key
        checked += 1
    assert checked >= 60
    assert btf.struct_size("page") == view61.vmcoreinfo.size("page")
    assert btf.member_offset("page", "lru.next") == view61.vmcoreinfo.offset("page.lru")
    assert btf.enum_value("pageflags", "PG_slab") == view61.vmcoreinfo.number("PG_slab")
    assert btf.array_length("zone", "free_area") == view61.vmcoreinfo.length("zone.free_area")
    auto = view61.layout()
    assert auto.member_offset("free_area", "nr_free") == btf.member_offset("free_area", "nr_free")
    facts = layout_facts(auto, required=False)
    assert facts["NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)"] == -129 and "OFFSET(free_area.nr_free)" in facts


def kv_layout_btf(kv: KernelView) -> BtfLayout:
    lay = kv.layout("btf")
    assert isinstance(lay, BtfLayout)
    return lay


@pytest.mark.guest
def test_cached_location_skips_search(guest61: VM, view61: KernelView) -> None:
    gpa = view61.vmcoreinfo_gpa
    assert gpa is not None and gpa % 4096 == 0
    again = KernelView.open(vm_memory(guest61), hint_gpa=gpa, load_btf=False)
    assert again.vmcoreinfo_gpa == gpa and again.kaslr_offset == view61.kaslr_offset
    assert again.timings["vmcoreinfo"] < 0.05 and again.btf is None


class PatchedMemory(GuestMemory):
    """A live guest's memory with some bytes replaced: corruption without copying 512 MiB."""

    kind = "patched memory"

    def __init__(self, base: GuestMemory, patches: dict[int, bytes]):
        self.base = base
        self.regions = tuple(Region(r.gpa, r.size, r.gpa) for r in base.regions)
        self.patches = patches

    def _fill(self, offset: int, out: memoryview) -> None:
        self.base.read_into(offset, np.frombuffer(out, dtype=np.uint8))
        for pa, data in self.patches.items():
            lo, hi = max(pa, offset), min(pa + len(data), offset + len(out))
            if lo < hi:
                out[lo - offset : hi - offset] = data[lo - pa : hi - pa]


@pytest.mark.guest
def test_bad_input_is_rejected(guest61: VM, view61: KernelView, tmp_path: Path) -> None:
    (tmp_path / "random.raw").write_bytes(os.urandom(32 * MiB))
    with (tmp_path / "zero.raw").open("wb") as f:
        f.truncate(64 * MiB)
    for name in ("random.raw", "zero.raw"):
        with pytest.raises(BadImage, match=f"no VMCOREINFO note found in raw image .*{name}"):
            KernelView.open(RawMemory(tmp_path / name))
    # A dump truncated below the kernel image: the note may survive, the page tables cannot.
    note_gpa = view61.vmcoreinfo_gpa
    pgd = view61.page_table.pgd_pa
    cut = min(max(note_gpa + 4096, 64 * MiB) if note_gpa < pgd else 64 * MiB, pgd & ~(MiB - 1))
    with open(guest61.config.ram_path, "rb") as src:
        (tmp_path / "truncated.raw").write_bytes(src.read(cut))
    with pytest.raises(BadImage, match="no VMCOREINFO note found|init_top_pgt does not translate"):
        KernelView.open(RawMemory(tmp_path / "truncated.raw"))
    # Corruptions in place, on the live guest's memory.
    mem = vm_memory(guest61)
    btf_pa = view61.translate(view61.symbol("__start_BTF"))
    names_pa = view61.translate(view61.vmcoreinfo.symbol("kallsyms_names"))
    for patches, message in [
        ({pgd + 8 * idx(view61.vmcoreinfo.symbol("_stext"), 39): bytes(8)}, "init_top_pgt does not translate _stext"),
        ({btf_pa: b"\x9f\xeb\x07"}, "BTF header invalid"),
        ({names_pa: b"\xff\xff" * 2048}, "kallsyms"),
    ]:
        with pytest.raises(BadImage, match=message):
            KernelView.open(PatchedMemory(mem, patches), hint_gpa=note_gpa)


@pytest.mark.guest
def test_bootstrap_612(image_612: Image) -> None:
    vm = start_vm("h3-introspect612", image_612, memory=512 * MiB, ram="shared")
    try:
        kv = KernelView.open(vm_memory(vm))
        script = (
            "uname -r; echo @@; cat /proc/version; echo @@; md5sum /sys/kernel/btf/vmlinux; echo @@; "
            'awk \'NR <= 40 || $3 == "_stext" { print NR, $0 } $3 == "_stext" { exit }\' /proc/kallsyms'
        )
        release, version, md5, table = vm.exec(script, timeout=120).check("ground truth").text.split("@@\n")
    finally:
        vm.stop()
    assert kv.release == release.strip() and kv.release.startswith("6.12")
    assert kv.read_cstr_va(kv.symbol("linux_banner")).decode().strip() == version.strip()
    ks = kv.symbols
    assert ks is not None
    for line in table.splitlines():
        nr, addr, typ, name = line.split()
        assert (ks.types[int(nr) - 1], ks.names[int(nr) - 1], int(ks.addresses[int(nr) - 1])) == (
            typ,
            name,
            int(addr, 16),
        )
    assert kv.btf is not None
    start, stop = ks["__start_BTF"], ks["__stop_BTF"]
    assert hashlib.md5(kv.read_va(start, stop - start).tobytes()).hexdigest() == md5.split()[0]
    # 6.12 exports SYMBOL(vmemmap) and the new page-type numbers, and no longer PG_slab.
    assert kv.notes["vmemmap_base"] == "VMCOREINFO SYMBOL(vmemmap)"
    assert kv.vmemmap_base == kv.read_u64_va(kv.symbol("vmemmap_base"))
    auto = kv.layout()
    assert layout_fact(auto, "NUMBER(PAGE_SLAB_MAPCOUNT_VALUE)") == -184549376
    with pytest.raises(LayoutMissing, match=re.escape("NUMBER(PG_slab)")):
        layout_fact(auto, "NUMBER(PG_slab)")
    assert layout_fact(auto, "ENUM(pagetype.PGTY_buddy)") == 0xF0
    assert layout_facts(kv.layout("btf"), ["OFFSET(page.lru.next)", "SIZE(page)"]) == {
        "OFFSET(page.lru.next)": 8,
        "SIZE(page)": 64,
    }


@pytest.mark.guest
def test_bootstrap_4g_anonymous(image: Image) -> None:
    """4 GiB of anonymous RAM (split at the PCI hole), read through /proc/PID/mem."""
    vm = start_vm("h3-introspect4g", image, memory=4 * GiB, ram="anonymous")
    try:
        mem = vm_memory(vm)
        assert len(mem.regions) == 2
        kv = KernelView.open(mem)
        assert kv.read_va(kv.symbol("linux_banner"), 14).tobytes() == b"Linux version "
        release = vm.exec("uname -r").text.strip()
    finally:
        vm.stop()
    assert kv.release == release
    assert kv.timings["vmcoreinfo"] < 1.0, kv.timings
    assert kv.layout("btf").struct_size("page") == kv.vmcoreinfo.size("page")
