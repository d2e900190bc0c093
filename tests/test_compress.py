"""Working-set tracking and adaptive compression on a real guest, with the host's real DAMON,
memory cgroups and zram.

One 1 GiB guest runs memtouch with a known hot set and a larger cold set of text (which
compresses about 2:1), plus datacheck's incompressible pattern as more cold data. The host
settings the tests touch (swap, zram, DAMON, the VM's cgroup limit) are put back even when a
test fails.

The suite runs on hosts where DAMON is free and on hosts where another tool holds it (a
kdamond started at boot with a ``pageout`` scheme, say). There memvirt tracks the working set
by referenced bits and must leave the other tool's kdamond exactly as it was; and once swap
exists, that tool pages out idle memory of every process, the uncompressed twin's included, so
comparisons read the twin's own resident and swapped memory instead of assuming it stays in RAM.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from cli import assert_one_line_error, memvirt

from memvirt.compress import damon, tiers
from memvirt.compress.controller import Controller, Policy, Sample
from memvirt.errors import UsageError
from memvirt.image.build import Image
from memvirt.qemu.vm import VM, start_vm

MIB = 1 << 20
HOT = 96 * MIB
COLD = 384 * MIB
PHASE = "/tmp/memtouch.phase"
LOG = "/tmp/memtouch.log"
COUNTER = "/tmp/memtouch.count"
WINDOW = 12.0
SPEED_TOLERANCE = 0.80
"""The guest must keep at least this share of its uncompressed hot-loop speed (relative to its
twin). The goal is 0.95 and bench/compress.py measures it over long phases. Here, under load,
the guest-to-twin ratio of two free windows varied from 0.98 to 1.10, and compressed steady
states with no refaults measured 0.84-0.95 of the free ratio, so a test held to 5 % fails on
this host without a memory cause. The refault checks are the exact ones: a working set kept
resident refaults nothing."""
DATACHECK = "/tmp/datacheck.state"

pytestmark = pytest.mark.guest


def _needs_damon() -> None:
    """Skip a DAMON-only test where memvirt can't have DAMON; the reason names the holder."""
    reason = damon.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


def _ram(vm: VM) -> tuple[int, int]:
    """(resident, swapped) bytes of the VM's guest RAM, measured on the VM itself."""
    from memvirt.compress.wss import _ram_state
    from memvirt.memory.pagemap import PageMap
    from memvirt.memory.source import PAGE_SIZE

    vaddr, size = vm.ram_mapping()
    with PageMap(vm.config.pid) as pm:
        _, resident, swapped, _ = _ram_state(vm, pm, vaddr, size // PAGE_SIZE)
    return resident * PAGE_SIZE, swapped * PAGE_SIZE


def _host_swap_state() -> tuple[dict[str, dict[str, int]], dict[str, str]]:
    zram = {p.name: (p / "disksize").read_text() for p in Path("/sys/block").glob("zram*")}
    return {k: {"size": v["size"], "priority": v["priority"]} for k, v in tiers.active_swaps().items()}, zram


def _start_workload(vm: VM) -> None:
    vm.exec(f"echo {HOT} > {PHASE}").check("phase file")
    vm.exec_background(f"datacheck write --size 48M --seed 5 --state {DATACHECK}", "/tmp/datacheck.log")
    vm.exec_background(
        f"memtouch --hot {HOT} --cold {COLD} --content text --phase-file {PHASE} --counter-file {COUNTER}", LOG
    )


def _wait_ready(vm: VM) -> None:
    deadline = time.monotonic() + 120
    while "ready" not in vm.exec(f"cat {LOG}").text:
        assert time.monotonic() < deadline, "memtouch did not fill its sets"
        time.sleep(1)


@pytest.fixture(scope="module")
def workload(image: Image) -> Iterator[tuple[VM, VM]]:
    """The guest to compress and its uncompressed twin (same workload), booted side by side: the
    twin's speed at the same moment is the reference, so other load on the host cancels out."""
    vms: list[VM] = []
    try:
        for name in ("compress-guest", "compress-twin"):
            vms.append(start_vm(name, image, memory=1024 * MIB, wait=False))
        if vms[0].memcg() is None:
            pytest.skip("the host offers no writable memory cgroup controller")
        for vm in vms:
            vm.channel.wait_ready(180, vm.alive)
            _start_workload(vm)
        for vm in vms:
            _wait_ready(vm)
        yield vms[0], vms[1]
    finally:
        for vm in vms:
            vm.stop()


@pytest.fixture
def tier() -> Iterator[tiers.Tiers]:
    before = _host_swap_state()
    t = tiers.up()
    try:
        yield t
    finally:
        tiers.down()
        assert _host_swap_state() == before, "the host's swap or zram settings were not restored"


def _qemu_cpu(vm: VM) -> float:
    with open(f"/proc/{vm.config.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _progress(vm: VM) -> tuple[int, float]:
    """(memtouch's hot-loop passes, QEMU's CPU seconds) at about the same moment."""
    c0 = _qemu_cpu(vm)
    n = int(vm.exec(f"cat {COUNTER}").check("counter").text)
    return n, (c0 + _qemu_cpu(vm)) / 2


def _relative_rate(pair: tuple[VM, VM], seconds: float, run: Callable[[float], None] = time.sleep) -> float:
    """The first VM's hot-loop speed over the twin's, in the same window. Speed is passes per CPU
    second QEMU got (other load only takes CPU time away; paging and faults cost passes), and
    the twin running at the same moment cancels what the host's load does to caches."""
    start = [_progress(vm) for vm in pair]
    run(seconds)
    end = [_progress(vm) for vm in pair]
    a, b = ((n1 - n0) / (c1 - c0) for (n0, c0), (n1, c1) in zip(start, end, strict=True))
    return a / b


def _trace(samples: list[Sample]) -> str:
    """wss/limit/usage/refaulted MiB and cap hits of each interval."""
    return "; ".join(
        f"{s.wss / MIB:.0f}/{s.limit / MIB:.0f}/{s.usage / MIB:.0f}/{s.refaulted / MIB:.0f} {s.cap_hits}h {s.action}"
        for s in samples
    )


def _settled(samples: list[Sample], n: int = 4) -> float:
    return statistics.median(s.wss for s in samples[-n:])


@pytest.mark.parametrize("method", ["damon", "referenced"])
def test_wss_estimate_matches_the_hot_set(workload: tuple[VM, VM], method: str) -> None:
    if method == "damon":
        _needs_damon()
    kdamonds = damon.kdamonds()
    ctl = Controller([workload[0]], Policy("none"), interval=1.0, method=method)
    samples: list[Sample] = []
    try:
        ctl.run(6, samples.extend)
    finally:
        ctl.close()
    assert all(s.limit == 0 and s.action == "measure" for s in samples), "measuring must not limit the VM"
    est = _settled(samples)
    assert abs(est - HOT) <= 0.15 * HOT, f"{method} estimate {est / MIB:.0f} MiB vs hot set {HOT / MIB:.0f} MiB"
    assert samples[-1].resident >= HOT + COLD, "the VM should be fully resident before compression"
    assert damon.kdamonds() == kdamonds, "DAMON is not as it was before (memvirt left or changed a kdamond)"


def _swap_settled(limit: float = 120.0) -> None:
    """Wait until the host's swap stops filling. With another tool's DAMON ``pageout`` scheme,
    swap appearing sets it paging out every idle page of the host (both twins' cold sets too), at
    this host's swap-out pace; speed windows taken meanwhile would measure that, not memvirt."""

    def used() -> int:
        return sum(v["used"] for v in tiers.active_swaps().values())

    deadline = time.monotonic() + limit
    before = used()
    while time.monotonic() < deadline:
        time.sleep(3)
        now = used()
        if now - before < 4 * MIB:
            return
        before = now


def test_adaptive_compression_follows_the_working_set(workload: tuple[VM, VM], tier: tiers.Tiers) -> None:
    vm, twin = workload
    _swap_settled()
    baseline = _relative_rate(workload, WINDOW)
    ctl = Controller([vm], Policy("adaptive", margin=0.10), interval=1.0)
    samples: list[Sample] = []

    def control(seconds: float) -> None:
        ctl.run(seconds, samples.extend)

    try:
        # Until the VM sits at its limit: the host's swap-out pace decides how long that takes
        # (on nested hosts ~10 MB/s, so ~40 s for this cold set; a few seconds elsewhere).
        deadline = time.monotonic() + 180
        control(6)
        while time.monotonic() < deadline and not (
            all(x.action == "steady" for x in samples[-2:]) and samples[-1].usage <= samples[-1].limit + 16 * MIB
        ):
            control(2)
        control(4)
        compressed = _relative_rate(workload, WINDOW, control)
        steady = samples[-1]
        twin_resident, twin_swapped = _ram(twin)
        twin_says = f"the twin: {twin_resident / MIB:.0f} MiB resident, {twin_swapped / MIB:.0f} MiB swapped"
        assert steady.swapped >= 0.5 * COLD, f"only {steady.swapped / MIB:.0f} MiB of the cold set left RAM"
        assert steady.resident <= HOT + COLD // 2, twin_says
        # memvirt's doing, not another tool's pageout: the VM is held under a cap of memvirt's that
        # keeps at least half of the cold set out (the twin has none, whatever else swaps it).
        overhead = steady.usage - steady.resident
        assert 0 < steady.limit <= overhead + HOT + COLD // 2, (steady, twin_says)
        assert steady.usage <= steady.limit + 16 * MIB, (steady, twin_says)
        assert abs(_settled(samples) - HOT) <= 0.15 * HOT
        steady_refaults = statistics.median(x.refaulted for x in samples[-6:])
        assert steady_refaults <= 0.01 * HOT, f"the hot set keeps coming back from zram ({_trace(samples)})"
        if compressed < SPEED_TOLERANCE * baseline:
            # One window's ratio strays by up to ~15 % on a loaded 2-core host (the baseline's own
            # distance from 1.0 shows it): judge a shortfall on the mean of two windows.
            compressed = (compressed + _relative_rate(workload, WINDOW, control)) / 2
        assert compressed >= SPEED_TOLERANCE * baseline, (
            f"hot loop slowed: {compressed:.3f} vs {baseline:.3f} of the twin's speed ({_trace(samples)})"
        )

        for v in workload:
            v.exec(f"echo {2 * HOT} > {PHASE}").check("phase change")
        n_before = len(samples)
        control(20)
        after = samples[n_before:]
        followed = [i for i, s in enumerate(after) if s.limit - (s.usage - s.resident) >= 0.95 * 2 * HOT]
        assert followed and followed[0] <= 8, (
            f"the limit did not follow the doubled hot set within 8 intervals ({_trace(after)})"
        )
        assert abs(_settled(after) - 2 * HOT) <= 0.15 * 2 * HOT
        doubled = _relative_rate(workload, WINDOW, control)
    finally:
        ctl.close()
        for v in workload:
            v.exec(f"echo {HOT} > {PHASE}")
    assert statistics.median(x.refaulted for x in samples[-6:]) <= 0.01 * 2 * HOT, _trace(samples[n_before:])
    assert doubled >= SPEED_TOLERANCE * baseline, (
        f"slowdown did not recover after the phase change: {doubled:.3f} vs {baseline:.3f} of the twin's speed "
        f"(wss/limit/usage/refaulted MiB, cap hits: {_trace(samples[n_before:])})"
    )
    assert vm.memcg().limit() >= 1 << 60, "closing the controller must lift the VM's limit"
    res = vm.exec(f"datacheck verify --state {DATACHECK}", timeout=120)
    assert res.rc == 0 and res.text.startswith("OK"), f"data changed after compression: {res.text}"


def test_a_cap_below_the_working_set_stalls_the_guest_but_never_kills_it(
    workload: tuple[VM, VM], tier: tiers.Tiers
) -> None:
    """A static cap far below what the guest touches (an operator's mistake): the kernel would
    OOM-kill QEMU under a hard limit; memvirt's cap only makes it wait, and lifting it lets it go on."""
    vm = workload[1]
    group = vm.memcg()
    ctl = Controller([vm], Policy("static", limit=HOT), interval=1.0, method="referenced")
    try:
        ctl.run(6)
        assert vm.alive(), "QEMU was killed under the cap"
    finally:
        ctl.close()
    n0 = int(vm.exec(f"cat {COUNTER}", timeout=120).check("counter").text)
    deadline = time.monotonic() + 60
    while int(vm.exec(f"cat {COUNTER}").check("counter").text) <= n0:
        assert time.monotonic() < deadline, "the workload did not go on within 60 s of lifting the cap"
        time.sleep(1)
    res = vm.exec(f"datacheck verify --state {DATACHECK}", timeout=120)
    assert res.rc == 0 and res.text.startswith("OK"), res.text
    assert "oom_kill_disable 0" in (group.path / "memory.oom_control").read_text() if group.version == 1 else True


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_controller_leaves_the_host_as_it_was(workload: tuple[VM, VM], how: signal.Signals) -> None:
    """``memvirt compress`` killed mid-run (SIGTERM: it unwinds; SIGKILL: its watchdog does it):
    no cap left, kdamonds as before (memvirt's own gone, another tool's untouched), and the zram
    tier the command set up itself taken down: the host's swap is as it was."""
    vm = workload[1]
    group = vm.memcg()
    before_swap, before_damon = _host_swap_state(), damon.kdamonds()
    uses_damon = damon.unavailable_reason() is None
    proc = subprocess.Popen(
        [sys.executable, "-m", "memvirt", "compress", vm.name, "--policy", "static", "--limit", "700M"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while group.limit() >= 1 << 60 or (uses_damon and damon.kdamonds() == before_damon):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.2)
        assert group.limit() == 700 * MIB
        assert _host_swap_state() != before_swap, "compress did not set up its zram tier"
    finally:
        proc.send_signal(how)
        proc.wait(120)
    deadline = time.monotonic() + 120
    while group.limit() < 1 << 60 or damon.kdamonds() != before_damon or _host_swap_state() != before_swap:
        assert time.monotonic() < deadline, (
            f"after {how.name}: limit {group.limit()}, kdamonds {damon.kdamonds()} (before {before_damon}), "
            f"swap {_host_swap_state()} (before {before_swap})"
        )
        time.sleep(0.2)
    assert vm.exec("true").rc == 0
    if how == signal.SIGTERM:
        assert proc.returncode in (0, 143), proc.stderr.read() if proc.stderr else ""


def test_damon_in_use_by_another_tool_is_refused(workload: tuple[VM, VM]) -> None:
    """memvirt never takes DAMON from its holder: ``Damon`` and ``--method damon`` refuse with one
    line naming it, ``auto`` falls back to referenced bits, and the holder is left as it was.
    Where DAMON is free, memvirt's own first instance plays the other tool."""
    from memvirt.compress.controller import choose_method

    with ExitStack() as stack:
        if damon.holder() is None:
            _needs_damon()
            first = stack.enter_context(damon.Damon(1))
            first.set_frames(0, [0x1000])
            first.start()
        holder = damon.holder()
        assert holder is not None
        before = damon.kdamonds()
        with pytest.raises(UsageError, match=f"DAMON held by another tool: kdamond {holder.index} pid {holder.pid}"):
            damon.Damon(1)
        assert choose_method("auto")[0] == "referenced"
        assert f"kdamond {holder.index} pid {holder.pid}" in (choose_method("auto")[1] or "")
        assert_one_line_error(
            memvirt("wss", workload[0].name, "--method", "damon", "--duration", "2"),
            2,
            f"kdamond {holder.index} pid {holder.pid}",
        )
        proc = memvirt("wss", workload[0].name, "--duration", "2", "--json")
        assert proc.returncode == 0, proc.stderr
        assert "memvirt: notice: working set from referenced bits, not DAMON" in proc.stderr
        assert json.loads(proc.stdout)["method"] == "referenced"
        assert damon.kdamonds() == before, "memvirt changed a kdamond it did not start"
    if damon.holder() is None:
        assert int(Path(damon.KDAMONDS / "nr_kdamonds").read_text()) == 0


def test_compress_cli_errors() -> None:
    assert_one_line_error(memvirt("compress", "no-such-vm", "--duration", "1"), 2, "no VM named")
    assert_one_line_error(memvirt("compress", "x", "--policy", "static"), 2, "--limit")
    assert_one_line_error(memvirt("compress", "x", "--margin", "lots"), 2, "percentage")
    assert_one_line_error(memvirt("wss", "x", "--method", "psychic"), 2, "--method")


def _decider(policy: Policy) -> tuple[Controller, Callable[..., tuple[int, str]]]:
    """The adaptive policy's decision step alone, over made-up measurements (no VM needed)."""
    from memvirt.compress.controller import _VMState
    from memvirt.compress.wss import Estimate
    from memvirt.qemu.vm import VMConfig

    ctl = Controller.__new__(Controller)
    ctl.policy = policy
    st = _VMState(VM(VMConfig(name="unit", memory=1 << 30)), None, None)  # type: ignore[arg-type]

    def decide(
        wss: int,
        resident: int,
        usage: int,
        limit: int,
        refaulted: int = 0,
        ratio: float | None = 2.0,
        fill: float = 0.5,
        swapped: int = 0,
        share: int = 1 << 62,
        stall: float = 0.0,
        oom: bool = False,
        hits: int = 0,
    ) -> tuple[int, str]:
        st.limit = limit
        est = Estimate(0.0, wss, resident, swapped, resident + swapped, "unit")
        return ctl._decide(st, est, usage, refaulted, ratio, fill, share, stall, oom, hits)

    decide.state = st  # type: ignore[attr-defined]
    return ctl, decide


def test_policy_backs_off_fast_and_shrinks_slowly() -> None:
    _, decide = _decider(Policy("adaptive", margin=0.10))
    overhead = 60 * MIB
    # Unlimited, working set 100 MiB of 900 MiB resident: shrink, but by at most a quarter of RAM.
    limit, action = decide(100 * MIB, 900 * MIB, 900 * MIB + overhead, 1 << 62)
    assert action == "shrink" and limit == 900 * MIB + overhead - 256 * MIB
    # Close to the target: straight to working set + margin + QEMU's own memory + headroom.
    limit, action = decide(100 * MIB, 200 * MIB, 200 * MIB + overhead, 300 * MIB)
    assert action == "shrink" and limit == overhead + 110 * MIB + 8 * MIB
    # Refaults: up at once by twice what came back, then held for three intervals.
    limit, action = decide(100 * MIB, 100 * MIB, 160 * MIB, 170 * MIB, refaulted=40 * MIB)
    assert action == "back off" and limit >= 170 * MIB + 80 * MIB
    for _ in range(3):
        held, action = decide(100 * MIB, 100 * MIB, 160 * MIB, limit)
        assert (held, action) == (limit, "hold")
    assert decide(100 * MIB, 100 * MIB, 160 * MIB, limit)[1] == "shrink"
    # The working set grew past the limit: raised at once.
    limit, action = decide(300 * MIB, 180 * MIB, 240 * MIB, 250 * MIB)
    assert action == "grow" and limit >= 300 * MIB * 1.1 + overhead
    # Compression that does not pay, or a full zram, stops the shrinking.
    assert decide(100 * MIB, 500 * MIB, 560 * MIB, 600 * MIB, ratio=1.1, swapped=100 * MIB)[1].startswith("hold: ratio")
    assert decide(100 * MIB, 500 * MIB, 560 * MIB, 600 * MIB, fill=0.97)[1] == "hold: zram full"
    assert decide(100 * MIB, 500 * MIB, 560 * MIB, 600 * MIB, stall=20.0)[1].startswith("hold: memory stalls")
    # A nearly full tier is shared: over its share a VM stops, under it a VM goes on.
    assert (
        decide(100 * MIB, 500 * MIB, 560 * MIB, 600 * MIB, fill=0.85, swapped=300 * MIB, share=200 * MIB)[1]
        == "hold: over its zram share"
    )
    assert (
        decide(100 * MIB, 500 * MIB, 560 * MIB, 600 * MIB, fill=0.85, swapped=100 * MIB, share=200 * MIB)[1] == "shrink"
    )
    # Tiny changes are not worth a reclaim pass.
    assert decide(100 * MIB, 100 * MIB, 160 * MIB, 179 * MIB)[1] == "steady"
    # A guest stuck at its cap looks idle (it touches nothing) but keeps hitting the cap: pressure.
    decide.state.last_wss = 190 * MIB  # type: ignore[attr-defined]
    assert decide(2 * MIB, 150 * MIB, 213 * MIB, 213 * MIB, hits=5000)[1] == "back off: stuck at the limit"
    decide.state.last_wss = 0  # type: ignore[attr-defined]
    # Tasks waiting at the cap: up by a quarter of RAM at once.
    assert decide(100 * MIB, 100 * MIB, 160 * MIB, 160 * MIB, oom=True) == (416 * MIB, "back off: stuck at the limit")


def test_policy_cuts_no_more_than_the_host_pages_out_in_an_interval() -> None:
    """Lowering a cap reclaims synchronously: once the host's pace is known, a cut is what it
    pages out in about two intervals, so the controller is never held long (nested hosts: ~10 MB/s)."""
    ctl, decide = _decider(Policy("adaptive", margin=0.10))
    ctl.interval = 1.0
    overhead = 60 * MIB
    decide.state.reclaim_rate = 20 * MIB  # type: ignore[attr-defined]
    limit, action = decide(100 * MIB, 900 * MIB, 900 * MIB + overhead, 1 << 62)
    assert action == "shrink" and limit == 900 * MIB + overhead - 40 * MIB
    decide.state.reclaim_rate = 1 * MIB  # type: ignore[attr-defined]
    limit, action = decide(100 * MIB, 900 * MIB, 900 * MIB + overhead, 1 << 62)
    deadband = (1 << 30) // 100
    assert action == "shrink" and limit == 900 * MIB + overhead - 2 * deadband, "a cut is never lost in the deadband"


def test_static_and_none_policies_never_move_the_limit() -> None:
    _, decide = _decider(Policy("static", limit=300 * MIB))
    assert decide(500 * MIB, 500 * MIB, 560 * MIB, 300 * MIB, refaulted=100 * MIB) == (300 * MIB, "static")
    _, decide = _decider(Policy("none"))
    assert decide(100 * MIB, 900 * MIB, 960 * MIB, 1 << 62) == (1 << 62, "measure")
    with pytest.raises(UsageError, match="--limit"):
        Policy("static")
