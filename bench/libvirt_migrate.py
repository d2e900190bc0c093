#!/usr/bin/env python3
"""libvirt's live migration with and without memvirt, on the same domain (issue #18's figures).

A TCG domain of ``--memory`` MiB writes and frees ``--freed`` of RAM (its free memory is dirty,
as in a long-running guest), then migrates with libvirt alone to a second libvirtd on this host
(tests/libvirtd2.py), and back with ``memvirt libvirt migrate`` (free pages discarded first, so
QEMU sends them as zero pages). Figures are libvirt's completed job statistics: bytes on the
wire (``data_processed``), the job's time, downtime; beside them memvirt's reclaim before the job
and the whole command's wall time (what an operator waits for).

The run is the guest test ``tests/test_libvirt_migrate.py`` at the bench's size (it owns the
libvirtd fixtures and asserts the data arrived intact), under ``/tmp/memvirt-libvirt.lock``.
Downtime of the memvirt row comes from the receiving daemon's job (the sender's is gone once the
domain left it), which counts from the pause until the target resumes.

    python bench/libvirt_migrate.py [--memory 1024] [--freed 600M] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import RESULTS, make_console, run_main

ROOT = Path(__file__).resolve().parent.parent
TEST = "tests/test_libvirt_migrate.py::test_migrate_sends_fewer_bytes_than_libvirt_alone"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory", type=int, default=1024, help="the domain's RAM in MiB")
    ap.add_argument("--freed", default="600M", help="what the guest writes and frees first")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    env = dict(os.environ, MEMVIRT_LVMIG_MIB=str(args.memory), MEMVIRT_LVMIG_FREED=args.freed)
    cmd = [
        "flock",
        "/tmp/memvirt-libvirt.lock",
        sys.executable,
        "-m",
        "pytest",
        TEST,
        "-q",
        "-s",
        "-p",
        "no:cacheprovider",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("LVMIG ")), None)
    if proc.returncode != 0 or line is None:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        print(f"libvirt_migrate: the run failed (exit {proc.returncode}):\n{tail}", file=sys.stderr)
        return 1
    rows = json.loads(line[len("LVMIG ") :])
    out = {"memory_mib": args.memory, "freed": args.freed, "load": os.getloadavg(), **rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "libvirt_migrate.json").write_text(json.dumps(out, indent=1))
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    console = make_console()
    console.print(f"{args.memory} MiB domain, {args.freed} written and freed; load {os.getloadavg()[0]:.1f}")
    console.print(
        f"{'run':<28}{'reclaimed first':>16}{'in':>8}{'bytes':>14}{'zero pages':>12}{'job':>8}{'downtime':>10}"
        f"{'command':>9}"
    )
    for name, r in (("libvirt alone", rows["plain"]), ("memvirt libvirt migrate", rows["memvirt"])):
        console.print(
            f"{name:<28}{r['reclaimed_before'] / 2**20:>12.0f} MiB{r['reclaim_ms'] / 1000:>7.1f}s"
            f"{r['bytes'] / 2**20:>10.0f} MiB{r['zero_pages']:>12}{r['total_ms'] / 1000:>7.1f}s"
            f"{r['downtime_ms']:>7} ms{r['wall_ms'] / 1000:>8.1f}s"
        )
    return 0


if __name__ == "__main__":
    run_main(main)
