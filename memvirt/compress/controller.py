"""The compression controller: keep each VM's resident memory near its working set plus a margin.

Each interval, per VM: estimate the working set (:mod:`memvirt.compress.wss`), read how much
the VM faulted back from swap (its memory cgroup's refault counter), and move the cgroup's
memory limit. The host kernel does the paging: lowering the limit makes it reclaim the VM's
least recently used pages into the swap tiers (zram first), so the choice of cold pages is the
kernel's page-granular LRU, not a guess from samples. The policies:

* ``adaptive``: target = QEMU's own memory + working set x (1 + margin). Refaults above a
  small floor mean the limit cut into the working set: the limit goes up at once by twice what
  was refaulted and stays there for a few intervals (back off fast, shrink slowly). Growth of
  the working set raises the limit at once; shrinking moves at most a quarter of the VM's RAM
  per interval, and not again below a limit that caused refaults (for a while, or until the
  working set really shrinks). Shrinking also stops while compression does not pay (zram's ratio below
  ``min_ratio``, Gatun's benefit test), while the VM stalls on memory (cgroup v2 PSI), when
  the compressed tier is full, and, once it is 80 % full, for a VM holding more than its equal
  share of it (the tier is shared fairly).
* ``static``: one fixed limit, the common operator practice the bench compares against.
* ``none``: measure only.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from memvirt.compress import damon as damon_mod
from memvirt.compress import tiers, watchdog
from memvirt.compress.damon import Damon
from memvirt.compress.wss import DamonTracker, Estimate, ReferencedTracker, Tracker
from memvirt.errors import MemvirtError, UsageError
from memvirt.memory.source import PAGE_SIZE
from memvirt.procs import end_watchdog
from memvirt.qemu.memcg import UNLIMITED, MemCgroup
from memvirt.qemu.vm import VM

POLICIES = ("adaptive", "static", "none")
METHODS = ("auto", "damon", "referenced")
PRESSURE_FLOOR = 2 << 20
"""Refaults per interval below this (and below 2 % of the working set) are noise, not pressure."""
HOLD_INTERVALS = 3
SAMPLES_PER_INTERVAL = 4
"""DAMON checks each watched page this often per interval. One check already covers all the
time since the last (it tests and clears the accessed bit), so more checks only refine how
often a page was used, at a cost in the guest's speed."""
FLOOR_MEMORY = 30
"""A limit that caused refaults is not approached again (within the margin) for this many
intervals, unless the working set shrinks by a fifth: no cycling between cut and back-off."""
HEADROOM = 8 << 20
DEADBAND = 2 << 20
"""Limit changes smaller than this (or 1 % of the VM's RAM) are not worth a reclaim pass."""
ZRAM_FULL = 0.95
ZRAM_FAIR = 0.80
"""Past this fill of zram's RAM cap, a VM holding more than its equal share of the tier stops
shrinking, so the last part of the tier goes to the VMs below their share."""
PSI_HOLD = 5.0
"""Percent of the last 10 s the VM's tasks stalled on memory (cgroup v2 PSI) above which it
stops shrinking."""


@dataclass
class Policy:
    name: str = "adaptive"
    margin: float = 0.10
    limit: int | None = None
    min_ratio: float = 1.3
    shrink_step: float = 0.25

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise UsageError(f"--policy must be one of {', '.join(POLICIES)}, not {self.name!r}")
        if self.name == "static" and not self.limit:
            raise UsageError("--policy static needs --limit SIZE (the VM's resident memory cap)")
        if not 0 <= self.margin <= 10:
            raise UsageError("--margin must be between 0% and 1000%")


@dataclass
class Sample:
    """One interval of one VM (bytes; ``limit`` 0 = none)."""

    t: float
    vm: str
    wss: int
    resident: int
    swapped: int
    usage: int
    limit: int
    refaulted: int
    action: str
    ratio: float | None = None
    cap_hits: int = 0
    """Times the VM ran into its cap this interval (each one a reclaim in QEMU's own time)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _VMState:
    vm: VM
    group: MemCgroup
    tracker: Tracker
    refaults: int = 0
    limit: int = UNLIMITED
    hold: int = 0
    floor: int = UNLIMITED
    floor_age: int = 0
    cap_hits: int = 0
    last_wss: int = 0
    reclaim_rate: float | None = None
    """Bytes per second the host paged out of this VM's group when its cap last went down."""
    samples: list[Sample] = field(default_factory=list)


def _group(vm: VM) -> MemCgroup:
    group = vm.memcg()
    if group is None:
        raise UsageError(
            f"VM {vm.name!r} has no memory cgroup of its own (the host offered no memory controller "
            "when it started), so its memory can't be limited"
        )
    return group


def choose_method(method: str) -> tuple[str, str | None]:
    """The tracker to use and, when ``auto`` could not have DAMON, why (a one-line notice).

    ``damon`` asked for on a host where memvirt can't have it is an error naming the other user:
    memvirt never stops or reconfigures a kdamond it did not start.
    """
    if method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    if method == "referenced":
        return method, None
    reason = damon_mod.unavailable_reason()
    if reason is None:
        return "damon", None
    if method == "damon":
        raise UsageError(
            f"--method damon: {reason}; memvirt never stops or reconfigures another tool's kdamond "
            "(use --method referenced)"
        )
    return "referenced", f"working set from referenced bits, not DAMON: {reason}"


class Controller:
    """Tracks and (per ``policy``) limits a set of running VMs; :meth:`run` is the loop."""

    def __init__(
        self,
        vms: list[VM],
        policy: Policy,
        interval: float = 1.0,
        method: str = "auto",
        samples: int = 4096,
        owns_tier: bool = False,
    ):
        """``owns_tier``: the caller set up the zram tier for this run; :meth:`close` takes it down
        (its pages come back into RAM), as the watchdog does if this process is killed."""
        if interval < 0.2:
            raise UsageError("--interval must be at least 0.2 s")
        if not vms:
            raise UsageError("name at least one VM")
        self.policy, self.interval = policy, interval
        self.owns_tier = owns_tier
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._cpu0 = time.process_time()
        self.method, self.method_notice = choose_method(method)
        for vm in vms:
            vm.require_alive()
            if vm.is_template:
                raise UsageError(f"VM {vm.name!r} is a frozen template: its memory backs clones, compress those")
        groups = [_group(vm) for vm in vms] if policy.name != "none" else [vm.memcg() for vm in vms]
        self.damon: Damon | None = None
        self.states: list[_VMState] = []
        # Each group's cap as found (an operator's own, or none) is what comes back at the end.
        self._found = {str(g.path): g.limit() for g in groups if g is not None}
        limited = [f"{g.path}={self._found[str(g.path)]}" for g in groups if g is not None and policy.name != "none"]
        kdamonds = len(vms) if self.method == "damon" else 0
        # The watchdog is up before anything it undoes exists: no window where a kill leaves a cap,
        # a kdamond or the tier behind.
        self._watchdog = watchdog.spawn(limited, kdamonds, owns_tier) if (limited or kdamonds or owns_tier) else None
        try:
            if kdamonds:
                us = int(interval * 1e6)
                self.damon = Damon(kdamonds, sample_us=max(us // SAMPLES_PER_INTERVAL, 5000), aggr_us=us)
            for i, (vm, group) in enumerate(zip(vms, groups, strict=True)):
                tracker: Tracker = (
                    DamonTracker(vm, self.damon, i, samples, seed=i) if self.damon else ReferencedTracker(vm)
                )
                tracker.start()
                st = _VMState(vm, group, tracker)  # type: ignore[arg-type]
                if group is not None:
                    st.refaults = group.counters()[0]
                    st.limit = group.limit()
                    st.cap_hits = group.cap_hits()
                self.states.append(st)
            if self.damon:
                self.damon.start()
        except BaseException:
            self.close()
            raise

    def _zram(self) -> tuple[float | None, float, int]:
        """(compression ratio, fill as a share of its RAM cap, fair share per VM in uncompressed
        bytes) of memvirt's compressed tier."""
        t = tiers.load()
        if t is None or not t.zram:
            return None, 0.0, UNLIMITED
        st = tiers.zram_stats(t.zram)
        ratio = st["orig_data_size"] / st["compr_data_size"] if st["compr_data_size"] else None
        cap = st["mem_limit"] or t.mem_limit
        fill = st["mem_used_total"] / cap if cap else 0.0
        capacity = min(t.disksize, int(cap * (ratio or 1.0))) if cap else t.disksize
        return ratio, fill, capacity // max(len(self.states), 1)

    def _decide(
        self,
        st: _VMState,
        est: Estimate,
        usage: int,
        refaulted: int,
        ratio: float | None,
        fill: float = 0.0,
        share: int = UNLIMITED,
        stall: float = 0.0,
        oom: bool = False,
        hits: int = 0,
    ) -> tuple[int, str]:
        p = self.policy
        if p.name == "none":
            return st.limit, "measure"
        if p.name == "static":
            return int(p.limit or 0), "static"
        overhead = max(0, usage - est.resident)
        target = overhead + int(est.wss * (1 + p.margin)) + HEADROOM
        collapsed = est.wss < st.last_wss / 2
        at_cap = usage >= min(st.limit, UNLIMITED) - max(DEADBAND, st.vm.config.memory // 100)
        if oom or collapsed and (at_cap or hits * PAGE_SIZE > max(PRESSURE_FLOOR, 0.02 * est.wss)):
            st.hold = HOLD_INTERVALS
            st.floor, st.floor_age = st.limit, 0
            return max(target, st.limit + int(p.shrink_step * st.vm.config.memory)), "back off: stuck at the limit"
        if refaulted > max(PRESSURE_FLOOR, 0.02 * est.wss):
            st.hold = HOLD_INTERVALS
            base = min(st.limit, usage + refaulted)
            st.floor = max(st.floor if st.floor < UNLIMITED else 0, min(st.limit, usage) + refaulted)
            st.floor_age = 0
            return max(target, base + 2 * refaulted), "back off"
        deadband = max(DEADBAND, st.vm.config.memory // 100)
        if target > st.limit:
            return (target, "grow") if target > st.limit + deadband else (st.limit, "steady")
        if st.hold > 0:
            st.hold -= 1
            return st.limit, "hold"
        if ratio is not None and ratio < p.min_ratio and est.swapped > 64 * PAGE_SIZE:
            return st.limit, f"hold: ratio {ratio:.2f} < {p.min_ratio}"
        if fill >= ZRAM_FULL:
            return st.limit, "hold: zram full"
        if fill >= ZRAM_FAIR and est.swapped >= share:
            return st.limit, "hold: over its zram share"
        if stall > PSI_HOLD:
            return st.limit, f"hold: memory stalls {stall:.0f} %"
        st.floor_age += 1
        if st.floor < UNLIMITED and (st.floor_age > FLOOR_MEMORY or target < 0.8 * st.floor):
            st.floor = UNLIMITED
        cut = int(p.shrink_step * st.vm.config.memory)
        if st.reclaim_rate:
            # Lowering a cap reclaims synchronously: a cut the host can't page out within about
            # two intervals would hold the controller (and a guest that starts to grow) that long.
            # Nested hosts page out at ~10 MB/s, so this matters there.
            deadband = max(DEADBAND, st.vm.config.memory // 100)
            cut = min(cut, max(2 * deadband, int(2 * st.reclaim_rate * self.interval)))
        step_floor = min(st.limit, usage) - cut
        known_low = int(st.floor * (1 + p.margin)) if st.floor < UNLIMITED else 0
        new = max(target, step_floor, known_low)
        return (new, "shrink") if new < st.limit - deadband else (st.limit, "steady")

    def step(self) -> list[Sample]:
        """One interval for every VM (their trackers measure in turn, each over ``interval``/n)."""
        out = []
        share = self.interval / len(self.states) if self.method == "referenced" else self.interval
        slept = False
        ratio, fill, fair = self._zram()
        for st in self.states:
            est = st.tracker.measure(share if (self.method == "referenced" or not slept) else 0.0)
            slept = True
            usage, refaulted, stall, oom, hits = est.resident, 0, 0.0, False, 0
            if st.group is not None:
                oom = st.group.under_oom()
                total_hits = st.group.cap_hits()
                hits, st.cap_hits = total_hits - st.cap_hits, total_hits
                usage = st.group.usage()
                refaults, _ = st.group.counters()
                refaulted, st.refaults = (refaults - st.refaults) * PAGE_SIZE, refaults
                stall = st.group.stall()
            limit, action = self._decide(st, est, usage, refaulted, ratio, fill, fair, stall, oom, hits)
            st.last_wss = max(est.wss, st.last_wss // 2)
            if st.group is not None and limit != st.limit:
                t0 = time.monotonic()
                try:
                    st.group.set_limit(None if limit >= UNLIMITED else limit)
                except MemvirtError as e:
                    action = f"{action} refused: {e}"
                    limit = st.group.limit()
                took = time.monotonic() - t0
                if limit < usage and took > 0.05:
                    freed = max(0, usage - st.group.usage())
                    rate = freed / took
                    st.reclaim_rate = rate if st.reclaim_rate is None else 0.5 * (st.reclaim_rate + rate)
                st.limit = limit
            s = Sample(
                round(est.t, 3),
                st.vm.name,
                est.wss,
                est.resident,
                est.swapped,
                usage,
                0 if st.limit >= UNLIMITED else st.limit,
                refaulted,
                action,
                ratio,
                hits,
            )
            st.samples.append(s)
            out.append(s)
        return out

    def run(
        self,
        duration: float | None = None,
        on_sample: Callable[[list[Sample]], None] | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> None:
        t0 = time.monotonic()
        while duration is None or time.monotonic() - t0 < duration:
            if stop is not None and stop():
                break
            batch = self.step()
            if on_sample is not None:
                on_sample(batch)

    def cpu_seconds(self) -> float:
        """CPU the controller used: this process plus its kdamonds."""
        own = time.process_time() - self._cpu0
        return own + (self.damon.cpu_seconds() if self.damon else 0.0)

    def close(self, release: bool = True) -> None:
        """Stop tracking; with ``release``, put each VM's cap back as it was found (none, or an
        operator's own); cold pages stay compressed until touched, unless this run owns the tier:
        then it is taken down and they come back now."""
        for st in self.states:
            st.tracker.close()
            if release and st.group is not None and self.policy.name != "none":
                found = self._found.get(str(st.group.path), UNLIMITED)
                try:
                    st.group.set_limit(None if found >= UNLIMITED else found)
                except MemvirtError:
                    pass
        if self.damon is not None:
            self.damon.close()
            self.damon = None
        try:
            if self.owns_tier:
                self.owns_tier = False
                tiers.down()
        finally:
            end_watchdog(self._watchdog)
            self._watchdog = None

    def summary(self) -> list[dict[str, Any]]:
        """Per VM: resident at start and at the end, least and mean resident, working set, refaults."""
        out = []
        for st in self.states:
            s = st.samples
            if not s:
                continue
            out.append(
                {
                    "vm": st.vm.name,
                    "intervals": len(s),
                    "resident_first": s[0].resident,
                    "resident_last": s[-1].resident,
                    "resident_mean": sum(x.resident for x in s) // len(s),
                    "swapped_last": s[-1].swapped,
                    "wss_last": s[-1].wss,
                    "refaulted_total": sum(x.refaulted for x in s),
                    "back_offs": sum(x.action == "back off" for x in s),
                }
            )
        return out
