"""Positional reads into caller buffers, opening the files a user names as memory sources, and
the base of the readers over one descriptor."""

from __future__ import annotations

import os
import stat

from memvirt.errors import BadImage, NotFound, UsageError
from memvirt.memory.source import GuestMemory


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


def read_image_into(fd: int, offset: int, out: memoryview, what: str) -> None:
    """:func:`pread_into` for a user's image file: an I/O error is a :class:`BadImage`, not a traceback."""
    try:
        pread_into(fd, offset, out, what)
    except OSError as e:
        raise BadImage(f"{what}: cannot read byte {offset:#x}: {e.strerror or e}") from e


def open_image(path: os.PathLike[str] | str, what: str) -> int:
    """A read-only descriptor of the regular file ``path`` names.

    A FIFO or device would block or has no size, so it is refused before anything reads it
    (``O_NONBLOCK`` keeps the open itself from waiting for a FIFO writer). Open failures are
    the user's input: missing -> :class:`NotFound`, anything else -> :class:`UsageError`.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError as e:
        raise NotFound(f"{what} {path} does not exist") from e
    except OSError as e:
        raise UsageError(f"cannot open {what} {path}: {e.strerror or e}") from e
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        os.close(fd)
        raise UsageError(f"cannot open {what} {path}: {e.strerror or e}") from e
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise UsageError(f"{path} is {kind}, not a memory image")
    return fd


class FdMemory(GuestMemory):
    """A reader over one open descriptor (a RAM file, a dump, a raw image, ``/proc/PID/mem``):
    the descriptor is closed once, and by default bytes are read from it at the backing offset,
    an I/O error naming :meth:`describe` (the readers that decompress or map override
    :meth:`_fill`)."""

    _fd: int = -1

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _fill(self, offset: int, out: memoryview) -> None:
        read_image_into(self._fd, offset, out, self.describe())
