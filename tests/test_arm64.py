"""arm64 guests under TCG (issue 21 item 3): Debian bookworm's arm64 6.1 kernel in
``qemu-system-aarch64 -M virt`` with RAM at 1 GiB.

The image is built through the private arm64 apt and the cross compiler; the guest boots with
the same command agent as on x86; the paused census matches the guest's own figures exactly,
bootstrapped from its memory alone (arm64 page tables, the linear map from PHYS_OFFSET, data
symbols from the export table since Debian's arm64 kallsyms has code symbols only, BTF found by
its header). One 512 MiB guest serves the module. A boot takes about 4 s here (TCG, 2 cores):
modest, so CI runs the 6.1 guest and a 7.2 one (52-bit addresses, LPA2); 6.12 and the 16 KiB
page kernel are in the kernel matrix (``-m kernels``).
"""

from __future__ import annotations

import gzip
import json
import os
import time
from collections.abc import Iterator

import numpy as np
import pytest
from cli import memvirt
from test_introspect import _start_toucher, assert_matches_guest
from test_migrate import (
    Receiver,
    _migrate,
    host_b,  # noqa: F401 (the receiving host's fixture)
)

from memvirt.dedup.reclaim import Reclaimer
from memvirt.errors import BadImage
from memvirt.image.build import Image, default_image
from memvirt.introspect import Introspector
from memvirt.introspect.groundtruth import FrozenFigures
from memvirt.introspect.kernel import KernelView
from memvirt.qemu.vm import VM, start_vm, vm_memory

pytestmark = pytest.mark.guest
GUEST_FIXTURES = ("arm64_guest",)
SERIES = "6.1"
NAME = "arm64-guest"
COUNTER = "/tmp/a64.count"
FREEZE_DELAY_MS = 1500
"""memsnap's wait for the shells that started it to exit (300 ms by default): on a loaded 2-core
TCG host an arm64 guest's shell exit was seen to free its pages inside the default."""


def _quiet_vmstat(vm: VM) -> None:
    """Keep the guest's vmstat worker out of memsnap's window: from 6.x its per-second run also
    decays the per-cpu lists' auto-tuned ``high`` and frees their pages (``decay_pcp_high``),
    which a freshly booted, slower TCG arm64 guest was seen to do between reading
    /proc/zoneinfo and its freeze (free_pcp off by 10 in ~1 of 8 runs). A long
    ``vm.stat_interval`` and the one run already queued let through first."""
    vm.exec("echo 3600 > /proc/sys/vm/stat_interval && sleep 1.2").check("vm.stat_interval")


@pytest.fixture(scope="module")
def arm64_image() -> Image:
    return default_image(SERIES, arch_="arm64")


@pytest.fixture(scope="module")
def arm64_guest(arm64_image: Image) -> Iterator[VM]:
    vm = start_vm(NAME, arm64_image, memory=512 << 20)
    yield vm
    vm.stop()


def test_image_is_arm64(arm64_image):
    """An arm64 kernel (Image magic after gunzip) and static aarch64 programs, recorded as arm64."""
    assert arm64_image.arch == "arm64" and arm64_image.release.endswith("-arm64")
    kernel = arm64_image.vmlinuz.read_bytes()
    image = gzip.decompress(kernel) if kernel[:2] == b"\x1f\x8b" else kernel
    assert image[0x38:0x3C] == b"ARM\x64"
    assert {"memsnap", "datacheck", "memtouch", "pmagent"} <= set(arm64_image.programs)
    listed = json.loads(memvirt("image", "list", "--json").stdout)
    assert {"name": arm64_image.name, "arch": "arm64"}.items() <= next(
        i for i in listed if i["name"] == arm64_image.name
    ).items()


@pytest.mark.support("boot & exec")
def test_guest_boots_and_runs_commands(arm64_guest):
    vm = VM.load(NAME)
    assert vm.config.arch == "arm64" and vm.regions[0].gpa == 1 << 30
    assert arm64_guest.exec("uname -m").check("uname").text.strip() == "aarch64"
    arm64_guest.exec_background("datacheck write --size 8M --seed 64 --state /tmp/dc.state", "/tmp/dc.log")
    res = arm64_guest.exec("while [ ! -e /tmp/dc.state ]; do sleep 0.1; done; datacheck verify --state /tmp/dc.state")
    assert res.rc == 0 and res.text.startswith("OK"), res.text


@pytest.mark.timeout(600)
def test_paused_census_is_exact(arm64_guest):
    """free == MemFree (and the zones' nr_free_pages), per-cpu free exact, page cache, anon and
    slab within 2 %, while the guest is frozen where it read them; BTF and auto agree page by
    page. The bootstrap says where each fact came from."""
    _start_toucher(
        arm64_guest, "memtouch --hot 16M --cold 32M --content mix"
    )  # allocated before the freeze: it only touches after 'ready'
    _quiet_vmstat(arm64_guest)
    with vm_memory(arm64_guest) as mem:
        intros = {choice: Introspector(mem, layouts=choice, cache=False) for choice in ("auto", "btf")}
        with FrozenFigures(arm64_guest, delay_ms=FREEZE_DELAY_MS) as snap:
            results = {choice: intro.scan() for choice, intro in intros.items()}
    census = results["auto"]
    assert np.array_equal(results["btf"].classes, census.classes)
    assert census.release == arm64_guest.config.kernel_release
    assert census.counts["free"] == snap.figures.pages("MemFree")
    assert_matches_guest(census, snap.figures)
    assert census.counts["unbacked"] == 0  # the 1 GiB below RAM is no hole in it
    notes = intros["auto"].kernel.notes
    assert "__per_cpu_offset" in notes["ksymtab"] and "read-only data" in notes["btf"], notes
    assert arm64_guest.status() == "running"


def test_inspect_cli(arm64_guest):
    """``memvirt inspect``; run again, it bootstraps from the build-id cache (arm64's image is
    wherever KASLR put it outside the linear map, and its per-boot numbers are left out of the
    cache key)."""
    for _ in range(2):
        proc = memvirt("inspect", NAME, "--json")
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["kernel"]["release"] == arm64_guest.config.kernel_release
        assert out["pages"]["free"] > 0
    assert out["layout_facts"] and all(k.endswith("(cached)") for k in out["layout_facts"]), out["layout_facts"]


@pytest.mark.timeout(900)
@pytest.mark.support("reclaim & KSM", "cloning", "live migration")
def test_reclaim_clone_and_live_migration(arm64_guest, host_b):  # noqa: F811
    """What rests on the census works on arm64 as on x86: a reclaim punches the guest's free pages
    out of its RAM file and datacheck's data stays intact; a lazy clone runs on (its counter
    advances); a live migration to another "host" moves the guest, data and workload intact.
    Last in the module: the shared guest leaves with the migration."""
    vm = arm64_guest
    vm.exec_background("datacheck write --size 24M --seed 65 --state /tmp/rc.state", "/tmp/rc.log")
    vm.exec_background(f"memtouch --hot 4M --cold 8M --counter-file {COUNTER}", "/tmp/mt.log")
    vm.exec(f"while [ ! -e /tmp/rc.state ] || [ ! -s {COUNTER} ]; do sleep 0.1; done").check("workloads")
    vm.exec("memtouch --hot 96M --content random --duration 1 >/dev/null", timeout=120).check("dirtying free memory")
    with Reclaimer(vm) as rec:
        rep = rec.run()
    assert rep.reclaimed_bytes >= 32 << 20, rep
    assert vm.exec("datacheck verify --state /tmp/rc.state --timeout 60").rc == 0

    proc = memvirt("clone", vm.name, "--count", "1", "--prefix", "a64c", "--json")
    assert proc.returncode == 0, proc.stderr
    clone = VM.load(json.loads(proc.stdout)["clones"][0]["name"])
    try:
        assert clone.config.arch == "arm64"
        first = int(clone.exec(f"cat {COUNTER}").check("counter").text)
        time.sleep(1)
        assert int(clone.exec(f"cat {COUNTER}").check("counter").text) > first
    finally:
        clone.stop(force=True)
    VM.load(vm.name).resume()  # the template becomes an ordinary VM again

    rx = Receiver(host_b)
    tx = _migrate(vm.name, rx.port, "--as", "a64-moved")
    out, err = tx.communicate(timeout=300)
    assert tx.returncode == 0, err
    assert rx.wait() == 0, rx.log
    os.environ["MEMVIRT_HOME"], home = host_b["MEMVIRT_HOME"], os.environ["MEMVIRT_HOME"]
    try:
        moved = VM.load("a64-moved")
        assert moved.config.arch == "arm64" and moved.status() == "running"
        assert moved.exec("datacheck verify --state /tmp/rc.state --timeout 60").rc == 0
        a = int(moved.exec(f"cat {COUNTER}").check("counter").text)
        time.sleep(1)
        assert int(moved.exec(f"cat {COUNTER}").check("counter").text) > a
    finally:
        os.environ["MEMVIRT_HOME"] = home


@pytest.mark.timeout(900)
@pytest.mark.parametrize("series", ["7.2", pytest.param("6.12", marks=pytest.mark.kernels)])
def test_52_bit_kernels(vm_factory, series):
    """Debian's arm64 kernels from 6.12 on are built for 52-bit addresses (CONFIG_ARM64_LPA2)
    and, on QEMU's ``-cpu max`` (FEAT_LPA2), run with 5 levels of 4 KiB tables in the LPA2
    descriptor format; their kallsyms has data symbols again. The census is exact there too.
    CI runs 7.2 (a boot takes ~4 s); 6.12 is in the kernel matrix (``-m kernels``)."""
    img = default_image(series, arch_="arm64")
    vm = vm_factory(f"a64-{series.replace('.', '')}", img, memory=512 << 20)
    _start_toucher(
        vm, "memtouch --hot 8M --cold 16M --content mix"
    )  # allocated before the freeze: it only touches after 'ready'
    _quiet_vmstat(vm)
    with vm_memory(vm) as mem:
        intro = Introspector(mem, cache=False)
        with FrozenFigures(vm, delay_ms=FREEZE_DELAY_MS) as snap:
            census = intro.scan()
    assert intro.kernel.page_table.levels == 5 and intro.kernel.vmcoreinfo.va_bits == 52
    assert census.release == vm.config.kernel_release and census.release.startswith(series)
    assert census.counts["free"] == snap.figures.pages("MemFree")
    assert_matches_guest(census, snap.figures)
    assert census.counts["page_table"] > 0  # PGTY_table from 6.12 on


@pytest.mark.kernels
@pytest.mark.timeout(900)
def test_16k_pages(vm_factory):
    """Debian's arm64-16k kernel (sid 7.2): the bootstrap walks 16 KiB tables (4 levels of 2048
    entries, LPA2 at 52 bits); the census counts 16 KiB frames and is exact (free == MemFree,
    per-cpu free; page cache, anon and slab within 2 %). ``inspect`` reports it in 16 KiB pages;
    what works in 4 KiB frames (reclaim, migration, dedup) refuses such a guest in one line."""
    img = default_image("7.2", "16k", arch_="arm64")
    vm = vm_factory("a64-16k", img, memory=512 << 20)
    assert vm.exec("grep -m1 KernelPageSize /proc/self/smaps").check("smaps").text.split()[1:] == ["16", "kB"]
    _start_toucher(
        vm, "memtouch --hot 8M --cold 16M --content mix"
    )  # allocated before the freeze: it only touches after 'ready'
    _quiet_vmstat(vm)
    with vm_memory(vm) as mem:
        kv = KernelView.open(mem)
        assert kv.vmcoreinfo.page_size == 16384 and kv.page_table.levels == 4
        assert kv.btf is not None
        assert kv.btf.size == int(vm.exec("wc -c < /sys/kernel/btf/vmlinux").check("btf").text)
        intro = Introspector(mem, cache=False, any_page_size=True)
        with FrozenFigures(vm, delay_ms=FREEZE_DELAY_MS) as snap:
            census = intro.scan()
        with pytest.raises(BadImage, match="16 KiB pages"):
            Introspector(mem, cache=False)
    figs, c, ps = snap.figures, census.counts, 16384
    assert census.page_size == ps
    assert c["free"] == figs.pages("MemFree", ps) == sum(figs.zone_free.values())
    assert c["free_pcp"] == figs.pcp_total
    file_pages = figs.pages("Cached", ps) + figs.pages("Buffers", ps) + figs.pages("SwapCached", ps)
    for ours, theirs in (
        (c["page_cache"], file_pages),
        (c["anon"], figs.pages("AnonPages", ps)),
        (c["slab"], figs.pages("Slab", ps)),
    ):
        assert abs(ours - theirs) <= max(0.02 * theirs, 2), (c, figs.meminfo_kb)
    proc = memvirt("inspect", vm.name, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["page_size"] == ps
    proc = memvirt("reclaim", vm.name)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "16 KiB pages" in proc.stderr, proc.stderr
