"""A running VM's anonymous RAM through ``/proc/PID/mem``.

QEMU maps guest RAM as one anonymous private mapping of exactly the RAM size (``rw-p``);
TCG's translation buffer is the large ``rwxp`` one and is skipped.
"""

from __future__ import annotations

import os

from memvirt.errors import BadImage, NotFound
from memvirt.memory.fileio import pread_into
from memvirt.memory.rammap import pc_ram_map
from memvirt.memory.source import GuestMemory, Region
from memvirt.units import parse_size


def find_ram_mapping(pid: int, ram_size: int) -> int:
    """Host virtual address of the QEMU process's guest-RAM mapping."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.read().splitlines()
    except FileNotFoundError as e:
        raise NotFound(f"no process {pid}") from e
    except PermissionError as e:
        raise BadImage(f"no permission to read /proc/{pid}/maps") from e
    hits = []
    for line in lines:
        fields = line.split()
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        inode = fields[4]
        if hi - lo == ram_size and fields[1].startswith("rw") and inode == "0":
            hits.append(lo)
    if not hits:
        raise BadImage(f"process {pid} has no anonymous mapping of {ram_size} bytes (is it a QEMU guest?)")
    return hits[0]


def find_file_mapping(pid: int, path: str, size: int, private: bool) -> tuple[int, int]:
    """``(start, end)`` host addresses of process ``pid``'s writable mapping of ``size`` bytes of
    file ``path`` (also after the file was unlinked), private (copy-on-write) or shared."""
    real = os.path.realpath(path)
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.read().splitlines()
    except (FileNotFoundError, ProcessLookupError) as e:
        raise NotFound(f"no process {pid}") from e
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or not fields[1].startswith("rw") or (fields[1][3] == "p") != private:
            continue
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if hi - lo == size and fields[5].removesuffix(" (deleted)") in (path, real):
            return lo, hi
    kind = "private" if private else "shared"
    raise BadImage(f"process {pid} has no {kind} mapping of {path} ({size} bytes)")


def guess_ram_size(pid: int) -> int:
    """The guest RAM size of a QEMU process from its command line (``-m``), for ``pid:N`` sources."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except FileNotFoundError as e:
        raise NotFound(f"no process {pid}") from e
    for i, a in enumerate(argv[:-1]):
        if a == b"-m":
            spec = argv[i + 1].decode().split(",")[0].removeprefix("size=")
            return parse_size(spec if spec[-1:].isalpha() else spec + "M")
    raise BadImage(f"process {pid} has no -m option: pass the RAM size")


class ProcMemory(GuestMemory):
    """Reads guest RAM from a live QEMU's address space."""

    kind = "process memory"

    def __init__(self, pid: int, ram_size: int | None = None, regions: tuple[Region, ...] | None = None):
        self.pid = pid
        size = ram_size if ram_size is not None else guess_ram_size(pid)
        base = find_ram_mapping(pid, size)
        regions = regions if regions is not None else pc_ram_map(size)
        self.regions = tuple(Region(r.gpa, r.size, base + r.offset) for r in regions)
        try:
            self._fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        except (FileNotFoundError, ProcessLookupError) as e:
            raise NotFound(f"no process {pid}") from e

    def describe(self) -> str:
        return f"/proc/{self.pid}/mem"

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _fill(self, offset: int, out: memoryview) -> None:
        try:
            pread_into(self._fd, offset, out, f"/proc/{self.pid}/mem")
        except OSError as e:
            raise BadImage(f"reading /proc/{self.pid}/mem failed: {e.strerror} (did the VM exit?)") from e
