"""Working set, resident memory, limit and compressed memory over time: one panel per VM."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MIB = 1 << 20


def draw_timeline(samples: Sequence[Any], path: str | Path, title: str = "") -> Path:
    """Write a PNG from :class:`~memvirt.compress.controller.Sample` or
    :class:`~memvirt.compress.wss.Estimate` rows (anything with ``t``, ``wss``, ``resident``...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_vm: dict[str, list[Any]] = defaultdict(list)
    for s in samples:
        by_vm[getattr(s, "vm", "")].append(s)
    fig, axes = plt.subplots(len(by_vm) or 1, 1, figsize=(9, 3.2 * max(len(by_vm), 1)), squeeze=False)
    for ax, (vm, rows) in zip(axes[:, 0], sorted(by_vm.items()), strict=False):
        t = [r.t for r in rows]
        ax.plot(t, [r.wss / MIB for r in rows], label="working set (estimate)", color="#d62728", lw=2)
        ax.plot(t, [r.resident / MIB for r in rows], label="guest RAM resident", color="#1f77b4")
        ax.plot(t, [r.swapped / MIB for r in rows], label="guest RAM in swap tiers", color="#2ca02c", ls="--")
        limits = [(r.t, r.limit / MIB) for r in rows if getattr(r, "limit", 0)]
        if limits:
            ax.step(
                *zip(*limits, strict=True), where="post", label="memory limit (QEMU total)", color="#7f7f7f", ls=":"
            )
        ax.set_ylabel("MiB")
        ax.set_title(vm or title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    axes[-1, 0].set_xlabel("seconds")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
