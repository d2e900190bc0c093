"""``reclaim``: give the host the memory behind pages the guest holds free, race-free.

One pass: a live census finds the free buddy blocks the host still backs; then, in pauses kept
under a budget (default 20 ms per GiB of guest), the guest is stopped, the zone locks checked,
each candidate block re-verified against the guest's struct pages, the still-free part
discarded, and the guest resumed. The budget is kept by sizing each batch from the measured cost
per page; pauses are spaced so the guest runs at least as long as it was held. Each pause is
marked (:mod:`memvirt.dedup.watchdog`), and a watchdog resumes the guest if this process dies
inside one: by default one per pass, started here; a long-lived caller (memvirtd) passes
``mark`` in a folder its own watchdog guards, so a pass starts no process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from memvirt.dedup import watchdog
from memvirt.dedup.discard import Discarder, discarder_for
from memvirt.dedup.freepages import FreeBlocks, FreePageOracle
from memvirt.errors import MemvirtError, UsageError, VMError
from memvirt.introspect import Introspector, buildcache
from memvirt.introspect.census import Census
from memvirt.introspect.layout import LayoutMissing
from memvirt.procs import end_watchdog
from memvirt.qemu.monitor import Monitor
from memvirt.qemu.vm import vm_memory

GOAL_MS_PER_GIB = 20.0
MIN_BUDGET_MS = 4.0
LOCK_RETRIES = 50
FIRST_COST_US = {"FileHoles": 4.0, "AnonDontneed": 0.5}
"""Assumed discard cost per populated page (µs) before the first batch is measured."""


@dataclass
class ReclaimPass:
    """What one pass did and what it cost the guest."""

    free_pages: int = 0
    candidate_pages: int = 0
    """Free pages the host still backs, found by the live scan."""
    verified_pages: int = 0
    """Pages of the blocks still free at their pause, discarded (holes among them included)."""
    gone_pages: int = 0
    """Pages of candidate blocks the guest had allocated (or merged) by their pause: left alone."""
    resident_before: int = 0
    resident_after: int = 0
    pauses_ms: list[float] = field(default_factory=list)
    """How long the guest's CPUs were stopped, from QEMU's STOP and RESUME event times."""
    wall_ms: list[float] = field(default_factory=list)
    """From sending ``stop`` to the answer to ``cont``: the pause plus QMP round trips."""
    lock_retries: int = 0
    budget_ms: float = 0.0
    seconds: float = 0.0

    @property
    def reclaimed_bytes(self) -> int:
        return self.resident_before - self.resident_after

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("pauses_ms")
        d.pop("wall_ms")
        p = self.pauses_ms or [0.0]
        d.update(
            wall_max_ms=round(max(self.wall_ms or [0.0]), 2),
            reclaimed_bytes=self.reclaimed_bytes,
            pauses=len(self.pauses_ms),
            pause_max_ms=round(max(p), 2),
            pause_total_ms=round(sum(p), 2),
            pause_mean_ms=round(float(np.mean(p)), 2),
            budget_ms=round(self.budget_ms, 2),
            seconds=round(self.seconds, 3),
        )
        return d


class Reclaimer:
    """Reclaims free pages of one running VM; bootstraps introspection once, then runs passes."""

    def __init__(
        self,
        vm,
        goal_ms_per_gib: float = GOAL_MS_PER_GIB,
        mark: Path | None = None,
        shelf: Any = None,
    ):
        """``mark``: where to mark pauses, in a folder a watchdog of the caller's already guards;
        None: ``VM_DIR/reclaim.paused`` with a watchdog per pass. ``shelf``: bootstraps shared
        with other VMs of this process (:class:`memvirt.introspect.buildcache.Shelf`)."""
        vm.require_alive()
        self.vm = vm
        self.mark = mark if mark is not None else vm.dir / watchdog.MARK
        self._own_watchdog = mark is None
        self.shelf = shelf
        self.mem = vm_memory(vm)
        self.discarder: Discarder = discarder_for(vm, self.mem)
        self.intro = Introspector(self.mem) if shelf is None else Introspector(self.mem, shelf=shelf)
        try:
            self.oracle = FreePageOracle(self.intro)
        except LayoutMissing:
            self.intro = _full_introspector(self.mem, shelf)
            self.oracle = FreePageOracle(self.intro)
        self.budget_ms = max(MIN_BUDGET_MS, goal_ms_per_gib * self.mem.ram_size / (1 << 30))
        self.cost_us = FIRST_COST_US.get(type(self.discarder).__name__, 1.0)
        self.overhead_ms = 3.0
        self._poison_checked = False
        self._scans = 0

    def close(self) -> None:
        self.discarder.close()
        self.mem.close()

    def __enter__(self) -> Reclaimer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def candidates(self) -> tuple[FreeBlocks, FreeBlocks, np.ndarray]:
        """All buddy blocks, those the host still backs, and the per-frame populated mask."""
        _, free = self.scan()
        populated = self.discarder.populated()
        if not self._poison_checked:
            self.oracle.check_no_poisoning(free, populated)
            self._poison_checked = True
        csum = np.concatenate(([0], np.cumsum(populated, dtype=np.int64)))
        ends = np.minimum(free.heads + free.sizes, len(populated))
        backed = csum[ends] - csum[free.heads]
        cand = free.take(backed > 0)
        self.oracle.still_free(cand.take(slice(0, 64)))
        return free, cand, backed[backed > 0]

    def scan(self) -> tuple[Census, FreeBlocks]:
        """A live census and its buddy blocks; from the second on, on the shelf's bootstrap."""
        if self._scans and self.shelf is not None and not self.intro.cached:
            self._from_shelf()
        self._scans += 1
        return self.oracle.scan()

    def _from_shelf(self) -> None:
        """Trade the full bootstrap (kallsyms, BTF) for the shelf's entry its first census left,
        checked against this guest as any other's; keep the full one if that fails."""
        try:
            intro = Introspector(self.mem, shelf=self.shelf)
            oracle = FreePageOracle(intro) if intro.cached else None
        except (LayoutMissing, MemvirtError):
            oracle = None
        if oracle is not None:
            self.intro, self.oracle = intro, oracle
        else:
            self.shelf = None  # this guest's build cannot be shared: don't try every pass

    def run(self, progress: Callable[[int, int], None] | None = None) -> ReclaimPass:
        """One pass over the guest's free memory."""
        t0 = time.perf_counter()
        rep = ReclaimPass(budget_ms=self.budget_ms, resident_before=self.discarder.resident())
        free, cand, backed = self.candidates()
        rep.free_pages, rep.candidate_pages = free.pages, int(backed.sum())
        dog = watchdog.spawn(self.mark) if len(cand) and self._own_watchdog else None
        try:
            self._batches(cand, backed, rep, progress)
        finally:
            end_watchdog(dog)
        rep.resident_after = self.discarder.resident()
        rep.seconds = time.perf_counter() - t0
        return rep

    def _batches(
        self, cand: FreeBlocks, backed: np.ndarray, rep: ReclaimPass, progress: Callable[[int, int], None] | None
    ) -> None:
        """The pass's pauses, batch by batch, over one QMP connection."""
        done = 0
        with self.vm.monitor() as mon:
            i = 0
            while i < len(cand):
                room = max(0.8 * self.budget_ms - self.overhead_ms, 0.5) * 1000 / self.cost_us
                j = i + max(1, int(np.searchsorted(np.cumsum(backed[i:]), room, side="right")))
                self._batch(mon, cand.take(slice(i, j)), int(backed[i:j].sum()), rep)
                done += int(backed[i:j].sum())
                if progress:
                    progress(done, rep.candidate_pages)
                i = j

    def _batch(self, mon: Monitor, blocks: FreeBlocks, backed: int, rep: ReclaimPass) -> None:
        """One pause: stop, re-verify, discard, continue; then let the guest run as long."""
        for _ in range(LOCK_RETRIES):
            t = time.perf_counter()
            spent, still = 0.0, None
            hold = self.vm.hold_pauses()  # a migration's switch-over must not be resumed by this batch
            try:
                watchdog.mark_paused(self.mark, self.vm)
                mon.command("stop")
            except BaseException:
                os.close(hold)
                raise
            try:
                if self.oracle.locks_free():
                    still = self.oracle.still_free(blocks)
                    starts, ends = still.runs()
                    td = time.perf_counter()
                    with self.discarder.session():
                        self.discarder.discard(starts, ends)
                    spent = time.perf_counter() - td
            finally:
                try:
                    mon.command("cont")
                    watchdog.unmark(self.mark)
                finally:
                    os.close(hold)
                wall = (time.perf_counter() - t) * 1000
                pause = _event_pause_ms(mon, wall)
                rep.pauses_ms.append(pause)
                rep.wall_ms.append(wall)
            time.sleep(wall / 1000)
            if still is None:
                rep.lock_retries += 1
                continue
            rep.verified_pages += still.pages
            rep.gone_pages += blocks.pages - still.pages
            if backed:
                self.cost_us = max(0.5 * self.cost_us, spent * 1e6 / backed, 0.01)
            self.overhead_ms = max(0.5 * self.overhead_ms, pause - spent * 1000, 0.5)
            return
        raise VMError(f"the guest held a zone lock at {LOCK_RETRIES} pauses in a row: try again")


def _event_pause_ms(mon: Monitor, fallback: float) -> float:
    """Milliseconds between QEMU's STOP and RESUME events (its own clock), else ``fallback``."""
    stop, resume = mon.wait_event("STOP", 1.0), mon.wait_event("RESUME", 1.0)
    if not stop or not resume:
        return fallback

    def at(ev: dict) -> float:
        return ev["timestamp"]["seconds"] + ev["timestamp"]["microseconds"] / 1e6

    return (at(resume) - at(stop)) * 1000


def _full_introspector(mem, shelf: Any = None) -> Introspector:
    """An introspector with every layout source, for facts a cached bootstrap did not record
    (the zone lock); refuses with a clear message when the kernel really lacks them. With a
    ``shelf``, what it uses is recorded there (for the next VM of its build)."""
    try:
        intro = Introspector(mem, cache=False) if shelf is None else Introspector(mem, shelf=buildcache.NoLoad(shelf))
        FreePageOracle(intro)
    except LayoutMissing as e:
        raise UsageError(f"cannot find the guest's zone locks, so free pages cannot be re-verified: {e}") from e
    return intro
