"""``memvirt dirty``: how fast a running guest writes its memory, and which pages it wrote.

QEMU's ``calc-dirty-rate`` needs KVM's dirty ring or log; this works under TCG too (see
:mod:`memvirt.qemu.dirty`). One row per interval on stderr, a summary (or JSON) on stdout.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from memvirt.cli.output import JsonOpt, emit_json, err, human, out, table
from memvirt.errors import UsageError
from memvirt.memory.source import PAGE_SHIFT, PAGE_SIZE

MAX_INTERVAL = 3600.0
MIN_INTERVAL = 0.01


@dataclass
class Interval:
    """One scan: the pages written since the previous one (``t``: seconds since tracking began)."""

    t: float
    seconds: float
    pages: int
    bytes: int
    pages_per_s: float
    bytes_per_s: float
    new_pages: int
    """Pages written for the first time since tracking began."""
    set_pages: int
    """Size of the written set so far."""
    scan_ms: float


def ranges(mask: np.ndarray) -> list[list[int]]:
    """``[[first, end), ...]`` runs of True in ``mask`` (guest frame numbers)."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.astype(np.int8), [0]))))
    return edges.reshape(-1, 2).tolist()


def _row(r: Interval) -> str:
    return (
        f"{r.t:7.2f}s  written {r.pages:>8} pages {human(r.bytes):>10}  "
        f"rate {r.pages_per_s:>10.1f} pages/s {human(r.bytes_per_s):>10}/s  "
        f"set {r.set_pages:>8} pages  (+{r.new_pages})  scan {r.scan_ms:.2f} ms"
    )


def draw(rows: list[Interval], path: Path, title: str) -> Path:
    """A PNG: the dirty rate per interval, and the written set growing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mib = float(1 << 20)
    t = [r.t for r in rows]
    fig, (a, b) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    a.stairs([r.bytes_per_s / mib for r in rows], [rows[0].t - rows[0].seconds, *t], color="#d62728", lw=1.8)
    a.set_ylabel("dirty rate (MiB/s)")
    a.set_ylim(bottom=0)
    a.grid(alpha=0.3)
    b.plot(t, [r.set_pages * PAGE_SIZE / mib for r in rows], color="#1f77b4", lw=1.8)
    b.set_ylabel("written set (MiB)")
    b.set_ylim(bottom=0)
    b.set_xlabel("seconds")
    b.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def dirty(
    name: Annotated[str, typer.Argument(help="A running memvirt VM.")],
    interval: Annotated[float, typer.Option(help="Seconds per scan.")] = 1.0,
    duration: Annotated[float | None, typer.Option(help="Stop after SECONDS (default: until Ctrl-C).")] = None,
    method: Annotated[
        str, typer.Option(help="auto (userfaultfd write-protect, else fingerprints), uffd-wp, or fingerprint.")
    ] = "auto",
    json_: JsonOpt = False,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of the dirty rate and written set over time.")] = None,
) -> None:
    """Measure the pages a running guest writes: rate per interval and the set written.

    Needs no KVM and no guest agent: QEMU's RAM is write-protected through a userfaultfd in
    asynchronous mode and the written pages collected with PAGEMAP_SCAN (Linux 6.7+); the guest
    runs on at full speed (one in-kernel fault per page per interval). Closing ends it; so does
    memvirt dying. Writes to a shared RAM file from outside QEMU are not seen: refused.
    """
    from memvirt.qemu.dirty import METHODS, track
    from memvirt.qemu.vm import VM

    if not MIN_INTERVAL <= interval <= MAX_INTERVAL:
        raise UsageError(f"--interval must be between {MIN_INTERVAL} and {MAX_INTERVAL:.0f} seconds")
    if duration is not None and duration <= 0:
        raise UsageError("--duration must be positive")
    if method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}")
    if plot is not None and not plot.parent.is_dir():
        raise UsageError(f"--plot: folder {plot.parent} does not exist")
    vm = VM.load(name)
    vm.require_alive()
    tracker = track(vm, method)
    if tracker.notice:
        err.print(f"memvirt: notice: {tracker.notice}", markup=False)
    written = np.zeros(max(r.end for r in vm.regions) >> PAGE_SHIFT, dtype=bool)
    rows: list[Interval] = []
    t0 = last = time.monotonic()
    try:
        while duration is None or last - t0 < duration - 1e-6:
            step = interval if duration is None else min(interval, duration - (last - t0))
            time.sleep(max(0.0, last + step - time.monotonic()))
            s0 = time.monotonic()
            pfns = tracker.scan()
            s1 = time.monotonic()
            new = int(np.count_nonzero(~written[pfns]))
            written[pfns] = True
            secs = s1 - last
            n = len(pfns)
            row = Interval(
                round(s1 - t0, 3),
                round(secs, 4),
                n,
                n * PAGE_SIZE,
                round(n / secs, 1),
                round(n * PAGE_SIZE / secs, 1),
                new,
                int(np.count_nonzero(written)),
                round((s1 - s0) * 1000, 3),
            )
            rows.append(row)
            last = s1
            if not json_:
                err.print(_row(row), markup=False)
    except KeyboardInterrupt:
        pass
    finally:
        tracker.close()
    report = _report(vm.name, tracker.method, tracker.notice, interval, rows, written)
    if plot is not None and rows:
        report["plot"] = str(draw(rows, plot, f"{vm.name}: pages written ({tracker.method})"))
    if json_:
        emit_json(report)
        return
    table(
        None,
        ["VM", "method", "intervals", "seconds", "written set", "mean rate", "peak rate"],
        [
            [
                vm.name,
                tracker.method,
                len(rows),
                f"{report['seconds']:.1f}",
                f"{report['written_pages']} pages ({human(report['written_bytes'])})",
                f"{human(report['mean_bytes_per_s'])}/s",
                f"{human(report['peak_bytes_per_s'])}/s",
            ]
        ],
    )
    if "plot" in report:
        out.print(f"plot: {report['plot']}")


def _report(
    name: str, method: str, notice: str, interval: float, rows: list[Interval], written: np.ndarray
) -> dict[str, Any]:
    seconds = sum(r.seconds for r in rows)
    total = sum(r.pages for r in rows)
    return {
        "vm": name,
        "method": method,
        "notice": notice,
        "interval": interval,
        "page_size": PAGE_SIZE,
        "seconds": round(seconds, 3),
        "scanned_pages_total": total,
        "mean_pages_per_s": round(total / seconds, 1) if seconds else 0.0,
        "mean_bytes_per_s": round(total * PAGE_SIZE / seconds, 1) if seconds else 0.0,
        "peak_bytes_per_s": max((r.bytes_per_s for r in rows), default=0.0),
        "written_pages": int(np.count_nonzero(written)),
        "written_bytes": int(np.count_nonzero(written)) * PAGE_SIZE,
        "written_set": ranges(written),
        "intervals": [asdict(r) for r in rows],
    }
