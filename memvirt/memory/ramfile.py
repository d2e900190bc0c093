"""A running VM's RAM as a shared file (``memory-backend-file,share=on``)."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

from memvirt.errors import BadImage, NotFound
from memvirt.memory.fileio import pread_into
from memvirt.memory.rammap import pc_ram_map
from memvirt.memory.source import PAGE_SHIFT, GuestMemory, Region


class RamFileMemory(GuestMemory):
    """Reads the RAM backend file with ``preadv``, so the file's holes are never allocated."""

    kind = "RAM file"

    def __init__(self, path: str | os.PathLike[str], regions: tuple[Region, ...] | None = None):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise NotFound(f"RAM file {self.path} does not exist") from None
        except PermissionError:
            raise BadImage(f"no permission to read RAM file {self.path}") from None
        self._map: mmap.mmap | None = None
        size = os.fstat(self._fd).st_size
        self.regions = regions if regions is not None else pc_ram_map(size)
        need = max(r.offset + r.size for r in self.regions)
        if size < need:
            os.close(self._fd)
            raise BadImage(f"RAM file {self.path} has {size} bytes; the RAM map needs {need}")

    def describe(self) -> str:
        return f"RAM file {self.path}"

    def view(self, gpa: int, size: int) -> np.ndarray | None:
        r = self.region_of(gpa)
        if gpa + size > r.end:
            return None
        if self._map is None:
            self._map = mmap.mmap(self._fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
        return np.frombuffer(self._map, dtype=np.uint8, count=size, offset=r.offset + gpa - r.gpa)

    def close(self) -> None:
        self._map = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _fill(self, offset: int, out: memoryview) -> None:
        pread_into(self._fd, offset, out, str(self.path))

    def populated_pfns(self) -> np.ndarray:
        """Boolean array over guest frames: True where the file has data (not a hole).

        A frame the guest never touched is a hole in the file; found with SEEK_DATA/SEEK_HOLE
        per extent, not per page.
        """
        present = np.zeros(self.max_pfn, dtype=bool)
        for r in self.regions:
            pos, end = r.offset, r.offset + r.size
            while pos < end:
                try:
                    data = os.lseek(self._fd, pos, os.SEEK_DATA)
                except OSError:
                    break
                if data >= end:
                    break
                hole = min(os.lseek(self._fd, data, os.SEEK_HOLE), end)
                first = (r.gpa + data - r.offset) >> PAGE_SHIFT
                last = (r.gpa + hole - r.offset + 4095) >> PAGE_SHIFT
                present[first:last] = True
                pos = hole
        return present
