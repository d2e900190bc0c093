"""Adaptive compression against no compression and a static memory limit, over a working-set change.

Each policy gets a fresh VM (default 1 GiB) running memtouch with a hot set H and a cold set C
of text-like pages (about 2:1 under lz4). The run has two phases: hot set H, then 2H (the
working set moves). Every interval the bench records the VM's memory-cgroup usage, its guest
RAM resident and in zram, and memtouch's hot-loop passes, both per wall second and per CPU
second QEMU got (the second is immune to other load on this 2-core host).

* none: no limit, nothing compressed: the reference for speed and memory.
* adaptive: ``memvirt compress`` (DAMON-sampled working set + 10 % margin, back-off on refaults).
* static: one fixed cgroup limit equal to the adaptive run's mean usage, so both save about as
  much on average; it fits phase 1 and is below the working set in phase 2.

Reported per policy and phase: mean usage and host memory saved (net of zram's own memory),
the share of the cold set reclaimed, slowdown against ``none``, zram's ratio, controller CPU.
Goal (issue #7): >= 50 % of the cold memory reclaimed at <= 5 % slowdown.

    python bench/compress.py [--memory 1G] [--hot 128M] [--cold 512M] [--phase 40] [--json FILE] [--plot FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

from common import RESULTS, machine_info, make_console, run_main, size_arg, write_json
from rich.table import Table

os.environ.setdefault("MEMVIRT_HOME", "/tmp/bench-compress-state")
os.environ.setdefault("MEMVIRT_RAM_DIR", "/dev/shm/bench-compress-ram")
MIB = float(1 << 20)
console = make_console()
T0 = time.monotonic()
COUNTER = "/tmp/memtouch.count"
PHASE = "/tmp/memtouch.phase"


def say(msg: str) -> None:
    console.print(f"[dim]{time.monotonic() - T0:7.1f}s[/dim] {msg}")


def qemu_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def boot(image: Any, args: argparse.Namespace, name: str) -> Any:
    from memvirt.qemu.vm import start_vm

    vm = start_vm(name, image, memory=args.memory)
    vm.exec(f"echo {args.hot} > {PHASE}").check("phase file")
    vm.exec_background(
        f"memtouch --hot {args.hot} --cold {args.cold} --content text --phase-file {PHASE} --counter-file {COUNTER}",
        "/tmp/memtouch.log",
    )
    deadline = time.monotonic() + 300
    while "ready" not in vm.exec("cat /tmp/memtouch.log").text:
        if time.monotonic() > deadline:
            raise RuntimeError("memtouch did not fill its sets")
        time.sleep(1)
    time.sleep(3)
    return vm


def run_policy(vm: Any, policy: str, args: argparse.Namespace, static_limit: int | None) -> dict[str, Any]:
    """Both phases under one policy; a row per control interval."""
    from memvirt.compress import tiers
    from memvirt.compress.controller import Controller, Policy
    from memvirt.errors import MemvirtError

    ctl = None
    if policy != "none":
        ctl = Controller([vm], Policy(policy, 0.10, static_limit), interval=args.interval)
    group = vm.memcg()
    rows: list[dict[str, Any]] = []
    zram = tiers.load()
    t_start = time.monotonic()

    def record(phase: int, action: str, wss: int, swapped: int, resident: int) -> None:
        try:
            n = int(vm.exec(f"cat {COUNTER}", timeout=max(2.0, args.interval)).check("counter").text)
        except MemvirtError:
            n = rows[-1]["passes"] if rows else 0
            action += " (guest not answering)"
        st = tiers.zram_stats(zram.zram) if zram else {}
        rows.append(
            {
                "t": time.monotonic() - t_start,
                "phase": phase,
                "passes": n,
                "cpu": qemu_cpu(vm.config.pid),
                "usage": group.usage(),
                "limit": group.limit(),
                "wss": wss,
                "swapped": swapped,
                "resident": resident,
                "zram_used": st.get("mem_used_total", 0),
                "action": action,
            }
        )

    try:
        for phase, hot in ((1, args.hot), (2, 2 * args.hot)):
            vm.exec(f"echo {hot} > {PHASE}").check("phase change")
            t_phase = time.monotonic()
            while time.monotonic() - t_phase < args.phase:
                if ctl is None:
                    time.sleep(args.interval)
                    record(phase, "none", 0, 0, 0)
                else:
                    for s in ctl.step():
                        record(phase, s.action, s.wss, s.swapped, s.resident)
        cpu = ctl.cpu_seconds() if ctl else 0.0
    finally:
        if ctl is not None:
            ctl.close()
    return {
        "policy": policy,
        "rows": rows,
        "controller_cpu_s": cpu,
        "duration_s": time.monotonic() - t_start,
        "samples": [s.to_json() for s in (ctl.states[0].samples if ctl else [])],
    }


def phase_figures(run: dict[str, Any], phase: int, skip: float) -> dict[str, float]:
    """Means over a phase, leaving out its first ``skip`` seconds (the controller settling)."""
    rows = [r for r in run["rows"] if r["phase"] == phase]
    t0 = rows[0]["t"] if rows else 0
    steady = [r for r in rows if r["t"] - t0 >= skip] or rows
    a, b = steady[0], steady[-1]
    wall = b["t"] - a["t"]
    cpu = b["cpu"] - a["cpu"]
    first = [r for r in rows if r["t"] - t0 < skip] or rows[:1]
    worst = (
        min(((y["passes"] - x["passes"]) / max(y["t"] - x["t"], 1e-9)) for x, y in zip(rows, rows[1:], strict=False))
        if len(rows) > 1
        else 0.0
    )
    return {
        "usage_mean": statistics.mean(r["usage"] for r in steady),
        "swapped_mean": statistics.mean(r["swapped"] for r in steady),
        "zram_used_mean": statistics.mean(r["zram_used"] for r in steady),
        "rate_wall": (b["passes"] - a["passes"]) / wall if wall > 0 else 0.0,
        "rate_cpu": (b["passes"] - a["passes"]) / cpu if cpu > 0 else 0.0,
        "rate_worst_interval": worst,
        "settle_rate_wall": ((first[-1]["passes"] - rows[0]["passes"]) / max(first[-1]["t"] - rows[0]["t"], 1e-9))
        if len(first) > 1
        else 0.0,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memory", type=size_arg, default=1 << 30)
    ap.add_argument("--hot", type=size_arg, default=128 << 20)
    ap.add_argument("--cold", type=size_arg, default=512 << 20)
    ap.add_argument("--phase", type=float, default=40.0, help="seconds per phase")
    ap.add_argument("--settle", type=float, default=10.0, help="seconds at the start of a phase left out")
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()

    from memvirt.compress import tiers
    from memvirt.image.build import default_image
    from memvirt.qemu.accel import qemu_binary

    info = machine_info(qemu_binary())
    image = default_image("6.1")
    tiers_before = tiers.load()
    tiers.up()
    runs: dict[str, dict[str, Any]] = {}
    try:
        for policy in ("none", "adaptive", "static"):
            static_limit = None
            if policy == "static":
                static_limit = int(statistics.mean(r["usage"] for r in runs["adaptive"]["rows"]))
            vm = boot(image, args, f"bench-compress-{policy}")
            try:
                say(
                    f"{policy}: running two phases of {args.phase:.0f} s"
                    + (f" with a static limit of {static_limit / MIB:.0f} MiB" if static_limit else "")
                )
                runs[policy] = run_policy(vm, policy, args, static_limit)
                runs[policy]["static_limit"] = static_limit
                runs[policy]["zram"] = tiers.status().get("zram")
            finally:
                vm.stop()
    finally:
        if tiers_before is None:
            tiers.down()

    base = {p: phase_figures(runs["none"], p, args.settle) for p in (1, 2)}
    table = Table(
        title=f"compression: {args.memory / MIB:.0f} MiB VM, hot {args.hot / MIB:.0f} MiB -> "
        f"{2 * args.hot / MIB:.0f} MiB, cold {args.cold / MIB:.0f} MiB text"
    )
    for col in (
        "policy",
        "phase",
        "usage MiB",
        "saved MiB (net of zram)",
        "swapped / cold set",
        "rate /s",
        "slowdown (wall)",
        "slowdown (per CPU-s)",
        "worst 1-s rate",
        "controller CPU",
    ):
        table.add_column(col, justify="right")
    summary: dict[str, Any] = {}
    for policy, run in runs.items():
        for phase in (1, 2):
            f = phase_figures(run, phase, args.settle)
            saved = base[phase]["usage_mean"] - f["usage_mean"] - f["zram_used_mean"]
            slow_wall = 1 - f["rate_wall"] / base[phase]["rate_wall"] if base[phase]["rate_wall"] else 0.0
            slow_cpu = 1 - f["rate_cpu"] / base[phase]["rate_cpu"] if base[phase]["rate_cpu"] else 0.0
            cold = f["swapped_mean"] / args.cold
            cpu_share = run["controller_cpu_s"] / run["duration_s"]
            summary[f"{policy}/{phase}"] = {
                **f,
                "saved_net": saved,
                "slowdown_wall": slow_wall,
                "slowdown_cpu": slow_cpu,
                "cold_reclaimed": cold,
                "controller_cpu_share": cpu_share,
            }
            table.add_row(
                policy,
                str(phase),
                f"{f['usage_mean'] / MIB:.0f}",
                f"{saved / MIB:.0f}",
                f"{cold:.0%}" if policy != "none" else "-",
                f"{f['rate_wall']:.1f}",
                f"{slow_wall:+.1%}",
                f"{slow_cpu:+.1%}",
                f"{f['rate_worst_interval']:.1f}",
                f"{cpu_share:.1%}" if policy != "none" else "-",
            )
    console.print(table)
    a1 = summary["adaptive/1"]
    ok = a1["cold_reclaimed"] >= 0.5 and a1["slowdown_cpu"] <= 0.05
    console.print(
        f"goal (>= 50 % of cold memory reclaimed at <= 5 % slowdown, phase 1): "
        f"{a1['cold_reclaimed']:.0%} at {a1['slowdown_cpu']:+.1%} per CPU-s "
        f"({a1['slowdown_wall']:+.1%} wall) -> {'met' if ok else 'missed'}"
    )
    s2, a2 = summary["static/2"], summary["adaptive/2"]
    console.print(
        f"phase change: static limit slowdown {s2['slowdown_cpu']:+.1%} per CPU-s "
        f"(worst 1-s rate {s2['rate_worst_interval']:.1f}/s) vs adaptive {a2['slowdown_cpu']:+.1%} "
        f"(worst {a2['rate_worst_interval']:.1f}/s)"
    )
    plot = args.plot or RESULTS / "compress.png"
    try:
        from memvirt.compress.controller import Sample
        from memvirt.compress.plot import draw_timeline

        rows = [Sample(**{**s, "vm": f"{p}: {s['vm']}"}) for p in ("adaptive", "static") for s in runs[p]["samples"]]
        draw_timeline(rows, plot, "adaptive vs static limit over a working-set change")
        console.print(f"plot: {plot}")
    except Exception as e:
        console.print(f"plot failed: {e}")
    out = args.json or RESULTS / f"compress-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_json(
        out, {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "summary": summary, "runs": runs}
    )
    console.print(f"results: {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
