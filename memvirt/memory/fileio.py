"""Positional reads into caller buffers: the one primitive the file-backed sources share."""

from __future__ import annotations

import os

from memvirt.errors import BadImage


def pread_into(fd: int, offset: int, out: memoryview, what: str) -> None:
    """Fill ``out`` from ``fd`` at ``offset``; a short read means the source is truncated.

    ``preadv`` on tmpfs copies holes from the zero page, so reading a sparse RAM file never
    allocates its holes.
    """
    pos = 0
    while pos < len(out):
        n = os.preadv(fd, [out[pos:]], offset + pos)
        if n <= 0:
            raise BadImage(f"{what} ends at byte {offset + pos:#x}; expected {len(out) - pos} more bytes")
        pos += n
