"""Working-set estimates against known hot sets, for every tracker this host lets memvirt use.

One VM (default 1 GiB) runs memtouch with a cold set C and a hot set that steps through the
given sizes (its phase file). For each size and each method (``damon`` where memvirt can have
DAMON, else the reason it can't; ``referenced`` always) a fresh tracker measures ``--intervals``
one-second intervals after ``--settle`` seconds; the figure is the median of the last four
estimates beside the hot set. The guest kernel and memtouch's own code and stack are part of
any real working set, so a few MiB above the hot set is expected.

    python bench/wss.py [--memory 1G] [--hot 64M,128M,256M] [--cold 384M] [--intervals 8] [--json FILE]
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

os.environ.setdefault("MEMVIRT_HOME", "/tmp/bench-wss-state")
os.environ.setdefault("MEMVIRT_RAM_DIR", "/dev/shm/bench-wss-ram")
MIB = float(1 << 20)
PHASE = "/tmp/memtouch.phase"
console = make_console()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memory", type=size_arg, default=1 << 30)
    ap.add_argument("--hot", default="64M,128M,256M", help="hot-set sizes, comma-separated")
    ap.add_argument("--cold", type=size_arg, default=384 << 20)
    ap.add_argument("--intervals", type=int, default=8)
    ap.add_argument("--settle", type=float, default=4.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    hots = [size_arg(h) for h in args.hot.split(",")]

    from memvirt.compress import damon
    from memvirt.compress.controller import Controller, Policy
    from memvirt.image.build import default_image
    from memvirt.qemu.accel import qemu_binary
    from memvirt.qemu.vm import start_vm

    info = machine_info(qemu_binary())
    damon_reason = damon.unavailable_reason()
    methods = (["damon"] if damon_reason is None else []) + ["referenced"]
    vm = start_vm("bench-wss", default_image("6.1"), memory=args.memory)
    rows: list[dict[str, Any]] = []
    try:
        vm.exec(f"echo {hots[0]} > {PHASE}").check("phase file")
        vm.exec_background(
            f"memtouch --hot {max(hots)} --cold {args.cold} --content text --phase-file {PHASE}", "/tmp/memtouch.log"
        )
        deadline = time.monotonic() + 300
        while "ready" not in vm.exec("cat /tmp/memtouch.log").text:
            if time.monotonic() > deadline:
                raise SystemExit("memtouch did not fill its sets")
            time.sleep(1)
        for hot in hots:
            vm.exec(f"echo {hot} > {PHASE}").check("phase change")
            time.sleep(args.settle)
            for method in methods:
                ctl = Controller([vm], Policy("none"), interval=1.0, method=method)
                samples: list[Any] = []
                try:
                    ctl.run(args.intervals, samples.extend)
                finally:
                    ctl.close()
                est = statistics.median(s.wss for s in samples[-4:])
                rows.append(
                    {
                        "method": method,
                        "hot": hot,
                        "estimate": est,
                        "error": est / hot - 1,
                        "estimates": [s.wss for s in samples],
                    }
                )
                console.print(
                    f"{method:>10}  hot {hot / MIB:5.0f} MiB  estimate {est / MIB:6.1f} MiB  ({est / hot - 1:+.1%})"
                )
    finally:
        vm.stop()
    table = Table(title=f"working-set estimates, {args.memory / MIB:.0f} MiB VM, cold {args.cold / MIB:.0f} MiB")
    for col in ("method", "hot set MiB", "estimate MiB", "error"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["method"], f"{r['hot'] / MIB:.0f}", f"{r['estimate'] / MIB:.1f}", f"{r['error']:+.1%}")
    console.print(table)
    if damon_reason is not None:
        console.print(f"damon: not measured here ({damon_reason})")
    out = args.json or RESULTS / f"wss-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_json(
        out,
        {
            "machine": info,
            "damon_unavailable": damon_reason,
            "rows": rows,
            "args": {k: str(v) for k, v in vars(args).items()},
        },
    )
    console.print(f"results: {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
