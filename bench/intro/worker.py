"""The measuring process: one fresh Python per measurement, so nothing cached helps."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from intro import (
    WORKER_TIMEOUT,
    load,
    stats,
)

# --- the measuring process ----------------------------------------------------------------------
# Runs as `python bench/introspect.py --worker JSON`, prints one JSON line. Imports only what the
# measurement needs, so its RSS is memvirt's.


def _proc_status() -> dict[str, int]:
    out: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem", "VmSize"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def _reset_hwm() -> bool:
    """Reset the peak-RSS counter (``VmHWM``), Linux 4.0+."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _profile_top(prof: Any, scans: int, n: int = 25) -> dict[str, list[dict[str, Any]]]:
    import pstats

    st = pstats.Stats(prof)
    rows = []
    for (file, line, func), (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        where = file
        if "/memvirt/" in file:
            where = "memvirt/" + file.rsplit("/memvirt/", 1)[1]
        elif "/site-packages/" in file:
            where = file.rsplit("/site-packages/", 1)[1]
        rows.append(
            {
                "function": f"{where}:{line}({func})" if line else func,
                "calls_per_scan": nc / scans,
                "tottime_ms_per_scan": 1e3 * tt / scans,
                "cumtime_ms_per_scan": 1e3 * ct / scans,
            }
        )
    return {
        "by_tottime": sorted(rows, key=lambda r: -r["tottime_ms_per_scan"])[:n],
        "by_cumtime": sorted(rows, key=lambda r: -r["cumtime_ms_per_scan"])[:n],
    }


def worker(task: dict[str, Any]) -> dict[str, Any]:
    t_start = time.perf_counter()
    import numpy as np  # noqa: F401 - timed with the rest of the imports

    from memvirt.introspect import Introspector
    from memvirt.targets import open_memory

    out: dict[str, Any] = {"task": task, "pid": os.getpid(), "loadavg_start": load()}
    out["import_s"] = time.perf_counter() - t_start
    live = bool(task.get("live"))
    hwm_reset = _reset_hwm()
    out["rss_baseline"] = _proc_status()

    t = time.perf_counter()
    mem = open_memory(task["source"])
    out["open_s"] = time.perf_counter() - t
    out["source"] = mem.describe()
    out["ram_bytes"] = mem.ram_size
    out["max_pfn"] = mem.max_pfn

    boots = []
    intro = None
    for _ in range(max(1, task.get("bootstraps", 1))):
        intro = None  # let the previous one go, as a fresh construction would
        t, c0 = time.perf_counter(), time.process_time()
        intro = Introspector(mem, layouts=task.get("layouts", "auto"), cache=task.get("cache", True))
        dt, cpu = time.perf_counter() - t, time.process_time() - c0
        steps = dict(intro.kernel.timings)
        steps["layout+scanner"] = intro.bootstrap_seconds - steps.get("total", 0.0)
        boots.append(
            {"seconds": dt, "cpu_s": cpu, "steps": steps, "from_build_cache": bool(getattr(intro, "cached", False))}
        )
    assert intro is not None
    out["bootstraps"] = boots
    out["release"] = intro.release
    out["layout_source"] = intro.layout.source
    out["layout_provenance"] = intro.layout_sources() if hasattr(intro, "layout_sources") else {}
    out["kernel_notes"] = dict(intro.kernel.notes)
    out["rss_after_bootstrap"] = _proc_status()

    scans = task.get("scans", 0)
    if scans or task.get("first_scan"):
        _reset_hwm()
        t, c0 = time.perf_counter(), time.process_time()
        first = intro.scan(live=live)
        out["first_scan_s"] = time.perf_counter() - t
        out["first_scan_cpu_s"] = time.process_time() - c0
        out["counts"] = dict(first.counts)
        out["zones"] = first.to_json()["zones"]
        out["first_scan_warnings"] = list(first.warnings)
    if scans:
        runs, cpus, parts, warnings = [], [], {}, []
        for _ in range(scans):
            t, c0 = time.perf_counter(), time.process_time()
            c = intro.scan(live=live)
            runs.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c0)
            for k, v in c.timings.items():
                if k != "bootstrap":
                    parts.setdefault(k, []).append(v)
            warnings.extend(c.warnings)
        out["rescan"] = stats(runs)
        out["rescan_cpu"] = stats(cpus)
        out["rescan_parts_median_s"] = {k: statistics.median(v) for k, v in parts.items()}
        out["last_counts"] = dict(c.counts)
        out["scan_warnings"] = len(warnings)
        out["scan_warning_samples"] = sorted(set(warnings))[:5]
        out["rss_scans"] = _proc_status()

    content = task.get("content_scans", 0)
    if content:
        _reset_hwm()
        runs, zero = [], None
        for _ in range(content):
            t = time.perf_counter()
            c = intro.scan(live=live, content=True)
            runs.append(time.perf_counter() - t)
            zero = c.counts.get("zero")
        out["content_scan"] = stats(runs)
        out["content_zero_pages"] = zero
        out["rss_content"] = _proc_status()

    prof_scans = task.get("profile_scans", 0)
    if prof_scans:
        import cProfile

        prof = cProfile.Profile(time.process_time)
        prof.enable()
        for _ in range(prof_scans):
            intro.scan(live=live)
        prof.disable()
        out["profile"] = _profile_top(prof, prof_scans)
        out["profile_scans"] = prof_scans

    out["ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["hwm_reset_works"] = hwm_reset

    if task.get("tracemalloc"):
        import tracemalloc

        tracemalloc.start()
        tracemalloc.reset_peak()
        probe = Introspector(mem, layouts=task.get("layouts", "auto"), cache=task.get("cache", True))
        peaks = {"bootstrap": tracemalloc.get_traced_memory()[1]}
        tracemalloc.reset_peak()
        probe.scan(live=live)
        peaks["scan"] = tracemalloc.get_traced_memory()[1]
        if content:
            tracemalloc.reset_peak()
            probe.scan(live=live, content=True)
            peaks["scan_content"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        out["tracemalloc_peak_bytes"] = peaks

    mem.close()
    out["wall_s"] = time.perf_counter() - t_start
    out["loadavg_end"] = load()
    return out


def run_worker(task: dict[str, Any], what: str) -> dict[str, Any]:
    """Run :func:`worker` in a fresh Python process; its result, plus the process's wall time."""
    t, c0 = time.perf_counter(), _children_cpu()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parents[1] / "introspect.py"), "--worker", json.dumps(task)],
        capture_output=True,
        text=True,
        timeout=WORKER_TIMEOUT,
        env=os.environ.copy(),
    )
    wall, cpu = time.perf_counter() - t, _children_cpu() - c0
    if proc.returncode != 0:
        raise RuntimeError(f"{what}: worker failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_wall_s"] = wall
    res["process_cpu_s"] = cpu
    return res


def _children_cpu() -> float:
    """User + system CPU seconds of waited-for child processes so far."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime
