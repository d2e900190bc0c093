"""DAMON physical-address monitoring of sampled guest pages, through its sysfs interface.

This host's DAMON monitors physical addresses only (``paddr``), and a VM's RAM is scattered
over ~100k runs of host frames per GiB: far more regions than DAMON can check each sampling
interval. So memvirt watches a uniform random sample of the VM's pages, one single-page region
each (a region can't split below a page, and regions merge only when adjacent), the way ESX
estimates working sets by sampling. Each aggregation interval DAMON tells how many sampled
bytes were accessed; scaled to the VM's backed pages that is the working-set estimate
(binomial error: 1.5 % of RAM at 4096 samples, at worst).

One kdamond per VM. DAMON's sysfs is one global tree and its kdamonds are often another tool's
(DAMON_RECLAIM, damo, a host's own ``pageout`` scheme started at boot): while any kdamond runs
the kernel refuses to change ``nr_kdamonds`` (EBUSY), so memvirt can't add its own beside it,
and it never stops or reconfigures one it did not start. :func:`holder` names the other user;
working-set tracking then falls back to referenced bits (:mod:`memvirt.compress.wss`).
memvirt only ever creates kdamonds when none exist, and removes exactly those when done.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
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
        raise MemvirtError(f"DAMON refused {value!r} for {path.relative_to(ADMIN)}: {e.strerror}") from e


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class Kdamond:
    """One kdamond as the sysfs tree shows it: enough to name it and to tell it was left alone."""

    index: int
    state: str
    pid: int
    operations: tuple[str, ...]
    schemes: tuple[str, ...]

    def describe(self) -> str:
        ops = "/".join(self.operations) or "no context"
        acts = ", ".join(self.schemes)
        return f"kdamond {self.index} pid {self.pid} ({ops}{f', {acts} scheme' if acts else ''})"


def kdamonds() -> list[Kdamond]:
    """Every kdamond in the sysfs tree, running or not (empty without DAMON)."""
    try:
        n = int(_read(KDAMONDS / "nr_kdamonds") or 0)
    except ValueError:
        return []
    out = []
    for i in range(n):
        d = KDAMONDS / str(i)
        ctxs = d / "contexts"
        ops, acts = [], []
        try:
            nctx = int(_read(ctxs / "nr_contexts") or 0)
        except ValueError:
            nctx = 0
        for c in range(nctx):
            ops.append(_read(ctxs / str(c) / "operations"))
            try:
                nsch = int(_read(ctxs / str(c) / "schemes" / "nr_schemes") or 0)
            except ValueError:
                nsch = 0
            acts += [_read(ctxs / str(c) / "schemes" / str(k) / "action") for k in range(nsch)]
        try:
            pid = int(_read(d / "pid") or -1)
        except ValueError:
            pid = -1
        out.append(Kdamond(i, _read(d / "state"), pid, tuple(ops), tuple(acts)))
    return out


def holder() -> Kdamond | None:
    """The first running kdamond (memvirt's own never outlive it: it creates them only when DAMON
    is free), or None when DAMON is free for memvirt."""
    return next((k for k in kdamonds() if k.state == "on"), None)


def pageout_schemes() -> list[Kdamond]:
    """Running kdamonds with a ``pageout`` scheme: with any swap on the host they move idle memory
    of every process into it, QEMU guest RAM included, whoever set the swap up."""
    return [k for k in kdamonds() if k.state == "on" and "pageout" in k.schemes]


def unavailable_reason() -> str | None:
    """Why memvirt can't run DAMON here now (one line), or None when it can."""
    if not available():
        return "this host kernel has no DAMON sysfs interface (/sys/kernel/mm/damon/admin)"
    tree = kdamonds()
    running = next((k for k in tree if k.state == "on"), None)
    if running is not None:
        return f"DAMON held by another tool: {running.describe()}"
    if tree:  # configured and switched off: still another tool's tree, not memvirt's to overwrite
        return f"DAMON configured by another tool: {tree[0].describe()}, off"
    return None


class Damon:
    """A set of kdamonds memvirt owns, one per monitored VM, each with a ``stat`` scheme that
    sums the bytes of regions accessed in the last aggregation interval."""

    def __init__(self, count: int, sample_us: int = 50_000, aggr_us: int = 1_000_000):
        reason = unavailable_reason()
        if reason is not None:
            raise UsageError(
                f"{reason}; memvirt never stops or reconfigures another tool's kdamond (use --method referenced)"
            )
        self.count = count
        self._cpu = 0.0
        self._owned = False
        _write(KDAMONDS / "nr_kdamonds", count)
        self._owned = True
        try:
            for i in range(count):
                ctx = self._ctx(i)
                _write(KDAMONDS / str(i) / "contexts" / "nr_contexts", 1)
                ops = (ctx / "avail_operations").read_text().split()
                if "paddr" not in ops:
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
        except BaseException:
            self.close()
            raise
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
        if not getattr(self, "_owned", False):
            return
        self.cpu_seconds()
        release(self.count)
        self._owned = False

    def __enter__(self) -> Damon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def release(count: int) -> None:
    """Turn off and remove the ``count`` kdamonds memvirt created; nothing if the tree no longer
    holds exactly that many (then they are not, or no longer only, memvirt's)."""
    try:
        if int((KDAMONDS / "nr_kdamonds").read_text()) != count:
            return
    except (OSError, ValueError):
        return
    for i in range(count):
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
