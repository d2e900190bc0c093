"""Sizes as people type them (``512M``, ``4G``): one parser for every command and bench."""

from __future__ import annotations

from memvirt.errors import BadSize

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``512M``, ``4G``, ``1048576`` -> bytes; anything else raises :class:`BadSize`."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        n = int(float(t[:-1]) * UNITS[t[-1]]) if t and t[-1] in UNITS else int(t)
    except (ValueError, OverflowError) as e:  # "inf" overflows int()
        raise BadSize(f"not a size: {text!r} (use e.g. 512M, 4G)") from e
    if n < 0:
        raise BadSize(f"not a size: {text!r} (use e.g. 512M, 4G)")
    return n
