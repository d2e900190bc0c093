"""Introspection speed and memory: bootstrap and rescan of a 4 GiB guest, beside makedumpfile.

Goals (the issue): bootstrap <= 1 s and each rescan <= 20 ms for a 4 GiB guest on this machine,
memory bounded (never a full copy of guest RAM). One run boots a guest with shared-file RAM (and
one with anonymous RAM, read through ``/proc/PID/mem``), fills most of its memory with
``memtouch --content mix`` and a hot set rewritten at ``--dirty-rate``, and measures, each in a
fresh Python process so that nothing cached in memory helps:

* bootstrap: the first ``Introspector(mem)`` of a process (cold) and a second one (warm), with
  ``kernel.timings`` per step, in ``--rounds`` processes per source, alternating between sources;
* rescan: ``--scans`` calls of ``intro.scan()`` on the paused guest over those processes
  (min/median/p95), ``scan(content=True)`` (reads all RAM to find zero pages), and
  ``scan(live=True)`` on the running guest;
* peak RSS of the measuring process per phase (``VmHWM``, reset between phases) and tracemalloc
  peaks, beside the guest's RAM size;
* a cProfile of a few rescans (which functions dominate).

The reference: the paused guest is dumped as ELF (``dump_vm``) and ``makedumpfile -d 16`` (the
Debian package) excludes free pages from the same dump, alternating with a fresh memvirt process
doing bootstrap + scan of that dump; makedumpfile's excluded free pages are compared with memvirt's
``free`` (buddy) pages. QEMU 7.2 writes its ELF section headers between the ELF header and the
program headers (``e_phoff`` 192) but makedumpfile reads program header *i* at
``sizeof(Elf64_Ehdr) + i * sizeof(Elf64_Phdr)`` whatever ``e_phoff`` says (``elf_info.c``,
``get_elf64_phdr``), finds no PT_LOAD and stops with "get_elf_info: Can't get the number of
PT_LOAD". The bench rewrites the dump's headers in place (program headers right after the ELF
header, section headers moved to the end of the file): no memory byte moves. A kdump-zlib dump is
also tried (``makedumpfile -R`` to un-flatten it, ``phys_base`` fixed: QEMU 7.2 parses VMCOREINFO's
decimal ``NUMBER(phys_base)`` as hex).

    python bench/introspect.py [--memory 4G] [--kernel 6.1] [--json FILE] [--no-anon] [--no-kdump]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from common import GIB, RESULTS, fill_and_pause, fs_type, machine_info, make_console, run_main, size_arg, write_json

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
    from memvirt.memory.open import open_memory

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
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(task)],
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


# --- guests -------------------------------------------------------------------------------------


def boot(image: Any, memory: int, names: list[tuple[str, str]], cpus: int) -> list[Any]:
    from memvirt.errors import VMError
    from memvirt.qemu.vm import BOOT_TIMEOUT, _tail, start_vm

    vms: list[Any] = []
    try:
        for name, ram in names:
            say(f"booting {name} ({ram} RAM, {memory / GIB:.1f} GiB, {cpus} CPU)")
            vms.append(start_vm(name, image, memory=memory, cpus=cpus, ram=ram, wait=False))
        for vm in vms:
            try:
                vm.channel.wait_ready(BOOT_TIMEOUT, vm.alive)
            except Exception:
                raise VMError(f"VM {vm.name!r} did not boot: {_tail(vm.serial_log)}") from None
    except BaseException:
        for vm in vms:
            vm.stop()
        raise
    say(f"booted ({vms[0].config.accel})")
    return vms


# --- dumps and makedumpfile ---------------------------------------------------------------------

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")


def make_dump(vm: Any, fmt: str, dest: Path) -> dict[str, Any]:
    from memvirt.qemu.dump import dump_vm

    say(f"dumping {vm.name} as {fmt} to {dest}")
    t = time.perf_counter()
    dump_vm(vm, dest, fmt)
    dump_s = time.perf_counter() - t
    os.chmod(dest, 0o600)
    st = os.stat(dest)
    say(f"dump {fmt}: {dump_s:.1f} s, {st.st_size / GIB:.2f} GiB")
    return {"format": fmt, "path": str(dest), "seconds": dump_s, "size_bytes": st.st_size, "fs": fs_type(dest)}


def elf_for_makedumpfile(path: Path) -> dict[str, Any]:
    """Rewrite the headers of QEMU's ELF core so that makedumpfile reads it, in place.

    makedumpfile assumes the program headers follow the 64-byte ELF header (as in the kernel's
    /proc/vmcore); QEMU 7.2 puts its section headers there. The program headers move to offset 64
    and the section header table to the end of the file; segments and notes stay where they are.
    """
    with open(path, "r+b") as f:
        raw = f.read(_EHDR.size)
        (ident, e_type, mach, ver, entry, phoff, shoff, flags, ehsize, phentsize, phnum, shentsize, shnum, shstrndx) = (
            _EHDR.unpack(raw)
        )
        before = {"e_phoff": phoff, "e_shoff": shoff, "e_ehsize": ehsize, "e_phnum": phnum, "e_shnum": shnum}
        if phoff == _EHDR.size:
            return {"changed": False, "before": before}
        if phnum == 0xFFFF:
            raise RuntimeError("PN_XNUM dump (paging=true form): too many program headers to move in place")
        f.seek(phoff)
        phdrs = f.read(phnum * phentsize)
        first_data = min(struct.unpack_from("<IIQ", phdrs, i * phentsize)[2] for i in range(phnum))
        if _EHDR.size + len(phdrs) > first_data:
            raise RuntimeError(f"program headers would overwrite data at {first_data:#x}")
        shdrs = b""
        if shoff and shnum:
            f.seek(shoff)
            shdrs = f.read(shnum * shentsize)
        end = f.seek(0, os.SEEK_END)
        new_shoff = (end + 7) & ~7 if shdrs else 0
        if shdrs:
            f.seek(end)
            f.write(b"\0" * (new_shoff - end) + shdrs)
        f.seek(0)
        f.write(
            _EHDR.pack(
                ident,
                e_type,
                mach,
                ver,
                entry,
                _EHDR.size,
                new_shoff,
                flags,
                _EHDR.size,
                phentsize,
                phnum,
                shentsize,
                shnum if shdrs else 0,
                shstrndx if shdrs else 0,
            )
        )
        f.write(phdrs)
    after = {"e_phoff": _EHDR.size, "e_shoff": new_shoff, "e_ehsize": _EHDR.size, "e_phnum": phnum, "e_shnum": shnum}
    return {"changed": True, "before": before, "after": after}


_HEX = r"0x([0-9a-fA-F]+)"


def parse_makedumpfile(text: str) -> dict[str, Any]:
    """Figures from makedumpfile's report (``--message-level 31``)."""
    out: dict[str, Any] = {}
    for key, label in [
        ("original_pages", "Original pages"),
        ("excluded_pages", "Excluded pages"),
        ("free_pages", "Free pages"),
        ("zero_pages", "Pages filled with zero"),
        ("remaining_pages", "Remaining pages"),
        ("memory_hole_pages", "Memory Hole"),
    ]:
        m = re.search(rf"{label}\s*:\s*{_HEX}", text)
        if m:
            out[key] = int(m[1], 16)
    steps: dict[str, float] = {}
    for name, secs in re.findall(r"STEP \[([^\]]+?)\s*\]\s*:\s*([0-9.]+) seconds", text):
        steps[name] = steps.get(name, 0.0) + float(secs)
    out["steps_s"] = steps
    out["notes"] = sorted(
        {ln.strip() for ln in text.splitlines() if "not supported" in ln or "may be incomplete" in ln or "mmap()" in ln}
    )
    return out


def run_makedumpfile(args: list[str], what: str, stdin: Path | None = None) -> dict[str, Any]:
    t, c0 = time.perf_counter(), _children_cpu()
    with open(stdin, "rb") if stdin else open(os.devnull, "rb") as inp:
        proc = subprocess.run(
            ["makedumpfile", *args], stdin=inp, capture_output=True, text=True, errors="replace", timeout=WORKER_TIMEOUT
        )
    wall, cpu = time.perf_counter() - t, _children_cpu() - c0
    text = proc.stdout + "\n" + proc.stderr
    res = {
        "argv": ["makedumpfile", *args],
        "returncode": proc.returncode,
        "wall_s": wall,
        "cpu_s": cpu,
        **parse_makedumpfile(text),
    }
    if proc.returncode != 0:
        tail = [
            ln
            for ln in text.replace("\r", "\n").splitlines()
            if ln.strip() and "%]" not in ln and not ln.startswith(("mem_map", "  "))
        ]
        res["error_tail"] = tail[-6:]
        say(f"makedumpfile ({what}) failed: {' | '.join(tail[-4:])}")
    return res


def makedumpfile_version() -> str:
    try:
        out = subprocess.run(["makedumpfile", "-v"], capture_output=True, text=True, timeout=10)
        return (out.stdout + out.stderr).splitlines()[0].strip()
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "not installed"


def vmcoreinfo_number(path: Path, key: str) -> int | None:
    from memvirt.memory.open import open_memory

    with open_memory(str(path)) as mem:
        text = (mem.vmcoreinfo or b"").decode(errors="replace")
    m = re.search(rf"^NUMBER\({re.escape(key)}\)=(-?\d+)$", text, re.M)
    return int(m[1]) if m else None


def fix_kdump_phys_base(path: Path, phys_base: int) -> dict[str, Any]:
    """QEMU 7.2 fills the kdump sub-header's ``phys_base`` by reading VMCOREINFO's decimal
    ``NUMBER(phys_base)`` as hex; makedumpfile trusts that field when it re-filters a kdump file."""
    with open(path, "r+b") as f:
        hdr = f.read(4096)
        if hdr[:8] != b"KDUMP   ":
            raise RuntimeError(f"{path} is not a plain kdump-compressed file")
        block_size = struct.unpack_from("<i", hdr, 428)[0]
        f.seek(block_size)
        old = struct.unpack("<Q", f.read(8))[0]
        if old != phys_base:
            f.seek(block_size)
            f.write(struct.pack("<Q", phys_base))
    return {"header_phys_base": old, "vmcoreinfo_phys_base": phys_base, "changed": old != phys_base}


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


def _mmp(st: dict[str, Any]) -> str:
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
            _mmp(cold) + (f" (CPU {ms(m['bootstrap_cold_cpu']['median_s'])})" if m.get("bootstrap_cold_cpu") else ""),
            mark(cold.get("median_s"), GOAL_BOOTSTRAP_S),
            _mmp(m.get("bootstrap_cold_nocache") or {})
            + (
                f" (CPU {ms(m['bootstrap_cold_nocache_cpu']['median_s'])})"
                if m.get("bootstrap_cold_nocache_cpu")
                else ""
            ),
            mark((m.get("bootstrap_cold_nocache") or {}).get("median_s"), GOAL_BOOTSTRAP_S),
            ms((m.get("bootstrap_warm") or {}).get("median_s")),
            ms((m.get("first_scan") or {}).get("median_s")),
            _mmp(r),
            f"{mark(r.get('median_s'), GOAL_RESCAN_S)} (p95 {mark(r.get('p95_s'), GOAL_RESCAN_S)})" if r else "-",
            f"{ms((m.get('rescan_cpu') or {}).get('median_s'))} "
            f"{mark((m.get('rescan_cpu') or {}).get('median_s'), GOAL_RESCAN_S)}"
            if m.get("rescan_cpu")
            else "-",
            ms((m.get("content_scan") or {}).get("median_s")),
            _mmp(m.get("live_rescan") or {}) + (f" ({m['live_warnings']} warn.)" if m.get("live_warnings") else ""),
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
    root = Path(__file__).resolve().parent.parent

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


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--memory", default="4G", type=size_arg, help="guest RAM (default 4G)")
    p.add_argument("--fill", default="2560M", type=size_arg, help="bytes memtouch fills (default 2560M)")
    p.add_argument("--hot", default="64M", type=size_arg, help="memtouch hot set (default 64M)")
    p.add_argument("--dirty-rate", default="32M/s", help="memtouch --dirty-rate of the hot set (default 32M/s)")
    p.add_argument("--cpus", default=1, type=int, help="guest CPUs (default 1)")
    p.add_argument("--kernel", default="6.1", help="guest kernel spec for default_image (default 6.1)")
    p.add_argument("--layouts", default="auto", help="Introspector layouts (default auto)")
    p.add_argument(
        "--rounds",
        default=5,
        type=int,
        help="fresh measuring processes per source, alternating between the sources (and with\n"
        "makedumpfile on the dump); each times a cold and a warm bootstrap and\n"
        "scans/rounds rescans (default 5)",
    )
    p.add_argument("--scans", default=50, type=int, help="timed rescans per source, over all rounds (default 50)")
    p.add_argument("--content-scans", default=10, type=int, help="timed scan(content=True) per guest (default 10)")
    p.add_argument("--profile-scans", default=5, type=int, help="rescans under cProfile per guest (default 5)")
    p.add_argument("--no-anon", action="store_true", help="skip the anonymous-RAM guest (/proc/PID/mem)")
    p.add_argument("--no-kdump", action="store_true", help="skip the kdump-zlib dump (QEMU takes 1.5-3 min for 4 GiB)")
    p.add_argument("--json", type=Path, default=RESULTS / "introspect.json", help="where to write the results")
    p.add_argument("--keep-dumps", type=Path, metavar="DIR", help="write the dumps to DIR and keep them")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker is None and (a.fill <= a.hot or a.fill > a.memory - (512 << 20)):
        p.error("--fill must be above --hot and at most --memory minus 512M")
    if a.rounds < 1 or a.scans < a.rounds or min(a.content_scans, a.profile_scans) < 0:
        p.error("--rounds must be positive and at most --scans; counts must not be negative")
    return a


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MEMVIRT_HOME", "/tmp/bench-intro-state")
    os.environ.setdefault("MEMVIRT_RAM_DIR", "/dev/shm/bench-intro-ram")
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    from memvirt.image.build import default_image
    from memvirt.qemu.accel import qemu_binary

    started = time.time()
    report: dict[str, Any] = {
        "bench": "introspect",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "machine": machine_info(qemu_binary()),
        "code": code_state(),
        "goals": {"bootstrap_s": GOAL_BOOTSTRAP_S, "rescan_s": GOAL_RESCAN_S},
        "config": {
            "memory_bytes": args.memory,
            "fill_bytes": args.fill,
            "hot_bytes": args.hot,
            "dirty_rate": args.dirty_rate,
            "cpus": args.cpus,
            "layouts": args.layouts,
            "rounds": args.rounds,
            "scans": args.scans,
            "content_scans": args.content_scans,
            "profile_scans": args.profile_scans,
            "memvirt_home": os.environ["MEMVIRT_HOME"],
            "ram_dir": os.environ["MEMVIRT_RAM_DIR"],
            "makedumpfile": makedumpfile_version(),
            "units": "seconds in JSON; ms in the tables; MiB = 2^20 bytes",
        },
        "sources": {},
        "loadavg": {},
    }
    sources: dict[str, dict[str, Any]] = report["sources"]
    vms: list[Any] = []
    dump_dir = args.keep_dumps
    tmp_dir: Path | None = None
    error: str | None = None
    per_round = args.scans // args.rounds

    def phase(name: str) -> None:
        report["loadavg"][name] = load()
        say(f"[bold]{name}[/bold] (load {report['loadavg'][name]})")

    def round_task(source: str) -> dict[str, Any]:
        return {"source": source, "bootstraps": 2, "scans": per_round, "layouts": args.layouts}

    def nocache_task(source: str) -> dict[str, Any]:
        return {"source": source, "bootstraps": 2, "cache": False, "layouts": args.layouts}

    def said_round(name: str, r: int, res: dict[str, Any]) -> None:
        b = res["bootstraps"]
        say(
            f"{name} round {r + 1}: bootstrap cold {ms(b[0]['seconds'])} / warm {ms(b[1]['seconds'])} ms, "
            f"first scan {ms(res.get('first_scan_s'))} ms, rescan median {ms(res['rescan']['median_s'])} ms "
            f"(process {res['process_wall_s']:.2f} s)"
        )

    try:
        image = default_image(args.kernel)
        report["config"]["guest_kernel"] = image.release
        if dump_dir is None:
            tmp_dir = dump_dir = Path(tempfile.mkdtemp(prefix="memvirt-bench-intro-"))
        else:
            dump_dir.mkdir(parents=True, exist_ok=True)

        names = [(VM_SHARED, "shared")] + ([] if args.no_anon else [(VM_ANON, "anonymous")])
        phase("boot")
        vms = boot(image, args.memory, names, args.cpus)
        report["machine"]["accel"] = vms[0].config.accel
        guests = {vm.name: vm for vm in vms}
        label = {VM_SHARED: "RAM file", VM_ANON: "/proc/PID/mem"}
        cmd = (
            f"memtouch --hot {args.hot} --cold {args.fill - args.hot} --dirty-rate {args.dirty_rate} "
            f"--content mix --report 30"
        )
        phase("fill")
        report["guests"] = fill_and_pause(vms, cmd, GUEST_LOG, FILL_TIMEOUT, say, meminfo=True)

        # 1. paused guests: rounds of fresh processes, alternating between the sources.
        phase("paused guests: bootstrap and rescans")
        for r in range(args.rounds):
            for vm in vms:
                res = run_worker(round_task(vm.name), f"round {r + 1} {vm.name}")
                sources.setdefault(label[vm.name], {}).setdefault("rounds", []).append(res)
                said_round(label[vm.name], r, res)
                res = run_worker(nocache_task(vm.name), f"round {r + 1} {vm.name}, no cache")
                sources[label[vm.name]].setdefault("rounds_nocache", []).append(res)
                say(
                    f"{label[vm.name]} round {r + 1}, no build cache: bootstrap cold "
                    f"{ms(res['bootstraps'][0]['seconds'])} / warm {ms(res['bootstraps'][1]['seconds'])} ms"
                )

        # 2. paused guests: content scans, profile, tracemalloc.
        for vm in vms:
            phase(f"content scans and profile, {label[vm.name]}")
            res = run_worker(
                {
                    "source": vm.name,
                    "bootstraps": 1,
                    "content_scans": args.content_scans,
                    "profile_scans": args.profile_scans,
                    "tracemalloc": True,
                    "layouts": args.layouts,
                },
                f"extra {vm.name}",
            )
            sources[label[vm.name]]["extra"] = res
            say(
                f"{label[vm.name]}: content scan median {ms(res.get('content_scan', {}).get('median_s'))} ms, "
                f"zero pages {res.get('content_zero_pages')}, tracemalloc peaks {res.get('tracemalloc_peak_bytes')}"
            )

        # 3. running guests, one at a time: live rescans (memtouch keeps dirtying its hot set).
        for vm in vms:
            phase(f"live {label[vm.name]}")
            vm.resume()
            try:
                time.sleep(2)
                res = run_worker(
                    {"source": vm.name, "bootstraps": 1, "scans": args.scans, "live": True, "layouts": args.layouts},
                    f"live {vm.name}",
                )
            finally:
                vm.pause()
            sources[label[vm.name]]["live"] = res
            say(
                f"{label[vm.name]} live: rescan min/median/p95 {_mmp(res['rescan'])} ms, "
                f"{res['scan_warnings']} warnings in {args.scans} scans"
            )

        shared = guests[VM_SHARED]
        if VM_ANON in guests:
            guests[VM_ANON].stop()
            vms.remove(guests[VM_ANON])
            say(f"{VM_ANON} stopped")

        # 4. the reference on an ELF dump of the paused guest.
        phase("ELF dump")
        ref: dict[str, Any] = {"makedumpfile_runs": []}
        report["reference"] = ref
        elf = dump_dir / f"{VM_SHARED}.elf"
        ref["dump"] = make_dump(shared, "elf", elf)
        if shared.status() != "paused":
            raise RuntimeError(f"{VM_SHARED} is {shared.status()} after the dump, not paused")
        mdf_args = ["--dry-run", "-d", "16", "--message-level", "31", str(elf), str(dump_dir / "out-d16")]
        ref["as_written"] = run_makedumpfile(mdf_args, "QEMU's ELF as written")
        ref["memvirt_as_written"] = run_worker(
            {"source": str(elf), "bootstraps": 1, "first_scan": True, "layouts": args.layouts},
            "memvirt on the ELF as written",
        )
        ref["header_fix"] = elf_for_makedumpfile(elf)
        say(f"ELF headers rewritten for makedumpfile: {ref['header_fix']}")
        phase("makedumpfile vs memvirt on the ELF dump, alternating")
        for r in range(args.rounds):
            m = run_makedumpfile(mdf_args, "fixed ELF")
            ref["makedumpfile_runs"].append(m)
            v = run_worker(round_task(str(elf)), "memvirt on the fixed ELF")
            sources.setdefault("ELF dump", {}).setdefault("rounds", []).append(v)
            sources["ELF dump"].setdefault("rounds_nocache", []).append(
                run_worker(nocache_task(str(elf)), "memvirt on the fixed ELF, no cache")
            )
            say(
                f"makedumpfile round {r + 1}: exit {m['returncode']}, {m['wall_s']:.2f} s, exclusion "
                f"{ms(m['steps_s'].get('Excluding unnecessary pages'))} ms, free {m.get('free_pages')}"
            )
            said_round("ELF dump", r, v)
        ref["memvirt_counts"] = sources["ELF dump"]["rounds"][-1]["counts"]
        ref["memvirt_counts_equal_before_and_after_fix"] = ref["memvirt_as_written"]["counts"] == ref["memvirt_counts"]
        if tmp_dir is not None:
            elf.unlink()

        # 5. a kdump-zlib dump: memvirt reads it as written; makedumpfile after -R and a phys_base fix.
        if not args.no_kdump:
            phase("kdump-zlib dump")
            kd = dump_dir / f"{VM_SHARED}.kdump"
            kref: dict[str, Any] = {"dump": make_dump(shared, "kdump-zlib", kd)}
            report["reference_kdump"] = kref
            res = run_worker({"source": str(kd), "bootstraps": 2, "scans": 10, "layouts": args.layouts}, "kdump")
            sources["kdump-zlib dump"] = {"rounds": [res]}
            said_round("kdump-zlib dump", 0, res)
            kref["memvirt_counts"] = res["counts"]
            kref["as_written"] = run_makedumpfile(
                ["--dry-run", "-d", "16", "--message-level", "31", str(kd), str(dump_dir / "out-k")], "QEMU's kdump"
            )
            plain = dump_dir / f"{VM_SHARED}.plain.kdump"
            kref["rearrange"] = run_makedumpfile(["-R", str(plain)], "-R", stdin=kd)
            if kref["rearrange"]["returncode"] == 0:
                pb = vmcoreinfo_number(kd, "phys_base")
                if pb is not None:
                    kref["phys_base_fix"] = fix_kdump_phys_base(plain, pb)
                    say(
                        f"kdump sub-header phys_base {kref['phys_base_fix']['header_phys_base']:#x}, "
                        f"VMCOREINFO says {pb:#x}"
                    )
                kref["refilter"] = run_makedumpfile(
                    ["--dry-run", "-d", "16", "--message-level", "31", str(plain), str(dump_dir / "out-k2")],
                    "un-flattened kdump",
                )
                say(
                    f"makedumpfile on the un-flattened kdump: exit {kref['refilter']['returncode']}, "
                    f"free {kref['refilter'].get('free_pages')} (memvirt {res['counts']['free']})"
                )
            if tmp_dir is not None:
                kd.unlink()
                plain.unlink(missing_ok=True)
    except BaseException as e:
        error = f"{type(e).__name__}: {e}"
        if not isinstance(e, KeyboardInterrupt | SystemExit):
            traceback.print_exc()
    finally:
        for vm in vms:
            try:
                vm.stop()
            except Exception as e:  # keep cleaning up the rest
                console().print(f"[red]could not stop {vm.name}: {e}[/red]")
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)

    report["wall_s"] = time.time() - started
    report["loadavg"]["end"] = load()
    if error:
        report["error"] = error
    for s in sources.values():
        s["summary"] = summarize(s)
    c = console()
    if sources:
        c.print(summary_table(report))
        c.print(steps_table(report))
        c.print(parts_table(report))
    if report.get("reference"):
        c.print(reference_table(report))
    for name in ("RAM file", "/proc/PID/mem"):
        if (sources.get(name) or {}).get("extra", {}).get("profile"):
            c.print(profile_table(sources[name]["extra"], name))
    c.print(
        f"Goals: bootstrap <= {GOAL_BOOTSTRAP_S:.0f} s (cold: first Introspector() of a fresh process, median of "
        f"{args.rounds}; with the build-id cache a previous census wrote, and with cache=False: the first sight of "
        f"a kernel build), rescan <= {GOAL_RESCAN_S * 1e3:.0f} ms (median of {per_round * args.rounds} over "
        f"{args.rounds} processes; p95 marked too). CPU = the measuring process's user+system time "
        "(time.process_time), which leaves out time other jobs held the CPU. Peak RSS = the measuring processes' "
        "highest VmHWM over "
        f"bootstrap, rescans and content scans (reset between phases; on the RAM file the mapped struct pages "
        f"count as RssShmem); baseline = Python + numpy + memvirt imported; guest RAM {args.memory / GIB:.0f} GiB. "
        f"Host load (1-min) per phase: "
        + "; ".join(f"{k} {v[0]}" for k, v in report["loadavg"].items())
        + f". Host: {report['machine']['cpus']} CPUs shared with other jobs; guests under "
        f"{report['machine'].get('accel', '?')}; a running guest takes a core."
    )
    out = write_json(args.json, report)
    say(f"wrote {out}; wall time {report['wall_s']:.0f} s")
    if error:
        c.print(f"[red]bench failed: {error}[/red]")
        return 1
    return 0


if __name__ == "__main__":
    run_main(main)
