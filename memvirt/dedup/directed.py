"""Directed KSM: ksmd scans only the guest pages that have a twin somewhere.

Blind KSM walks every page of every mergeable area, free or not, duplicate or not, and merges a
page only after it saw it unchanged twice. memvirt knows more: which guest pages are free (the
census; reclaim gives them back, so they are absent and cost ksmd nothing) and, by fingerprinting
every page in use of every guest (XXH3 in C), which contents occur more than once. One refresh:

1. reclaim: free pages discarded (race-safe, :mod:`memvirt.dedup.reclaim`);
2. per guest, the pages the host backs and the guest does not hold free are hashed: only those
   written since the last refresh (the dirty tracker, :mod:`memvirt.qemu.dirty`) or not hashed
   before; every one where the tracker is refused (one line in :attr:`DirectedKsm.notices`);
3. candidates: pages whose hash occurs twice or more across all guests (zero pages included,
   they merge with the zero page), plus every page QEMU maps but not exclusively (already a KSM
   page or the zero page: unmarking those would break their sharing);
4. candidate runs, the gaps between them closed smallest first down to ``max_ranges`` runs per
   guest, are made ``MADV_MERGEABLE`` and the rest ``MADV_UNMERGEABLE``, inside QEMU
   (:func:`memvirt.qemu.remote.remote_madvise`: ``process_madvise`` from outside accepts only
   COLD, PAGEOUT, WILLNEED and COLLAPSE on Linux 6.18, so the advice runs in a borrowed QEMU
   thread on its own pidfd, 1024 ranges a call). Only what changed since the last refresh is
   advised again;
5. ``pages_to_scan`` is set so one pass over the mergeable pages takes ``pass_seconds``, capped
   by the ksmd CPU budget (:class:`memvirt.dedup.ksm.Pacer`).

``MADV_UNMERGEABLE`` unmerges (copies) KSM pages in its range, so it is never applied where the
mapping is shared (step 3); a page that merges between the pagemap read and the advice is copied
back, which costs memory, never data. QEMU marked its whole RAM mergeable (``mem-merge=on``):
on every way out (``close``, Ctrl-C, SIGTERM; after SIGKILL a watchdog, ``python -m
memvirt.dedup.directed``) the whole RAM is made mergeable again, which also joins the split VMAs
back into one. KSM's settings are borrowed (:mod:`memvirt.borrow`).

Use from the daemon or a script::

    with DirectedKsm(vms, ksmd_cpu=0.015) as d:
        while running:
            d.tick()          # refreshes every refresh_seconds, paces ksmd, returns a sample
            time.sleep(5)
"""

from __future__ import annotations

import io
import math
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from memvirt.borrow import Borrowed
from memvirt.dedup import ksm
from memvirt.dedup.discard import backing_ranges, host_usage
from memvirt.dedup.fingerprint import CHUNK, ZERO_HASH, hash_source
from memvirt.errors import MemvirtError, Unsupported, UsageError, VMError
from memvirt.memory.pagehash import hash_pages
from memvirt.memory.pagemap import PM_PRESENT, PageMap
from memvirt.memory.source import PAGE_SHIFT, GuestMemory
from memvirt.procs import end_watchdog, pid_alive, spawn_watchdog
from memvirt.qemu.dirty import VMWriteTracker
from memvirt.qemu.remote import MADV_MERGEABLE, MADV_UNMERGEABLE, remote_madvise
from memvirt.qemu.vm import vm_memory

PM_EXCLUSIVE = np.uint64(1 << 56)
"""pagemap: the page is mapped by this mapping only (a KSM page or the zero page never is)."""
MAX_RANGES = 2048
"""Mergeable runs per guest: each splits QEMU's RAM mapping into VMAs (vm.max_map_count 65530)."""
PASS_SECONDS = 5.0
"""One KSM pass over the mergeable pages should take this long (a page merges on its second look)."""
REFRESH_SECONDS = 20.0
SPARSE = 8
"""Above 1/SPARSE of the RAM to hash, one sequential pass in 64 MiB chunks; below, the runs only."""
MAX_READS = 4096
SLEEP_MS = 20


@dataclass
class GuestPlan:
    """One guest's part of a refresh (pages)."""

    name: str
    pages: int
    free: int
    backed: int
    hashed: int
    candidates: int
    shared: int
    """Pages QEMU maps but not exclusively (KSM pages, zero page): kept mergeable."""
    mergeable: int
    """Pages in the mergeable runs (candidates plus the small gaps closed between them)."""
    ranges: int
    advised: int
    """Ranges advised at this refresh (what changed since the last)."""
    rehashed: int = 0
    """Pages read and hashed at this refresh (written since the last, or newly in use)."""


@dataclass
class Refresh:
    t: float
    seconds: float
    reclaimed_bytes: int
    candidates: int
    mergeable: int
    pages_to_scan_max: int
    guests: list[GuestPlan] = field(default_factory=list)
    pause_max_ms: float = 0.0
    """Longest guest pause of the reclaim passes."""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["t"], d["seconds"] = round(self.t, 2), round(self.seconds, 3)
        return d


def ram_is_mergeable(pid: int, start: int, size: int) -> bool:
    """Every VMA of ``[start, start + size)`` in process ``pid`` carries ``mg`` (VM_MERGEABLE)."""
    seen, inside = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = start <= lo < start + size
                if inside:
                    seen += hi - lo
            elif inside and head == "VmFlags:" and "mg" not in line.split()[1:]:
                return False
    return seen == size


def closed_runs(mask: np.ndarray, max_runs: int) -> tuple[np.ndarray, np.ndarray]:
    """Runs ``[starts, ends)`` of True in ``mask``, the smallest gaps closed until at most ``max_runs`` remain."""
    d = np.diff(np.concatenate(([0], mask.view(np.int8), [0])))
    starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
    if len(starts) > max_runs > 0:
        gaps = starts[1:] - ends[:-1]
        keep: np.ndarray = (
            np.sort(np.argpartition(gaps, -(max_runs - 1))[-(max_runs - 1) :])
            if max_runs > 1
            else np.zeros(0, dtype=np.int64)
        )
        starts = np.concatenate((starts[:1], starts[1:][keep]))
        ends = np.concatenate((ends[:-1][keep], ends[-1:]))
    return starts, ends


def runs_mask(n: int, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    delta = np.zeros(n + 1, dtype=np.int32)
    np.add.at(delta, starts, 1)
    np.add.at(delta, ends, -1)
    return np.cumsum(delta[:n]) > 0


def advise_detached(
    jobs: list[tuple[int, int, np.ndarray, np.ndarray]], whole: list[tuple[int, int, int]] | None = None
) -> None:
    """Run ``(qemu_pid, advice, host_starts, lengths)`` jobs through the ptrace borrow in a child
    process of its own session, and wait for it.

    A borrow cut short by a SIGKILL while the borrowed thread runs the injected call ends QEMU
    (single-step SIGTRAP, :mod:`memvirt.qemu.remote`), and ``MADV_UNMERGEABLE`` over a large range
    runs for milliseconds: so the borrow lives in a child that a SIGKILL of ``dedup run`` (or a
    Ctrl-C to its process group) does not reach; it finishes its calls and exits. If this process
    is gone by then, the child makes each guest's ``whole`` RAM (``(pid, base, size)``) mergeable
    again itself: the watchdog may have restored it before the child's last advice.
    """
    if not jobs:
        return
    buf = io.BytesIO()
    arrays = {f"j{i}": np.concatenate(([p, a], o, n)).astype(np.int64) for i, (p, a, o, n) in enumerate(jobs)}
    arrays["whole"] = np.array(whole or [], dtype=np.int64).reshape(-1, 3)
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    proc = subprocess.Popen(
        [sys.executable, "-m", "memvirt.dedup.directed", "--advise"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(buf.getvalue())
    except BaseException:
        proc.wait()  # never kill it: a borrow cut short mid-call ends QEMU
        raise
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        raise VMError(lines[-1] if lines else f"the madvise helper failed (exit {proc.returncode})")


def _advise_main() -> None:
    """``--advise``: the jobs of :func:`advise_detached` from stdin."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = os.getppid()
    data = np.load(io.BytesIO(sys.stdin.buffer.read()))
    try:
        for key in sorted((k for k in data.files if k != "whole"), key=lambda k: int(k[1:])):
            j = data[key]
            pid, advice, n = int(j[0]), int(j[1]), (len(j) - 2) // 2
            with remote_madvise(pid, advice) as advise:
                advise(j[2 : 2 + n], j[2 + n :])
        if not pid_alive(parent):
            for pid, base, size in data["whole"].tolist():
                if pid_alive(pid):
                    with remote_madvise(pid, MADV_MERGEABLE) as advise:
                        advise(np.array([base], dtype=np.int64), np.array([size], dtype=np.int64))
    except MemvirtError as e:
        print(e, file=sys.stderr)
        sys.exit(1)


class _Guest:
    """One VM's RAM, its reclaimer and what memvirt last made mergeable."""

    def __init__(self, vm, reclaim: bool):
        from memvirt.dedup.reclaim import Reclaimer
        from memvirt.introspect import Introspector

        self.vm = vm
        self.pid: int = vm.config.pid
        self.rec = Reclaimer(vm) if reclaim else None
        self.mem: GuestMemory = self.rec.mem if self.rec else vm_memory(vm)
        self.intro = self.rec.intro if self.rec else Introspector(self.mem)
        self.base = self.mem.regions[0].offset
        self.size = self.mem.ram_size
        self.pfns = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in self.mem.pfn_ranges()])
        self.mergeable = np.ones(len(self.pfns), dtype=bool)
        """What QEMU set (mem-merge=on: all of it), then what memvirt last advised."""
        self.hashes = np.zeros(len(self.pfns), dtype=np.uint64)
        self.valid = np.zeros(len(self.pfns), dtype=bool)
        """Pages whose hash is of their content now: hashed, not written since."""
        self.tracker: VMWriteTracker | None = None
        self.why_full = ""

    def track(self) -> None:
        """Follow the guest's writes (:mod:`memvirt.qemu.dirty`), or say why every refresh
        hashes every page in use (no WP_ASYNC/PAGEMAP_SCAN, another userfaultfd holds the RAM)."""
        try:
            self.tracker = VMWriteTracker(self.vm)
        except (Unsupported, VMError) as e:
            self.why_full = f"VM {self.vm.name!r}: every page in use hashed at each refresh: {e}"

    def prints(self, want: np.ndarray) -> int:
        """Make ``hashes`` hold the content hash of every page ``want`` marks; returns how many
        pages were read. Only pages written since the last call (and wanted pages never hashed)
        are read. The tracker is scanned *before* reading, so a write racing the read shows up
        at the next call. A merge by KSM or a discard may also be reported as a write (an extra
        re-hash, never a stale hash)."""
        if self.tracker is not None:
            try:
                written = self.tracker.scan()
            except MemvirtError as e:
                self.tracker.close()
                self.tracker = None
                self.why_full = f"VM {self.vm.name!r}: write tracking ended, every page hashed from now on: {e}"
            else:
                i = np.minimum(np.searchsorted(self.pfns, written), len(self.pfns) - 1)
                self.valid[i[self.pfns[i] == written]] = False
        if self.tracker is None:
            self.valid[:] = False
        need = want & ~self.valid
        n = int(need.sum())
        if n > len(need) // SPARSE:
            fp = hash_source(self.mem, skip=~need)
            self.hashes[need] = fp.hashes[need]
        elif n:
            self._hash_runs(need)
        self.valid |= need
        return n

    def _hash_runs(self, need: np.ndarray) -> None:
        """Hash the pages ``need`` marks, reading only their runs (gaps closed down to
        :data:`MAX_READS` reads): :func:`hash_source` reads every 64 MiB chunk with one page
        to hash, so a few scattered writes cost a whole pass (0.58 s against 0.45 s for a full
        one, 1 GiB guest, 1,511 pages written in 20 s)."""
        starts, ends = closed_runs(need, MAX_READS)
        cuts = np.flatnonzero(np.diff(self.pfns) != 1) + 1  # RAM regions: a read stays in one
        per = CHUNK >> PAGE_SHIFT
        buf = np.empty(CHUNK, dtype=np.uint8)
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
            inner = cuts[(cuts > a) & (cuts < b)].tolist()
            for lo, hi in zip([a, *inner], [*inner, b], strict=True):
                for s in range(lo, hi, per):
                    e = min(hi, s + per)
                    view = buf[: (e - s) << PAGE_SHIFT]
                    self.mem.read_into(int(self.pfns[s]) << PAGE_SHIFT, view)
                    m = need[s:e]
                    self.hashes[s:e][m] = hash_pages(view, ~m)[m]

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None
        if self.rec:
            self.rec.close()
        else:
            self.mem.close()

    def entries(self) -> np.ndarray:
        with PageMap(self.pid) as pm:
            return np.concatenate([pm.entries(r.offset, r.size >> PAGE_SHIFT) for r in self.mem.regions])

    def job(self, mask: np.ndarray, advice: int) -> tuple[int, int, np.ndarray, np.ndarray] | None:
        """``advice`` over the runs of ``mask`` (frame indices), as a job for :func:`advise_detached`."""
        starts, ends = closed_runs(mask, 0)
        if len(starts) == 0:
            return None
        offs, lens = backing_ranges(self.mem, self.pfns[starts], self.pfns[ends - 1] + 1)
        return self.pid, advice, offs, lens

    def restore_job(self) -> tuple[int, int, np.ndarray, np.ndarray] | None:
        """The whole RAM mergeable again, as QEMU left it (one range: the VMAs join again)."""
        if pid_alive(self.pid) and not self.mergeable.all():
            return (
                self.pid,
                MADV_MERGEABLE,
                np.array([self.base], dtype=np.int64),
                np.array([self.size], dtype=np.int64),
            )
        return None


class DirectedKsm:
    """Reclaim plus KSM directed at duplicate candidates, over running anonymous-RAM VMs."""

    def __init__(
        self,
        vms: list,
        ksmd_cpu: float | None = None,
        reclaim: bool = True,
        zero_pages: bool = True,
        pass_seconds: float = PASS_SECONDS,
        refresh_seconds: float = REFRESH_SECONDS,
        max_ranges: int = MAX_RANGES,
        directed: bool = True,
    ):
        """``ksmd_cpu``: a share of one CPU ksmd may use (None: no cap beyond the pass rate);
        ``directed=False`` keeps the whole RAM mergeable (reclaim and pacing only: for comparison)."""
        if not ksm.available():
            raise UsageError("this host kernel has no KSM (/sys/kernel/mm/ksm is missing)")
        for vm in vms:
            vm.require_alive()
            if vm.config.ram != "anonymous":
                raise UsageError(
                    f"VM {vm.name!r} has {vm.config.ram} RAM: KSM merges only anonymous RAM (start it with "
                    "--ram anonymous); memvirt reclaims its free pages (memvirt reclaim)"
                )
        if pass_seconds <= 0 or refresh_seconds <= 0 or max_ranges < 1:
            raise UsageError("pass and refresh times must be positive, max ranges at least 1")
        advisor = (ksm.KSM / "advisor_mode").read_text() if (ksm.KSM / "advisor_mode").exists() else "[none]"
        if "[none]" not in advisor:
            raise UsageError(
                f"KSM's own advisor tunes pages_to_scan on this host ({ksm.KSM / 'advisor_mode'}: {advisor.strip()}); "
                "memvirt won't fight it: set it to none first"
            )
        ksm.refuse_other_tuners()
        self.vms = vms
        self.budget = ksmd_cpu
        self.reclaim, self.zero_pages, self.directed = reclaim, zero_pages, directed
        self.pass_seconds, self.refresh_seconds, self.max_ranges = pass_seconds, refresh_seconds, max_ranges
        self.guests: list[_Guest] = []
        self.refreshes: list[Refresh] = []
        self._stack = ExitStack()
        self._dog: subprocess.Popen[bytes] | None = None
        self.borrowed: Borrowed | None = None
        self.pacer: ksm.Pacer | None = None
        self.pages_to_scan = ksm.STOCK["pages_to_scan"]
        self.t0 = self.cpu0 = 0.0
        self._scanned0 = 0
        self._next_refresh = 0.0
        self.reclaimed = 0

    def __enter__(self) -> DirectedKsm:
        try:
            for vm in self.vms:
                g = _Guest(vm, self.reclaim)
                self.guests.append(g)
                if not ram_is_mergeable(g.pid, g.base, g.size):
                    raise UsageError(
                        f"VM {vm.name!r}: QEMU did not mark its RAM mergeable (mem-merge=off?): KSM cannot merge it"
                    )
                g.track()
            if self.directed:
                args = [f"{g.pid}:{g.base}:{g.size}" for g in self.guests]
                self._dog = spawn_watchdog("memvirt.dedup.directed", *args)
            self.borrowed = self._stack.enter_context(
                ksm.configured(
                    run=1,
                    pages_to_scan=self.pages_to_scan,
                    sleep_millisecs=SLEEP_MS,
                    use_zero_pages=int(self.zero_pages),
                )
            )
            if self.budget is not None:
                self.pacer = ksm.Pacer(self.budget, self.pages_to_scan, self.borrowed)
            self.t0, self.cpu0 = time.monotonic(), ksm.ksmd_cpu_seconds()
            self._scanned0 = ksm.read("pages_scanned") or 0
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def notices(self) -> list[str]:
        """One line per guest whose refreshes hash every page in use, and why."""
        return [g.why_full for g in self.guests if g.why_full]

    def close(self) -> None:
        """Whole RAM mergeable again, KSM's settings back, watchdog ended; on every path."""
        try:
            advise_detached([j for g in self.guests if (j := g.restore_job())])
            for g in self.guests:
                g.mergeable[:] = True
        except MemvirtError:
            if any(pid_alive(g.pid) for g in self.guests):
                raise
        finally:
            end_watchdog(self._dog)
            self._dog = None
            self._stack.close()
            for g in self.guests:
                g.close()
            self.guests = []

    def refresh(self) -> Refresh:
        """Reclaim, fingerprint, advise the new candidate set, set the scan rate."""
        t = time.perf_counter()
        reclaimed, pause = 0, 0.0
        for g in self.guests:
            if g.rec:
                rp = g.rec.run()
                reclaimed += rp.reclaimed_bytes
                pause = max([pause, *rp.pauses_ms])
        self.reclaimed += reclaimed
        frees, entries = [], []
        for g in self.guests:
            census = g.intro.scan(live=True)
            frees.append(census.free_mask[g.pfns])
            entries.append(g.entries())
        present = [(e & PM_PRESENT) != 0 for e in entries]
        shared = [p & ((e & PM_EXCLUSIVE) == 0) for p, e in zip(present, entries, strict=True)]
        hashed = [p & ~f & ~s for p, f, s in zip(present, frees, shared, strict=True)]
        rehashed = [g.prints(h) for g, h in zip(self.guests, hashed, strict=True)]
        zeros = [h & (g.hashes == np.uint64(ZERO_HASH)) for g, h in zip(self.guests, hashed, strict=True)]
        allh = np.concatenate([g.hashes[h & ~z] for g, h, z in zip(self.guests, hashed, zeros, strict=True)])
        values, counts = np.unique(allh, return_counts=True)
        twins = values[counts > 1]
        rep = Refresh(time.monotonic() - self.t0, 0.0, reclaimed, 0, 0, 0, pause_max_ms=round(pause, 2))
        jobs: list[tuple[int, int, np.ndarray, np.ndarray]] = []
        wanted: dict[int, np.ndarray] = {}
        for g, z, h, s, f, nread in zip(self.guests, zeros, hashed, shared, frees, rehashed, strict=True):
            cand = h & (z | np.isin(g.hashes, twins))
            want = cand | s
            if self.directed:
                starts, ends = closed_runs(want, self.max_ranges)
                want = runs_mask(len(want), starts, ends)
                wanted[g.pid] = want
                mine = [g.job(want & ~g.mergeable, MADV_MERGEABLE), g.job(g.mergeable & ~want, MADV_UNMERGEABLE)]
                jobs += [j for j in mine if j]
                advised = sum(len(j[2]) for j in mine if j)
                nranges = len(starts)
            else:
                want, advised, nranges = np.ones(len(want), dtype=bool), 0, 1
            plan = GuestPlan(
                g.vm.name,
                len(g.pfns),
                int(f.sum()),
                int(present[len(rep.guests)].sum()),
                int(h.sum()),
                int(cand.sum()),
                int(s.sum()),
                int(want.sum()),
                nranges,
                advised,
                nread,
            )
            rep.guests.append(plan)
            rep.candidates += plan.candidates
            # ksmd's pass covers the present pages of the mergeable runs
            rep.mergeable += int((want & present[len(rep.guests) - 1]).sum())
        # mergeable first, then unmergeable: a guest's RAM never has fewer mergeable pages than both
        advise_detached(
            sorted(jobs, key=lambda j: j[1] != MADV_MERGEABLE), [(g.pid, g.base, g.size) for g in self.guests]
        )
        for g in self.guests:
            if g.pid in wanted:
                g.mergeable = wanted[g.pid]
        rate = max(ksm.Pacer.MIN_PAGES, math.ceil(rep.mergeable * SLEEP_MS / (self.pass_seconds * 1000)))
        rep.pages_to_scan_max = rate
        self.pages_to_scan = rate
        if self.pacer is not None:
            self.pacer.max_pages = rate
            self.pacer.pages = min(self.pacer.pages, rate) if self.refreshes else rate
        elif self.borrowed is not None:
            self.borrowed.set(ksm.KSM / "pages_to_scan", rate)
        rep.seconds = time.perf_counter() - t
        self.refreshes.append(rep)
        return rep

    def tick(self) -> dict[str, Any]:
        """Refresh when due, keep ksmd within its budget, and return a sample of where things are.
        Stops (MemvirtError) if another tool changed a KSM setting memvirt holds."""
        if self.borrowed is None:
            raise MemvirtError("DirectedKsm.tick called outside its with block")
        changed = self.borrowed.check()
        if changed:
            path, mine, theirs = changed[0]
            raise MemvirtError(
                f"another tool changed {path} ({mine} -> {theirs}) while memvirt drove KSM; "
                "memvirt stops rather than fight it (its other settings are restored)"
            )
        now = time.monotonic()
        refreshed = None
        if now >= self._next_refresh:
            refreshed = self.refresh()
            self._next_refresh = time.monotonic() + self.refresh_seconds
        if self.pacer is not None:
            self.pages_to_scan = self.pacer.step()
        return self.sample(refreshed)

    def sample(self, refreshed: Refresh | None = None) -> dict[str, Any]:
        c = ksm.counters()
        row: dict[str, Any] = {
            "t": round(time.monotonic() - self.t0, 2),
            "guest_bytes": sum(host_usage(g.vm) for g in self.guests),
            "ksm_saving_bytes": ksm.saving_bytes(c),
            "reclaimed_bytes": self.reclaimed,
            "ksmd_cpu_seconds": round(ksm.ksmd_cpu_seconds() - self.cpu0, 3),
            "pages_scanned": c.get("pages_scanned", 0) - self._scanned0,
            "pages_to_scan": self.pages_to_scan,
            "candidates": self.refreshes[-1].candidates if self.refreshes else None,
            "mergeable_pages": self.refreshes[-1].mergeable if self.refreshes else None,
        }
        if refreshed is not None:
            row["refresh"] = refreshed.to_json()
        return row


def main(pid: int, specs: list[str]) -> None:
    """Watchdog: when ``pid`` (a ``dedup run``) dies without its own restore, make each QEMU's
    whole RAM mergeable again (``QEMU_PID:BASE:SIZE`` per guest)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while pid_alive(pid):
        time.sleep(0.2)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from memvirt.memory.procmem import find_ram_mapping
    from memvirt.qemu.remote import close_stray_pidfds

    for spec in specs:
        qpid, base, size = (int(x) for x in spec.split(":"))
        try:
            if not pid_alive(qpid) or find_ram_mapping(qpid, size) != base:
                continue
            close_stray_pidfds(qpid)
            if not ram_is_mergeable(qpid, base, size):
                with remote_madvise(qpid, MADV_MERGEABLE) as advise:
                    advise(np.array([base], dtype=np.int64), np.array([size], dtype=np.int64))
        except (MemvirtError, OSError):
            continue


if __name__ == "__main__":
    if sys.argv[1:2] == ["--advise"]:
        _advise_main()
    else:
        main(int(sys.argv[1]), sys.argv[2:])
        os._exit(0)
