"""arm64 address translation over synthetic translation tables (no QEMU): every granule the
architecture has, pages and blocks, what is refused; the export-table search of kernels whose
kallsyms has no data symbols; the swapper_pg_dir check of the bootstrap."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from memvirt.errors import BadImage, UnmappedAddress
from memvirt.introspect import ksymtab
from memvirt.introspect.kernel import _page_table, arm64_is_linear, arm64_linear_base
from memvirt.introspect.pgtable import Arm64PageTable, kimg_to_phys
from memvirt.introspect.vmcoreinfo import Vmcoreinfo
from memvirt.memory.source import GuestMemory, Region

RAM_BASE = 1 << 30
RAM_SIZE = 96 << 20
KERNEL_VA = 0xFFFF_8000_1000_0000  # an image address (above the 48-bit linear map)


class RamAt1G(GuestMemory):
    """arm64 ``virt``-like RAM: one region at 1 GiB, held in a bytearray."""

    kind = "synthetic arm64 RAM"

    def __init__(self, size: int = RAM_SIZE):
        self.data = bytearray(size)
        self.regions = (Region(RAM_BASE, size, 0),)

    def _fill(self, offset: int, out: memoryview) -> None:
        out[:] = self.data[offset : offset + len(out)]

    def put(self, pa: int, raw: bytes) -> None:
        self.data[pa - RAM_BASE : pa - RAM_BASE + len(raw)] = raw


class Tables:
    """Builds TTBR1 tables for one granule and address size, the way the hardware reads them."""

    def __init__(
        self,
        mem: RamAt1G,
        granule: int,
        va_bits: int,
        first_table_pa: int = RAM_BASE + (32 << 20),
        lpa2: bool = False,
    ):
        self.mem, self.granule, self.va_bits, self.lpa2 = mem, granule, va_bits, lpa2
        self.shift = granule.bit_length() - 1
        bits = self.shift - 3
        self.levels = -(-(va_bits - self.shift) // bits)
        self.shifts = [self.shift + bits * (self.levels - 1 - i) for i in range(self.levels)]
        self.masks = [(1 << (va_bits - self.shifts[0])) - 1] + [(1 << bits) - 1] * (self.levels - 1)
        self.next = first_table_pa
        self.root = self._alloc()

    def _alloc(self) -> int:
        pa = self.next
        self.next += self.granule
        return pa

    def _entry(self, table: int, index: int) -> int:
        off = table - RAM_BASE + 8 * index
        return int(struct.unpack_from("<Q", self.mem.data, off)[0])

    def _set(self, table: int, index: int, value: int) -> None:
        self.mem.put(table + 8 * index, struct.pack("<Q", value))

    def _oa(self, pa: int) -> int:
        """``pa`` as a descriptor holds it: LPA2 moves bits 51:50 to bits 9:8."""
        return (pa & ((1 << 50) - 1)) | ((pa >> 50) & 3) << 8 if self.lpa2 else pa

    def map(self, va: int, pa: int, size: int, raw_leaf: int | None = None) -> None:
        """Map ``size`` bytes (a page or a block size of some level) at ``va`` to ``pa``."""
        table = self.root
        for depth, shift in enumerate(self.shifts):
            index = (va >> shift) & self.masks[depth]
            if 1 << shift == size:
                leaf = self._oa(pa) | (0b11 if depth == self.levels - 1 else 0b01) | (1 << 10)  # AF set
                self._set(table, index, leaf if raw_leaf is None else raw_leaf)
                return
            entry = self._entry(table, index)
            if not entry & 1:
                entry = self._alloc() | 0b11
                self._set(table, index, entry)
            table = entry & ((1 << 48) - 1) & ~(self.granule - 1)
        raise AssertionError(f"{size:#x} is no mapping size of this granule")

    def walker(self) -> Arm64PageTable:
        return Arm64PageTable(self.mem, self.root, self.va_bits, self.granule, 52 if self.lpa2 else 48, self.lpa2)


@pytest.mark.parametrize(
    "granule,va_bits,levels,block",
    [
        (4096, 48, 4, 2 << 20),
        (4096, 39, 3, 2 << 20),
        (16384, 48, 4, 32 << 20),
        (16384, 47, 3, 32 << 20),
        (65536, 48, 3, 512 << 20),
    ],
)
def test_pages_and_blocks_of_every_granule(granule, va_bits, levels, block):
    """A page and a block translate with their own size, offsets inside them kept; the depth
    follows from granule and address size, nothing assumes 4 KiB."""
    mem = RamAt1G(max(RAM_SIZE, 2 * block if block <= (64 << 20) else RAM_SIZE))
    t = Tables(mem, granule, va_bits)
    top = (1 << 64) - (1 << va_bits)
    page_va = top + 5 * granule
    t.map(page_va, RAM_BASE + 7 * granule, granule)
    pt = t.walker()
    assert pt.levels == levels
    assert pt.walk(page_va + 123) == (RAM_BASE + 7 * granule + 123, granule)
    if block <= (64 << 20):
        block_va = top + 4 * block
        t.map(block_va, RAM_BASE + block, block)
        pt.flush()
        assert pt.walk(block_va + granule + 8) == (RAM_BASE + block + granule + 8, block)


def test_lpa2_five_levels_and_high_address_bits():
    """Debian's 6.12+ arm64 kernels run with 52-bit addresses on an LPA2 CPU: 5 levels of 4 KiB
    (level -1 resolves bits 51:48) and physical bits 51:50 in descriptor bits 9:8; a 512 GiB
    block is valid at level 0 there, and the same bits 9:8 mean shareability without LPA2."""
    mem = RamAt1G()
    t = Tables(mem, 4096, 52, lpa2=True)
    linear = 0xFFF0_0000_0000_0000  # PAGE_OFFSET with VA_BITS 52
    t.map(linear + 0x5000, RAM_BASE + 0x7000, 4096)
    high = (1 << 51) | (1 << 50) | (5 << 39)
    t.map(0xFFF8_0000_0000_0000, high, 1 << 39)
    pt = t.walker()
    assert pt.levels == 5
    assert pt.walk(linear + 0x5010) == (RAM_BASE + 0x7010, 4096)
    assert pt.walk(0xFFF8_0000_0000_0042) == (high | 0x42, 1 << 39)
    plain = Arm64PageTable(mem, t.root, 52, 4096, 48, lpa2=False)
    with pytest.raises(UnmappedAddress, match="level 0"):
        plain.walk(0xFFF8_0000_0000_0042)  # no block at level 0 without LPA2
    assert plain.walk(linear + 0x5010)[0] == RAM_BASE + 0x7010


def test_1g_block_and_reads_across_mappings():
    """4 KiB granule: a 1 GiB level-1 block; a read crosses from one page to the next
    (physically apart) and gets both halves."""
    mem = RamAt1G()
    t = Tables(mem, 4096, 48)
    t.map(0xFFFF_0000_0000_0000, RAM_BASE, 1 << 30)
    a, b = RAM_BASE + 0x10000, RAM_BASE + 0x30000
    mem.put(a + 4096 - 3, b"abc")
    mem.put(b, b"defg")
    t.map(KERNEL_VA, a, 4096)
    t.map(KERNEL_VA + 4096, b, 4096)
    pt = t.walker()
    assert pt.walk(0xFFFF_0000_0001_2345) == (RAM_BASE + 0x12345, 1 << 30)
    assert pt.read_va(KERNEL_VA + 4096 - 3, 7).tobytes() == b"abcdefg"
    assert pt.runs(KERNEL_VA + 4096 - 3, 7) == [(a + 4096 - 3, 3), (b, 4)]


def test_refusals():
    mem = RamAt1G()
    t = Tables(mem, 4096, 48)
    t.map(KERNEL_VA, RAM_BASE, 4096, raw_leaf=RAM_BASE | 0b01)  # bit 1 clear at level 3: reserved
    pt = t.walker()
    with pytest.raises(UnmappedAddress, match="level 3"):
        pt.walk(KERNEL_VA)
    with pytest.raises(UnmappedAddress, match="level 0"):
        pt.walk(0xFFFF_F000_0000_0000)  # nothing mapped there
    with pytest.raises(UnmappedAddress, match="TTBR1"):
        pt.walk(0x0000_7FFF_0000_0000)  # a user (TTBR0) address
    with pytest.raises(BadImage, match="granule"):
        Arm64PageTable(mem, t.root, 48, 8192)
    with pytest.raises(BadImage, match="not arm64's"):
        Arm64PageTable(mem, t.root, 48, 65536, pa_bits=52, lpa2=True)


def _arm64_info(voffset: int, stext: int, swapper: int, t1sz: int = 16) -> Vmcoreinfo:
    return Vmcoreinfo.parse(
        (
            "OSRELEASE=6.1.0-0-arm64\nPAGESIZE=4096\n"
            f"SYMBOL(_stext)={stext:x}\nSYMBOL(swapper_pg_dir)={swapper:x}\n"
            "NUMBER(VA_BITS)=48\nNUMBER(MAX_PHYSMEM_BITS)=48\n"
            f"NUMBER(kimage_voffset)={voffset:#x}\nNUMBER(PHYS_OFFSET)={RAM_BASE:#x}\n"
            f"NUMBER(TCR_EL1_T1SZ)={t1sz:#x}\n"
        ).encode()
    )


def test_bootstrap_checks_swapper_pg_dir_against_kimage_voffset():
    """swapper_pg_dir is found at va - kimage_voffset and must map _stext and itself there;
    a note of another boot (another kimage_voffset) fails, as does a T1SZ that does not say how
    these tables are walked (52 bits, 5 levels, over 48-bit tables)."""
    mem = RamAt1G()
    image_pa = RAM_BASE + (2 << 20)
    voffset = KERNEL_VA - image_pa
    swapper_off = 0x8000
    t = Tables(mem, 4096, 48, first_table_pa=image_pa + swapper_off)
    for off in range(0, 0x10000, 4096):
        t.map(KERNEL_VA + off, image_pa + off, 4096)
    info = _arm64_info(voffset, KERNEL_VA + 0x1000, KERNEL_VA + swapper_off)
    assert info.arch == "arm64" and info.kimage_voffset == voffset
    pt = _page_table(mem, info)
    assert isinstance(pt, Arm64PageTable) and pt.translate(KERNEL_VA + 0x1234) == image_pa + 0x1234
    assert kimg_to_phys(KERNEL_VA + 0x1234, voffset) == image_pa + 0x1234
    with pytest.raises(BadImage, match="swapper_pg_dir"):
        _page_table(mem, _arm64_info(voffset - 0x20000, KERNEL_VA + 0x1000, KERNEL_VA + swapper_off))
    with pytest.raises(BadImage, match="swapper_pg_dir"):
        _page_table(mem, _arm64_info(voffset, KERNEL_VA + 0x1000, KERNEL_VA + swapper_off, t1sz=12))


def test_linear_map_formula():
    """__phys_to_virt(pa) = (pa - PHYS_OFFSET) | PAGE_OFFSET with PAGE_OFFSET = -(1 << VA_BITS)."""
    info = _arm64_info(0, 0, 0)
    base = arm64_linear_base(info)
    assert (RAM_BASE + base) % (1 << 64) == 0xFFFF_0000_0000_0000
    assert arm64_is_linear(info, 0xFFFF_0000_1234_0000)
    assert not arm64_is_linear(info, KERNEL_VA)


def _rodata(entries: list[tuple[str, int]], base_va: int, extra_strings: bytes = b"") -> np.ndarray:
    """Read-only data with a place-relative __ksymtab (value, name, namespace) and its strings."""
    strings = bytearray(b"\0" + extra_strings)
    offsets = {}
    for name, _ in entries:
        offsets[name] = len(strings)
        strings += name.encode() + b"\0"
    tab = bytearray()
    str_at = base_va + 0x1000
    for i, (name, value) in enumerate(entries):
        entry = base_va + 12 * i
        tab += struct.pack("<iii", value - entry, str_at + offsets[name] - (entry + 4), 0)
    data = bytearray(0x1000) + strings
    data[: len(tab)] = tab
    return np.frombuffer(bytes(data), dtype=np.uint8)


def test_exported_symbols_from_ksymtab():
    """A name's entry is the word that points at its string from where it stands; its value
    the word before. A name that only appears inside another string is not taken."""
    base = 0xFFFF_8000_0900_0000
    data = _rodata([("node_data", base + 0x5_0000), ("nr_cpu_ids", base + 0x6_0008)], base, b"not__per_cpu_offset\0")
    found = ksymtab.exported(data, base, ["node_data", "nr_cpu_ids", "__per_cpu_offset"])
    assert found == {"node_data": base + 0x5_0000, "nr_cpu_ids": base + 0x6_0008}
    with pytest.raises(BadImage, match="outside the kernel image"):
        ksymtab.check_found(found, lambda va: va != base + 0x5_0000)


def test_btf_header_search():
    base = 0xFFFF_8000_0900_0000
    raw = bytearray(0x3000)
    raw[0x1234 : 0x1234 + 8] = ksymtab.BTF_HEADER
    assert ksymtab.find_btf(np.frombuffer(bytes(raw), dtype=np.uint8), base) == [base + 0x1234]
