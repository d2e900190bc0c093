"""Sizes as people type them (``512M``, ``4G``): one parser for every command and bench."""

from __future__ import annotations

from memvirt.errors import BadImage


def parse_size(text: str) -> int:
    """``512M``, ``4G``, ``1048576`` -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise BadImage(f"not a size: {text!r} (use e.g. 512M, 4G)") from None
