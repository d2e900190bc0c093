"""The host's KSM (``/sys/kernel/mm/ksm``): settings, counters, ksmd's CPU time, per-process figures.

KSM merges only anonymous private memory marked mergeable: QEMU's ``memory-backend-ram`` with
``merge=on`` (memvirt's anonymous RAM), never a shared RAM file. A page merges after KSM has
seen it unchanged on two passes (its checksum must be stable), so at the stock rate (100 pages
every 20 ms) one pass over four 1 GiB guests takes minutes. Pages absent from QEMU's page
tables are skipped without counting against ``pages_to_scan``: that is how reclaiming free
pages makes each KSM pass shorter at the same ksmd CPU.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memvirt.borrow import Borrowed
from memvirt.errors import MemvirtError, UsageError
from memvirt.memory.source import PAGE_SIZE

KSM = Path("/sys/kernel/mm/ksm")
SETTINGS = ("run", "pages_to_scan", "sleep_millisecs", "use_zero_pages")
COUNTERS = (
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "full_scans",
    "ksm_zero_pages",
    "general_profit",
    "pages_scanned",
)
STOCK = {"pages_to_scan": 100, "sleep_millisecs": 20, "use_zero_pages": 0}
"""The kernel's defaults: what "stock KSM" means in memvirt's figures."""


def available() -> bool:
    return (KSM / "run").exists()


def _require() -> None:
    if not available():
        raise UsageError("this host kernel has no KSM (/sys/kernel/mm/ksm is missing)")


def read(name: str) -> int | None:
    """A KSM sysfs value, or None when this kernel does not have it."""
    try:
        return int((KSM / name).read_text().split()[0])
    except (FileNotFoundError, ValueError):
        return None


def write(name: str, value: int) -> None:
    _require()
    try:
        (KSM / name).write_text(f"{value}\n")
    except PermissionError as e:
        raise UsageError(f"no permission to change {KSM / name}: run as root") from e
    except OSError as e:
        raise MemvirtError(f"setting {KSM / name} to {value} failed: {e.strerror}") from e


def settings() -> dict[str, int]:
    return {k: v for k in SETTINGS if (v := read(k)) is not None}


def counters() -> dict[str, int]:
    return {k: v for k in COUNTERS if (v := read(k)) is not None}


def saving_bytes(c: dict[str, int] | None = None) -> int:
    """Memory KSM saves now: pages mapped to a shared KSM page beyond its one copy, plus pages it
    replaced with the zero page (summed over live processes: the global ``ksm_zero_pages`` of
    this kernel keeps counting pages of processes long gone)."""
    c = counters() if c is None else c
    zero = zero_pages_held()
    return (c.get("pages_sharing", 0) + (c.get("ksm_zero_pages", 0) if zero is None else zero)) * PAGE_SIZE


def zero_pages_held() -> int | None:
    """KSM zero pages mapped by live processes (``/proc/*/ksm_stat``), None where the kernel has no
    per-process figures."""
    total, seen = 0, False
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            st = process_stat(int(pid))
            if "ksm_zero_pages" in st:
                seen = True
                total += st["ksm_zero_pages"]
    return total if seen else None


TUNERS = ("ksmtuned",)
"""Daemons known to tune KSM on their own: memvirt won't drive KSM beside them."""


def other_tuners() -> list[tuple[int, str]]:
    """Running processes that tune KSM themselves: (pid, name)."""
    found = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                comm = Path(f"/proc/{p}/comm").read_text().strip()
            except OSError:
                continue
            if comm in TUNERS:
                found.append((int(p), comm))
    return found


def refuse_other_tuners() -> None:
    tuners = other_tuners()
    if tuners:
        pid, name = tuners[0]
        raise UsageError(
            f"{name} (pid {pid}) tunes KSM on this host; memvirt won't fight it over {KSM}: stop {name} first"
        )


@contextmanager
def configured(**values: int) -> Iterator[Borrowed]:
    """Apply KSM settings for the duration, borrowed (:mod:`memvirt.borrow`): on exit, also on
    error, Ctrl-C, SIGTERM and (by a watchdog) SIGKILL, each comes back to its previous value
    unless another tool changed it since. ``run`` is written last and restored last."""
    _require()
    with Borrowed("ksm") as b:
        b.guard(order=(str(KSM / "run"),))
        for k, v in values.items():
            if v is not None and k != "run":
                b.set(KSM / k, v)
        if values.get("run") is not None:
            b.set(KSM / "run", values["run"])
        yield b


def restore(before: dict[str, int]) -> None:
    """Put settings back (``run`` last, so the others are written while it is as it was)."""
    for k, v in before.items():
        if k != "run" and read(k) != v:
            write(k, v)
    if "run" in before and read("run") != before["run"]:
        write("run", before["run"])


def _ksmd_pid() -> int | None:
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if Path(f"/proc/{p}/comm").read_text().strip() == "ksmd":
                    return int(p)
            except OSError:
                continue
    return None


_KSMD: list[int | None] = []


def ksmd_cpu_seconds() -> float:
    """CPU time ksmd has used since boot: from ``schedstat`` (nanoseconds) where the kernel keeps
    it, else ``stat`` (clock ticks, too coarse for a budget of a few ms a second)."""
    if not _KSMD:
        _KSMD.append(_ksmd_pid())
    pid = _KSMD[0]
    if pid is None:
        return 0.0
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Pacer:
    """Keeps ksmd within a CPU budget by setting ``pages_to_scan`` each interval.

    KSM's cost per scanned page is not fixed: a page that merges costs a compare, a copy-on-write
    protection and rmap work on top of the checksum, so the same rate costs more CPU where more
    merges (after a reclaim, say). The pacer scales the rate by budget / measured share, never
    above ``max_pages`` (the stock rate unless told) nor below :data:`MIN_PAGES`.
    """

    MIN_PAGES = 10

    def __init__(self, budget: float, max_pages: int = STOCK["pages_to_scan"], borrowed: Borrowed | None = None):
        if not 0 < budget <= 1:
            raise UsageError("--ksmd-cpu must be a share of one CPU above 0 and at most 100 %")
        self.budget, self.max_pages = budget, max_pages
        self.pages = max_pages
        self.borrowed = borrowed
        self._last: tuple[float, float] | None = None
        self._written: int | None = None

    def step(self) -> int:
        """Measure ksmd's share since the last step, set and return the new ``pages_to_scan``.

        If ``pages_to_scan`` is no longer what the last step wrote, another tuner is at work:
        memvirt stops (MemvirtError) rather than fight it every interval.
        """
        current = read("pages_to_scan")
        if self._written is not None and current != self._written:
            raise MemvirtError(
                f"another tool changed {KSM / 'pages_to_scan'} ({self._written} -> {current}) while "
                "memvirt paced ksmd; memvirt stops rather than fight it (ksmtuned?)"
            )
        now, cpu = time.monotonic(), ksmd_cpu_seconds()
        if self._last is not None and now - self._last[0] > 0.5:
            share = (cpu - self._last[1]) / (now - self._last[0])
            scale = self.budget / share if share > 0 else 2.0
            self.pages = int(min(self.max_pages, max(self.MIN_PAGES, self.pages * min(scale, 2.0))))
        self._last = (now, cpu)
        if self.borrowed is not None:
            self.borrowed.set(KSM / "pages_to_scan", self.pages)
        else:
            write("pages_to_scan", self.pages)
        self._written = self.pages
        return self.pages


def process_stat(pid: int) -> dict[str, int]:
    """``/proc/PID/ksm_stat`` (merging pages, zero pages, profit) where the kernel has it."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/ksm_stat").read_text().splitlines():
            k, _, v = line.partition(" ")
            if v.strip().lstrip("-").isdigit():
                out[k] = int(v)
    except OSError:
        pass
    return out


@dataclass
class Sample:
    """Host memory of a set of guests and KSM's state at one moment."""

    t: float
    guest_bytes: int
    ksm_saving: int
    ksmd_cpu: float
    counters: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return {
            "t": round(self.t, 2),
            "guest_bytes": self.guest_bytes,
            "ksm_saving_bytes": self.ksm_saving,
            "ksmd_cpu_seconds": round(self.ksmd_cpu, 3),
            **{k: self.counters[k] for k in ("pages_sharing", "ksm_zero_pages", "full_scans") if k in self.counters},
        }


def sample(t0: float, usage: list[int]) -> Sample:
    c = counters()
    return Sample(time.monotonic() - t0, sum(usage), saving_bytes(c), ksmd_cpu_seconds(), c)
