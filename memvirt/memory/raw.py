"""A raw memory image: file offset equals guest-physical address (holes are sparse)."""

from __future__ import annotations

import os
from pathlib import Path

from memvirt.errors import BadImage
from memvirt.memory.fileio import FdMemory, open_image
from memvirt.memory.source import MAX_GPA, Region, check_regions


class RawMemory(FdMemory):
    kind = "raw image"

    def __init__(self, path: str | os.PathLike[str], regions: tuple[Region, ...] | None = None):
        self.path = Path(path)
        self._fd = open_image(self.path, "raw image")
        try:
            self._check(regions)
        except BaseException:
            self.close()
            raise

    def _check(self, regions: tuple[Region, ...] | None) -> None:
        size = os.fstat(self._fd).st_size
        if size == 0 or size % 4096:
            raise BadImage(f"{self.path} is {size} bytes: a raw image is a whole number of 4 KiB pages")
        if size > MAX_GPA:
            raise BadImage(f"{self.path} is {size} bytes: more than the 52-bit physical address space of a guest")
        self.regions = regions if regions is not None else (Region(0, size, 0),)
        check_regions(self.regions, f"raw image {self.path}")
        need = max(r.offset + r.size for r in self.regions)
        if size < need:
            raise BadImage(f"raw image {self.path} has {size} bytes; its RAM map needs {need}")

    def describe(self) -> str:
        return f"raw image {self.path}"
