"""DAMON physical-address monitoring of sampled guest pages, through its sysfs interface.

This host's DAMON monitors physical addresses only (``paddr``), and a VM's RAM is scattered
over ~100k runs of host frames per GiB: far more regions than DAMON can check each sampling
interval. So memvirt watches a uniform random sample of the VM's pages, one single-page region
each (a region can't split below a page, and regions merge only when adjacent), the way ESX
estimates working sets by sampling. Each aggregation interval DAMON tells how many sampled
bytes were accessed; scaled to the VM's backed pages that is the working-set estimate
(binomial error: 1.5 % of RAM at 4096 samples, at worst).

One kdamond per VM; DAMON's sysfs is one global tree, so memvirt refuses to touch it while any
kdamond it did not start is running, and puts ``nr_kdamonds`` back to 0 when done.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from memvirt.errors import MemvirtError, UsageError
from memvirt.memory.source import PAGE_SIZE

ADMIN = Path("/sys/kernel/mm/damon/admin")
KDAMONDS = ADMIN / "kdamonds"
MAX_ULONG = str((1 << 64) - 1)


def available() -> bool:
    """DAMON's sysfs interface with physical-address monitoring."""
    try:
        (KDAMONDS / "nr_kdamonds").read_text()
    except OSError:
        return False
    return True


def _write(path: Path, value: object) -> None:
    try:
        path.write_text(str(value))
    except OSError as e:
        raise MemvirtError(f"DAMON refused {value!r} for {path.relative_to(ADMIN)}: {e.strerror}") from None


def _running() -> list[int]:
    n = int((KDAMONDS / "nr_kdamonds").read_text())
    return [i for i in range(n) if (KDAMONDS / str(i) / "state").read_text().strip() == "on"]


class Damon:
    """A set of kdamonds memvirt owns, one per monitored VM, each with a ``stat`` scheme that
    sums the bytes of regions accessed in the last aggregation interval."""

    def __init__(self, count: int, sample_us: int = 50_000, aggr_us: int = 1_000_000):
        if not available():
            raise UsageError("this host kernel has no DAMON sysfs interface (/sys/kernel/mm/damon/admin)")
        busy = _running()
        if busy:
            raise UsageError(f"DAMON is in use by another tool (kdamond {busy[0]} is on); stop it first")
        self.count = count
        self._cpu = 0.0
        _write(KDAMONDS / "nr_kdamonds", 0)
        _write(KDAMONDS / "nr_kdamonds", count)
        for i in range(count):
            ctx = self._ctx(i)
            _write(KDAMONDS / str(i) / "contexts" / "nr_contexts", 1)
            ops = (ctx / "avail_operations").read_text().split()
            if "paddr" not in ops:
                self.close()
                raise UsageError(f"this host's DAMON can't monitor physical addresses (it offers {', '.join(ops)})")
            _write(ctx / "operations", "paddr")
            attrs = ctx / "monitoring_attrs"
            _write(attrs / "intervals" / "sample_us", sample_us)
            _write(attrs / "intervals" / "aggr_us", aggr_us)
            _write(attrs / "intervals" / "update_us", aggr_us)
            _write(ctx / "targets" / "nr_targets", 1)
            _write(ctx / "schemes" / "nr_schemes", 1)
            scheme = ctx / "schemes" / "0"
            _write(scheme / "action", "stat")
            pattern = scheme / "access_pattern"
            for key, lo, hi in (("sz", 0, MAX_ULONG), ("nr_accesses", 1, MAX_ULONG), ("age", 0, MAX_ULONG)):
                _write(pattern / key / "max", hi)
                _write(pattern / key / "min", lo)
        self.aggr_s = aggr_us / 1e6

    def _ctx(self, i: int) -> Path:
        return KDAMONDS / str(i) / "contexts" / "0"

    def set_frames(self, i: int, frames: Iterable[int]) -> None:
        """Monitor these host frames (one page each) with kdamond ``i``; applied at once if it runs."""
        pfns = np.unique(np.fromiter(frames, dtype=np.uint64))
        pfns = pfns[pfns != 0]
        if len(pfns) == 0:
            raise MemvirtError("no resident guest page to monitor (is the VM's RAM all swapped out?)")
        ctx = self._ctx(i)
        regions = ctx / "targets" / "0" / "regions"
        attrs = ctx / "monitoring_attrs" / "nr_regions"
        _write(attrs / "max", max(len(pfns) * 2, 10))
        _write(attrs / "min", 3)
        _write(regions / "nr_regions", len(pfns))
        starts = (pfns * PAGE_SIZE).tolist()
        for k, start in enumerate(starts):
            d = regions / str(k)
            for name, value in (("start", start), ("end", start + PAGE_SIZE)):
                fd = os.open(d / name, os.O_WRONLY)
                try:
                    os.write(fd, str(value).encode())
                finally:
                    os.close(fd)
        if (KDAMONDS / str(i) / "state").read_text().strip() == "on":
            _write(KDAMONDS / str(i) / "state", "commit")

    def start(self) -> None:
        for i in range(self.count):
            _write(KDAMONDS / str(i) / "state", "on")

    def accessed_bytes(self, i: int) -> int:
        """Sampled bytes kdamond ``i`` saw accessed in its last complete aggregation interval."""
        _write(KDAMONDS / str(i) / "state", "update_schemes_tried_bytes")
        return int((self._ctx(i) / "schemes" / "0" / "tried_regions" / "total_bytes").read_text())

    def cpu_seconds(self) -> float:
        """CPU time the kdamonds have used so far (remembered after they stop)."""
        total = 0.0
        for i in range(self.count):
            try:
                pid = int((KDAMONDS / str(i) / "pid").read_text())
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, ValueError, IndexError):
                continue
        self._cpu = max(self._cpu, total)
        return self._cpu

    def close(self) -> None:
        """Stop the kdamonds and leave DAMON as memvirt found it (no kdamonds)."""
        self.cpu_seconds()
        for i in range(self.count):
            state = KDAMONDS / str(i) / "state"
            try:
                if state.read_text().strip() == "on":
                    state.write_text("off")
            except OSError:
                pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                (KDAMONDS / "nr_kdamonds").write_text("0")
                return
            except OSError:
                time.sleep(0.05)

    def __enter__(self) -> Damon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
