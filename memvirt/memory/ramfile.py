"""A running VM's RAM as a shared file (``memory-backend-file,share=on``)."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

from memvirt.errors import BadImage, NotFound
from memvirt.memory.fileio import FdMemory, pread_into
from memvirt.memory.rammap import pc_ram_map
from memvirt.memory.source import PAGE_SHIFT, Region


class RamFileMemory(FdMemory):
    """Reads the RAM backend file with ``preadv``, so the file's holes are never allocated."""

    kind = "RAM file"

    def __init__(self, path: str | os.PathLike[str], regions: tuple[Region, ...] | None = None):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError as e:
            raise NotFound(f"RAM file {self.path} does not exist") from e
        except PermissionError as e:
            raise BadImage(f"no permission to read RAM file {self.path}") from e
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
        super().close()

    def _fill(self, offset: int, out: memoryview) -> None:
        pread_into(self._fd, offset, out, str(self.path))

    def populated_pfns(self, grown_from: np.ndarray | None = None) -> np.ndarray:
        """Boolean array over guest frames: True where the file has data (not a hole).

        A frame the guest never touched is a hole in the file; found with SEEK_DATA/SEEK_HOLE
        per extent, not per page (a swapped-out page counts as data). With ``grown_from`` (an
        earlier answer) only its holes are probed: a running guest only fills holes, so a
        repeated question costs what the holes cost, not the whole file.
        """
        present = np.zeros(self.max_pfn, dtype=bool) if grown_from is None else grown_from.copy()
        for r in self.regions:
            p0 = r.gpa >> PAGE_SHIFT
            if grown_from is None:
                spans = [(r.offset, r.offset + r.size)]
            else:
                holes = ~grown_from[p0 : p0 + (r.size >> PAGE_SHIFT)]
                edges = np.flatnonzero(np.diff(np.concatenate(([False], holes, [False])).astype(np.int8)))
                spans = [
                    (r.offset + (a << PAGE_SHIFT), r.offset + (b << PAGE_SHIFT))
                    for a, b in edges.reshape(-1, 2).tolist()
                ]
            for pos, end in spans:
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
