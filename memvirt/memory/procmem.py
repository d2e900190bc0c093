"""A running VM's anonymous RAM through ``/proc/PID/mem``.

QEMU maps guest RAM as one anonymous private mapping of exactly the RAM size (``rw-p``);
TCG's translation buffer is the large ``rwxp`` one and is skipped. Where that block lies in the
guest's physical address space is QEMU's machine type's rule (:mod:`memvirt.memory.rammap`),
applied to the machine and RAM size on QEMU's own command line.
"""

from __future__ import annotations

import os
import time

from memvirt.errors import BadImage, NotFound
from memvirt.memory.fileio import FdMemory, pread_into
from memvirt.memory.rammap import RamLayout, machine_family, ram_map
from memvirt.memory.source import Region
from memvirt.units import parse_size


def find_ram_mapping(pid: int, ram_size: int) -> int:
    """Host virtual address of the QEMU process's guest-RAM mapping."""
    for _ in range(MAPS_TRIES - 1):
        try:
            return _find_ram_mapping(pid, ram_size)
        except BadImage:
            # /proc/PID/maps is read a page at a time: while ``dedup run`` splits or joins the RAM's
            # VMAs one read can see lines of two states, with part of the RAM missing
            time.sleep(0.01)
    return _find_ram_mapping(pid, ram_size)


MAPS_TRIES = 5


def _find_ram_mapping(pid: int, ram_size: int) -> int:
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.read().splitlines()
    except FileNotFoundError as e:
        raise NotFound(f"no process {pid}") from e
    except PermissionError as e:
        raise BadImage(f"no permission to read /proc/{pid}/maps") from e
    hits, runs = [], []
    run: list[tuple[int, int]] = []
    for line in lines:
        fields = line.split()
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        anon = fields[1].startswith("rw") and fields[4] == "0" and len(fields) == 5
        if hi - lo == ram_size and fields[1].startswith("rw") and fields[4] == "0":
            hits.append(lo)
        if anon and run and run[-1][1] == lo:
            run.append((lo, hi))
        else:
            runs.append(run)
            run = [(lo, hi)] if anon else []
    runs.append(run)
    if hits:
        return hits[0]
    # ``dedup run`` marks parts of the RAM mergeable and others not (madvise splits the mapping
    # into several VMAs until it puts the whole back): a run of adjacent anonymous VMAs whose
    # sizes from one VMA on add up to the RAM size is the RAM then.
    for run in runs:
        ends = {hi for _, hi in run}
        for lo, _ in run:
            if lo + ram_size in ends:
                return lo
    raise BadImage(f"process {pid} has no anonymous mapping of {ram_size} bytes (is it a QEMU guest?)")


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


def _argv(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except FileNotFoundError as e:
        raise NotFound(f"no process {pid}") from e


def guess_ram_size(pid: int) -> int:
    """The guest RAM size of a QEMU process from its command line (``-m``), for ``pid:N`` sources."""
    argv = _argv(pid)
    for i, a in enumerate(argv[:-1]):
        if a == b"-m":
            spec = argv[i + 1].decode().split(",")[0].removeprefix("size=")
            return parse_size(spec if spec[-1:].isalpha() else spec + "M")
    raise BadImage(f"process {pid} has no -m option: pass the RAM size")


def qemu_machine(pid: int) -> tuple[str, int | None]:
    """``(machine type, max-ram-below-4g or None)`` from QEMU's ``-machine``/``-M`` options.

    Without a type QEMU's x86 default is ``pc`` (i440fx); options may be split over several
    ``-machine`` arguments, the last one given wins as in QEMU's option parsing.
    """
    machine, below = "pc", None
    argv = _argv(pid)
    for i, a in enumerate(argv[:-1]):
        if a not in (b"-machine", b"-M", b"--machine"):
            continue
        for n, part in enumerate(argv[i + 1].decode(errors="replace").split(",")):
            key, eq, value = part.partition("=")
            if not eq and n == 0:
                machine = key
            elif key == "type":
                machine = value
            elif key == "max-ram-below-4g":
                below = parse_size(value)
    return machine, below


def qemu_ram_layout(pid: int, ram_size: int) -> RamLayout:
    """The RAM map QEMU ``pid`` built, from its machine type and RAM size."""
    machine, below = qemu_machine(pid)
    family = machine_family(machine)
    return RamLayout(f"{family} from QEMU's command line", ram_map(family, ram_size, below))


class ProcMemory(FdMemory):
    """Reads guest RAM from a live QEMU's address space."""

    kind = "process memory"

    def __init__(self, pid: int, ram_size: int | None = None, regions: tuple[Region, ...] | None = None):
        self.pid = pid
        size = ram_size if ram_size is not None else guess_ram_size(pid)
        base = find_ram_mapping(pid, size)
        if regions is None:
            found = qemu_ram_layout(pid, size)
            regions, self.layout = found.regions, found.describe()
        self.regions = tuple(Region(r.gpa, r.size, base + r.offset) for r in regions)
        try:
            self._fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        except (FileNotFoundError, ProcessLookupError) as e:
            raise NotFound(f"no process {pid}") from e

    def describe(self) -> str:
        return f"/proc/{self.pid}/mem"

    def _fill(self, offset: int, out: memoryview) -> None:
        try:
            pread_into(self._fd, offset, out, f"/proc/{self.pid}/mem")
        except OSError as e:
            raise BadImage(f"reading /proc/{self.pid}/mem failed: {e.strerror} (did the VM exit?)") from e
