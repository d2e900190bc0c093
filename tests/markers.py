"""physaddr's page pattern, regenerated on the host (see memvirt/image/guest/physaddr.c)."""

from __future__ import annotations

import time

import numpy as np

from memvirt.qemu.vm import VM

M64 = (1 << 64) - 1


def marker_pages(seed: int, count: int) -> np.ndarray:
    """The ``(count, 4096)`` bytes ``physaddr mark --seed SEED --pages COUNT`` writes."""
    idx = np.arange(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        st = np.uint64(seed & M64) ^ (np.uint64(0xD1B54A32D192ED03) * (idx + np.uint64(1)))
        words = np.empty((count, 509), dtype=np.uint64)
        for w in range(509):
            st = st + np.uint64(0x9E3779B97F4A7C15)
            z = st
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            words[:, w] = z ^ (z >> np.uint64(31))
    pages = np.empty((count, 4096), dtype=np.uint8)
    for i in range(count):
        pages[i, :24] = np.frombuffer(b"MEMVIRT_%08x%08x" % (seed & 0xFFFFFFFF, i), dtype=np.uint8)
    pages[:, 24:] = words.astype("<u8").view(np.uint8).reshape(count, -1)
    return pages


def mark(vm: VM, seed: int, count: int) -> tuple[np.ndarray, int]:
    """Have the guest write ``count`` marker pages and hold them; returns (pfns, guest pid)."""
    log = f"/tmp/physaddr-{seed}.log"
    pid = vm.exec_background(f"physaddr mark --pages {count} --seed {seed} --hold", log)
    for _ in range(100):
        text = vm.exec(f"cat {log}").text
        if "READY" in text:
            break

        time.sleep(0.2)
    else:
        raise AssertionError(f"physaddr did not finish: {text}")
    pfns = [int(line.split()[1], 16) for line in text.splitlines() if line and line[0].isdigit()]
    assert len(pfns) == count and all(pfns), text
    return np.array(pfns, dtype=np.int64), pid
