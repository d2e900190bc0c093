"""The guest-physical memory interface every memvirt capability reads through.

A source knows the guest's RAM map (which guest-physical ranges are RAM and where each lives
in its backing store) and fills caller-supplied buffers from that store. Bulk reads return
numpy arrays; page lists are grouped into contiguous runs so that a read costs one system
call per run, never one per page.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Self

import numpy as np

from memvirt.errors import BadImage

PAGE_SIZE = 4096
PAGE_SHIFT = 12
MAX_GPA = 1 << 52
"""x86-64's architectural ceiling on physical addresses (MAXPHYADDR <= 52): no guest RAM lies above it,
so a file claiming otherwise is corrupt, and per-page tables sized by ``max_pfn`` stay finite."""
MAX_REGIONS = 1 << 16
"""More separate RAM ranges than any machine's memory map holds (Linux keeps at most ~3200 e820
entries); a file claiming more is corrupt, and each range costs a Python object and lookup time."""


@dataclass(frozen=True)
class Region:
    """A guest-physical RAM range and where its bytes live in the source's backing store."""

    gpa: int
    size: int
    offset: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


def check_regions(regions: tuple[Region, ...], what: str) -> None:
    """Reject a RAM map a real machine cannot have: too many ranges, or RAM above :data:`MAX_GPA`."""
    if len(regions) > MAX_REGIONS:
        raise BadImage(f"{what}: {len(regions)} separate RAM ranges; a machine has at most {MAX_REGIONS}")
    top = max((r.end for r in regions), default=0)
    if top > MAX_GPA:
        raise BadImage(f"{what}: RAM ends at guest-physical {top:#x}, above the 52-bit physical address space")


class GuestMemory(ABC):
    """Read access to a guest's physical memory.

    Subclasses set ``regions`` and implement :meth:`_fill`, which copies ``len(out)`` bytes
    from backing offset ``offset`` into ``out``.
    """

    kind: str = "memory"
    regions: tuple[Region, ...] = ()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the backing store."""

    @abstractmethod
    def _fill(self, offset: int, out: memoryview) -> None:
        """Copy backing bytes ``[offset, offset + len(out))`` into ``out``."""

    @property
    def vmcoreinfo(self) -> bytes | None:
        """The VMCOREINFO note the dump carries, if any (raw ``KEY=VALUE`` lines)."""
        return None

    @property
    def ram_size(self) -> int:
        """Bytes of guest RAM, holes excluded."""
        return sum(r.size for r in self.regions)

    @property
    def max_pfn(self) -> int:
        """One past the highest guest page frame that is RAM."""
        return max((r.end for r in self.regions), default=0) >> PAGE_SHIFT

    def describe(self) -> str:
        return self.kind

    def region_of(self, gpa: int) -> Region:
        """The RAM region holding ``gpa``; a :class:`BadImage` error if it is not RAM."""
        for r in self.regions:
            if r.gpa <= gpa < r.end:
                return r
        raise BadImage(f"guest-physical address {gpa:#x} is not RAM in this {self.kind}")

    def read(self, gpa: int, size: int) -> np.ndarray:
        """Bytes ``[gpa, gpa + size)`` of guest-physical memory as a uint8 array.

        The range may span regions but not fall into a hole between them.
        """
        out = np.empty(size, dtype=np.uint8)
        self.read_into(gpa, out)
        return out

    def read_into(self, gpa: int, out: np.ndarray) -> None:
        """Fill ``out`` (a contiguous uint8 array) from guest-physical address ``gpa``."""
        view = out.data.cast("B")
        pos = 0
        while pos < len(view):
            r = self.region_of(gpa + pos)
            n = min(len(view) - pos, r.end - (gpa + pos))
            self._fill(r.offset + (gpa + pos - r.gpa), view[pos : pos + n])
            pos += n

    def view(self, gpa: int, size: int) -> np.ndarray | None:
        """A zero-copy, read-only view of ``[gpa, gpa + size)`` if the source can map it, else None.

        Only for memory the guest is known to have populated (kernel structures): on a RAM file
        a mapping's read fault allocates a hole, where ``read`` would not.
        """
        return None

    def read_u64(self, gpa: int) -> int:
        return int(self.read(gpa, 8).view("<u8")[0])

    def read_pages(self, pfns: np.ndarray) -> np.ndarray:
        """The pages with frame numbers ``pfns`` as an ``(n, 4096)`` uint8 array, in that order.

        Runs of consecutive frames are read with one call each.
        """
        pfns = np.asarray(pfns, dtype=np.int64)
        out = np.empty((len(pfns), PAGE_SIZE), dtype=np.uint8)
        if len(pfns) == 0:
            return out
        breaks = np.flatnonzero(np.diff(pfns) != 1) + 1
        starts = np.concatenate(([0], breaks))
        ends = np.concatenate((breaks, [len(pfns)]))
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            self.read_into(int(pfns[s]) << PAGE_SHIFT, out[s:e].reshape(-1))
        return out

    def chunks(self, chunk_bytes: int = 64 << 20) -> Iterator[tuple[int, np.ndarray]]:
        """Walk all RAM in order as ``(gpa, bytes)`` pieces of at most ``chunk_bytes``.

        The yielded buffer is reused between iterations: copy what you keep.
        """
        buf = np.empty(chunk_bytes, dtype=np.uint8)
        for r in self.regions:
            for off in range(0, r.size, chunk_bytes):
                n = min(chunk_bytes, r.size - off)
                self._fill(r.offset + off, buf.data[:n])
                yield r.gpa + off, buf[:n]

    def pfn_ranges(self) -> list[tuple[int, int]]:
        """RAM as ``[(first_pfn, end_pfn), ...]``."""
        return [(r.gpa >> PAGE_SHIFT, r.end >> PAGE_SHIFT) for r in self.regions]

    def ram_pfns(self) -> np.ndarray:
        """Every RAM frame number, in order (int64)."""
        return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in self.pfn_ranges()])
