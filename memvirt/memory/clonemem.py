"""A lazy clone's RAM: its template's RAM file overlaid with the pages the clone has written.

A lazy clone's QEMU maps the template's RAM file privately. A page the clone never wrote is still
the file's page; a page it wrote is an anonymous copy inside its process. ``/proc/PID/pagemap``
tells them apart (present or swapped, and not file-backed, means the clone's own copy), so reads
take those pages from ``/proc/PID/mem`` and everything else from the file. Reading the whole
mapping through ``/proc/PID/mem`` instead would fault every untouched page in, and on tmpfs a
read fault fills a hole of the template's file: a reader must not allocate memory.
"""

from __future__ import annotations

import os

import numpy as np

from memvirt.errors import BadImage, NotFound
from memvirt.memory.fileio import pread_into
from memvirt.memory.pagemap import PM_FILE, PM_PRESENT, PM_SWAPPED
from memvirt.memory.procmem import find_file_mapping
from memvirt.memory.ramfile import RamFileMemory
from memvirt.memory.rammap import pc_ram_map
from memvirt.memory.source import PAGE_SHIFT, PAGE_SIZE, GuestMemory, Region


def find_cow_mapping(pid: int, backing: str, ram_size: int) -> tuple[int, int]:
    """``(start, end)`` host addresses of the clone's private mapping of ``backing``."""
    try:
        return find_file_mapping(pid, backing, ram_size, private=True)
    except BadImage as e:
        raise BadImage(
            f"process {pid} has no private mapping of {backing} ({ram_size} bytes): is it a lazy clone?"
        ) from e


def _open_mapped_file(pid: int, lo: int, hi: int, backing: str, regions: tuple[Region, ...]) -> RamFileMemory:
    """The mapped file itself (``map_files`` also opens it after a forced template stop unlinked it)."""
    for path in (f"/proc/{pid}/map_files/{lo:x}-{hi:x}", backing):
        try:
            return RamFileMemory(path, regions)
        except (OSError, NotFound, BadImage):
            continue
    raise NotFound(f"cannot open {backing}, the RAM file lazy clone process {pid} maps")


class CloneMemory(GuestMemory):
    """Guest-physical memory of a lazy clone, read without faulting in a single page."""

    kind = "clone memory"

    def __init__(self, pid: int, backing: str, ram_size: int, regions: tuple[Region, ...] | None = None):
        self.pid = pid
        self.base, end = find_cow_mapping(pid, backing, ram_size)
        self.regions = regions if regions is not None else pc_ram_map(ram_size)
        self._file = _open_mapped_file(pid, self.base, end, backing, self.regions)
        self._mem = self._pagemap = -1
        try:
            self._mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
            self._pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
        except (FileNotFoundError, ProcessLookupError) as e:
            self.close()
            raise NotFound(f"no process {pid}") from e
        except PermissionError as e:
            self.close()
            raise BadImage(f"no permission to read /proc/{pid}/mem") from e

    def describe(self) -> str:
        return f"lazy clone /proc/{self.pid}/mem over {self._file.path}"

    def close(self) -> None:
        self._file.close()
        for fd in (self._mem, self._pagemap):
            if fd >= 0:
                os.close(fd)
        self._mem = self._pagemap = -1

    def private_mask(self, offset: int, npages: int) -> np.ndarray:
        """For ``npages`` pages from backing ``offset``: True where the clone holds its own copy."""
        entries = np.empty(npages, dtype=np.uint64)
        pread_into(
            self._pagemap,
            ((self.base + offset) >> PAGE_SHIFT) * 8,
            entries.data.cast("B"),
            f"/proc/{self.pid}/pagemap",
        )
        return ((entries & (PM_PRESENT | PM_SWAPPED)) != 0) & ((entries & PM_FILE) == 0)

    def _fill(self, offset: int, out: memoryview) -> None:
        self._file._fill(offset, out)
        first = offset >> PAGE_SHIFT
        last = (offset + len(out) + PAGE_SIZE - 1) >> PAGE_SHIFT
        mask = self.private_mask(first << PAGE_SHIFT, last - first).astype(np.int8)
        edges = np.flatnonzero(np.diff(np.concatenate(([0], mask, [0]))))
        for a, b in zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True):
            lo = max((first + a) << PAGE_SHIFT, offset)
            hi = min((first + b) << PAGE_SHIFT, offset + len(out))
            try:
                pread_into(self._mem, self.base + lo, out[lo - offset : hi - offset], f"/proc/{self.pid}/mem")
            except OSError as e:
                raise BadImage(f"reading /proc/{self.pid}/mem failed: {e.strerror} (did the clone exit?)") from e

    def populated_pfns(self) -> np.ndarray:
        """Frames with data: the template file's non-holes plus the clone's own pages."""
        present = self._file.populated_pfns()
        for r in self.regions:
            first = r.gpa >> PAGE_SHIFT
            present[first : first + (r.size >> PAGE_SHIFT)] |= self.private_mask(r.offset, r.size >> PAGE_SHIFT)
        return present


def mapping_usage(pid: int, backing: str, ram_size: int) -> dict[str, int]:
    """Bytes of the clone's RAM mapping from ``/proc/PID/smaps``: ``rss``, ``private`` (its own
    copies), ``shared`` (template pages it maps), plus the whole process's private memory."""
    lo, _hi = find_cow_mapping(pid, backing, ram_size)
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps") as f:
        inside = False
        for line in f:
            if "-" in line.split(" ", 1)[0] and not line.split(" ", 1)[0].endswith(":"):
                inside = int(line.split("-", 1)[0], 16) == lo
            elif inside and line.rstrip().endswith("kB"):
                key, value = line.split(":", 1)
                fields[key] = int(value.split()[0]) << 10
    rollup = process_private(pid)
    return {
        "rss": fields.get("Rss", 0),
        "private": fields.get("Private_Dirty", 0) + fields.get("Private_Clean", 0) + fields.get("Swap", 0),
        "shared": fields.get("Shared_Dirty", 0) + fields.get("Shared_Clean", 0),
        "process_private": rollup,
    }


def process_private(pid: int) -> int:
    """Private bytes of a whole process (``Private_*`` in ``/proc/PID/smaps_rollup``)."""
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:", "Swap:")):
                total += int(line.split()[1]) << 10
    return total
