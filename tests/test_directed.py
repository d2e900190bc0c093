"""Directed KSM (``memvirt dedup run``) on two real anonymous-RAM guests holding the same data set.

What users care about: KSM is only made to scan pages with a twin (far fewer than the guests
hold), it still merges the shared data, the guests run on with their data intact, and QEMU's RAM
(all mergeable, as QEMU set it) and the host's KSM settings come back, also after SIGKILL.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from memvirt.dedup import ksm
from memvirt.dedup.directed import PM_EXCLUSIVE, _Guest, ram_is_mergeable
from memvirt.dedup.fingerprint import hash_source
from memvirt.memory.pagemap import PM_PRESENT
from memvirt.memory.procmem import find_ram_mapping
from memvirt.memory.source import PAGE_SIZE
from memvirt.qemu.dirty import uffd_holds
from memvirt.qemu.vm import start_vm

pytestmark = pytest.mark.guest

HOLD = "memtouch --hot 8M --cold 64M --content mix --seed 7 --report 60"
UNIQUE = "memtouch --hot 4M --cold 96M --content random --seed {seed} --report 60"


def cli(*args: str, timeout: float = 600):
    return subprocess.run([sys.executable, "-m", "memvirt", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def twins(image):
    """Two 512 MiB anonymous-RAM guests, each with a data checker (32 MiB, own seed), 100 MiB of
    its own random data and the same 64 MiB mixed-content set (one seed)."""
    if not ksm.available():
        pytest.skip("no KSM on this host kernel")
    vms = []
    try:
        for i in range(2):
            vms.append(start_vm(f"dir-twin-{i}", image, memory=512 << 20, ram="anonymous"))
        for i, vm in enumerate(vms):
            vm.exec_background(f"datacheck write --size 32M --seed {20 + i} --state /tmp/dc.state", "/tmp/dc.log")
            vm.exec_background(HOLD, "/tmp/hold.log")
            vm.exec_background(UNIQUE.format(seed=30 + i), "/tmp/unique.log")
        for vm in vms:
            for _ in range(600):
                logs = vm.exec("cat /tmp/hold.log /tmp/unique.log").text
                if logs.count("memtouch ready") == 2 and vm.exec("test -e /tmp/dc.state").rc == 0:
                    break
                time.sleep(0.5)
            else:
                raise AssertionError(f"{vm.name}: workload not ready: " + vm.exec("cat /tmp/hold.log /tmp/dc.log").text)
        yield vms
    finally:
        for vm in vms:
            vm.stop()


@pytest.fixture
def ksm_restored():
    before = ksm.settings()
    try:
        yield before
    finally:
        ksm.restore(before)


def _all_mergeable(vm) -> bool:
    return ram_is_mergeable(vm.config.pid, find_ram_mapping(vm.config.pid, vm.config.memory), vm.config.memory)


def _merged(vms) -> int:
    """Pages KSM saves in these guests now (their own ksm_stat: other tools' guests share the host)."""
    total = 0
    for vm in vms:
        st = ksm.process_stat(vm.config.pid)
        total += st.get("ksm_merging_pages", 0) + st.get("ksm_zero_pages", 0)
    return total


def _stock_scans_per_merge(vms, seconds: float) -> tuple[int, int]:
    """Stock KSM (zero pages merged, as ``dedup run`` does) for ``seconds``: (pages scanned, pages
    merged in these guests); then every merge undone (run=2) so the next phase starts equal."""
    with ksm.configured(run=1, **{**ksm.STOCK, "use_zero_pages": 1}):
        s0, m0 = ksm.read("pages_scanned") or 0, _merged(vms)
        time.sleep(seconds)
        scanned, merged = (ksm.read("pages_scanned") or 0) - s0, _merged(vms) - m0
    with ksm.configured(run=2):
        deadline = time.monotonic() + 120
        while _merged(vms) and time.monotonic() < deadline:
            time.sleep(0.2)
    return scanned, merged


def test_directed_run_scans_candidates_only_and_keeps_data(twins, ksm_restored):
    stock_scanned, stock_merged = _stock_scans_per_merge(twins, 45)
    m0 = _merged(twins)
    proc = cli(
        "dedup", "run", *[vm.name for vm in twins], "--duration", "45", "--interval", "5", "--refresh", "20", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    refreshes = [s["refresh"] for s in r["samples"] if "refresh" in s]
    first = refreshes[0]
    backed = sum(g["backed"] for g in first["guests"])
    # the candidate set is what ksmd walks: the 132 MiB of unique data per guest left out
    assert 0 < first["mergeable"] < 0.6 * backed, first
    assert all(g["candidates"] >= (48 << 20) // PAGE_SIZE for g in first["guests"]), first
    last = r["samples"][-1]
    assert last["ksm_saving_bytes"] >= 32 << 20, last
    # pages scanned per page merged in these guests (pages_scanned is host-wide: other guests count too)
    merged = _merged(twins) - m0
    assert merged >= (32 << 20) // PAGE_SIZE, merged
    ratio = last["pages_scanned"] / merged
    stock_ratio = stock_scanned / max(stock_merged, 1)
    print(f"pages scanned per merge: directed {ratio:.1f}, stock {stock_ratio:.1f} ({stock_merged} merged)")
    assert ratio < stock_ratio / 2, (ratio, stock_ratio, stock_merged)
    assert ksm.settings() == ksm_restored
    for vm in twins:
        assert _all_mergeable(vm), f"{vm.name}: RAM not all mergeable again"
        assert vm.exec("datacheck verify --state /tmp/dc.state --timeout 60").rc == 0
        assert vm.exec("echo alive").text.strip() == "alive"


def test_killed_dedup_run_gives_ram_and_settings_back(twins, ksm_restored):
    proc = subprocess.Popen(
        [sys.executable, "-m", "memvirt", "dedup", "run", *[vm.name for vm in twins], "--duration", "120"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while _all_mergeable(twins[0]):
            assert proc.poll() is None and time.monotonic() < deadline, "dedup run never directed KSM"
            time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 30
    while ksm.settings() != ksm_restored or not all(_all_mergeable(vm) for vm in twins):
        assert time.monotonic() < deadline, f"not restored after SIGKILL: {ksm.settings()}"
        time.sleep(0.2)
    for vm in twins:  # the write tracker's userfaultfd died with dedup run
        base = find_ram_mapping(vm.config.pid, vm.config.memory)
        assert uffd_holds(vm.config.pid, base, base + vm.config.memory) == [], vm.name
    for vm in twins:
        assert vm.exec("datacheck verify --state /tmp/dc.state --timeout 60").rc == 0


def test_dedup_run_refuses_shared_ram(guest):
    proc = cli("dedup", "run", guest.name, "--duration", "1")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "anonymous" in lines[0], proc.stderr


def _wait_state(vm, path: str) -> None:
    for _ in range(600):
        if vm.exec(f"test -e {path}").rc == 0:
            return
        time.sleep(0.5)
    raise AssertionError(f"{vm.name}: {path} never appeared")


def test_refresh_rehashes_only_written_pages_and_equals_a_full_pass(anon_guest):
    """After the guest writes 24 MiB it keeps, the next pass reads about that many pages, and
    its hashes of the pages in use are exactly a full pass's (guest paused for the comparison)."""
    vm = anon_guest
    vm.exec_background("datacheck write --size 16M --seed 41 --state /tmp/inc1.state", "/tmp/inc1.log")
    _wait_state(vm, "/tmp/inc1.state")
    g = _Guest(vm, reclaim=False)
    try:
        g.track()
        assert g.tracker is not None, g.why_full

        def in_use():
            e = g.entries()
            free = g.intro.scan(live=True).free_mask[g.pfns]
            return ((e & PM_PRESENT) != 0) & ((e & PM_EXCLUSIVE) != 0) & ~free

        want = in_use()
        assert g.prints(want) == int(want.sum())  # the first pass reads every page in use
        g.prints(in_use())  # settle: what the guest wrote meanwhile
        vm.exec_background("datacheck write --size 24M --seed 42 --state /tmp/inc2.state", "/tmp/inc2.log")
        _wait_state(vm, "/tmp/inc2.state")
        vm.pause()
        try:
            want = in_use()
            n = g.prints(want)
            full = hash_source(g.mem, skip=~want)
            assert (g.hashes[want] == full.hashes[want]).all(), int((g.hashes[want] != full.hashes[want]).sum())
        finally:
            vm.resume()
        written = (24 << 20) // PAGE_SIZE
        print(f"incremental pass read {n} pages of {int(want.sum())} in use; the workload wrote {written}")
        assert written <= n <= written + (16 << 20) // PAGE_SIZE, (n, written)
        assert n < want.sum() / 2
        pid, (base, size) = vm.config.pid, vm.ram_mapping()
    finally:
        g.close()
    assert uffd_holds(pid, base, base + size) == []
    for st in ("inc1", "inc2"):
        assert vm.exec(f"datacheck verify --state /tmp/{st}.state --timeout 60").rc == 0
    vm.exec("pkill datacheck; rm -f /tmp/inc1.state /tmp/inc2.state")
