"""The parts of ``bench/introspect.py``: shared settings and output here; the measuring process
(:mod:`intro.worker`), guests and dumps (:mod:`intro.guests`), aggregation and tables
(:mod:`intro.report`)."""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

from common import make_console

VM_SHARED = "bench-intro"
VM_ANON = "bench-intro-anon"
GUEST_LOG = "/tmp/bench-intro-memtouch.log"
FILL_TIMEOUT = 1800.0
WORKER_TIMEOUT = 1800.0
GOAL_BOOTSTRAP_S = 1.0
GOAL_RESCAN_S = 0.020
T0 = time.monotonic()
_console: Any = None


def console() -> Any:
    global _console
    if _console is None:
        _console = make_console()
    return _console


def say(msg: str) -> None:
    console().print(f"[dim]{time.monotonic() - T0:7.1f}s[/dim] {msg}")


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def stats(runs: list[float]) -> dict[str, Any]:
    """min/median/p95/max of ``runs`` (seconds), and the runs themselves."""
    if not runs:
        return {}
    s = sorted(runs)
    p95 = s[min(len(s) - 1, max(0, round(0.95 * len(s) + 0.5) - 1))]
    return {"n": len(s), "min_s": s[0], "median_s": statistics.median(s), "p95_s": p95, "max_s": s[-1], "runs_s": runs}
