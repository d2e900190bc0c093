"""Migration: QEMU's native precopy beside memvirt's engine, same guest and workload, one run.

Each scenario boots one guest and migrates it hop after hop on this host (target of one hop is
the source of the next), once per engine (``idle1g`` caps both engines to a 1 Gbit/s link):
memvirt (dirty tracker, free-page elision), memvirt fingerprinting every page in use per round
(its pre-tracker rounds, ``--dirty fingerprint``), memvirt without elision, QEMU plain precopy,
QEMU with xbzrle, QEMU with multifd (2 channels). ``used2g``/``dirty2g`` (and ``used4g``/
``dirty4g``) are guests with 75 % of RAM held by ``memtouch``, idle or rewriting 20 MB/s. QEMU gets
``max-bandwidth`` 4 GiB/s (its 32 MiB/s default would make it look worse than it is) and
``downtime-limit`` 300 ms, memvirt ``--downtime 300``. After every hop the guest must answer,
its counter must advance and ``datacheck verify`` must pass. Then a reliability loop migrates a
dirtying guest N times with memvirt and N times with QEMU plain.

QEMU's migrations listen unauthenticated and unencrypted on a loopback port (its ``tcp:``
transport): run the bench on a host whose local users are trusted. memvirt's use a one-off
secret (``secrets.token_hex(32)``) handed only to its receiver process, never to QEMU.

``python bench/migration.py [--scenarios idle,used2g,dirty2g,...] [--engines memvirt,...]
[--reliability 20] [--json FILE] [--png FILE]``
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("MEMVIRT_HOME", "/tmp/bench-mig-state")
os.environ.setdefault("MEMVIRT_RAM_DIR", "/dev/shm/bench-mig-ram")
SECRET = os.environ.pop("MEMVIRT_SECRET", "") or secrets.token_hex(32)
"""The receivers' shared secret: in their environment only, not in this process's (QEMU inherits it)."""
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, guest_health, machine_info, start_workload, write_json  # noqa: E402

from memvirt.image.build import default_image  # noqa: E402
from memvirt.migrate.qemu_native import qemu_migrate  # noqa: E402
from memvirt.migrate.sender import migrate  # noqa: E402
from memvirt.qemu.accel import qemu_binary  # noqa: E402
from memvirt.qemu.vm import VM, start_vm  # noqa: E402

GBIT = 125_000_000
"""A 1 Gbit/s link in bytes per second: both engines are capped to it (QEMU's ``max-bandwidth``,
memvirt's ``--max-bandwidth``) where a scenario says so; elsewhere loopback is the link."""
SCENARIOS: dict[str, dict[str, Any]] = {
    "idle": {
        "memory": 512 << 20,
        "label": "idle 512 MiB",
        "workload": None,
        "prepare": "memtouch --hot 256M --content text --duration 1 > /dev/null 2>&1",
    },
    "idle1g": {
        "memory": 512 << 20,
        "label": "idle 512 MiB, 1 Gbit/s",
        "workload": None,
        "bandwidth": GBIT,
        "prepare": "memtouch --hot 256M --content text --duration 1 > /dev/null 2>&1",
    },
    "half2g": {
        "memory": 2 << 30,
        "label": "2 GiB, 1 GiB in use",
        "workload": "memtouch --hot 32M --cold 992M --content mix --dirty-rate 1M",
        "prepare": None,
    },
    "dirty": {
        "memory": 512 << 20,
        "label": "512 MiB dirtying 50 MB/s",
        "workload": "memtouch --hot 64M --content random --dirty-rate 50M",
        "prepare": None,
    },
    "used2g": {
        "memory": 2 << 30,
        "label": "2 GiB, 75 % in use, idle",
        "workload": "memtouch --hot 4M --cold 1532M --content mix --dirty-rate 64K",
        "prepare": None,
    },
    "dirty2g": {
        "memory": 2 << 30,
        "label": "2 GiB, 75 % in use, 20 MB/s",
        "workload": "memtouch --hot 64M --cold 1472M --content mix --dirty-rate 20M",
        "prepare": None,
    },
    "used4g": {
        "memory": 4 << 30,
        "label": "4 GiB, 75 % in use, idle",
        "workload": "memtouch --hot 4M --cold 3068M --content mix --dirty-rate 64K",
        "prepare": None,
    },
    "dirty4g": {
        "memory": 4 << 30,
        "label": "4 GiB, 75 % in use, 20 MB/s",
        "workload": "memtouch --hot 64M --cold 3008M --content mix --dirty-rate 20M",
        "prepare": None,
    },
}
ENGINES = ["memvirt", "memvirt-fingerprint", "memvirt-no-elide", "qemu-plain", "qemu-xbzrle", "qemu-multifd"]
QEMU_ENGINES = ("qemu-plain", "qemu-xbzrle", "qemu-multifd")
QEMU_TIMEOUT = 180.0


def setup_guest(name: str, sc: dict[str, Any]) -> VM:
    vm = start_vm(name, default_image("6.1"), memory=sc["memory"])
    start_workload(vm, sc["workload"] or "memtouch --hot 4M --dirty-rate 64K", 16 << 20)
    return vm


def hop_memvirt(src: VM, dst: str, elide: bool, bandwidth: int, dirty: str = "auto") -> dict[str, Any]:
    port = 47100 + secrets.randbelow(800)
    rx = subprocess.Popen(
        [sys.executable, "-m", "memvirt", "receive", "--listen", f"127.0.0.1:{port}", "--timeout", "300"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "MEMVIRT_SECRET": SECRET},
    )
    rx.stderr.readline()
    try:
        rep = migrate(
            src.name, "127.0.0.1", port, SECRET.encode(), dst, elide_free=elide, max_bandwidth=bandwidth, dirty=dirty
        )
        rx.wait(60)
    finally:
        if rx.poll() is None:
            rx.kill()
    return {
        "bytes": rep.wire_bytes,
        "total_s": rep.total_seconds,
        "downtime_ms": rep.downtime_seconds * 1000,
        "rounds": len(rep.rounds),
        "converged": True,
        "detail": rep.stop_reason,
        "throttle": rep.max_throttle,
        "codecs": rep.codecs,
        "dirty_method": rep.dirty_method,
        "final_round_ms": rep.final_round_seconds * 1000,
        "final_pages": rep.rounds[-1].hashed if rep.rounds else 0,
        "switch_over_ms": {k: round(v * 1000, 1) for k, v in rep.switch_over.items()},
        "track_ms": rep.track_seconds * 1000,
    }


def run_hop(vm: VM, engine: str, dst: str, sc: dict[str, Any]) -> tuple[dict[str, Any], VM]:
    if sc.get("prepare"):
        vm.exec(sc["prepare"], timeout=120)
    if engine.startswith("memvirt"):
        dirty = "fingerprint" if engine == "memvirt-fingerprint" else "auto"
        res = hop_memvirt(vm, dst, engine != "memvirt-no-elide", sc.get("bandwidth", 0), dirty)
    else:
        res = qemu_migrate(vm, dst, engine.removeprefix("qemu-"), QEMU_TIMEOUT, sc.get("bandwidth") or 4 << 30)
    new = VM.load(dst) if (Path(os.environ["MEMVIRT_HOME"]) / "vms" / dst / "vm.json").exists() else vm
    res["guest"] = guest_health(new) if new.alive() else "target gone"
    return res, new


def main() -> None:
    ap = argparse.ArgumentParser(
        description="Migration bench: memvirt beside QEMU's own precopy. QEMU's "
        "migrations listen unauthenticated on a loopback port while they run."
    )
    ap.add_argument("--scenarios", default="idle,idle1g,half2g,dirty")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--reliability", type=int, default=20)
    ap.add_argument("--json", type=Path, default=RESULTS / "migration.json")
    ap.add_argument("--png", type=Path, default=RESULTS / "migration.png")
    ap.add_argument("--replot", action="store_true", help="Only print the table and plot from --json.")
    args = ap.parse_args()
    if args.replot:
        results = json.loads(args.json.read_text())
        print_table(results)
        plot(results, args.png)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results: dict[str, Any] = {"machine": machine_info(qemu_binary()), "scenarios": {}, "reliability": {}}
    hop = 0
    try:
        for key in args.scenarios.split(","):
            sc = SCENARIOS[key]
            vm = setup_guest(f"mg-{key}-0", sc)
            rows = results["scenarios"][key] = {"label": sc["label"], "engines": {}}
            for engine in args.engines.split(","):
                hop += 1
                try:
                    res, vm = run_hop(vm, engine, f"mg-{key}-{hop}", sc)
                except Exception as e:
                    res = {"error": f"{e.__class__.__name__}: {e}", "trace": traceback.format_exc(limit=3)}
                rows["engines"][engine] = res
                print(key, engine, {k: v for k, v in res.items() if k != "trace"}, flush=True)
                if not vm.alive():
                    break
            vm.stop()
        if args.reliability:
            results["reliability"] = reliability(args.reliability)
    finally:
        for v in VM.all():
            if v.name.startswith("mg-"):
                v.stop()
    write_json(args.json, results)
    print_table(results)
    plot(results, args.png)


def reliability(n: int) -> dict[str, Any]:
    """``n`` consecutive migrations of a dirtying guest per engine; guest errors counted."""
    out: dict[str, Any] = {}
    sc = {**SCENARIOS["dirty"], "workload": "memtouch --hot 32M --content mix --dirty-rate 20M"}
    for engine in ("memvirt", "qemu-plain"):
        vm = setup_guest(f"mg-rel-{engine}-0", sc)
        errors, downs = [], []
        for i in range(1, n + 1):
            try:
                res, vm = run_hop(vm, engine, f"mg-rel-{engine}-{i}", sc)
            except Exception as e:
                res = {"guest": f"migration failed: {e}"}
            if res.get("guest"):
                errors.append(f"run {i}: {res['guest']}")
            else:
                downs.append(res.get("downtime_ms") or 0)
            print("reliability", engine, i, res.get("guest") or "ok", flush=True)
            if not vm.alive() or res.get("guest"):
                vm.stop()
                vm = setup_guest(f"mg-rel-{engine}-r{i}", sc)
        vm.stop()
        out[engine] = {
            "runs": n,
            "guest_errors": len(errors),
            "errors": errors,
            "max_downtime_ms": max(downs) if downs else None,
        }
    return out


def print_table(results: dict[str, Any]) -> None:
    print(f"\n{'scenario':26} {'engine':18} {'MB on wire':>11} {'total s':>8} {'downtime ms':>12} {'rounds':>7}  guest")
    for sc in results["scenarios"].values():
        for engine, r in sc["engines"].items():
            if "error" in r:
                print(f"{sc['label']:26} {engine:18} error: {r['error']}")
                continue
            dt = f"{r['downtime_ms']:.0f}" if r.get("downtime_ms") is not None else "-"
            print(
                f"{sc['label']:26} {engine:18} {r['bytes'] / 1e6:11.1f} {r['total_s']:8.2f} {dt:>12} "
                f"{r['rounds'] if r['rounds'] is not None else '-':>7}  {r['guest'] or 'ok'}"
                f"{'' if r['converged'] else ' (did not converge: ' + r['detail'] + ')'}"
            )
        e = sc["engines"]
        m = e.get("memvirt", {})
        qs = [e[k] for k in QEMU_ENGINES if e.get(k, {}).get("converged")]
        if m.get("bytes") and qs:
            best_t = min(q["total_s"] for q in qs)
            best_d = min(q["downtime_ms"] for q in qs if q.get("downtime_ms") is not None)
            plain = e.get("qemu-plain", {}).get("bytes")
            print(
                f"{'':26} memvirt vs best QEMU: time {100 * m['total_s'] / best_t:.0f} %, "
                f"downtime {m['downtime_ms']:.0f} / {best_d:.0f} ms"
                + (f", bytes {100 * m['bytes'] / plain:.0f} % of plain" if plain else "")
            )
    for engine, r in results.get("reliability", {}).items():
        print(
            f"reliability {engine}: {r['runs']} migrations, {r['guest_errors']} guest errors, "
            f"max downtime {r['max_downtime_ms']} ms"
        )


def plot(results: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scs = list(results["scenarios"].values())
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (key, title, scale) in zip(
        axes,
        [("bytes", "MB on the wire", 1e-6), ("total_s", "total time (s)", 1), ("downtime_ms", "downtime (ms)", 1)],
        strict=True,
    ):
        width = 0.8 / len(ENGINES)
        for i, engine in enumerate(ENGINES):
            vals = [(sc["engines"].get(engine, {}).get(key) or 0) * scale for sc in scs]
            ax.bar([x + i * width for x in range(len(scs))], vals, width, label=engine)
        ax.set_xticks(
            [x + 0.4 - width / 2 for x in range(len(scs))], [textwrap.fill(sc["label"], 14) for sc in scs], fontsize=8
        )
        ax.set_title(title)
        if key == "downtime_ms":
            ax.axhline(300, color="k", ls="--", lw=0.8)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
