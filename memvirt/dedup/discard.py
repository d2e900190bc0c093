"""Giving the host memory behind guest frames back, and measuring what the host holds for a guest.

Shared-file RAM: ``fallocate(PUNCH_HOLE | KEEP_SIZE)`` over the file ranges, one call per run
(:mod:`memvirt.memory.holes`, which also tells a running dirty tracker).
Anonymous RAM: ``MADV_DONTNEED`` run inside QEMU (:mod:`memvirt.qemu.remote`), 1024 ranges per
call. Measured on this host (Linux 6.18, 512 MiB guest, 320 MiB of dirty free pages): holes
0.7 µs per 4 KiB page; DONTNEED 1.4 ms in all (QEMU's RAM is in transparent huge pages). The
alternatives for anonymous RAM were worse: ``process_madvise(MADV_DONTNEED)`` from outside is
refused (EINVAL), ``MADV_PAGEOUT`` frees nothing without swap, and zeroing the pages through
``/proc/PID/mem`` for KSM's ``use_zero_pages`` costs a write of every page during the pause and
then waits for two full KSM passes. Either way the guest reads zeros there afterwards.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np

from memvirt.errors import UsageError, VMError
from memvirt.memory.holes import punch_frames, register_puncher
from memvirt.memory.pagemap import pagemap_backed
from memvirt.memory.source import PAGE_SHIFT, GuestMemory


def backing_ranges(mem: GuestMemory, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Frame runs ``[starts, ends)`` as ``(offsets, lengths)`` in the source's backing store (file
    offsets of a RAM file, host addresses of QEMU's RAM mapping), split at region edges."""
    offs, lens = [], []
    for r in mem.regions:
        f0, f1 = r.gpa >> PAGE_SHIFT, r.end >> PAGE_SHIFT
        s, e = np.maximum(starts, f0), np.minimum(ends, f1)
        keep = s < e
        offs.append(r.offset + ((s[keep] - f0) << PAGE_SHIFT))
        lens.append((e[keep] - s[keep]) << PAGE_SHIFT)
    return np.concatenate(offs).astype(np.int64), np.concatenate(lens).astype(np.int64)


class Discarder(ABC):
    """Drops the host memory behind guest frames of one VM."""

    method: str

    def __init__(self, mem: GuestMemory):
        self.mem = mem

    @abstractmethod
    def populated(self) -> np.ndarray:
        """Boolean per guest frame: the host holds memory for it."""

    def close(self) -> None:
        """Release what the discarder holds open (nothing by default)."""

    def session(self) -> AbstractContextManager[object]:
        """Whatever must be set up around a series of :meth:`discard` calls during one pause."""
        return nullcontext()

    @abstractmethod
    def discard(self, starts: np.ndarray, ends: np.ndarray) -> None:
        """Drop frames ``[starts, ends)``; the guest reads zeros there afterwards."""

    @abstractmethod
    def resident(self) -> int:
        """Bytes of host memory the guest's RAM holds now (anonymous: its proportional share)."""


class FileHoles(Discarder):
    """Shared-file RAM: punch holes in the file."""

    method = "punch holes in the RAM file"

    def __init__(self, mem: GuestMemory, path: str):
        super().__init__(mem)
        self.path = path
        # Registered before it opens the file for writing: a migration's tracker would otherwise take
        # this process for a foreign writer and fail the migration (memory/holes.py).
        self.registration = register_puncher(path)
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            os.close(self.registration)
            raise UsageError(f"cannot open RAM file {path} for writing: {e.strerror}") from e

    def close(self) -> None:
        os.close(self.fd)
        os.close(self.registration)

    def populated(self) -> np.ndarray:
        # only a RAM file's reader (RamFileMemory, CloneMemory) is handed to FileHoles
        return self.mem.populated_pfns()  # type: ignore[attr-defined]

    def discard(self, starts: np.ndarray, ends: np.ndarray) -> None:
        offs, lens = backing_ranges(self.mem, starts, ends)
        punch_frames(self.fd, self.path, starts, ends, offs, lens)

    def resident(self) -> int:
        return os.fstat(self.fd).st_blocks * 512


class AnonDontneed(Discarder):
    """Anonymous RAM: ``MADV_DONTNEED`` inside the QEMU process."""

    method = "MADV_DONTNEED inside QEMU"

    def __init__(self, mem: GuestMemory, pid: int):
        super().__init__(mem)
        self.pid = pid
        self._advise = None

    def close(self) -> None:
        pass

    def populated(self) -> np.ndarray:
        return pagemap_backed(self.pid, self.mem)

    def session(self) -> AbstractContextManager[object]:
        from memvirt.qemu.remote import remote_madvise

        return _Bound(self, remote_madvise(self.pid))

    def discard(self, starts: np.ndarray, ends: np.ndarray) -> None:
        if self._advise is None:
            raise VMError("AnonDontneed.discard called outside its session")
        self._advise(*backing_ranges(self.mem, starts, ends))

    def resident(self) -> int:
        return ram_mapping_usage(self.pid, self.mem.regions[0].offset, self.mem.ram_size)["Pss"]


class _Bound(AbstractContextManager):
    """Enter ``cm`` and hand what it yields to the discarder for the duration."""

    def __init__(self, owner: AnonDontneed, cm: AbstractContextManager):
        self.owner, self.cm = owner, cm

    def __enter__(self) -> object:
        self.owner._advise = self.cm.__enter__()
        return self.owner._advise

    def __exit__(self, *exc: Any) -> bool | None:
        self.owner._advise = None
        return self.cm.__exit__(*exc)


def ram_mapping_usage(pid: int, start: int, size: int | None = None) -> dict[str, int]:
    """``Rss``, ``Pss`` and ``Anonymous`` (bytes) of the mapping of QEMU process ``pid`` at ``start``
    (with ``size``: summed over every VMA in ``[start, start + size)``, as ``dedup run`` splits the
    RAM mapping while it marks parts of it mergeable).

    ``Pss`` splits a KSM page among the mappings that share it, and pages KSM replaced with the
    zero page are in neither, so summing ``Pss`` over guests gives the memory they really use."""
    end = start + (size or 1)
    out = {"Rss": 0, "Pss": 0, "Anonymous": 0}
    found = inside = False
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split(maxsplit=1)[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    inside = lo == start if size is None else start <= lo < end
                    found |= lo == start
                    if lo >= end:
                        break
                    continue
                if inside:
                    name, _, rest = line.partition(":")
                    if name in out:
                        out[name] += int(rest.split()[0]) * 1024
    except FileNotFoundError as e:
        raise VMError(f"QEMU process {pid} is gone") from e
    if not found:
        raise VMError(f"QEMU process {pid} has no mapping at {start:#x}")
    return out


def discarder_for(vm, mem: GuestMemory) -> Discarder:
    """The discard method for a VM's kind of RAM."""
    if vm.config.ram == "shared":
        return FileHoles(mem, vm.config.ram_path)
    if vm.config.ram == "anonymous":
        return AnonDontneed(mem, vm.config.pid)
    raise UsageError(f"VM {vm.name!r} has {vm.config.ram!r} RAM: reclaim handles shared and anonymous RAM")


def host_usage(vm) -> int:
    """Host memory a VM's RAM holds now: its RAM file's blocks, or the proportional share (Pss)
    of QEMU's RAM mapping (KSM-shared pages split among sharers, zero-page mappings free)."""
    if vm.config.ram == "shared":
        try:
            return os.stat(vm.config.ram_path).st_blocks * 512
        except FileNotFoundError as e:
            raise VMError(f"VM {vm.name!r} has no RAM file any more") from e
    from memvirt.memory.procmem import find_ram_mapping

    return ram_mapping_usage(vm.config.pid, find_ram_mapping(vm.config.pid, vm.config.memory), vm.config.memory)["Pss"]
