"""Physical-machine migration: downtime per scheme and compression, beside the link it runs on.

One 512 MiB guest (``--used`` of its memory in use: memtouch's content mix plus datacheck's
data) moves hop after hop, each hop to a freshly booted machine on the same LAN, once per
scheme × compression. Per hop: the LAN throughput measured just before (same pair, same
moment), the downtime breakdown (freeze, create image, transfer, restore), image size against
used memory, bytes on the wire, the compression ratio, where the frozen source spent its time,
and whether the machine runs on (counter advances, data verifies). A hop that fails (e.g. the
kernel's ENOMEM once the image no longer fits beside the used memory, without swap) is recorded
with its one-line error and the bench boots a new machine to go on. The goal from the issue: a
512 MiB machine with 200 MiB in use moves with a downtime under 5 s under TCG.

``python bench/pm.py [--used 200M] [--schemes memory,disk,iterative] [--codecs lz4,zstd,none]
[--shrink] [--json FILE]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("MEMVIRT_HOME", "/tmp/bench-pm-state")
os.environ.setdefault("MEMVIRT_RAM_DIR", "/dev/shm/bench-pm-ram")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, guest_health, machine_info, run_main, size_arg, start_workload, write_json

from memvirt.errors import MemvirtError
from memvirt.image.build import default_image
from memvirt.pm.link import measure_link
from memvirt.pm.migrate import migrate
from memvirt.qemu.accel import qemu_binary
from memvirt.qemu.vm import VM, start_vm

LAN = "pm-bench"
DC_SIZE = 16 << 20


def used(vm: VM) -> int:
    """MemTotal - MemFree: what the machine has in use (page cache and the initramfs included)."""
    text = vm.exec("grep -E '^(MemTotal|MemFree):' /proc/meminfo").text.split()
    return (int(text[1]) - int(text[4])) * 1024


def boot(name: str) -> VM:
    return start_vm(name, default_image("6.1"), memory=512 << 20, lan_name=LAN)


def setup_source(name: str, target_used: int) -> VM:
    """A machine with about ``target_used`` bytes in use, dirtying 1 MB/s of it."""
    vm = boot(name)
    extra = max(16 << 20, target_used - used(vm) - DC_SIZE)
    hot = min(32 << 20, extra // 4)
    start_workload(
        vm, f"memtouch --hot {hot >> 20}M --cold {(extra - hot) >> 20}M --content mix --dirty-rate 1M", DC_SIZE
    )
    return vm


def hop(src: VM, dst: VM, scheme: str, codec: str, shrink: bool) -> dict[str, Any]:
    row: dict[str, Any] = {"scheme": scheme, "compress": codec, "used_before": used(src)}
    row["link_bytes_per_s"] = round(measure_link(src, dst))
    try:
        rep = migrate(src.name, dst.name, scheme, codec, shrink)
    except MemvirtError as e:
        row["error"] = str(e)
        return row
    row.update(rep.to_json())
    row["guest"] = guest_health(VM.load(dst.name)) or "ok"
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--used", type=size_arg, default=200 << 20, help="memory in use on the machine")
    ap.add_argument("--schemes", default="memory,disk,iterative")
    ap.add_argument("--codecs", default="lz4,zstd,none")
    ap.add_argument("--shrink", action="store_true", help="PREF_IMAGE_SIZE 0: the smallest image")
    ap.add_argument("--json", type=Path, default=RESULTS / "pm.json")
    ap.add_argument("--prefix", default="pm-bench", help="VM and LAN name prefix")
    args = ap.parse_args()
    global LAN
    LAN = args.prefix
    results: dict[str, Any] = {"machine": machine_info(qemu_binary()), "used_target": args.used, "hops": []}
    n = 0
    try:
        src = setup_source(f"{args.prefix}-{n}", args.used)
        for scheme in args.schemes.split(","):
            for codec in args.codecs.split(","):
                n += 1
                dst = boot(f"{args.prefix}-{n}")
                row = hop(src, dst, scheme, codec, args.shrink)
                results["hops"].append(row)
                print_row(row)
                write_json(args.json, results)
                if "error" not in row:
                    src = VM.load(dst.name)
                    continue
                dst.stop()  # untouched by the failed hop; the source thawed and runs on
                if not src.alive() or guest_health(src):
                    src.stop()
                    n += 1
                    src = setup_source(f"{args.prefix}-{n}", args.used)
    finally:
        for v in VM.all():
            if v.name.startswith(f"{args.prefix}-"):
                v.stop()
    write_json(args.json, results)
    print_table(results)
    print(f"wrote {args.json}")


def print_row(r: dict[str, Any]) -> None:
    if "error" in r:
        print(f"{r['scheme']}/{r['compress']}: error: {r['error']}", flush=True)
        return
    st = r.get("source_stages", {})
    print(
        f"{r['scheme']}/{r['compress']}: downtime {r['downtime_seconds']:.2f} s (freeze {r['freeze_seconds']:.3f}, "
        f"create {r['create_seconds']:.2f}, transfer {r['transfer_seconds']:.2f}, restore {r['restore_seconds']:.2f}); "
        f"source read {st.get('read', 0):.2f} scan {st.get('scan', 0):.2f} compress {st.get('compress', 0):.2f} "
        f"send {st.get('send', 0):.2f}; target "
        + " ".join(f"{k} {v:.2f}" for k, v in r.get("target_stages", {}).items())
        + (
            f"; zram: preswap {r['preswap_seconds']:.1f} s, {r['swapped_bytes'] >> 20} MiB swapped at the snapshot, "
            f"stored/compressed {json.dumps(r['zram_stats'])}"
            if r.get("zram")
            else ""
        )
        + f"; guest {r['guest']}",
        flush=True,
    )


def print_table(results: dict[str, Any]) -> None:
    print(
        f"\n{'scheme':10} {'codec':5} {'used MiB':>8} {'image MiB':>9} {'stream MiB':>10} {'ratio':>6} "
        f"{'link MB/s':>9} {'eff MB/s':>8} {'freeze':>7} {'create':>7} {'transfer':>8} {'restore':>7} "
        f"{'DOWNTIME':>8} {'precopy':>8}  guest"
    )
    for r in results["hops"]:
        link = r["link_bytes_per_s"] / 1e6
        if "error" in r:
            print(
                f"{r['scheme']:10} {r['compress']:5} {r['used_before'] / 2**20:8.0f} {'':>9} {'':>10} {'':>6} "
                f"{link:9.1f}  error: {r['error']}"
            )
            continue
        eff = r["image_bytes"] / r["transfer_seconds"] / 1e6 if r["transfer_seconds"] else 0
        pre = f"{r['precopy_seconds']:.1f} s" if r["precopy_pages"] else "-"
        print(
            f"{r['scheme']:10} {r['compress']:5} {r['used_bytes'] / 2**20:8.0f} {r['image_bytes'] / 2**20:9.0f} "
            f"{r['stream_bytes'] / 2**20:10.1f} {r['compression_ratio']:6.2f} {link:9.1f} {eff:8.1f} "
            f"{r['freeze_seconds']:7.3f} {r['create_seconds']:7.2f} {r['transfer_seconds']:8.2f} "
            f"{r['restore_seconds']:7.2f} {r['downtime_seconds']:8.2f} {pre:>8}  {r['guest']}"
        )
    print(
        "eff MB/s: image bytes moved per second of transfer (beats the link when compression or references "
        "leave bytes out); goal: downtime < 5 s at 200 MiB used"
    )


if __name__ == "__main__":
    run_main(main)
