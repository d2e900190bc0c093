"""``/proc/PID/pagemap``: for each page of a process mapping, is it resident, swapped, and which host frame.

One 8-byte entry per page (bit 63 present, 62 swapped, 61 file-backed or shared-anonymous, bits
0-54 the frame number, visible to root only). memvirt reads it for a QEMU's RAM mapping to find
which guest pages have backing, which a lazy clone owns, and which host frames DAMON should watch.
"""

from __future__ import annotations

import os

import numpy as np

from memvirt.errors import NotFound, VMError
from memvirt.memory.fileio import pread_into
from memvirt.memory.source import PAGE_SHIFT, GuestMemory

PM_PRESENT = np.uint64(1 << 63)
PM_SWAPPED = np.uint64(1 << 62)
PM_FILE = np.uint64(1 << 61)
PFN_MASK = np.uint64((1 << 55) - 1)


class PageMap:
    """An open ``/proc/PID/pagemap``."""

    def __init__(self, pid: int):
        self.pid = pid
        try:
            self.fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
        except (FileNotFoundError, ProcessLookupError) as e:
            raise NotFound(f"no process {pid}") from e
        except PermissionError as e:
            raise VMError(f"no permission to read /proc/{pid}/pagemap") from e

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> PageMap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def entries(self, vaddr: int, npages: int) -> np.ndarray:
        """The raw entries of ``npages`` pages from host virtual address ``vaddr``."""
        out = np.empty(npages, dtype="<u8")
        pread_into(self.fd, (vaddr >> PAGE_SHIFT) * 8, out.data.cast("B"), f"/proc/{self.pid}/pagemap")
        return out


def pagemap_backed(pid: int, mem: GuestMemory) -> np.ndarray:
    """Per guest frame of ``mem`` (a QEMU's RAM, ``Region.offset`` relative to host address 0 as
    :class:`~memvirt.memory.procmem.ProcMemory` sets it): True where the page has data."""
    out = np.zeros(mem.max_pfn, dtype=bool)
    with PageMap(pid) as pm:
        for r in mem.regions:
            n = r.size >> PAGE_SHIFT
            first = r.gpa >> PAGE_SHIFT
            out[first : first + n] = backed(pm.entries(r.offset, n))
    return out


def backed(entries: np.ndarray) -> np.ndarray:
    """Pages with data somewhere: resident or swapped out."""
    return (entries & (PM_PRESENT | PM_SWAPPED)) != 0


def frames(entries: np.ndarray) -> np.ndarray:
    """Host frame numbers, 0 where a page is not resident (or the reader is not root)."""
    return np.where((entries & PM_PRESENT) != 0, entries & PFN_MASK, np.uint64(0))
