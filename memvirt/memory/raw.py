"""A raw memory image: file offset equals guest-physical address (holes are sparse)."""

from __future__ import annotations

import os
from pathlib import Path

from memvirt.errors import BadImage, NotFound
from memvirt.memory.fileio import pread_into
from memvirt.memory.source import GuestMemory, Region


class RawMemory(GuestMemory):
    kind = "raw image"

    def __init__(self, path: str | os.PathLike[str], regions: tuple[Region, ...] | None = None):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise NotFound(f"{self.path} does not exist") from None
        size = os.fstat(self._fd).st_size
        if size == 0 or size % 4096:
            os.close(self._fd)
            raise BadImage(f"{self.path} is {size} bytes: a raw image is a whole number of 4 KiB pages")
        self.regions = regions if regions is not None else (Region(0, size, 0),)
        need = max(r.offset + r.size for r in self.regions)
        if size < need:
            os.close(self._fd)
            raise BadImage(f"raw image {self.path} has {size} bytes; its RAM map needs {need}")

    def describe(self) -> str:
        return f"raw image {self.path}"

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _fill(self, offset: int, out: memoryview) -> None:
        pread_into(self._fd, offset, out, str(self.path))
