"""Consolidation: host memory of many guests with mixed, phase-changing workloads, under no
management, an operator's usual configuration, and memvirtd (issue #17, item 5).

Per mode, on fresh guests (``--guests`` of ``--memory``, anonymous RAM), each guest runs one kind
of workload (``--kinds``, cycled), through ``--phases`` phases of ``--phase`` seconds:

* ``idle``: nothing, except one burst in phase 1 (256 MiB allocated and freed: dirty free memory);
* ``steady``: ``memtouch`` over a fixed hot set with a cold rest and a slow dirty rate;
* ``churn``: allocate 192 MiB of unique data, hold 2 s, free it, rest 2 s, forever;
* ``growing``: a hot set that grows at each phase (64, 160, 256 MiB, ...; ``--phase-file``);
* ``identical``: the same pages in every such guest (``memtouch --content dup``, one seed).

Modes:

* ``none``: host KSM off, no swap added, nothing else;
* ``operator``: what an operator turns on instead: stock KSM (``run=1``, 100 pages per 20 ms),
  a host zram swap (``memvirt tier up``, lz4), and virtio-balloon free-page reporting
  (``-device virtio-balloon-pci,free-page-reporting=on``; acts where the guest has the driver);
* ``memvirtd``: ``memvirt daemon`` with its default config (no ``--config``), nothing else.

KSM and swap are borrowed and given back (``ksm.configured``, ``tiers.up``/``down``); DAMON is
never touched. Host memory used is the guests' Pss (KSM pages split among sharers) plus what
the zram device holds; sampled every ``--interval`` s from the start of phase 0. Throughput is
each guest's progress per phase (``memtouch`` hot-set passes, or churn rounds), divided by the
same guest's in the ``none`` run. Saving at steady state: the mean over the last phase of
``none``'s memory minus the mode's at the same time.

    python bench/consolidate.py [--guests 8] [--memory 1G] [--phase 120] [--phases 3] [--modes none,operator,memvirtd]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

os.environ.setdefault("MEMVIRT_HOME", "/tmp/bench-consolidate-state")
os.environ.setdefault("MEMVIRT_RAM_DIR", "/dev/shm/bench-consolidate-ram")

from common import GIB, RESULTS, machine_info, size_arg, write_json
from dedup import boot, usage

T0 = time.monotonic()
MODES = ("none", "operator", "memvirtd")
KINDS = ("identical", "churn", "growing", "steady", "identical", "idle", "churn", "steady")
CTR = "/tmp/ctr"
BALLOON = ["-device", "virtio-balloon-pci,free-page-reporting=on"]
GROW = (64, 160, 256, 352)
START = {
    "steady": f"memtouch --hot 96M --cold 160M --content mix --seed 11 --dirty-rate 1M --counter-file {CTR}",
    "identical": f"memtouch --hot 16M --cold 320M --content dup --dup-groups 64 --seed 7 --counter-file {CTR}",
    "growing": (
        f"memtouch --hot 64M --content mix --seed 13 --dirty-rate 512K --phase-file /tmp/phase --counter-file {CTR}"
    ),
    "churn": (
        "sh -c 'n=0; while :; do memtouch --hot 192M --content random --seed $n --duration 2 >/dev/null 2>&1; "
        f"n=$((n+1)); echo $n > {CTR}; sleep 2; done'"
    ),
}
BURST = "memtouch --hot 256M --content random --seed 99 --duration 1 >/dev/null"


def say(msg: str) -> None:
    print(f"{time.monotonic() - T0:7.1f}s {msg}", flush=True)


def start_workloads(vms: list[Any], kinds: list[str]) -> None:
    for vm, kind in zip(vms, kinds, strict=True):
        if kind == "growing":
            vm.exec(f"echo {GROW[0]}M > /tmp/phase").check("phase file")
        if kind in START:
            vm.exec_background(START[kind], "/tmp/work.log")
    for vm, kind in zip(vms, kinds, strict=True):
        if kind in ("steady", "identical", "growing"):
            deadline = time.monotonic() + 600
            while "memtouch ready" not in vm.exec("cat /tmp/work.log").text:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{vm.name}: memtouch did not get ready")
                time.sleep(1)


def counters(vms: list[Any], kinds: list[str]) -> list[float | None]:
    out: list[float | None] = []
    for vm, kind in zip(vms, kinds, strict=True):
        if kind == "idle":
            out.append(None)
            continue
        text = vm.exec(f"cat {CTR} 2>/dev/null", timeout=60).text.strip()
        out.append(float(text) if text.isdigit() else 0.0)
    return out


def enter_phase(p: int, vms: list[Any], kinds: list[str]) -> None:
    for vm, kind in zip(vms, kinds, strict=True):
        if kind == "growing":
            vm.exec(f"echo {GROW[min(p, len(GROW) - 1)]}M > /tmp/phase").check("phase file")
        elif kind == "idle" and p == 1:
            vm.exec_background(BURST, "/tmp/burst.log")


def zram_used() -> int:
    total = 0
    for d in Path("/sys/block").glob("zram*"):
        try:
            total += int((d / "mm_stat").read_text().split()[2])
        except (OSError, ValueError, IndexError):
            continue
    return total


def metric(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


class Daemon:
    """``memvirt daemon`` with its defaults, over this bench's state folder."""

    def __init__(self, tmp: Path):
        self.log = tmp / "memvirtd.log"
        argv = [sys.executable, "-m", "memvirt", "daemon", "--metrics", "127.0.0.1:0", "--socket", str(tmp / "c.sock")]
        with open(self.log, "wb") as lf:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=lf, stderr=lf)
        deadline = time.monotonic() + 60
        while "/metrics" not in (text := self.log.read_text(errors="replace")):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"memvirtd did not start: {text[-400:]}")
            time.sleep(0.3)
        self.port = int(text.split("http://127.0.0.1:", 1)[1].split("/", 1)[0])

    def cpu(self) -> float:
        return metric(self.port, "memvirt_daemon_cpu_seconds") or 0.0

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def run_mode(mode: str, args: argparse.Namespace, kinds: list[str]) -> dict[str, Any]:
    from memvirt.compress import tiers
    from memvirt.dedup import ksm

    names = [f"cons-{mode}-{i}" for i in range(len(kinds))]
    say(f"[{mode}] booting {len(kinds)} x {args.memory >> 20} MiB: {', '.join(kinds)}")
    vms = boot(names, args.memory, BALLOON if mode == "operator" else None)
    out: dict[str, Any] = {"mode": mode, "kinds": kinds}
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="bench-cons-") as tmp:
        stack.callback(lambda: [vm.stop() for vm in vms])
        if mode == "operator":
            drv = vms[0].exec("ls /sys/bus/virtio/drivers/virtio_balloon/ 2>/dev/null").text
            out["guest_balloon_driver"] = "virtio" in drv
            stack.enter_context(ksm.configured(run=1, **ksm.STOCK))
            t = tiers.up("lz4", disksize=args.zram_size)
            stack.callback(tiers.down)
            out["zram"] = t.zram
        else:
            stack.enter_context(ksm.configured(run=0))
        say(f"[{mode}] starting the workloads")
        start_workloads(vms, kinds)
        daemon = Daemon(Path(tmp)) if mode == "memvirtd" else None
        if daemon is not None:
            stack.callback(daemon.stop)
        t0, ksm0 = time.monotonic(), ksm.ksmd_cpu_seconds()
        cpu0 = daemon.cpu() if daemon else 0.0
        samples: list[dict[str, Any]] = []
        marks: list[dict[str, Any]] = [{"t": 0.0, "counters": counters(vms, kinds)}]
        for p in range(args.phases):
            enter_phase(p, vms, kinds)
            end = (p + 1) * args.phase
            while (t := time.monotonic() - t0) < end:
                guests = usage(vms)
                z = zram_used()
                samples.append({"t": round(t, 1), "guest_bytes": guests, "zram_bytes": z, "host_bytes": guests + z})
                time.sleep(max(0.0, min(args.interval, end - (time.monotonic() - t0))))
            marks.append({"t": round(time.monotonic() - t0, 1), "counters": counters(vms, kinds)})
            s = samples[-1]
            say(f"[{mode}] phase {p} done: host {s['host_bytes'] / GIB:.2f} GiB (zram {s['zram_bytes'] / GIB:.2f})")
        out.update(
            samples=samples,
            marks=marks,
            ksmd_cpu_s=round(ksm.ksmd_cpu_seconds() - ksm0, 2),
            ksm_saving_bytes=ksm.saving_bytes(),
            alive=[vm.exec("echo ok", timeout=60).text.strip() == "ok" for vm in vms],
        )
        if daemon is not None:
            out["daemon_cpu_s"] = round(daemon.cpu() - cpu0, 2)
            out["daemon_exit"] = daemon.stop()
            out["daemon_warnings"] = [
                ln for ln in daemon.log.read_text(errors="replace").splitlines() if "WARNING" in ln or "ERROR" in ln
            ][-10:]
    return out


def rates(r: dict[str, Any]) -> list[list[float | None]]:
    """Per phase, per guest: progress per second."""
    m = r["marks"]
    out = []
    for a, b in zip(m, m[1:], strict=False):
        dt = b["t"] - a["t"]
        out.append(
            [
                None if x is None or y is None else (y - x) / dt
                for x, y in zip(a["counters"], b["counters"], strict=True)
            ]
        )
    return out


def at(samples: list[dict[str, Any]], t: float) -> dict[str, Any]:
    before = [s for s in samples if s["t"] <= t + 0.5]
    return before[-1] if before else samples[0]


def summarize(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    base = results.get("none")
    last = (args.phases - 1) * args.phase
    rows = []
    for mode, r in results.items():
        steady = [s for s in r["samples"] if s["t"] >= last]
        mean = sum(s["host_bytes"] for s in steady) / max(len(steady), 1)
        saving = None
        if base is not None:
            saving = sum(at(base["samples"], s["t"])["host_bytes"] - s["host_bytes"] for s in steady) / max(
                len(steady), 1
            )
        tput: dict[str, float | None] = {}
        if base is not None:
            mine, ref = rates(r), rates(base)
            for g, kind in enumerate(r["kinds"]):
                ratios = [
                    mine[p][g] / ref[p][g]
                    for p in range(min(len(mine), len(ref)))
                    if mine[p][g] is not None and ref[p][g]
                ]
                tput[f"{g}:{kind}"] = round(sum(ratios) / len(ratios), 3) if ratios else None
        dur = r["samples"][-1]["t"] if r["samples"] else 1.0
        rows.append(
            {
                "mode": mode,
                "steady_host_bytes": mean,
                "steady_saving_bytes": saving,
                "throughput_vs_none": tput,
                "worst_throughput": min((v for v in tput.values() if v is not None), default=None),
                "daemon_cpu_s": r.get("daemon_cpu_s"),
                "daemon_cpu_share": round(r["daemon_cpu_s"] / dur, 4) if r.get("daemon_cpu_s") is not None else None,
                "ksmd_cpu_s": r["ksmd_cpu_s"],
                "guests_alive": all(r["alive"]),
            }
        )
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'mode':10} {'host GiB (last phase)':>22} {'saved GiB':>10} {'worst tput':>11} "
        f"{'daemon CPU':>14} {'ksmd CPU s':>11}  throughput per guest vs none"
    )
    for r in rows:
        sv = "" if r["steady_saving_bytes"] is None else f"{r['steady_saving_bytes'] / GIB:.2f}"
        wt = "" if r["worst_throughput"] is None else f"{r['worst_throughput']:.2f}"
        dc = "" if r["daemon_cpu_s"] is None else f"{r['daemon_cpu_s']} s ({100 * r['daemon_cpu_share']:.1f} %)"
        tp = ", ".join(f"{k} {v}" for k, v in r["throughput_vs_none"].items() if v is not None)
        print(
            f"{r['mode']:10} {r['steady_host_bytes'] / GIB:>22.2f} {sv:>10} {wt:>11} {dc:>14} "
            f"{r['ksmd_cpu_s']:>11}  {tp}"
        )


def plot(data: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = data["modes"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    base = modes.get("none", {}).get("samples", [])
    for i, (mode, r) in enumerate(modes.items()):
        ts = [s["t"] for s in r["samples"]]
        axes[0].plot(ts, [s["host_bytes"] / GIB for s in r["samples"]], label=mode, color=f"C{i}")
        if base and mode != "none":
            axes[1].plot(
                ts,
                [(at(base, s["t"])["host_bytes"] - s["host_bytes"]) / GIB for s in r["samples"]],
                label=mode,
                color=f"C{i}",
            )
    a = data["args"]
    for ax in axes:
        for p in range(1, a["phases"]):
            ax.axvline(p * a["phase"], color="k", ls=":", lw=0.8)
        ax.legend(fontsize=8)
        ax.set_xlabel("s (dotted: phase changes)")
    n = len(data["kinds"])
    axes[0].set(title=f"host memory of {n} x {a['memory'] >> 20} MiB guests (Pss + zram)", ylabel="GiB")
    axes[1].set(title="saved vs no management", ylabel="GiB")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    say(f"wrote {png}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guests", type=int, default=8)
    ap.add_argument("--memory", type=size_arg, default=size_arg("1G"))
    ap.add_argument("--kinds", default=",".join(KINDS), help="workload kinds, cycled over the guests")
    ap.add_argument("--phase", type=float, default=120.0, help="seconds per phase")
    ap.add_argument("--phases", type=int, default=3)
    ap.add_argument("--interval", type=float, default=5.0)
    ap.add_argument("--zram-size", type=size_arg, default=size_arg("4G"))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--json", default=str(RESULTS / "consolidate.json"))
    ap.add_argument("--png", default=str(RESULTS / "consolidate.png"))
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from memvirt.dedup import ksm

    if not ksm.available():
        print("this host kernel has no KSM")
        return 2
    cycle = [k for k in args.kinds.split(",") if k]
    unknown = [k for k in cycle if k not in (*START, "idle")]
    if unknown:
        print(f"unknown workload kind {unknown[0]!r}: use {', '.join((*START, 'idle'))}")
        return 2
    kinds = [cycle[i % len(cycle)] for i in range(args.guests)]
    data: dict[str, Any] = {"machine": machine_info("qemu-system-x86_64"), "args": vars(args), "kinds": kinds}
    results: dict[str, dict[str, Any]] = {}
    try:
        for mode in args.modes.split(","):
            results[mode] = run_mode(mode, args, kinds)
            data["modes"] = results
            write_json(Path(args.json).resolve(), data)
        data["summary"] = summarize(results, args)
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        write_json(Path(args.json).resolve(), data)
    print_rows(data["summary"])
    plot(data, Path(args.png))
    say(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
