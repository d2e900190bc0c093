"""Working-set estimates of a running VM, taken from the host with no help from the guest.

Two trackers share one interface (:meth:`Tracker.measure` blocks one interval and returns an
:class:`Estimate`):

* :class:`DamonTracker` samples guest pages with DAMON (see :mod:`memvirt.compress.damon`).
  A sampled page that was swapped out and is resident again was touched too: DAMON can't see
  it (it watched no frame for it), the page map can, so such refaults count as accesses.
* :class:`ReferencedTracker` is the fallback where DAMON is missing: it clears the QEMU
  process's accessed bits (``/proc/PID/clear_refs``) and reads back how many bytes of the RAM
  mapping were referenced one interval later (``smaps``). Exact as a total, but it says nothing
  about which pages, and it wipes the hints host reclaim uses; DAMON keeps them.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from memvirt.compress.damon import Damon
from memvirt.errors import MemvirtError, VMError
from memvirt.memory.pagemap import PM_PRESENT, PageMap, backed, frames
from memvirt.memory.ramfile import RamFileMemory
from memvirt.memory.source import PAGE_SIZE, Region
from memvirt.qemu.vm import VM

DEFAULT_SAMPLES = 4096
RESAMPLE_DRIFT = 0.05
"""Draw a new sample once the VM's backed pages or the sample's frames moved by this fraction."""


@dataclass
class Estimate:
    """One interval's view of a VM's memory, in bytes (``t`` in seconds since tracking began)."""

    t: float
    wss: int
    resident: int
    swapped: int
    backed: int
    method: str
    samples: int = 0
    accessed_samples: int = 0
    refaulted_samples: int = 0
    vm: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Tracker(Protocol):
    method: str

    def start(self) -> None: ...

    def measure(self, interval: float) -> Estimate: ...

    def close(self) -> None: ...


def smaps_fields(pid: int, vaddr: int, names: tuple[str, ...]) -> dict[str, int]:
    """Fields (bytes) of the ``/proc/PID/smaps`` entry of the mapping that starts at ``vaddr``."""
    head = f"{vaddr:x}-"
    out: dict[str, int] = {}
    inside = False
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                key = line.split(" ", 1)[0]
                if "-" in key:
                    if inside:
                        break
                    inside = line.startswith(head)
                elif inside and key[:-1] in names:
                    out[key[:-1]] = int(line.split()[1]) * 1024
    except OSError as e:
        raise VMError(f"reading the memory map of process {pid} failed: {e.strerror}") from e
    if len(out) != len(names):
        raise MemvirtError(f"process {pid} has no mapping at {vaddr:#x} in its smaps (did the VM stop?)")
    return out


def _ram_state(vm: VM, pm: PageMap, vaddr: int, npages: int) -> tuple[np.ndarray, int, int, int]:
    """(page map entries, resident, swapped, backed pages) of the VM's RAM.

    A swapped-out page of a shared RAM file (tmpfs) leaves no trace in the page map (its swap
    entry lives in the file, not the page table), and a resident one need not be mapped; tmpfs
    counts both in the file's blocks and smaps tells the swapped ones.
    """
    e = pm.entries(vaddr, npages)
    if vm.config.ram == "shared":
        nbacked = os.stat(vm.config.ram_path).st_blocks * 512 // PAGE_SIZE
        swapped = smaps_fields(vm.config.pid, vaddr, ("Swap",))["Swap"] // PAGE_SIZE
        return e, nbacked - swapped, swapped, nbacked
    resident = int(np.count_nonzero((e & PM_PRESENT) != 0))
    nbacked = int(np.count_nonzero(backed(e)))
    return e, resident, nbacked - resident, nbacked


def _backed_mask(vm: VM, entries: np.ndarray) -> np.ndarray:
    """Pages with data, swapped out ones included (for a shared RAM file: its non-hole pages)."""
    if vm.config.ram != "shared":
        return backed(entries)
    with RamFileMemory(vm.config.ram_path, (Region(0, len(entries) * PAGE_SIZE, 0),)) as f:
        return f.populated_pfns()[: len(entries)] | ((entries & PM_PRESENT) != 0)


class DamonTracker:
    """Working set from DAMON's view of ``samples`` random guest pages (kdamond ``index``)."""

    method = "damon"

    def __init__(self, vm: VM, damon: Damon, index: int, samples: int = DEFAULT_SAMPLES, seed: int = 0):
        self.vm, self.damon, self.index, self.samples = vm, damon, index, samples
        self.vaddr, size = vm.ram_mapping()
        self.npages = size // PAGE_SIZE
        self.pm = PageMap(vm.config.pid)
        self.rng = np.random.default_rng(seed)
        self.t0 = time.monotonic()
        self.idx = np.empty(0, dtype=np.int64)
        self.prev_frames = np.empty(0, dtype=np.uint64)
        self.sampled_backed = 0
        self.fraction = 1.0
        self.stale = True
        self.fresh = True

    def _draw(self, entries: np.ndarray) -> None:
        candidates = np.flatnonzero(_backed_mask(self.vm, entries))
        if len(candidates) == 0:
            raise VMError(f"VM {self.vm.name!r} has no guest page in memory yet")
        k = min(self.samples, len(candidates))
        self.idx = np.sort(self.rng.choice(candidates, size=k, replace=False))
        self.sampled_backed = len(candidates)
        self.prev_frames = frames(entries[self.idx])
        self.damon.set_frames(self.index, self.prev_frames)
        self.stale = True
        self.fresh = True

    def start(self) -> None:
        entries, *_ = _ram_state(self.vm, self.pm, self.vaddr, self.npages)
        self._draw(entries)

    def measure(self, interval: float) -> Estimate:
        time.sleep(interval)
        entries, resident, swapped, nbacked = _ram_state(self.vm, self.pm, self.vaddr, self.npages)
        now = frames(entries[self.idx])
        accessed = self.damon.accessed_bytes(self.index) // PAGE_SIZE
        refaulted = int(np.count_nonzero((now != 0) & (now != self.prev_frames)))
        k = len(self.idx)
        fraction = min(1.0, (accessed + refaulted) / k) if k else 0.0
        if self.stale:
            # DAMON's first aggregation over newly set frames is not complete yet: its count says
            # nothing, and reading it as "nothing accessed" would starve a growing guest.
            fraction = max(fraction, self.fraction)
            self.stale = False
        self.fraction = fraction
        est = Estimate(
            time.monotonic() - self.t0,
            int(fraction * nbacked * PAGE_SIZE),
            resident * PAGE_SIZE,
            swapped * PAGE_SIZE,
            nbacked * PAGE_SIZE,
            self.method,
            k,
            accessed,
            refaulted,
            self.vm.name,
        )
        moved = np.count_nonzero(now != self.prev_frames) / max(k, 1)
        if abs(nbacked - self.sampled_backed) > RESAMPLE_DRIFT * max(self.sampled_backed, 1):
            self._draw(entries)
        elif moved > RESAMPLE_DRIFT:
            self.prev_frames = now
            self.damon.set_frames(self.index, now)
            self.stale = True
        else:
            self.prev_frames = now
        return est

    def close(self) -> None:
        self.pm.close()


class ReferencedTracker:
    """Working set as the bytes of the RAM mapping referenced during one interval."""

    method = "referenced"

    def __init__(self, vm: VM):
        self.vm = vm
        self.pid = vm.config.pid
        self.vaddr, size = vm.ram_mapping()
        self.npages = size // PAGE_SIZE
        self.pm = PageMap(self.pid)
        self.t0 = time.monotonic()

    def start(self) -> None:
        pass

    def _clear(self) -> None:
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("1")
        except OSError as e:
            raise VMError(f"clearing the accessed bits of VM {self.vm.name!r} failed: {e.strerror}") from e

    def _referenced(self) -> int:
        return smaps_fields(self.pid, self.vaddr, ("Referenced",))["Referenced"]

    def measure(self, interval: float) -> Estimate:
        self._clear()
        time.sleep(interval)
        wss = self._referenced()
        _, resident, swapped, nbacked = _ram_state(self.vm, self.pm, self.vaddr, self.npages)
        return Estimate(
            time.monotonic() - self.t0,
            wss,
            resident * PAGE_SIZE,
            swapped * PAGE_SIZE,
            nbacked * PAGE_SIZE,
            self.method,
            vm=self.vm.name,
        )

    def close(self) -> None:
        self.pm.close()
