"""Aggregation of the workers' figures and the tables and JSON they end in."""

from __future__ import annotations

import statistics
import subprocess
from pathlib import Path
from typing import Any

from common import GIB

from intro import (
    GOAL_BOOTSTRAP_S,
    GOAL_RESCAN_S,
    stats,
)

# --- aggregation and output ---------------------------------------------------------------------


def ms(x: float | None) -> str:
    return "-" if x is None else f"{1e3 * x:.1f}"


def mark(value: float | None, goal: float) -> str:
    if value is None:
        return "-"
    return "[green]PASS[/green]" if value <= goal else "[red]FAIL[/red]"


def _median_steps(steps: list[dict[str, float]]) -> dict[str, float]:
    keys: list[str] = []
    for st in steps:
        keys += [k for k in st if k not in keys]
    return {k: statistics.median([st.get(k, 0.0) for st in steps]) for k in keys} if steps else {}


def summarize(s: dict[str, Any]) -> dict[str, Any]:
    """Headline figures of one source from its worker runs (``rounds``, ``extra``, ``live``)."""
    rounds = s.get("rounds", [])
    nocache = s.get("rounds_nocache", [])
    extra = s.get("extra") or {}
    live = s.get("live") or {}
    cold = [r["bootstraps"][0] for r in rounds]
    warm = [b for r in [*rounds, extra] for b in r.get("bootstraps", [])[1:]]
    rescans = [x for r in rounds for x in (r.get("rescan") or {}).get("runs_s", [])]
    rescans_cpu = [x for r in rounds for x in (r.get("rescan_cpu") or {}).get("runs_s", [])]
    parts: dict[str, list[float]] = {}
    for r in rounds:
        for k, v in (r.get("rescan_parts_median_s") or {}).items():
            parts.setdefault(k, []).append(v)
    hwm = [
        w.get(k, {}).get("VmHWM", 0)
        for w in [*rounds, extra]
        for k in ("rss_after_bootstrap", "rss_scans", "rss_content")
    ]
    counts = [r.get("counts") for r in rounds if r.get("counts")]
    out = {
        "bootstrap_cold": stats([b["seconds"] for b in cold]),
        "bootstrap_cold_steps_median_s": _median_steps([b["steps"] for b in cold]),
        "bootstrap_warm": stats([b["seconds"] for b in warm]),
        "bootstrap_warm_steps_median_s": _median_steps([b["steps"] for b in warm]),
        "bootstrap_cold_from_build_cache": [b.get("from_build_cache") for b in cold],
        "bootstrap_cold_nocache": stats([r["bootstraps"][0]["seconds"] for r in nocache]),
        "bootstrap_cold_nocache_steps_median_s": _median_steps([r["bootstraps"][0]["steps"] for r in nocache]),
        "bootstrap_warm_nocache": stats([b["seconds"] for r in nocache for b in r["bootstraps"][1:]]),
        "imports_s": statistics.median([r["import_s"] for r in rounds]) if rounds else None,
        "first_scan": stats([r["first_scan_s"] for r in rounds if "first_scan_s" in r]),
        "rescan": stats(rescans),
        "rescan_cpu": stats(rescans_cpu),
        "bootstrap_cold_cpu": stats([b["cpu_s"] for b in cold if "cpu_s" in b]),
        "bootstrap_cold_nocache_cpu": stats(
            [r["bootstraps"][0]["cpu_s"] for r in nocache if "cpu_s" in r["bootstraps"][0]]
        ),
        "live_rescan_cpu": live.get("rescan_cpu") or {},
        "rescan_parts_median_s": {k: statistics.median(v) for k, v in parts.items()},
        "content_scan": extra.get("content_scan") or {},
        "live_rescan": live.get("rescan") or {},
        "live_warnings": live.get("scan_warnings"),
        "peak_rss_bytes": max(hwm, default=0),
        "rss_after_scans_bytes": statistics.median([r["rss_scans"]["VmRSS"] for r in rounds if "rss_scans" in r])
        if any("rss_scans" in r for r in rounds)
        else None,
        "rss_baseline_bytes": statistics.median([r["rss_baseline"]["VmRSS"] for r in rounds]) if rounds else None,
        "tracemalloc_peak_bytes": extra.get("tracemalloc_peak_bytes"),
        "ram_bytes": rounds[0]["ram_bytes"] if rounds else None,
        "counts": counts[-1] if counts else {},
        "counts_equal_in_all_rounds": all(c == counts[0] for c in counts),
    }
    out["goal_bootstrap_cold_median"] = (out["bootstrap_cold"].get("median_s") or 1e9) <= GOAL_BOOTSTRAP_S
    out["goal_bootstrap_cold_nocache_median"] = (
        out["bootstrap_cold_nocache"].get("median_s") or 1e9
    ) <= GOAL_BOOTSTRAP_S
    out["goal_rescan_median"] = (out["rescan"].get("median_s") or 1e9) <= GOAL_RESCAN_S
    out["goal_rescan_p95"] = (out["rescan"].get("p95_s") or 1e9) <= GOAL_RESCAN_S
    return out


def mmp(st: dict[str, Any]) -> str:
    return f"{ms(st.get('min_s'))} / {ms(st.get('median_s'))} / {ms(st.get('p95_s'))}" if st else "-"


def summary_table(report: dict[str, Any]) -> Any:
    from rich.table import Table

    t = Table(
        title=f"memvirt introspection, {report['config']['memory_bytes'] / GIB:.0f} GiB guest "
        f"({report['machine']['cpu_model']}, {report['machine']['cpus']} CPUs, "
        f"{report['machine'].get('accel', '?')}, guest {report['config'].get('guest_kernel', '?')})"
    )
    for col in [
        "source",
        "bootstrap cold, build cache: min/med/p95 ms",
        "goal",
        "bootstrap cold, no cache: min/med/p95 ms",
        "goal",
        "warm med ms",
        "first scan med ms",
        "rescan min/med/p95 ms",
        "goal",
        "rescan CPU med ms",
        "content scan med ms",
        "live rescan min/med/p95 ms",
        "peak RSS MiB (% RAM)",
        "RSS after scans / baseline MiB",
        "free / free_pcp pages",
    ]:
        t.add_column(col, justify="left" if col in ("source", "goal") else "right")
    for name, s in report["sources"].items():
        m = s.get("summary") or {}
        cold, r = m.get("bootstrap_cold") or {}, m.get("rescan") or {}
        ram = m.get("ram_bytes") or report["config"]["memory_bytes"]
        peak, steady, base = m.get("peak_rss_bytes"), m.get("rss_after_scans_bytes"), m.get("rss_baseline_bytes")
        counts = m.get("counts") or {}
        t.add_row(
            name,
            mmp(cold) + (f" (CPU {ms(m['bootstrap_cold_cpu']['median_s'])})" if m.get("bootstrap_cold_cpu") else ""),
            mark(cold.get("median_s"), GOAL_BOOTSTRAP_S),
            mmp(m.get("bootstrap_cold_nocache") or {})
            + (
                f" (CPU {ms(m['bootstrap_cold_nocache_cpu']['median_s'])})"
                if m.get("bootstrap_cold_nocache_cpu")
                else ""
            ),
            mark((m.get("bootstrap_cold_nocache") or {}).get("median_s"), GOAL_BOOTSTRAP_S),
            ms((m.get("bootstrap_warm") or {}).get("median_s")),
            ms((m.get("first_scan") or {}).get("median_s")),
            mmp(r),
            f"{mark(r.get('median_s'), GOAL_RESCAN_S)} (p95 {mark(r.get('p95_s'), GOAL_RESCAN_S)})" if r else "-",
            f"{ms((m.get('rescan_cpu') or {}).get('median_s'))} "
            f"{mark((m.get('rescan_cpu') or {}).get('median_s'), GOAL_RESCAN_S)}"
            if m.get("rescan_cpu")
            else "-",
            ms((m.get("content_scan") or {}).get("median_s")),
            mmp(m.get("live_rescan") or {}) + (f" ({m['live_warnings']} warn.)" if m.get("live_warnings") else ""),
            f"{peak / 2**20:.0f} ({100 * peak / ram:.1f} %)" if peak else "-",
            f"{steady / 2**20:.0f} / {base / 2**20:.0f}" if steady and base else "-",
            f"{counts.get('free', '-')} / {counts.get('free_pcp', '-')}" if counts else "-",
        )
    return t


def steps_table(report: dict[str, Any]) -> Any:
    from rich.table import Table

    t = Table(
        title="bootstrap steps, median ms (cold = first Introspector() of a fresh process, from the build-id "
        "cache unless 'no cache'; warm = a second one in the same process)"
    )
    rows: dict[str, dict[str, float]] = {}
    for name, s in report["sources"].items():
        m = s.get("summary") or {}
        for kind, what in (("cold", "cold"), ("warm", "warm"), ("cold_nocache", "cold, no cache")):
            if m.get(f"bootstrap_{kind}_steps_median_s"):
                rows[f"{name} {what}"] = m[f"bootstrap_{kind}_steps_median_s"]
    keys: list[str] = []
    for r in rows.values():
        keys += [k for k in r if k not in keys]
    t.add_column("run")
    for k in keys:
        t.add_column(k, justify="right")
    for label, r in rows.items():
        t.add_row(label, *[ms(r.get(k)) for k in keys])
    return t


def parts_table(report: dict[str, Any]) -> Any:
    from rich.table import Table

    t = Table(title="rescan parts (Census.timings), median ms")
    keys: list[str] = []
    for s in report["sources"].values():
        keys += [k for k in (s.get("summary") or {}).get("rescan_parts_median_s", {}) if k not in keys]
    t.add_column("source")
    for k in keys:
        t.add_column(k, justify="right")
    for name, s in report["sources"].items():
        p = (s.get("summary") or {}).get("rescan_parts_median_s", {})
        if p:
            t.add_row(name, *[ms(p.get(k)) for k in keys])
    return t


def reference_table(report: dict[str, Any]) -> Any:
    from rich.table import Table

    ref = report.get("reference") or {}
    t = Table(
        title="reference: makedumpfile -d 16 (Debian 1.7.2) and memvirt on the same dump (alternating fresh processes)"
    )
    for col in [
        "tool, dump",
        "free pages excluded/found",
        "free_pcp",
        "vs memvirt free",
        "exclusion / scan ms (median)",
        "process wall s (min/median)",
        "process CPU s (median)",
        "note",
    ]:
        t.add_column(col, justify="left" if col in ("tool, dump", "vs memvirt free", "note") else "right")
    mv_counts = ref.get("memvirt_counts") or {}

    def mdf_row(label: str, runs: list[dict[str, Any]], note: str) -> None:
        ok = [r for r in runs if r.get("returncode") == 0]
        if not ok:
            if runs:
                t.add_row(
                    label,
                    "[red]failed[/red]",
                    "",
                    "",
                    "",
                    f"{runs[0]['wall_s']:.2f}",
                    "",
                    " | ".join(runs[0].get("error_tail", [])[-2:]),
                )
            return
        free = ok[0].get("free_pages")
        d = None if free is None or not mv_counts else free - mv_counts.get("free", 0)
        excl = [r["steps_s"].get("Excluding unnecessary pages", 0.0) for r in ok]
        walls = [r["wall_s"] for r in ok]
        t.add_row(
            label,
            str(free),
            "not excluded",
            "-" if d is None else ("[green]equal[/green]" if d == 0 else f"[red]{d:+d}[/red]"),
            ms(statistics.median(excl)),
            f"{min(walls):.2f} / {statistics.median(walls):.2f}",
            f"{statistics.median([r.get('cpu_s', 0.0) for r in ok]):.2f}",
            note,
        )

    mdf_row("makedumpfile, QEMU ELF as written", [ref["as_written"]] if ref.get("as_written") else [], "")
    mdf_row(
        "makedumpfile, ELF headers fixed",
        ref.get("makedumpfile_runs", []),
        "--dry-run; wall includes reading every kept page",
    )
    mv = (report["sources"].get("ELF dump") or {}).get("rounds", [])
    if mv:
        boot = [r["bootstraps"][0]["seconds"] for r in mv]
        t.add_row(
            "memvirt bootstrap + first scan, ELF fixed",
            str(mv_counts.get("free")),
            str(mv_counts.get("free_pcp")),
            "",
            ms(statistics.median([r["first_scan_s"] for r in mv])),
            f"{min(r['process_wall_s'] for r in mv):.2f} / {statistics.median([r['process_wall_s'] for r in mv]):.2f}",
            f"{statistics.median([r.get('process_cpu_s', 0.0) for r in mv]):.2f}",
            f"cold bootstrap {ms(statistics.median(boot))} ms; wall: Python start, imports, "
            f"{len(mv[0]['bootstraps'])} bootstraps, {mv[0]['task'].get('scans', 0) + 1} scans",
        )
    k = report.get("reference_kdump") or {}
    if k:
        mdf_row("makedumpfile, QEMU kdump-zlib as written", [k["as_written"]] if k.get("as_written") else [], "")
        if k.get("refilter"):
            mdf_row(
                "makedumpfile, kdump -R + phys_base fixed",
                [k["refilter"]],
                f"-R took {k['rearrange']['wall_s']:.1f} s; wall includes decompressing the kept pages",
            )
    return t


def profile_table(extra: dict[str, Any], name: str, n: int = 18) -> Any:
    from rich.table import Table

    prof = extra.get("profile") or {}
    t = Table(
        title=f"cProfile (CPU time, so other jobs' load does not count) of {extra.get('profile_scans', 0)} "
        f"rescans of {name}, per scan, by own time (cProfile adds overhead; ctypes calls count in "
        f"their caller's own time)"
    )
    for col in ["function", "calls", "tottime ms", "cumtime ms"]:
        t.add_column(col, justify="left" if col == "function" else "right")
    for r in prof.get("by_tottime", [])[:n]:
        t.add_row(
            r["function"],
            f"{r['calls_per_scan']:.0f}",
            f"{r['tottime_ms_per_scan']:.2f}",
            f"{r['cumtime_ms_per_scan']:.2f}",
        )
    return t


def code_state() -> dict[str, Any]:
    """The commit measured and which files under memvirt/ differ from it (read-only git)."""
    root = Path(__file__).resolve().parents[2]

    def git(*a: str) -> str:
        try:
            return subprocess.run(
                ["git", "-C", str(root), *a], capture_output=True, text=True, timeout=30
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    return {
        "commit": git("rev-parse", "HEAD"),
        "uncommitted_under_memvirt": git("status", "--porcelain", "--", "memvirt").splitlines(),
    }
