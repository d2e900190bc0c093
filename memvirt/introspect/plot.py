"""A picture of the guest-physical address space, one pixel per page, coloured by class."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from memvirt.introspect.census import CLASSES, Census

COLOURS = {
    "unbacked": "#d9d9d9",
    "reserved": "#525252",
    "free": "#a1d99b",
    "free_pcp": "#31a354",
    "page_cache": "#6baed6",
    "anon": "#fd8d3c",
    "slab": "#9e9ac8",
    "page_table": "#e7298a",
    "kernel": "#8c6d31",
}


def draw_map(census: Census, path: str | Path, title: str = "", width: int = 1024) -> Path:
    """Write a PNG: rows of ``width`` pages (4 MiB per row at 1024), low addresses at the top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    classes = census.classes
    rows = -(-len(classes) // width)
    cells = np.zeros(rows * width, dtype=np.uint8)
    cells[: len(classes)] = classes
    grid = cells.reshape(rows, width)
    cmap = ListedColormap([COLOURS[c] for c in CLASSES])
    fig, ax = plt.subplots(figsize=(10, max(3.0, min(14.0, rows / 60 + 2))), dpi=120)
    ax.imshow(grid, cmap=cmap, vmin=0, vmax=len(CLASSES) - 1, aspect="auto", interpolation="nearest")
    row_mib = width * census.page_size / (1 << 20)
    ticks = np.linspace(0, rows - 1, num=min(rows, 9)).astype(int)
    ax.set_yticks(ticks, [f"{t * row_mib / 1024:.2f} GiB" for t in ticks])
    ax.set_xticks([])
    ax.set_xlabel(f"{width} pages ({row_mib:.0f} MiB) per row")
    ax.set_title(title or f"Guest physical memory, Linux {census.release}")
    handles = [
        Patch(color=COLOURS[c], label=f"{c} ({census.counts.get(c, 0) * census.page_size / (1 << 20):.0f} MiB)")
        for c in CLASSES
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out
