"""De-duplication with introspection on real guests: reclaim, analyze, KSM.

What users care about: after a reclaim the guest keeps running and its data checker passes,
every discarded page was free at the pause that discarded it, no other page changed, and the
host really holds less (RAM file blocks, QEMU's Pss) — while the guest allocates and frees fast.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import xxhash
from cli import assert_one_line_error

from memvirt.dedup import ksm
from memvirt.dedup.analyze import analyze
from memvirt.dedup.discard import host_usage
from memvirt.dedup.reclaim import Reclaimer
from memvirt.errors import UsageError
from memvirt.introspect import CODE
from memvirt.memory.raw import RawMemory
from memvirt.memory.source import PAGE_SIZE

CHURN = "while true; do memtouch --hot 24M --content random --seed $RANDOM --duration 1 >/dev/null 2>&1; done"
DIRTY = "memtouch --hot 160M --content random --duration 1 >/dev/null"


def dedup_cli(*args: str, timeout: float = 300):
    """The CLI as a user runs it."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "memvirt", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def ksm_restored():
    """Every KSM setting this suite may touch comes back, also when the test fails."""
    if not ksm.available():
        pytest.skip("no KSM on this host kernel")
    before = ksm.settings()
    try:
        yield before
    finally:
        ksm.restore(before)
        assert ksm.settings() == before


@pytest.fixture(params=["guest", "anon_guest"])
def busy(request):
    """A guest (shared-file or anonymous RAM) with dirty free memory, a data checker holding 48 MiB,
    and a loop allocating and freeing 24 MiB of fresh data over and over."""
    vm = request.getfixturevalue(request.param)
    vm.exec("rm -f /tmp/dc.state /tmp/dc.state.result")
    vm.exec_background("datacheck write --size 48M --seed 11 --state /tmp/dc.state", "/tmp/dc.log")
    for _ in range(300):
        if vm.exec("test -e /tmp/dc.state").rc == 0:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("datacheck did not get ready: " + vm.exec("cat /tmp/dc.log").text)
    vm.exec(DIRTY, timeout=120).check("dirtying free memory")
    churn = vm.exec_background(CHURN, "/dev/null")
    try:
        yield vm
    finally:
        vm.exec(f"kill {churn}; killall memtouch datacheck; true")
        vm.resume()


def _spy(rec: Reclaimer, seen: list[dict]) -> None:
    """Check every discard from inside its pause: a full census of the stopped guest must call every
    discarded frame free, and no frame outside them may change across the discard."""
    inner = rec.discarder.discard

    def discard(starts: np.ndarray, ends: np.ndarray) -> None:
        census = rec.intro.scan()
        target = np.zeros(len(census.classes), dtype=bool)
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            target[s:e] = True
        keep = np.flatnonzero(~target & (census.classes != CODE["unbacked"]))
        before = _hashes(rec, keep)
        inner(starts, ends)
        after = _hashes(rec, keep)
        seen.append(
            {
                "discarded": int(target.sum()),
                "not_free": int((target & ~census.free_mask).sum()),
                "changed": int((before != after).sum()),
                "kept": len(keep),
            }
        )

    rec.discarder.discard = discard


def _hashes(rec: Reclaimer, pfns: np.ndarray) -> np.ndarray:
    out = np.empty(len(pfns), dtype=np.uint64)
    for i in range(0, len(pfns), 8192):
        pages = rec.mem.read_pages(pfns[i : i + 8192])
        out[i : i + len(pages)] = [xxhash.xxh3_64_intdigest(p) for p in pages]
    return out


def test_reclaim_discards_only_free_pages_under_churn(busy):
    """The check itself takes long inside each pause, so one pause per pass (no pause budget):
    the churn still runs between the live scan and the pause, which is the race that matters."""
    with Reclaimer(busy, goal_ms_per_gib=1e6) as rec:
        seen: list[dict] = []
        _spy(rec, seen)
        first = rec.run()
        for _ in range(2):
            time.sleep(1)
            rec.run()
    assert seen and sum(s["discarded"] for s in seen) >= first.candidate_pages // 2
    assert all(s["not_free"] == 0 for s in seen), seen
    assert all(s["changed"] == 0 for s in seen), seen
    assert busy.status() == "running"
    assert busy.exec("datacheck verify --state /tmp/dc.state --timeout 60").rc == 0


def test_reclaim_gives_memory_back_and_keeps_data(busy):
    before = host_usage(busy)
    with Reclaimer(busy) as rec:
        rep = rec.run()
    assert rep.candidate_pages * PAGE_SIZE >= 100 << 20, rep
    assert rep.reclaimed_bytes >= 80 << 20, rep
    assert host_usage(busy) <= before - (80 << 20)
    # The pause budget shows as the work split into several short pauses; how short they are is
    # wall-clock time, which bench/dedup.py measures (a test on a loaded host can't).
    assert len(rep.pauses_ms) >= 2, rep.pauses_ms
    assert busy.exec("datacheck verify --state /tmp/dc.state --timeout 60").rc == 0
    assert (
        busy.exec("memtouch --hot 96M --content random --duration 1 >/dev/null && echo alive").text.strip() == "alive"
    )


def test_cli_reclaim(guest):
    guest.exec(DIRTY, timeout=120).check("dirtying free memory")
    proc = dedup_cli("reclaim", guest.name, "--json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["vm"] == guest.name and rep["method"].startswith("punch holes")
    assert rep["reclaimed_bytes"] > 50 << 20 and rep["pauses"] >= 1
    assert guest.status() == "running"
    assert_one_line_error(dedup_cli("reclaim", "dd-no-such-vm"), 2, "no VM named")
    assert_one_line_error(dedup_cli("reclaim", guest.name, "--watch", "0"), 2, "--watch")


def test_page_poisoning_is_refused(vm_factory, image):
    """A guest that checks the poison in free pages would see zeros as corruption: refuse."""
    vm = vm_factory("dd-poison", image, memory=256 << 20, append="page_poison=1")
    with pytest.raises(UsageError, match="poison"):
        with Reclaimer(vm) as rec:
            rec.run()
    assert vm.exec("echo ok").text.strip() == "ok"


def _raw(tmp_path, name: str, pages: np.ndarray):
    path = tmp_path / name
    pages.tofile(path)
    return RawMemory(path)


def test_analyze_counts_exactly(tmp_path):
    """Synthetic images with known zero, duplicate and shared pages, including pages that are zero
    except far from every sampled word (the sample hash alone would call them zero)."""
    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, size=(3000, PAGE_SIZE), dtype=np.uint8)
    b = rng.integers(0, 256, size=(2000, PAGE_SIZE), dtype=np.uint8)
    a[:100] = 0
    a[200:260] = a[300]
    a[400:420] = 0
    a[400:420, 4095] = np.arange(20) % 2 + 1
    b[:500] = a[1000:1500]
    b[600:610] = 0
    result = analyze(
        [("a", _raw(tmp_path, "a.raw", a), False), ("b", _raw(tmp_path, "b.raw", b), False)], introspect=False
    )
    both = np.concatenate((a, b))
    nonzero = both.any(axis=1)
    distinct = len({bytes(p) for p in both[nonzero]})
    assert result.zero == int((~nonzero).sum()) == 110
    assert result.distinct == distinct
    assert result.content_saving == len(both) - distinct
    fa = result.sources[0]
    a_nonzero = a[a.any(axis=1)]
    assert fa.zero == 100 and fa.duplicate == len(a_nonzero) - len({bytes(p) for p in a_nonzero}) == 60 + 18
    assert result.free == 0 and result.free_unlocks == 0


def test_analyze_guests_and_free_pages(guest, anon_guest):
    for vm in (guest, anon_guest):
        vm.exec(DIRTY, timeout=120).check("dirtying free memory")
    proc = dedup_cli("dedup", "analyze", guest.name, anon_guest.name, "--json", "--pause")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    t = r["total"]
    assert [s["name"] for s in r["sources"]] == [guest.name, anon_guest.name]
    assert all(s["free"] > (100 << 20) // PAGE_SIZE and s["kernel"] for s in r["sources"])
    within = sum(s["duplicate"] + s["zero"] for s in r["sources"])
    assert t["content_saving_pages"] > within, "the two guests run one kernel: pages must match across them"
    assert t["free_unlocks_pages"] > (100 << 20) // PAGE_SIZE, (
        "dirty free memory is only saved with free-page knowledge"
    )
    assert r["gib_per_second"] > 0.2
    assert guest.status() == "running" and anon_guest.status() == "running"
    assert_one_line_error(dedup_cli("dedup", "analyze", "/no/such/dump.elf"), 2, "does not exist")


def test_ksm_run_reclaims_and_restores(anon_guest, guest, ksm_restored):
    anon_guest.exec(DIRTY, timeout=120).check("dirtying free memory")
    before = host_usage(anon_guest)
    proc = dedup_cli("ksm", "run", anon_guest.name, "--duration", "6", "--interval", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["restored"] and r["settings"]["pages_to_scan"] == 100 and r["settings"]["use_zero_pages"] == 1
    last = r["samples"][-1]
    assert len(r["samples"]) >= 3 and last["reclaimed_bytes"] >= 80 << 20
    assert last["guest_bytes"] <= before - (80 << 20)
    assert ksm.settings() == ksm_restored
    status = dedup_cli("ksm", "status", "--json")
    assert status.returncode == 0, status.stderr
    vms = {v["name"]: v for v in json.loads(status.stdout)["vms"]}
    assert vms[anon_guest.name]["mergeable"] and not vms[guest.name]["mergeable"]
    assert_one_line_error(dedup_cli("ksm", "run", guest.name, "--duration", "1"), 2, "anonymous")
    assert_one_line_error(dedup_cli("ksm", "run", anon_guest.name, "--ksmd-cpu", "lots"), 2, "share of one CPU")


def test_ksm_pacer_holds_ksmd_to_a_cpu_budget(anon_guest, ksm_restored):
    """With a budget far below what the stock rate costs, the pacer cuts pages_to_scan to what
    fits, and ksmd's CPU share over the paced intervals stays near the budget."""
    proc = dedup_cli(
        "ksm",
        "run",
        anon_guest.name,
        "--duration",
        "10",
        "--interval",
        "2",
        "--no-reclaim",
        "--pages-to-scan",
        "2000",
        "--sleep-ms",
        "10",
        "--ksmd-cpu",
        "1%",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["settings"]["ksmd_cpu_budget"] == pytest.approx(0.01)
    paces = [s["pages_to_scan"] for s in r["samples"]]
    assert paces[0] == 2000 and min(paces[1:]) < 2000, paces
    a, b = r["samples"][2], r["samples"][-1]
    assert (b["ksmd_cpu_seconds"] - a["ksmd_cpu_seconds"]) / (b["t"] - a["t"]) < 0.05
    assert ksm.settings() == ksm_restored


def test_ksm_run_stops_rather_than_fight_another_tuner(anon_guest, ksm_restored):
    """Another tool changes pages_to_scan while ``ksm run`` paces ksmd: memvirt stops with one
    line, leaves that tool's value alone and puts back the settings it still holds."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "memvirt",
            "ksm",
            "run",
            anon_guest.name,
            "--duration",
            "60",
            "--interval",
            "1",
            "--no-reclaim",
            "--ksmd-cpu",
            "5%",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while ksm.read("run") != 1 or ksm.read("use_zero_pages") != 1:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.1)
        time.sleep(1.5)
        (ksm.KSM / "pages_to_scan").write_text("777\n")
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and "another tool changed" in lines[0], stderr
    assert "pages_to_scan" in lines[0] and "Traceback" not in stderr
    now = ksm.settings()
    assert now["pages_to_scan"] == 777, "the other tool's value must stay"
    assert {k: v for k, v in now.items() if k != "pages_to_scan"} == {
        k: v for k, v in ksm_restored.items() if k != "pages_to_scan"
    }, "memvirt's other settings were not restored"


def test_a_killed_ksm_run_gives_the_settings_back(anon_guest, ksm_restored):
    """``ksm run`` SIGKILLed: its watchdog puts KSM's settings back from the journal."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "memvirt",
            "ksm",
            "run",
            anon_guest.name,
            "--duration",
            "60",
            "--no-reclaim",
            "--pages-to-scan",
            "321",
            "--sleep-ms",
            "7",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while ksm.read("run") != 1 or ksm.read("pages_to_scan") != 321:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 15
    while ksm.settings() != ksm_restored:
        assert time.monotonic() < deadline, f"KSM settings not restored after SIGKILL: {ksm.settings()}"
        time.sleep(0.2)
