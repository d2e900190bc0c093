"""Dirty-page tracking cost: a ``PAGEMAP_SCAN`` per interval against the fingerprint pass.

No guest: a child process holds ``--size`` of anonymous memory, every page written (as a guest's
RAM in use), and writes the pages it is told to. The same tracker code as ``memvirt dirty``
(``memvirt.qemu.dirty.WriteTracker``, the ptrace borrow included) tracks it. Baseline: what
memvirt's migration does today to find changed pages, reading every page through
``/proc/PID/mem`` and hashing it (XXH3, ``memvirt.memory.pagehash``).

    python bench/dirty.py [--size 1G] [--repeat 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, best_of, machine_info, run_main, size_arg, write_json

from memvirt.memory.pagehash import hash_pages
from memvirt.memory.source import PAGE_SIZE
from memvirt.qemu.dirty import WriteTracker

CHILD = textwrap.dedent("""
    import ctypes, mmap, os, sys, threading
    import numpy as np
    size = int(sys.argv[1])
    m = mmap.mmap(-1, size)
    a = np.frombuffer(m, dtype=np.uint8).reshape(-1, 4096)
    a[:, 0] = 1
    r, w = os.pipe()
    threading.Thread(target=os.read, args=(r, 1), daemon=True).start()
    print(ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)
    for line in sys.stdin:
        seed, k = map(int, line.split())
        idx = np.random.default_rng(seed).choice(len(a), size=k, replace=False) if k < len(a) else slice(None)
        a[idx, 8] += 1
        print("ok", flush=True)
""")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=size_arg, default=1 << 30)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", type=Path, default=RESULTS / "dirty.json")
    args = ap.parse_args()
    size, pages = args.size, args.size // PAGE_SIZE
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(size)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdin is not None and child.stdout is not None
    rows: list[dict[str, object]] = []
    try:
        addr = int(child.stdout.readline())
        time.sleep(0.2)

        def write(k: int, seed: int) -> None:
            child.stdin.write(f"{seed} {k}\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "ok"

        t = WriteTracker(child.pid, addr, size)
        t0 = time.perf_counter()
        t.start()
        rows.append(
            {"what": "start (borrow, register, protect all)", "pages": pages, "ms": (time.perf_counter() - t0) * 1000}
        )
        try:
            best, _ = best_of(t.scan, args.repeat * 4)
            rows.append({"what": "scan, nothing written", "pages": 0, "ms": best * 1000})
            for k in (8, 4096, 65536, pages):
                if k > pages:
                    continue
                times = []
                for r in range(args.repeat):
                    write(k, r)
                    s0 = time.perf_counter()
                    got = t.scan()
                    times.append(time.perf_counter() - s0)
                    assert len(got) == k, (k, len(got))
                rows.append({"what": f"scan, {k} pages written", "pages": k, "ms": min(times) * 1000})
        finally:
            t.close()
        fd = os.open(f"/proc/{child.pid}/mem", os.O_RDONLY)
        buf = np.empty(64 << 20, dtype=np.uint8)

        def fingerprint() -> None:
            for off in range(0, size, len(buf)):
                n = min(len(buf), size - off)
                os.preadv(fd, [memoryview(buf)[:n]], addr + off)
                hash_pages(buf[:n])

        try:
            best, _ = best_of(fingerprint, args.repeat)
        finally:
            os.close(fd)
        rows.append({"what": "fingerprint pass (read + XXH3 every page)", "pages": pages, "ms": best * 1000})
    finally:
        child.kill()
        child.wait()
    gib = size / (1 << 30)
    print(f"{'what':<45} {'pages':>9} {'ms':>9} {'ms/GiB':>9}")
    for r in rows:
        print(f"{r['what']:<45} {r['pages']:>9} {r['ms']:>9.2f} {float(r['ms']) / gib:>9.2f}")  # type: ignore[arg-type]
    out = write_json(
        args.json,
        {
            "bench": "dirty",
            "size": size,
            "repeat": args.repeat,
            "rows": rows,
            "machine": machine_info("qemu-system-x86_64"),
        },
    )
    print(f"results: {out}")


if __name__ == "__main__":
    run_main(main)
