"""Host memory of similar guests under no sharing, stock KSM and memvirt; reclaim vs virtio-balloon.

Part 1, per mode, on fresh guests: boot ``--guests`` guests with anonymous RAM (``merge=on``),
run the same workload in each (allocate ``--churn`` of unique data and free it, as long-running
guests do; then hold ``memtouch --content mix`` with one seed, so guests share content), then
watch for ``--observe`` seconds, sampling every ``--interval``:

* ``none``: KSM off;
* ``stock``: KSM at the kernel's defaults (100 pages per 20 ms, no zero-page merging);
* ``tuned``: KSM as far as ksmtuned boosts it (1,250 pages per 20 ms, zero pages merged);
* ``memvirt``: KSM with ``use_zero_pages``, paced (``pages_to_scan`` at most stock's, set at
  each sample) to the share of a CPU stock's ksmd used in the window, plus a ``reclaim`` pass
  over every guest at each sample (free pages discarded, race-safe);
* ``directed``: ``memvirt dedup run`` (:class:`memvirt.dedup.directed.DirectedKsm`): reclaim, then
  only the pages with a twin in some guest left mergeable, ``pages_to_scan`` from their count,
  ksmd held to ``--directed-cpu`` of one CPU, the candidate set refreshed every 20 s.

Before KSM starts, ``dedup analyze`` (free pages skipped) gives the limit: the distinct content
of the pages in use. Each guest's memtouch counts its passes over its hot set (a counter file):
the rate over the window against the rate over the 10 s before KSM started is the slowdown.

Host memory of the guests is the sum of the proportional set size (Pss) of the QEMU RAM
mappings; a mode's saving is the ``none`` mode's memory minus its own at the same time. Also:
time to reach 90 % of the saving at the end, ksmd CPU seconds, reclaim pauses.

Part 2: one guest with ``virtio-balloon-pci,free-page-reporting=on`` (the guest's driver reports
free 2 MiB blocks and QEMU discards them) beside one without a driver where memvirt reclaims:
same churn, host memory over time.

    python bench/dedup.py [--guests 4] [--memory 1G] [--observe 150] [--churn 600M] [--json FILE] [--png FILE]
"""

from __future__ import annotations

import argparse
import os
import time
import traceback
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from common import GIB, RESULTS, machine_info, make_console, run_main, write_json
from rich.table import Table

os.environ.setdefault("MEMVIRT_HOME", "/tmp/bench-state")
os.environ.setdefault("MEMVIRT_RAM_DIR", "/dev/shm/bench-ram")

console = make_console()
T0 = time.monotonic()
MODES = ("none", "stock", "tuned", "memvirt", "directed")
HOLD = (
    "memtouch --hot 32M --cold {cold} --content mix --seed 7 --dirty-rate 256K --report 60 --counter-file /tmp/passes"
)
TUNED = {"pages_to_scan": 1250, "sleep_millisecs": 20, "use_zero_pages": 1}
"""ksmtuned's boost at its ceiling (npages_max 1250) with zero pages merged."""
CHURN = "memtouch --hot {size} --content random --seed {seed} --duration 1 >/dev/null"


def say(msg: str) -> None:
    console.print(f"[dim]{time.monotonic() - T0:7.1f}s[/dim] {msg}")


def parse_size(text: str) -> int:
    from memvirt.units import parse_size as ps

    return ps(text)


def boot(names: list[str], memory: int, extra: list[str] | None = None) -> list[Any]:
    """Boot the guests (QEMU started for all first, then each waited for)."""
    import memvirt.qemu.vm as vmmod
    from memvirt.image.build import default_image

    image = default_image("6.1")
    plain = vmmod.qemu_argv
    if extra:
        vmmod.qemu_argv = lambda vm, img, *a, **k: plain(vm, img, *a, **k) + extra
    vms: list[Any] = []
    try:
        for n in names:
            vms.append(vmmod.start_vm(n, image, memory=memory, ram="anonymous", wait=False))
        for vm in vms:
            vm.channel.wait_ready(vmmod.BOOT_TIMEOUT, vm.alive)
    except BaseException:
        for vm in vms:
            vm.stop()
        raise
    finally:
        vmmod.qemu_argv = plain
    return vms


def workload(vms: list[Any], churn: int, cold: int) -> None:
    """Unique data allocated and freed (dirty free memory), then a shared-content working set."""
    for i, vm in enumerate(vms):
        vm.exec(CHURN.format(size=churn, seed=100 + i), timeout=600).check("churn")
    for vm in vms:
        vm.exec_background(HOLD.format(cold=cold), "/tmp/hold.log")
    for vm in vms:
        for _ in range(600):
            if "memtouch ready" in vm.exec("cat /tmp/hold.log").text:
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"{vm.name}: memtouch did not get ready")


def usage(vms: list[Any]) -> int:
    from memvirt.dedup.discard import host_usage

    return sum(host_usage(vm) for vm in vms)


def passes(vms: list[Any]) -> list[float]:
    """Each guest's memtouch hot-set passes so far."""
    return [float(vm.exec("cat /tmp/passes").text.split()[0]) for vm in vms]


def limit(vms: list[Any]) -> dict[str, Any]:
    """``dedup analyze`` of the running guests, free pages skipped: the limit and its cost."""
    from memvirt.dedup.analyze import analyze
    from memvirt.qemu.vm import vm_memory

    mems = [vm_memory(vm) for vm in vms]
    try:
        a = analyze([(vm.name, m, True) for vm, m in zip(vms, mems, strict=True)], skip_free=True)
    finally:
        for m in mems:
            m.close()
    return {
        "limit_bytes": a.limit_bytes,
        "seconds": round(a.seconds, 2),
        "fingerprint_s": round(a.timings.get("fingerprint", 0), 2),
        "gib": a.pages * 4096 / GIB,
    }


def run_mode(mode: str, args: argparse.Namespace, budget: float | None = None) -> dict[str, Any]:
    from memvirt.dedup import ksm
    from memvirt.dedup.directed import DirectedKsm
    from memvirt.dedup.reclaim import Reclaimer

    names = [f"dd-bench-{mode}-{i}" for i in range(args.guests)]
    say(f"[bold]{mode}[/]: booting {args.guests} x {args.memory >> 20} MiB guests")
    vms = boot(names, args.memory)
    recs: list[Any] = []
    try:
        say(f"{mode}: workload (churn {args.churn >> 20} MiB, hold {args.cold >> 20} MiB)")
        workload(vms, args.churn, args.cold)
        if mode == "memvirt":
            recs = [Reclaimer(vm) for vm in vms]
        settings = {
            "none": {"run": 0},
            "stock": {"run": 1, **ksm.STOCK},
            "tuned": {"run": 1, **TUNED},
            "memvirt": {"run": 1, **ksm.STOCK, "use_zero_pages": 1},
            "directed": {"run": 1, "use_zero_pages": 1, "ksmd_cpu": args.directed_cpu},
        }[mode]
        lim = limit(vms)
        say(
            f"{mode}: limit (distinct content in use) {lim['limit_bytes'] / GIB:.2f} GiB; analyze read "
            f"{lim['gib']:.1f} GiB in {lim['seconds']} s"
        )
        samples, pauses = [], []
        with ksm.configured(run=0) as borrowed:
            borrowed.set(ksm.KSM / "run", 2)
            # The guests' own zero pages, not the global counter: this kernel's ksm_zero_pages
            # keeps pages of processes long gone (858 here with no process holding any).
            deadline = time.monotonic() + 120
            while (
                ksm.read("pages_sharing") or any(ksm.process_stat(vm.config.pid).get("ksm_zero_pages") for vm in vms)
            ) and time.monotonic() < deadline:
                time.sleep(0.2)
        p0 = passes(vms)
        time.sleep(10)
        p1 = passes(vms)
        with ExitStack() as stack:
            eng = None
            if mode == "directed":
                eng = stack.enter_context(DirectedKsm(vms, args.directed_cpu))
            else:
                borrowed = stack.enter_context(ksm.configured(**settings))
            t0, cpu0 = time.monotonic(), ksm.ksmd_cpu_seconds()
            pacer = ksm.Pacer(budget, borrowed=borrowed) if budget and eng is None else None
            reclaimed = 0
            p_window = None
            while True:
                if eng is not None:
                    row = eng.tick()
                    reclaimed = row["reclaimed_bytes"]
                for r in recs:
                    rep = r.run()
                    reclaimed += rep.reclaimed_bytes
                    pauses += rep.pauses_ms
                if pacer is not None:
                    pacer.step()
                t = time.monotonic() - t0
                if p_window is None and t >= args.window:
                    p_window = (t, passes(vms))
                samples.append(
                    {
                        "t": round(t, 1),
                        "guest_bytes": usage(vms),
                        "ksm_saving_bytes": ksm.saving_bytes(),
                        "reclaimed_bytes": reclaimed,
                        "ksmd_cpu_s": round(ksm.ksmd_cpu_seconds() - cpu0, 3),
                    }
                )
                if len(samples) % 6 == 1:
                    s = samples[-1]
                    say(
                        f"{mode} t={s['t']:.0f}s guests {s['guest_bytes'] / GIB:.2f} GiB, KSM saves "
                        f"{s['ksm_saving_bytes'] / GIB:.2f} GiB, reclaimed {reclaimed / GIB:.2f} GiB, "
                        f"ksmd {s['ksmd_cpu_s']:.1f} s"
                    )
                if t >= args.observe:
                    break
                time.sleep(max(0.0, args.interval - (time.monotonic() - t0 - t)))
        t_end, p2 = p_window or (time.monotonic() - t0, passes(vms))
        base = [(b - a) / 10 for a, b in zip(p0, p1, strict=True)]
        during = [(b - a) / t_end for a, b in zip(p1, p2, strict=True)]
        return {
            "mode": mode,
            "limit": lim,
            "slowdown": [round(1 - d / b, 3) if b > 0 else None for b, d in zip(base, during, strict=True)],
            "refreshes": [r.to_json() for r in eng.refreshes] if mode == "directed" and eng is not None else None,
            "settings": settings,
            "ksmd_cpu_budget": budget,
            "samples": samples,
            "pause_max_ms": round(max(pauses), 2)
            if pauses
            else max((r.pause_max_ms for r in eng.refreshes), default=None)
            if mode == "directed" and eng is not None
            else None,
            "pauses": len(pauses),
            "guest_memory": args.memory,
        }
    finally:
        for r in recs:
            r.close()
        for vm in vms:
            vm.stop()


def _stock_share(stock: dict[str, Any] | None, window: float) -> float | None:
    """The share of a CPU stock KSM's ksmd used in the window: memvirt's ksmd budget, so it
    uses no more CPU (None without a stock run: memvirt then runs at the stock rate)."""
    if not stock:
        return None
    w = at(stock["samples"], window)
    return w["ksmd_cpu_s"] / w["t"] if w["t"] > 0 and w["ksmd_cpu_s"] > 0 else None


def at(samples: list[dict[str, Any]], t: float) -> dict[str, Any]:
    """The last sample taken at or before ``t`` seconds."""
    return [s for s in samples if s["t"] <= t + 0.5][-1]


def summarize(results: dict[str, dict[str, Any]], window: float) -> list[dict[str, Any]]:
    base = results["none"]["samples"]
    rows = []
    for mode, r in results.items():
        s = r["samples"]
        saving = [at(base, x["t"])["guest_bytes"] - x["guest_bytes"] for x in s]
        final = saving[-1]
        t90 = next((x["t"] for x, v in zip(s, saving, strict=True) if final > 0 and v >= 0.9 * final), None)
        w = at(s, window)
        rows.append(
            {
                "mode": mode,
                "start_bytes": s[0]["guest_bytes"],
                "bytes_at_window": w["guest_bytes"],
                "saving_at_window": at(base, window)["guest_bytes"] - w["guest_bytes"],
                "final_bytes": s[-1]["guest_bytes"],
                "final_saving": final,
                "t90_s": t90,
                "ksmd_cpu_s_window": w["ksmd_cpu_s"],
                "ksmd_cpu_s": s[-1]["ksmd_cpu_s"],
                "pause_max_ms": r.get("pause_max_ms"),
                "limit_bytes": r["limit"]["limit_bytes"],
                "x_limit_at_window": round(w["guest_bytes"] / r["limit"]["limit_bytes"], 2),
                "slowdown_max": max((x for x in r["slowdown"] if x is not None), default=None),
                "analyze_gib_per_s": round(r["limit"]["gib"] / r["limit"]["seconds"], 2)
                if r["limit"]["seconds"]
                else None,
            }
        )
    return rows


def balloon(args: argparse.Namespace) -> dict[str, Any]:
    """Free page reporting (guest driver) vs memvirt reclaim (no driver), same churn."""
    from memvirt.dedup.discard import host_usage
    from memvirt.dedup.reclaim import Reclaimer

    say("[bold]balloon[/]: booting a guest with virtio-balloon free page reporting and one without")
    (fpr,) = boot(["dd-bench-fpr"], args.memory, ["-device", "virtio-balloon-pci,free-page-reporting=on"])
    try:
        (mv,) = boot(["dd-bench-reclaim"], args.memory)
        try:
            drv = fpr.exec(
                "cat /sys/bus/virtio/drivers/virtio_balloon/*/features 2>/dev/null; "
                "ls /sys/bus/virtio/drivers/virtio_balloon/ 2>/dev/null"
            ).text
            out: dict[str, Any] = {"guest_driver_bound": "virtio" in drv}
            for vm in (fpr, mv):
                vm.exec(CHURN.format(size=args.churn, seed=5), timeout=600).check("churn")
            out["before_bytes"] = {"free_page_reporting": host_usage(fpr), "memvirt_reclaim": host_usage(mv)}
            t0 = time.monotonic()
            series: dict[str, list[tuple[float, int]]] = {"free_page_reporting": [], "memvirt_reclaim": []}
            with Reclaimer(mv) as rec:
                first = rec.run()
                done = time.monotonic() - t0
                while (t := time.monotonic() - t0) < args.balloon_observe:
                    series["free_page_reporting"].append((round(t, 1), host_usage(fpr)))
                    series["memvirt_reclaim"].append((round(t, 1), host_usage(mv)))
                    time.sleep(1)
            out.update(
                series=series,
                reclaim_seconds=round(done, 3),
                reclaim_pause_max_ms=round(max(first.pauses_ms or [0]), 2),
            )
            return out
        finally:
            mv.stop()
    finally:
        fpr.stop()


def pass_cost(args: argparse.Namespace) -> dict[str, Any]:
    """One guest after the workload: a refresh's fingerprinting of the pages in use, every page
    (no write tracker) against only those written since the last pass (20 s apart)."""
    from memvirt.dedup.directed import PM_EXCLUSIVE, _Guest
    from memvirt.memory.pagemap import PM_PRESENT

    (vm,) = boot(["dd-bench-pass"], args.memory)
    try:
        workload([vm], args.churn, args.cold)
        g = _Guest(vm, reclaim=False)
        try:
            g.track()
            rows = []
            for i in range(args.pass_rounds):
                if i:
                    time.sleep(20)
                e = g.entries()
                want = ((e & PM_PRESENT) != 0) & ((e & PM_EXCLUSIVE) != 0) & ~g.intro.scan(live=True).free_mask[g.pfns]
                for kind in ("incremental", "full"):  # incremental: writes of the last 20 s
                    if kind == "full":
                        g.valid[:] = False  # as a refresh without a tracker
                    t = time.perf_counter()
                    n = g.prints(want)
                    rows.append({"kind": kind, "seconds": round(time.perf_counter() - t, 4), "pages": n})
                    say(f"pass cost: {kind} read {n} of {int(want.sum())} pages in use in {rows[-1]['seconds']} s")
            return {
                "in_use_pages": int(want.sum()),
                "method": g.tracker.method if g.tracker else g.why_full,
                "rounds": rows,
            }
        finally:
            g.close()
    finally:
        vm.stop()


def print_rows(rows: list[dict[str, Any]], window: float, bal: dict[str, Any] | None) -> None:
    t = Table(
        title=f"Host memory of the guests (Pss of QEMU RAM mappings), saving vs no sharing; window {window:.0f} s"
    )
    for c in (
        "mode",
        "start GiB",
        f"at {window:.0f}s GiB",
        f"saving at {window:.0f}s GiB",
        "final GiB",
        "final saving GiB",
        "t to 90 % of final s",
        f"ksmd CPU s (to {window:.0f}s / all)",
        "max pause ms",
        "limit GiB",
        f"x limit at {window:.0f}s",
        "slowest guest",
    ):
        t.add_column(c, justify="left" if c == "mode" else "right")
    for r in rows:
        t.add_row(
            r["mode"],
            f"{r['start_bytes'] / GIB:.2f}",
            f"{r['bytes_at_window'] / GIB:.2f}",
            f"{r['saving_at_window'] / GIB:.2f}",
            f"{r['final_bytes'] / GIB:.2f}",
            f"{r['final_saving'] / GIB:.2f}",
            str(r["t90_s"]),
            f"{r['ksmd_cpu_s_window']:.1f} / {r['ksmd_cpu_s']:.1f}",
            str(r["pause_max_ms"] or ""),
            f"{r['limit_bytes'] / GIB:.2f}",
            f"{r['x_limit_at_window']:.2f}",
            "" if r["slowdown_max"] is None else f"{100 * r['slowdown_max']:+.1f} %",
        )
    console.print(t)
    by = {r["mode"]: r for r in rows}
    if "stock" in by and "memvirt" in by:
        st, mv = by["stock"]["saving_at_window"], by["memvirt"]["saving_at_window"]
        ratio = f"{mv / st:.1f}x" if st > 0 else "stock saved nothing"
        console.print(
            f"memvirt vs stock KSM in the first {window:.0f} s: {ratio} (goal >= 2x), ksmd CPU "
            f"{by['memvirt']['ksmd_cpu_s_window']:.1f} s vs {by['stock']['ksmd_cpu_s_window']:.1f} s"
        )
    if "directed" in by:
        d = by["directed"]
        slow = "?" if d["slowdown_max"] is None else f"{100 * d['slowdown_max']:.1f} %"
        console.print(
            f"directed: {d['x_limit_at_window']:.2f}x the limit at {window:.0f} s (goal <= 1.25x), ksmd CPU "
            f"{d['ksmd_cpu_s_window']:.1f} s (goal <= 2 s), slowest guest {slow} slower (goal <= 5 %)"
        )
    if bal:
        console.print(
            "after the churn, before any reclaim: "
            + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in bal["before_bytes"].items())
            + f"; memvirt's reclaim took {bal['reclaim_seconds']} s, longest pause {bal['reclaim_pause_max_ms']} ms"
        )
        for k, s in bal["series"].items():
            pts = ", ".join(f"{t:.0f}s {b / GIB:.2f}" for t, b in s[:: max(1, len(s) // 8)])
            console.print(f"{k}: host GiB over time: {pts}")


def plot(data: dict[str, Any], png: Path) -> None:
    """Host memory per mode over time, the saving over no sharing, and reclaim vs the balloon."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = data.get("modes") or {}
    bal = data.get("balloon")
    fig, axes = plt.subplots(1, 3 if bal else 2, figsize=(16 if bal else 11, 4.5))
    base = modes.get("none", {}).get("samples", [])
    window = data["args"]["window"]
    for mode, r in modes.items():
        ts = [x["t"] for x in r["samples"]]
        color = f"C{MODES.index(mode)}" if mode in MODES else None
        axes[0].plot(ts, [x["guest_bytes"] / GIB for x in r["samples"]], label=mode, color=color)
        if base and mode != "none":
            axes[1].plot(
                ts,
                [(at(base, x["t"])["guest_bytes"] - x["guest_bytes"]) / GIB for x in r["samples"]],
                label=mode,
                color=color,
            )
    axes[0].set(title=f"host memory of {data['args']['guests']} guests", xlabel="s after the workload", ylabel="GiB")
    axes[1].set(title="saving vs no sharing", xlabel="s after the workload", ylabel="GiB")
    for ax in axes[:2]:
        ax.axvline(window, color="k", ls="--", lw=0.8)
        ax.legend(fontsize=8)
    if bal:
        for k, series in bal["series"].items():
            axes[2].plot([t for t, _ in series], [b / GIB for _, b in series], label=k.replace("_", " "))
        axes[2].set(title="after a churn: driver vs no driver", xlabel="s", ylabel="GiB")
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    say(f"wrote {png}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guests", type=int, default=4)
    ap.add_argument("--memory", type=parse_size, default=parse_size("1G"))
    ap.add_argument("--churn", type=parse_size, default=parse_size("600M"))
    ap.add_argument("--cold", type=parse_size, default=parse_size("128M"))
    ap.add_argument("--observe", type=float, default=150.0)
    ap.add_argument("--window", type=float, default=120.0)
    ap.add_argument("--interval", type=float, default=5.0)
    ap.add_argument("--balloon-observe", type=float, default=30.0)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--directed-cpu", type=float, default=0.015, help="ksmd's CPU share in directed mode")
    ap.add_argument("--no-balloon", action="store_true")
    ap.add_argument("--pass-cost", action="store_true", help="only: one guest, fingerprint pass full vs incremental")
    ap.add_argument("--pass-rounds", type=int, default=3)
    ap.add_argument("--json", default=str(RESULTS / "dedup.json"))
    ap.add_argument("--png", default=str(RESULTS / "dedup.png"))
    args = ap.parse_args()
    # SIGTERM unwinds like Ctrl-C, so KSM settings and VMs are restored by the finally blocks.
    from memvirt.dedup import ksm

    if not ksm.available():
        console.print("this host kernel has no KSM")
        return 2
    info = machine_info("qemu-system-x86_64")
    results: dict[str, dict[str, Any]] = {}
    data: dict[str, Any] = {"machine": info, "args": {k: v for k, v in vars(args).items()}}
    try:
        if args.pass_cost:
            data["pass_cost"] = pass_cost(args)
            return 0
        for mode in args.modes.split(","):
            results[mode] = run_mode(
                mode, args, _stock_share(results.get("stock"), args.window) if mode == "memvirt" else None
            )
        data["modes"] = results
        data["summary"] = summarize(results, args.window) if "none" in results else None
        data["balloon"] = None if args.no_balloon else balloon(args)
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except Exception:
        traceback.print_exc()
        return 1
    finally:
        write_json(Path(args.json).resolve(), data)
    if data["summary"]:
        print_rows(data["summary"], args.window, data["balloon"])
        plot(data, Path(args.png))
    say(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    run_main(main)
