"""Parts of directed KSM without QEMU: the mergeable runs, and MADV_(UN)MERGEABLE run inside a child
process through the ptrace borrow, which splits its mapping into VMAs that memvirt must still find,
measure and join back into one mergeable mapping."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from memvirt.dedup.directed import advise_detached, closed_runs, ram_is_mergeable, runs_mask
from memvirt.dedup.discard import ram_mapping_usage
from memvirt.memory.procmem import find_ram_mapping
from memvirt.qemu.remote import MADV_MERGEABLE, MADV_UNMERGEABLE, remote_madvise

SIZE = 64 << 20
CHILD = textwrap.dedent(f"""
    import mmap, os, sys, threading, time
    m = mmap.mmap(-1, {SIZE}, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_MERGEABLE)
    m.write(os.urandom({SIZE}))
    print("ready", flush=True)
    threading.Thread(target=lambda: time.sleep(3600), daemon=True).start()
    sys.stdin.read()
""")


def test_closed_runs_keeps_the_largest_gaps():
    mask = np.zeros(40, dtype=bool)
    mask[[1, 2, 5, 20, 21, 30]] = True
    s, e = closed_runs(mask, 10)
    assert s.tolist() == [1, 5, 20, 30] and e.tolist() == [3, 6, 22, 31]
    s, e = closed_runs(mask, 2)
    assert s.tolist() == [1, 20] and e.tolist() == [6, 31]
    assert runs_mask(40, s, e).sum() == 5 + 11 and runs_mask(40, s, e)[mask].all()
    s, e = closed_runs(np.zeros(5, dtype=bool), 3)
    assert len(s) == len(e) == 0


@pytest.fixture
def child():
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_unmergeable_holes_split_the_mapping_and_restore_joins_it(child):
    pid = child.pid
    base = find_ram_mapping(pid, SIZE)
    assert ram_is_mergeable(pid, base, SIZE)
    rss = ram_mapping_usage(pid, base, SIZE)["Rss"]
    starts = np.array([base + (1 << 20), base + (9 << 20)], dtype=np.int64)
    lens = np.array([3 << 20, 4096], dtype=np.int64)
    advise_detached([(pid, MADV_UNMERGEABLE, starts, lens)], [(pid, base, SIZE)])
    assert not ram_is_mergeable(pid, base, SIZE)
    assert find_ram_mapping(pid, SIZE) == base, "the split mapping must still be found"
    assert ram_mapping_usage(pid, base, SIZE)["Rss"] == rss, "usage must sum every VMA of the RAM"
    with remote_madvise(pid, MADV_MERGEABLE) as advise:
        advise(np.array([base], dtype=np.int64), np.array([SIZE], dtype=np.int64))
    assert ram_is_mergeable(pid, base, SIZE)
    maps = open(f"/proc/{pid}/maps").read()
    assert f"{base:x}-{base + SIZE:x}" in maps, "the VMAs did not join back into one mapping"
    assert child.poll() is None
