"""Layout facts from Debian's kernel headers, checked against what the real kernels say.

Ground truth: the VMCOREINFO a booted 6.1 / 6.12 guest writes (every SIZE/OFFSET/LENGTH/NUMBER
key), and for 6.12 also the BTF in the ``vmlinux`` that its headers package ships. Header
packages are downloaded once into the memvirt cache; the first run per kernel compiles the
probe (seconds), later runs load the cached JSON.
"""

from __future__ import annotations

import inspect
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from memvirt.image.build import default_image
from memvirt.image.kernel import newest_package
from memvirt.introspect import headers
from memvirt.introspect.headers import (
    HeadersError,
    HeadersLayout,
    HeadersNotFound,
    ProbeCompileError,
    blame_errors,
    debian_tree,
    render_probe,
)
from memvirt.introspect.layout import Layout, LayoutMissing, layout_fact
from memvirt.introspect.vmcoreinfo import Vmcoreinfo, find_vmcoreinfo
from memvirt.paths import cache_home
from memvirt.qemu.vm import start_vm, vm_memory

SERIES = ("6.1", "6.12", pytest.param("7.2", marks=pytest.mark.kernels))
pytestmark = pytest.mark.skipif(
    shutil.which("apt-get") is None or shutil.which("gcc") is None, reason="needs apt-get and gcc (a Debian host)"
)

# VMCOREINFO keys the headers cannot answer, and why.
# - kernel/printk/*.{c,h} are not in header packages: the ring buffer types and latched_seq.
# - run-time values: with CONFIG_X86_5LEVEL, MAX_PHYSMEM_BITS (so NR_SECTION_ROOTS, which
#   LENGTH(mem_section) is) depends on pgtable_l5_enabled(); the rest are boot-time numbers.
# - the *_MAPCOUNT_VALUE numbers are #defines in kernel/crash_core.c or vmcore_info.c; they
#   are checked below against the page-type constants they are made of.
_NOT_IN_HEADERS = re.compile(
    r"^(SIZE|OFFSET)\((printk_ringbuffer|prb_desc_ring|prb_desc|prb_data_blk_lpos|printk_info|prb_data_ring|latched_seq)"
    r"|^NUMBER\((MAX_PHYSMEM_BITS|phys_base|pgtable_l5_enabled|sme_mask|VMALLOC_START|PAGE_\w+_MAPCOUNT_VALUE)\)$"
    r"|^LENGTH\(mem_section\)$"
)
_VMCI_LINE = re.compile(r"^((SIZE|OFFSET|LENGTH|NUMBER)\(([^)]*)\))=(-?(?:0x[0-9a-fA-F]+|\d+))$")


def _release(series: str) -> str:
    return newest_package(series, "amd64")[0].removeprefix("linux-image-")


@pytest.fixture(scope="module", params=SERIES)
def layout(request: pytest.FixtureRequest) -> HeadersLayout:
    return HeadersLayout.for_release(_release(request.param))


@pytest.fixture(scope="module", params=SERIES)
def guest_vmcoreinfo(request: pytest.FixtureRequest) -> Iterator[tuple[HeadersLayout, Vmcoreinfo]]:
    """A series' header layout and the VMCOREINFO its kernel wrote in a booted guest."""
    image = default_image(request.param)
    layout = HeadersLayout.for_release(image.release)
    vm = start_vm(f"h5-vmci-{request.param.replace('.', '')}", image, memory=256 << 20)
    try:
        with vm_memory(vm) as mem:
            _gpa, info = find_vmcoreinfo(mem)
    finally:
        vm.stop()
    yield layout, info


def _header_fact(layout: HeadersLayout, key: str, kind: str, name: str) -> int:
    """VMCOREINFO's key asked of the headers; a few LENGTH keys name a symbol, not a member."""
    symbol_lengths = {
        "LENGTH(mem_section)": lambda: layout.constant("NR_SECTION_ROOTS"),
        "LENGTH(node_data)": lambda: layout.constant("MAX_NUMNODES"),
        "LENGTH(printk_info_subsystem)": lambda: layout.array_length("dev_printk_info", "subsystem"),
        "LENGTH(printk_info_device)": lambda: layout.array_length("dev_printk_info", "device"),
    }
    if key in symbol_lengths:
        return symbol_lengths[key]()
    if kind == "NUMBER":
        return layout.constant(name)
    return layout_fact(layout, key)


@pytest.mark.guest
@pytest.mark.timeout(900)
def test_agrees_with_vmcoreinfo(guest_vmcoreinfo: tuple[HeadersLayout, Vmcoreinfo]) -> None:
    layout, info = guest_vmcoreinfo
    assert info.osrelease == layout.release
    checked, unexplained, wrong = [], [], []
    for line in info.text.splitlines():
        m = _VMCI_LINE.match(line)
        if m is None:
            continue
        key, kind, name, want = m[1], m[2], m[3], int(m[4], 0)
        try:
            got = _header_fact(layout, key, kind, name)
        except LayoutMissing as e:
            if not _NOT_IN_HEADERS.search(key):
                unexplained.append(f"{key}: {e}")
            continue
        checked.append(key)
        if got != want:
            wrong.append(f"{key}: headers say {got}, the kernel {want}")
    assert not wrong, wrong
    assert not unexplained, unexplained
    pg = [k for k in checked if k.startswith("NUMBER(PG_")]
    assert len(pg) >= 6 and "NUMBER(PG_head_mask)" in pg
    assert {
        "SIZE(page)",
        "OFFSET(page.lru)",
        "OFFSET(page.compound_head)",
        "LENGTH(zone.free_area)",
        "OFFSET(pglist_data.node_zones)",
        "SIZE(nodemask_t)",
        "OFFSET(atomic_long_t.counter)",
    } - ({"OFFSET(page.compound_head)"} if "OFFSET(page.compound_head)" not in info else set()) <= set(checked)
    # (7.x's VMCOREINFO no longer exports OFFSET(page.compound_head): the member became compound_info.)
    assert len(checked) >= 45, checked


@pytest.mark.guest
@pytest.mark.timeout(900)
def test_page_type_numbers_match_vmcoreinfo(guest_vmcoreinfo: tuple[HeadersLayout, Vmcoreinfo]) -> None:
    """The page-type constants rebuild VMCOREINFO's *_MAPCOUNT_VALUE numbers: ``~PG_buddy``
    until v6.9, the ``PGTY_*`` byte shifted into the top of page_type since."""
    layout, info = guest_vmcoreinfo

    def int32(v: int) -> int:
        return (v & 0xFFFFFFFF) - ((v & 0x80000000) << 1)

    if "PGTY_buddy" in layout.constants():
        pairs = {"BUDDY": "PGTY_buddy", "OFFLINE": "PGTY_offline", "SLAB": "PGTY_slab", "HUGETLB": "PGTY_hugetlb"}
        derive = lambda c: int32(layout.constant(c) << 24)  # noqa: E731
    else:
        pairs = {"BUDDY": "PG_buddy", "OFFLINE": "PG_offline"}
        derive = lambda c: ~layout.constant(c)  # noqa: E731
    seen = 0
    for what, const in pairs.items():
        key = f"NUMBER(PAGE_{what}_MAPCOUNT_VALUE)"
        if key in info:
            assert derive(const) == info.number(f"PAGE_{what}_MAPCOUNT_VALUE"), key
            seen += 1
    assert seen >= 2


def test_agrees_with_612_btf() -> None:
    """Every recorded struct, member (bitfields too) and enum equals the BTF of the 6.12 vmlinux
    that Debian ships in linux-headers for module builds."""
    from elftools.elf.elffile import ELFFile

    from memvirt.introspect.btf import Btf, BtfLayout

    release = _release("6.12")
    layout = HeadersLayout.for_release(release)
    vmlinux = debian_tree(release).objtree / "vmlinux"
    if not vmlinux.is_file():
        pytest.skip(f"linux-headers-{release} ships no vmlinux")
    with open(vmlinux, "rb") as f:
        btf = BtfLayout(Btf(ELFFile(f).get_section_by_name(".BTF").data(), str(vmlinux)))
    compared, wrong = 0, []
    for name in layout.structs():
        if layout.struct_size(name) != btf.struct_size(name):
            wrong.append(f"sizeof {name}")
        for path in layout.members(name):
            compared += 1
            if layout.member_bit_offset(name, path) != btf.member_bit_offset(name, path):
                wrong.append(f"{name}.{path}")
    for enum in ("pageflags", "pagetype", "zone_type", "migratetype", "node_stat_item", "zone_stat_item"):
        if layout.enumerators(enum) != btf.enumerators(enum):
            wrong.append(f"enum {enum}")
    assert not wrong, wrong
    assert compared > 1000


def test_stable_facts(layout: HeadersLayout) -> None:
    assert isinstance(layout, Layout) and layout.source == "headers"
    assert layout.struct_size("list_head") == 16
    assert layout.struct_size("struct list_head") == 16
    assert layout.member_offset("list_head", "prev") == 8
    assert layout.member_offset("page", "lru.next") == layout.member_offset("page", "lru")
    assert layout.member_offset("page", "lru.prev") == layout.member_offset("page", "lru") + 8
    free_area = layout.struct_size("free_area")
    assert layout.member_offset("zone", "free_area[2].nr_free") == (
        layout.member_offset("zone", "free_area") + 2 * free_area + layout.member_offset("free_area", "nr_free")
    )
    assert layout.array_length("per_cpu_pages", "lists") == layout.constant("NR_PCP_LISTS")
    assert layout.array_length("free_area", "free_list") == layout.constant("MIGRATE_TYPES")
    assert layout.member_type("page", "lru") == "struct list_head"
    assert layout.member_type("task_struct", "mm") == "struct mm_struct *"
    assert layout.has_member("page", "mapping") and not layout.has_member("page", "no_such_member")
    assert layout.struct_size("task_struct") > 4096 and layout.struct_size("mm_struct") > 512
    for name in ("folio", "zone", "pglist_data", "mem_section", "address_space", "nodemask_t"):
        assert layout.struct_size(name) > 0
    try:
        assert layout.constant("PAGE_MAPPING_ANON") == 1 and layout.constant("PAGE_MAPPING_MOVABLE") == 2
    except LayoutMissing:
        # 7.x names the bits FOLIO_MAPPING_* (the value census.PAGE_MAPPING_ANON relies on is kept).
        assert layout.constant("FOLIO_MAPPING_ANON") == 1
    assert layout.constant("MIGRATE_PCPTYPES") == 3
    assert layout.constant("__NR_PAGEFLAGS") == layout.constant("NR_PAGEFLAGS")
    assert layout.constant("PG_head_mask") == 1 << layout.constant("PG_head")
    assert layout.enum_value("pageflags", "PG_lru") == layout.constant("PG_lru")
    assert layout_fact(layout, "NUMBER(NR_FREE_PAGES)") == 0
    for enum, member in (
        ("node_stat_item", "NR_FILE_PAGES"),
        ("zone_stat_item", "NR_FREE_PAGES"),
        ("numa_stat_item", "NUMA_HIT"),
    ):
        assert member in layout.enumerators(enum)
    bit = layout.member_bit_offset("task_struct", "sched_reset_on_fork")
    assert layout.member_bit_size("task_struct", "sched_reset_on_fork") == 1 and bit > 0
    with pytest.raises(LayoutMissing, match="bitfield"):
        layout.member_offset("task_struct", "sched_reset_on_fork")


def test_version_specific_facts(layout: HeadersLayout) -> None:
    orders = layout.array_length("zone", "free_area")
    if layout.release.startswith("6.1."):
        assert layout.constant("PG_table") == 0x200
        assert layout.constant("PAGE_TYPE_BASE") == 0xF0000000
        assert layout.constant("MAX_ORDER") == orders == 11
        assert layout.struct_size("kmem_cache") > 0
        with pytest.raises(LayoutMissing, match="PGTY_table"):
            layout.constant("PGTY_table")
    else:
        assert (layout.constant("PGTY_buddy"), layout.constant("PGTY_table"), layout.constant("PGTY_slab")) == (
            0xF0,
            0xF2,
            0xF5,
        )
        assert layout.enumerators("pagetype")["PGTY_table"] == 0xF2
        assert layout.constant("NR_PAGE_ORDERS") == orders == 11
        with pytest.raises(LayoutMissing, match=r"PG_table.*undeclared"):
            layout.constant("PG_table")
        with pytest.raises(LayoutMissing, match="kmem_cache.*do not define"):
            layout.struct_size("kmem_cache")


def test_values_are_derived_not_written_down() -> None:
    """The page-type numbers the tests expect come from compiling the headers: none of them is
    in the library's source."""
    source = inspect.getsource(headers)
    for value in ("0x200", "512", "0xf0", "0xf2", "0xf5", "0xf0000000"):
        assert not re.search(rf"(?<![\w.]){value}(?![\w.])", source, re.I), value
    probe, _owner = render_probe({i: 0 for i in range(len(headers.probe_units()))})
    assert "MEMVIRT_CONST(PG_table)" in probe and "enum pagetype memvirt_e_pagetype;" in probe


def test_cached_load_is_fast(layout: HeadersLayout) -> None:
    path = cache_home() / "layouts" / f"headers-{layout.release}.json"
    assert path.is_file()
    t0 = time.perf_counter()
    again = HeadersLayout.for_release(layout.release)
    assert time.perf_counter() - t0 < 0.5
    assert again.struct_size("page") == layout.struct_size("page")
    assert again.meta["timings"]["compile"] > 0


def test_from_tree_matches_for_release() -> None:
    release = _release("6.1")
    packaged = HeadersLayout.for_release(release)
    tree = HeadersLayout.from_tree(debian_tree(release).objtree)
    assert tree.release == release
    for s in ("page", "zone", "pglist_data", "per_cpu_pages", "kmem_cache"):
        assert tree.struct_size(s) == packaged.struct_size(s)
    assert tree.constants() == packaged.constants()


def test_errors_name_the_release_and_gcc_error(tmp_path: Path) -> None:
    with pytest.raises(HeadersNotFound, match=r"linux-headers-6\.1\.0-999-amd64 is unknown to apt"):
        HeadersLayout.for_release("6.1.0-999-amd64")
    with pytest.raises(HeadersNotFound, match="not a kernel release"):
        HeadersLayout.for_release("../etc")
    with pytest.raises(HeadersNotFound, match="not a prepared kernel tree"):
        HeadersLayout.from_tree(tmp_path)
    for d in ("include/generated", "include/linux", "arch/x86/include"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "include/generated/autoconf.h").write_text("")
    (tmp_path / "include/generated/utsrelease.h").write_text('#define UTS_RELEASE "9.9.9-broken"\n')
    (tmp_path / "include/linux/kconfig.h").write_text("#error memvirt test: this tree is broken\n")
    with pytest.raises(ProbeCompileError, match=r"9\.9\.9-broken.*kconfig\.h:1:2: error: #error memvirt test") as e:
        HeadersLayout.from_tree(tmp_path)
    assert "\n" not in str(e.value) and isinstance(e.value, HeadersError)


def test_blame_errors_follows_includes_and_macros() -> None:
    owner = [-1, 0, 1, 2]
    stderr = (
        "In file included from x/include/linux/a.h:3,\n"
        "                 from memvirt_probe.c:2:\n"
        "x/include/linux/b.h:7:1: error: unknown type name 'foo'\n"
        "x/include/linux/c.h:9:20: error: initializer element is not constant\n"
        "memvirt_probe.c:4:15: note: in expansion of macro 'PTRS_PER_P4D'\n"
        "memvirt_probe.c: At top level:\n"
        "memvirt_probe.c:3:15: error: 'PG_table' undeclared here (not in a function)\n"
    )
    blamed, first = blame_errors(stderr, "memvirt_probe.c", owner)
    assert blamed == {
        0: "unknown type name 'foo' (linux/b.h)",
        2: "initializer element is not constant (linux/c.h)",
        1: "'PG_table' undeclared here (not in a function)",
    }
    assert first.startswith("x/include/linux/b.h:7:1: error")
    assert blame_errors("<command-line>: fatal error: x.h: No such file\n", "memvirt_probe.c", owner)[0] == {}
