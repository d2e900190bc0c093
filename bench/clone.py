"""Lazy cloning against eager cloning: start latency, host memory, and each clone's private memory.

Three parts, each lazy (the clone maps the template's RAM file copy-on-write) beside eager (the
clone first copies the RAM file: the baseline), from the same run:

* latency: request to QEMU reporting ``running`` for templates of 512 MiB, 2 GiB and 4 GiB whose
  guests filled half their RAM; QEMU's own process start (fork to daemonized) is reported apart,
  and the time until the clone's guest answers on its command channel;
* host memory: MemAvailable before and after 1, 5 and 10 clones of a 1 GiB template, beside the
  sum of what memvirt can attribute (each clone process's private memory, the growth of the
  template's file, eager RAM copies), which other processes on the host cannot disturb;
* private memory over time: smaps of each clone's RAM mapping from the moment it runs, while
  ``memtouch`` in it (started in the template) goes on dirtying its 32 MiB hot set.

    python bench/clone.py [--sizes 512M,2G,4G] [--repeat 3] [--counts 1,5,10] [--duration 30] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

from common import GIB, RESULTS, machine_info, make_console, run_main, write_json
from rich.table import Table

MIB = float(1 << 20)
console = make_console()
T0 = time.monotonic()


def say(msg: str) -> None:
    console.print(f"[dim]{time.monotonic() - T0:7.1f}s[/dim] {msg}")


def parse_sizes(text: str) -> list[int]:
    from memvirt.units import parse_size

    return [parse_size(s) for s in text.split(",") if s]


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) << 10
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def mem_available_settled(samples: int = 5) -> int:
    """Median of a few MemAvailable readings, so one burst elsewhere on the host counts less."""
    vals = []
    for _ in range(samples):
        vals.append(mem_available())
        time.sleep(0.2)
    return int(statistics.median(vals))


def ksm_state() -> dict[str, str]:
    """The host's KSM switch and merge count: KSM could merge clones' private pages behind smaps' back."""
    out = {}
    for key in ("run", "pages_sharing"):
        try:
            out[key] = Path(f"/sys/kernel/mm/ksm/{key}").read_text().strip()
        except OSError:
            out[key] = "?"
    return out


def allocated(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def make_template(image: Any, name: str, memory: int, workload: str) -> Any:
    """Boot a guest, start ``workload`` (memtouch), wait until it filled its sets, freeze it."""
    from memvirt.clone.template import freeze
    from memvirt.qemu.vm import VM, start_vm

    say(f"booting {name} ({memory / GIB:.1f} GiB)")
    vm = start_vm(name, image, memory=memory)
    vm.exec_background(workload, "/tmp/bench-memtouch.log")
    deadline = time.monotonic() + 1800
    while "memtouch ready" not in vm.exec("cat /tmp/bench-memtouch.log").text:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: memtouch did not get ready")
        time.sleep(1)
    t = time.perf_counter()
    freeze(vm)
    vm = VM.load(name)
    say(
        f"{name}: '{workload}' ready; frozen in {(time.perf_counter() - t) * 1000:.0f} ms, "
        f"RAM file {allocated(vm.config.ram_path) / MIB:.0f} MiB allocated"
    )
    return vm


def start(template: Any, name: str, eager: bool, wait: bool = True) -> dict[str, Any]:
    from memvirt.clone.start import settle, start_clone
    from memvirt.qemu.vm import VM

    c = start_clone(template, name, eager)
    if wait:
        settle(VM.load(name), c)
    return c.to_json()


def stop_all_clones() -> None:
    from memvirt.qemu.vm import VM

    for v in VM.all():
        if v.config.clone_of and v.name.startswith("bench-cl-"):
            v.stop(force=True)


# --- part 1: latency ----------------------------------------------------------------------------


def latency(image: Any, sizes: list[int], repeat: int) -> list[dict[str, Any]]:
    """All templates first, then clone starts in turn over sizes and modes, so that a change in
    host load during the run hits every size alike."""
    tpls = []
    try:
        for size in sizes:
            tpls.append(
                make_template(image, f"bench-cl-{size >> 20}m", size, f"memtouch --hot 8M --cold {(size // 2) >> 20}M")
            )
        runs: dict[int, dict[str, list[dict[str, Any]]]] = {s: {"lazy": [], "eager": []} for s in sizes}
        for r in range(repeat):
            for size, tpl in zip(sizes, tpls, strict=True):
                for mode in ("lazy", "eager"):
                    c = start(tpl, f"bench-cl-lat-{mode}-{r}", mode == "eager")
                    runs[size][mode].append(c)
                    stop_all_clones()
                    say(
                        f"{size >> 20} MiB {mode}: running in {c['seconds'] * 1000:.0f} ms "
                        f"(QEMU start {c['qemu_seconds'] * 1000:.0f}, restore {c['restore_seconds'] * 1000:.0f}, "
                        f"copy {c['copy_seconds'] * 1000:.0f} ms of {c['copied_bytes'] / MIB:.0f} MiB), "
                        f"guest answers at {c['guest_seconds'] * 1000:.0f} ms"
                    )
    finally:
        stop_all_clones()
        for tpl in tpls:
            tpl.stop(force=True)
    rows = []
    for size in sizes:
        row: dict[str, Any] = {"ram_bytes": size, "filled_bytes": size // 2, "runs": runs[size]}
        for mode, rs in runs[size].items():
            row[mode] = {
                k: statistics.median(x[k] for x in rs)
                for k in ("seconds", "qemu_seconds", "restore_seconds", "copy_seconds", "copied_bytes", "guest_seconds")
            }
            row[mode]["beyond_qemu_seconds"] = statistics.median(x["seconds"] - x["qemu_seconds"] for x in rs)
        rows.append(row)
    return rows


# --- parts 2 and 3: host memory and private memory over time --------------------------------------


def clone_costs(names: list[str]) -> dict[str, int]:
    """What memvirt can attribute to running clones: their processes' private memory and RAM copies."""
    from memvirt.clone.memory import process_private
    from memvirt.qemu.vm import VM

    vms = [VM.load(n) for n in names]
    return {
        "process_private": sum(process_private(v.config.pid) for v in vms),
        "ram_copies": sum(allocated(v.config.ram_path) for v in vms if v.config.ram_path),
    }


def host_memory(tpl: Any, counts: list[int], settle_s: float) -> list[dict[str, Any]]:
    time.sleep(2)
    before = mem_available_settled()
    time.sleep(settle_s)
    drift = before - mem_available_settled()
    say(f"no clones: MemAvailable moved by {drift / GIB:+.2f} GiB in {settle_s:.0f} s (other processes on the host)")
    rows: list[dict[str, Any]] = [
        {
            "mode": "none",
            "clones": 0,
            "mem_available_delta": drift,
            "attributed": 0,
            "process_private": 0,
            "ram_copies": 0,
            "template_file_growth": 0,
            "start_all_seconds": 0.0,
            "median_start_seconds": 0.0,
        }
    ]
    for mode in ("lazy", "eager"):
        for n in counts:
            time.sleep(2)
            before = mem_available_settled()
            tpl_before = allocated(tpl.config.ram_path)
            names = [f"bench-cl-mem-{mode}-{i}" for i in range(1, n + 1)]
            t = time.perf_counter()
            starts = [start(tpl, name, mode == "eager", wait=False) for name in names]
            started_s = time.perf_counter() - t
            from memvirt.clone.start import settle
            from memvirt.qemu.vm import VM

            for name in names:
                settle(VM.load(name))
            time.sleep(settle_s)
            after = mem_available_settled()
            costs = clone_costs(names)
            growth = allocated(tpl.config.ram_path) - tpl_before
            row = {
                "mode": mode,
                "clones": n,
                "mem_available_delta": before - after,
                "attributed": costs["process_private"] + costs["ram_copies"] + growth,
                "process_private": costs["process_private"],
                "ram_copies": costs["ram_copies"],
                "template_file_growth": growth,
                "start_all_seconds": started_s,
                "median_start_seconds": statistics.median(s["seconds"] for s in starts),
                "ksm": ksm_state(),
            }
            rows.append(row)
            say(
                f"{n:2d} {mode} clones: MemAvailable {-row['mem_available_delta'] / GIB:+.2f} GiB, attributed "
                f"{row['attributed'] / GIB:.2f} GiB (private {costs['process_private'] / GIB:.2f}, copies "
                f"{costs['ram_copies'] / GIB:.2f}, template file +{growth / MIB:.0f} MiB); "
                f"all started in {started_s:.1f} s"
            )
            stop_all_clones()
    return rows


def over_time(tpl: Any, lazy: int, duration: float, interval: float) -> dict[str, Any]:
    from memvirt.clone.memory import mapping_usage, process_private
    from memvirt.qemu.vm import VM

    names = [f"bench-cl-time-lazy-{i}" for i in range(1, lazy + 1)] + ["bench-cl-time-eager-1"]
    for name in names:
        start(tpl, name, eager="eager" in name, wait=False)
    vms = [VM.load(n) for n in names]
    series: list[dict[str, Any]] = []
    t0 = time.monotonic()
    try:
        while (t := time.monotonic() - t0) <= duration:
            point: dict[str, Any] = {"t": round(t, 1)}
            for v in vms:
                if v.config.ram == "cow":
                    u = mapping_usage(v.config.pid, v.config.backing, v.config.memory)
                    point[v.name] = {
                        "ram_private": u["private"],
                        "ram_rss": u["rss"],
                        "process_private": u["process_private"],
                    }
                else:
                    point[v.name] = {
                        "ram_private": allocated(v.config.ram_path),
                        "ram_rss": allocated(v.config.ram_path),
                        "process_private": process_private(v.config.pid),
                    }
            point["template_file"] = allocated(tpl.config.ram_path)
            series.append(point)
            time.sleep(max(0.0, interval - (time.monotonic() - t0 - t)))
    finally:
        stop_all_clones()
    return {"clones": names, "series": series}


# --- output ---------------------------------------------------------------------------------------


def print_report(rep: dict[str, Any]) -> None:
    if rep.get("latency"):
        t = Table(title="Request to running (median of repeats; ms)", show_edge=False)
        for c in [
            "template RAM",
            "filled",
            "lazy",
            "QEMU start",
            "lazy beyond QEMU",
            "lazy guest answers",
            "eager",
            "eager copy",
            "eager guest answers",
        ]:
            t.add_column(c, justify="right")
        for r in rep["latency"]:
            lz, eg = r["lazy"], r["eager"]
            t.add_row(
                f"{r['ram_bytes'] / GIB:.1f} GiB",
                f"{r['filled_bytes'] / GIB:.1f} GiB",
                f"{lz['seconds'] * 1000:.0f}",
                f"{lz['qemu_seconds'] * 1000:.0f}",
                f"{lz['beyond_qemu_seconds'] * 1000:.0f}",
                f"{lz['guest_seconds'] * 1000:.0f}",
                f"{eg['seconds'] * 1000:.0f}",
                f"{eg['copy_seconds'] * 1000:.0f}",
                f"{eg['guest_seconds'] * 1000:.0f}",
            )
        console.print(t)
    if rep.get("host_memory"):
        t = Table(
            title=f"Host memory for N clones of a {rep['config']['memory_template'] / GIB:.0f} GiB template (GiB)",
            show_edge=False,
        )
        for c in [
            "mode",
            "clones",
            "MemAvailable delta",
            "attributed",
            "clone processes private",
            "RAM copies",
            "template file growth",
        ]:
            t.add_column(c, justify="right")
        for r in rep["host_memory"]:
            t.add_row(
                r["mode"],
                str(r["clones"]),
                f"{r['mem_available_delta'] / GIB:.2f}",
                f"{r['attributed'] / GIB:.2f}",
                f"{r['process_private'] / GIB:.2f}",
                f"{r['ram_copies'] / GIB:.2f}",
                f"{r['template_file_growth'] / GIB:.3f}",
            )
        console.print(t)
    if rep.get("over_time"):
        ot = rep["over_time"]
        t = Table(
            title="Private memory of each clone's RAM over time under memtouch (MiB; eager: its RAM copy)",
            show_edge=False,
        )
        t.add_column("t (s)", justify="right")
        for n in ot["clones"]:
            t.add_column(n.removeprefix("bench-cl-time-"), justify="right")
        t.add_column("template file", justify="right")
        step = max(1, len(ot["series"]) // 10)
        for p in ot["series"][::step] + ([ot["series"][-1]] if (len(ot["series"]) - 1) % step else []):
            t.add_row(
                f"{p['t']:.0f}",
                *[f"{p[n]['ram_private'] / MIB:.1f}" for n in ot["clones"]],
                f"{p['template_file'] / MIB:.0f}",
            )
        console.print(t)
    for g in rep.get("goals", []):
        console.print(f"goal: {g['goal']}: {g['measured']} -> {'MET' if g['met'] else 'NOT MET'}")


def goals(rep: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    lat = rep.get("latency") or []
    if lat:
        lazy = [r["lazy"]["seconds"] for r in lat]
        beyond = [r["lazy"]["beyond_qemu_seconds"] for r in lat]
        out.append(
            {
                "goal": "lazy latency flat across sizes (max/min <= 2)",
                "measured": f"{max(lazy) / min(lazy):.2f}x ({', '.join(f'{x * 1000:.0f}' for x in lazy)} ms)",
                "met": max(lazy) / min(lazy) <= 2,
            }
        )
        out.append(
            {
                "goal": "lazy latency <= 100 ms beyond QEMU's own process start",
                "measured": f"{max(beyond) * 1000:.0f} ms at most",
                "met": max(beyond) <= 0.1,
            }
        )
    mem = [r for r in rep.get("host_memory") or [] if r["mode"] == "lazy" and r["clones"] == 10]
    if mem:
        r = mem[0]
        worst = max(r["mem_available_delta"], r["attributed"])
        out.append(
            {
                "goal": "10 lazy clones of a 1 GiB guest cost <= 1.5 GiB",
                "measured": f"MemAvailable delta {r['mem_available_delta'] / GIB:.2f} GiB, "
                f"attributed {r['attributed'] / GIB:.2f} GiB",
                "met": worst <= 1.5 * GIB,
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MEMVIRT_HOME", "/tmp/bench-state")
    os.environ.setdefault("MEMVIRT_RAM_DIR", "/dev/shm/bench-ram")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="512M,2G,4G", help="template RAM sizes for the latency part")
    ap.add_argument("--repeat", type=int, default=3, help="clones per size and mode in the latency part")
    ap.add_argument("--memory", default="1G", help="template RAM for the memory parts")
    ap.add_argument("--counts", default="1,5,10", help="clone counts for the host-memory part")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds clones run before memory is read")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of the private-memory time series")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: latency,memory,time")
    ap.add_argument("--json", type=Path, default=RESULTS / "clone.json")
    args = ap.parse_args(argv)

    from memvirt.image.build import default_image
    from memvirt.qemu.accel import qemu_binary
    from memvirt.qemu.vm import VM
    from memvirt.units import parse_size

    skip = set(args.skip.split(","))
    memory = parse_size(args.memory)
    workload = "memtouch --hot 32M --cold 224M --dirty-rate 4M"
    rep: dict[str, Any] = {
        "machine": machine_info(qemu_binary()),
        "config": {
            "sizes": parse_sizes(args.sizes),
            "repeat": args.repeat,
            "memory_template": memory,
            "counts": [int(x) for x in args.counts.split(",")],
            "settle_s": args.settle,
            "duration_s": args.duration,
            "workload_memory_parts": workload,
            "memvirt_home": os.environ["MEMVIRT_HOME"],
            "ram_dir": os.environ["MEMVIRT_RAM_DIR"],
        },
    }
    error = None
    try:
        image = default_image("6.1")
        rep["config"]["guest_kernel"] = image.release
        if "latency" not in skip:
            rep["latency"] = latency(image, rep["config"]["sizes"], args.repeat)
        if not {"memory", "time"} <= skip:
            tpl = make_template(image, "bench-cl-tpl", memory, workload)
            rep["machine"]["accel"] = tpl.config.accel
            rep["template_file_at_freeze"] = allocated(tpl.config.ram_path)
            try:
                if "memory" not in skip:
                    rep["host_memory"] = host_memory(tpl, rep["config"]["counts"], args.settle)
                if "time" not in skip:
                    rep["over_time"] = over_time(tpl, 3, args.duration, 0.5)
            finally:
                stop_all_clones()
                tpl.stop(force=True)
    except BaseException as e:
        error = f"{e.__class__.__name__}: {e}"
        traceback.print_exc()
    finally:
        for v in VM.all():
            if v.name.startswith("bench-cl-"):
                v.stop(force=True)
    rep["goals"] = goals(rep)
    rep["error"] = error
    print_report(rep)
    say(f"wrote {write_json(args.json, rep)}")
    return 1 if error else 0


if __name__ == "__main__":
    run_main(main)
