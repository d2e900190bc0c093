"""Punching holes in a RAM file, written once, and the journal that tells a write tracker about them.

``fallocate(PUNCH_HOLE | KEEP_SIZE)`` frees the host memory behind a range of a tmpfs file and makes
it read as zeros. The reclaim (:mod:`memvirt.dedup.discard`) punches a running guest's free pages,
the migration receiver punches the target's zero and freed pages.

A hole punch is *not* seen by the dirty tracker (:mod:`memvirt.qemu.dirty`): ``PAGEMAP_SCAN``
reports pages written through QEMU's page tables, and a punch only drops the file's pages (the
kernel zaps the mappings without marking them written). So while a tracker runs on a RAM file it
keeps a journal beside it, ``<ram file>.punched`` (for a libvirt memfd, in memvirt's RAM folder:
:func:`_side`), and every memvirt punch of that file appends its
guest-frame runs there first; each scan of the tracker takes them as written. The journal is used
only while its tracker lives: the tracker holds a shared ``flock`` on ``<ram file>.tracked`` for its
lifetime (the kernel drops it when the tracker dies, however it dies), and a puncher that can take
that lock exclusively knows no tracker is there and writes nothing. Appending and punching happen
under an exclusive ``flock`` of the journal, which the tracker also takes to read it, so a run it
reads was punched completely, and while it holds the journal (the migration's final round, with
the guest paused) no punch can happen behind its back.

A puncher holds the RAM file open for writing, which a tracker's look for other writers
(:func:`memvirt.qemu.dirty.ram_file_writers`) would take for a foreign writer whose writes it cannot
see. So memvirt's punchers register for as long as they hold it: a shared ``flock`` on
``<ram file>.punchers`` (:func:`register_puncher`), which the kernel drops when they die and which
``/proc/locks`` shows with the holder's pid (:func:`registered_punchers`). A registered process
changes the file only through :func:`punch_frames`, which journals. The registry is a guard
against accidents, not against a hostile local user: it is mode 0600 beside the RAM file, so
whoever can register could write the RAM file anyway.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import time

import numpy as np

from memvirt.errors import VMError
from memvirt.paths import ram_dir

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
LOCK_WAIT = 10.0
"""Seconds a puncher waits for a tracker that holds the journal (a migration's final round)."""
MAX_JOURNAL = 64 << 20
"""Bytes of journal read at most per scan; a longer one (a runaway puncher) counts as everything."""

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def punch(fd: int, offsets: np.ndarray, lengths: np.ndarray, what: str) -> None:
    """Punch ``[offsets[i], offsets[i] + lengths[i])`` (bytes) out of the file open as ``fd``."""
    for o, n in zip(offsets.tolist(), lengths.tolist(), strict=True):
        if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, o, n) != 0:
            raise VMError(f"punching a hole in {what} failed: {os.strerror(ctypes.get_errno())}")


def _side(ram_path: str, suffix: str) -> str:
    """The file ``suffix`` that goes with ``ram_path``: beside it, or, for a RAM file known only as
    another process's descriptor (``/proc/PID/fd/N``: a libvirt domain's memfd, where nothing can be
    created), in memvirt's RAM folder under the file's device and inode, which every process that
    opens that descriptor finds alike."""
    if not ram_path.startswith("/proc/"):
        return ram_path + suffix
    st = os.stat(ram_path)
    return str(ram_dir() / f"fd-{st.st_dev:x}-{st.st_ino}{suffix}")


def journal_path(ram_path: str) -> str:
    return _side(ram_path, ".punched")


def _tracked_path(ram_path: str) -> str:
    return _side(ram_path, ".tracked")


def _punchers_path(ram_path: str) -> str:
    return _side(ram_path, ".punchers")


def register_puncher(ram_path: str) -> int:
    """Register this process as a memvirt puncher of ``ram_path`` (module docstring); the returned
    descriptor holds the registration until it is closed."""
    fd = os.open(_punchers_path(ram_path), os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except BaseException:
        os.close(fd)
        raise
    return fd


def registered_punchers(ram_path: str) -> set[int]:
    """Pids holding a puncher registration of ``ram_path`` now (``flock`` entries of its registry
    file in ``/proc/locks``, which names device as hex major:minor and the inode in decimal)."""
    try:
        st = os.stat(_punchers_path(ram_path))
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return set()
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = set()
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  READ  1234 00:1a:5678 0 EOF"; a blocked waiter's line has "->" first
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == key and fields[4].isdigit():
            pids.add(int(fields[4]))
    return pids


def remove_journal(ram_path: str, punchers: bool = True) -> None:
    """Remove what a tracker killed on ``ram_path`` left (with the RAM file itself, ``punchers``:
    the puncher registry too; a tracker ending leaves it to the punchers that hold it)."""
    try:
        paths = (journal_path(ram_path), _tracked_path(ram_path)) + ((_punchers_path(ram_path),) if punchers else ())
    except OSError:  # a descriptor of a QEMU that is gone: its files are named after an inode now unknown
        return
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _lock(fd: int, how: int, what: str) -> None:
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise VMError(f"{what} stayed locked for {LOCK_WAIT:.0f} s (a migration's final round?)") from None
            time.sleep(0.005)


def _tracker_alive(ram_path: str) -> bool:
    try:
        fd = os.open(_tracked_path(ram_path), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def punch_frames(
    fd: int, ram_path: str, starts: np.ndarray, ends: np.ndarray, offsets: np.ndarray, lengths: np.ndarray
) -> None:
    """Punch a RAM file's byte ranges ``offsets``/``lengths``, which are the guest frames
    ``[starts, ends)``, telling a tracker of that file about them first (see the module docstring)."""
    if not _tracker_alive(ram_path):
        punch(fd, offsets, lengths, ram_path)
        return
    jfd = os.open(journal_path(ram_path), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        _lock(jfd, fcntl.LOCK_EX, f"the punch journal of {ram_path}")
        os.write(jfd, np.stack([starts, ends], axis=1).astype("<i8").tobytes())
        punch(fd, offsets, lengths, ram_path)
    finally:
        os.close(jfd)


class PunchJournal:
    """The tracker's side: announces a tracker on ``ram_path`` and reads what was punched since."""

    def __init__(self, ram_path: str):
        self.ram_path = ram_path
        self._held = False
        flags = os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        self.alive = os.open(_tracked_path(ram_path), os.O_RDONLY | flags, 0o600)
        try:
            fcntl.flock(self.alive, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a file left by a killed tracker is free
        except BlockingIOError:
            os.close(self.alive)
            raise VMError(f"another memvirt tracker follows the punches of {ram_path}") from None
        fcntl.flock(self.alive, fcntl.LOCK_SH)
        self.fd = os.open(journal_path(ram_path), os.O_RDWR | flags, 0o600)

    def take(self, hold: bool = False) -> np.ndarray | None:
        """Guest frames punched since the last call (sorted, unique), or None if the journal grew
        beyond :data:`MAX_JOURNAL` (treat everything as written). With ``hold`` the journal stays
        locked until :meth:`close`: nobody punches this file from then on."""
        if not self._held:
            _lock(self.fd, fcntl.LOCK_EX, f"the punch journal of {self.ram_path}")
        try:
            size = os.fstat(self.fd).st_size
            raw = os.pread(self.fd, min(size, MAX_JOURNAL), 0) if size else b""
            os.ftruncate(self.fd, 0)
        finally:
            if hold:
                self._held = True
            elif not self._held:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
        if size > MAX_JOURNAL:
            return None
        runs = np.frombuffer(raw[: len(raw) // 16 * 16], dtype="<i8").reshape(-1, 2)
        if not len(runs):
            return np.empty(0, dtype=np.int64)
        lengths = np.maximum(runs[:, 1] - runs[:, 0], 0)
        before = np.cumsum(lengths) - lengths
        frames = np.repeat(runs[:, 0] - before, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)
        return np.unique(frames)

    def close(self) -> None:
        """Stop announcing: remove the files, then let go of the locks."""
        remove_journal(self.ram_path, punchers=False)
        for name in ("fd", "alive"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                os.close(fd)
