"""Which guest pages a running VM writes, seen from the host: no KVM dirty log, no soft-dirty.

The mechanism (Linux 6.7+, checked on 6.18; see docs/dirty-tracking.md):

1. A userfaultfd belongs to the memory of the process that creates it, so memvirt has QEMU create
   one: a borrowed QEMU thread (:mod:`memvirt.qemu.remote`) runs ``userfaultfd()``, memvirt copies
   the descriptor out with ``pidfd_getfd`` and has QEMU close its copy at once, *before* anything
   is registered. From then on the only descriptor is memvirt's, and the kernel closes it when
   memvirt exits however it exits (SIGKILL too), which unregisters the range and lifts the
   protection: QEMU runs on and never notices. A memvirt killed inside the borrow leaves at most
   an unused, never-initialised userfaultfd in QEMU, which the next tracker closes.
2. From memvirt: ``UFFDIO_API`` with asynchronous write-protect (``WP_ASYNC``, ``WP_UNPOPULATED``,
   ``WP_HUGETLBFS_SHMEM``) and ``UFFDIO_REGISTER`` (``MODE_WP``) over QEMU's RAM mapping. A guest
   write to a protected page is resolved inside the kernel (no message, no handler thread; about
   +0.5-0.8 us once per page per interval) and leaves the page unprotected: "written".
3. Each :meth:`WriteTracker.scan` is one ``PAGEMAP_SCAN`` ioctl on ``/proc/PID/pagemap``
   (``PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC``, category ``PAGE_IS_WRITTEN``): the pages
   written since the previous scan, protected again in the same call (0.2 ms per idle GiB).

Not seen, by the kernel's design: writes to a *shared RAM file* by any other process (its own
mapping, ``write(2)``, a vhost-user backend), and hole punches (``fallocate(PUNCH_HOLE)``,
``MADV_REMOVE``, i.e. ``memvirt reclaim``), which turn a page to zeros silently; the protection
lives in QEMU's page tables only. So a tracker refuses a RAM file another process can write to
and looks again every :data:`WRITERS_EVERY` seconds, and memvirt's own punches of a tracked RAM
file are written to a journal the tracker reads at each scan (:mod:`memvirt.memory.holes`).
``MADV_DONTNEED`` on anonymous RAM *is* reported (as written).

Where the kernel lacks these features, :class:`FingerprintTracker` hashes every page per scan
(~0.15 s per GiB) and reports the pages whose contents changed: a subset of the written ones (a
page rewritten with the same bytes does not count).
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import time
from typing import Protocol

import numpy as np

from memvirt.errors import MemvirtError, NotFound, Unsupported, UsageError, VMError
from memvirt.memory.holes import PunchJournal, registered_punchers
from memvirt.memory.pagehash import hash_pages
from memvirt.memory.source import PAGE_SHIFT, PAGE_SIZE, Region
from memvirt.qemu.vm import VM, vm_memory

SYS_USERFAULTFD = 323
SYS_PIDFD_GETFD = 438
SYS_CLOSE = 3
UFFD_API = 0xAA
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
FEATURES = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1
PAGE_IS_WRITTEN = 1 << 1
UFFD_HOLD_FLAGS = {"uw": "write-protect", "um": "missing-page", "ui": "minor-fault"}
"""smaps VmFlags of a range registered with some userfaultfd."""
VEC_LEN = 1 << 16
"""Regions per ``PAGEMAP_SCAN`` call (1.5 MiB of buffer); a longer answer takes more calls."""
WRITERS_EVERY = 5.0
"""Seconds between looks for other processes that can write a shared RAM file."""
METHODS = ("auto", "uffd-wp", "fingerprint")
MUTEX_WAIT = 1.0


def _ioc(direction: int, kind: int, nr: int, size: int) -> int:
    """Linux's ``_IOC`` (x86-64): direction 3 is read+write."""
    return (direction << 30) | (size << 16) | (kind << 8) | nr


class _UffdioApi(ctypes.Structure):
    """``struct uffdio_api``."""

    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _UffdioRegister(ctypes.Structure):
    """``struct uffdio_register`` (its ``struct uffdio_range`` inlined)."""

    _fields_ = [
        ("start", ctypes.c_uint64),
        ("len", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("ioctls", ctypes.c_uint64),
    ]


class _UffdioWriteprotect(ctypes.Structure):
    """``struct uffdio_writeprotect`` (its ``struct uffdio_range`` inlined)."""

    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64), ("mode", ctypes.c_uint64)]


class _PmScanArg(ctypes.Structure):
    """``struct pm_scan_arg`` (linux/fs.h)."""

    _fields_ = [
        (n, ctypes.c_uint64)
        for n in (
            "size",
            "flags",
            "start",
            "end",
            "walk_end",
            "vec",
            "vec_len",
            "max_pages",
            "category_inverted",
            "category_mask",
            "category_anyof_mask",
            "return_mask",
        )
    ]


UFFDIO_API = _ioc(3, 0xAA, 0x3F, ctypes.sizeof(_UffdioApi))
UFFDIO_REGISTER = _ioc(3, 0xAA, 0x00, ctypes.sizeof(_UffdioRegister))
UFFDIO_WRITEPROTECT = _ioc(3, 0xAA, 0x06, ctypes.sizeof(_UffdioWriteprotect))
PAGEMAP_SCAN = _ioc(3, ord("f"), 16, ctypes.sizeof(_PmScanArg))

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int
_libc.syscall.restype = ctypes.c_long


def _ioctl(fd: int, request: int, arg: ctypes.Structure | None) -> int:
    ret = _libc.ioctl(fd, request, None if arg is None else ctypes.byref(arg))
    return ret if ret >= 0 else -ctypes.get_errno()


def pagemap_scan_supported() -> bool:
    """Whether this kernel has ``PAGEMAP_SCAN`` (tried on an empty range of this process)."""
    buf = np.zeros(2 * PAGE_SIZE, dtype=np.uint8)
    addr = (buf.ctypes.data + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    vec = np.zeros((1, 3), dtype=np.uint64)
    arg = _PmScanArg(
        size=ctypes.sizeof(_PmScanArg),
        start=addr,
        end=addr,
        vec=vec.ctypes.data,
        vec_len=1,
        category_mask=PAGE_IS_WRITTEN,
        return_mask=PAGE_IS_WRITTEN,
    )
    try:
        fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return _ioctl(fd, PAGEMAP_SCAN, arg) != -errno.ENOTTY
    finally:
        os.close(fd)


def uffd_holds(pid: int, start: int, end: int) -> list[str]:
    """The userfaultfd registrations (``write-protect``...) any mapping of ``pid`` overlapping
    ``[start, end)`` carries, from its smaps ``VmFlags``."""
    found: set[str] = set()
    inside = False
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split(" ", 1)[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    inside = lo < end and hi > start
                elif inside and head == "VmFlags:":
                    found.update(UFFD_HOLD_FLAGS[f] for f in line.split()[1:] if f in UFFD_HOLD_FLAGS)
    except (FileNotFoundError, ProcessLookupError) as e:
        raise NotFound(f"no process {pid}") from e
    except OSError as e:
        raise VMError(f"reading the memory map of process {pid} failed: {e.strerror}") from e
    return sorted(found)


def stray_uffds(pid: int) -> list[int]:
    """Descriptors in ``pid`` that are userfaultfds nobody initialised (``UFFDIO_API`` never ran,
    so nothing can be registered through them): what a tracker killed inside its borrow leaves."""
    from memvirt.qemu.remote import anon_fds

    def uninitialised(info: list[str]) -> bool:
        api = [line.split()[1] for line in info if line.startswith("API:") and len(line.split()) > 1]
        return bool(api) and api[0].split(":")[1:2] == ["0"]

    return [fd for fd, info in anon_fds(pid, "userfaultfd") if uninitialised(info)]


def _expand(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Page numbers covered by ``[starts[i], ends[i])`` page ranges, in order (no Python loop)."""
    lengths = ends - starts
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    before = np.cumsum(lengths) - lengths
    return np.repeat(starts - before, lengths) + np.arange(total, dtype=np.int64)


class WriteTracker:
    """The pages of ``[start, start + length)`` in process ``pid`` written between scans.

    :meth:`start` borrows the process once (a QEMU thread stopped ~0.3 ms) and protects the
    whole range; each :meth:`scan` returns page indices relative to ``start`` (sorted int64);
    :meth:`close` (or memvirt's death) ends tracking. Raises :class:`Unsupported` where the kernel
    or QEMU's privileges lack a feature, :class:`VMError` when another userfaultfd already holds
    the range.
    """

    method = "uffd-wp"

    def __init__(self, pid: int, start: int, length: int):
        if start % PAGE_SIZE or length % PAGE_SIZE or length <= 0:
            raise UsageError(f"range {start:#x}+{length:#x} is not whole pages")
        self.pid, self.start_addr, self.end = pid, start, start + length
        self.uffd = -1
        self.pagemap = -1
        self.strays_closed = 0
        self._vec = np.zeros((VEC_LEN, 3), dtype=np.uint64)

    def start(self) -> None:
        if not pagemap_scan_supported():
            raise Unsupported("this kernel has no PAGEMAP_SCAN ioctl (Linux 6.7+)")
        try:
            self.pagemap = os.open(f"/proc/{self.pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError) as e:
            raise NotFound(f"no process {self.pid}") from e
        except PermissionError as e:
            raise VMError(f"no permission to read /proc/{self.pid}/pagemap (run as root)") from e
        try:
            self.uffd = self._take_uffd()
            self._register()
            self._protect_all()
            self._scan(None)  # the baseline: nothing reported before this
        except BaseException:
            self.close()
            raise

    def _take_uffd(self) -> int:
        """A userfaultfd bound to the target's memory, with the target's copy closed again."""
        from memvirt.qemu.remote import RemoteProcess

        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError as e:
            raise NotFound(f"no process {self.pid}") from e
        mutex = _creation_mutex(self.pid)
        mine = -1
        try:
            with RemoteProcess(self.pid) as rp:
                if mutex is not None:  # no other tracker is between its userfaultfd() and close()
                    for fd in stray_uffds(self.pid):
                        if rp.syscall(SYS_CLOSE, fd) == 0:
                            self.strays_closed += 1
                theirs = rp.syscall(SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
                if theirs < 0:
                    raise Unsupported(
                        f"QEMU (process {self.pid}) may not create a userfaultfd: "
                        f"{os.strerror(-theirs)} (vm.unprivileged_userfaultfd is "
                        f"{_read_sysctl('vm/unprivileged_userfaultfd')})"
                    )
                mine = _libc.syscall(SYS_PIDFD_GETFD, pidfd, theirs, 0)
                err = ctypes.get_errno()
                # Close QEMU's copy only if it is still the descriptor made above, never one of QEMU's own.
                if mine >= 0 and _same_file(self.pid, theirs, mine) or mine < 0 and theirs in stray_uffds(self.pid):
                    rp.syscall(SYS_CLOSE, theirs)
                elif mine >= 0:
                    raise VMError(f"descriptor {theirs} in QEMU changed while memvirt took it (another tracker?)")
        except BaseException:
            if mine >= 0:
                os.close(mine)
            raise
        finally:
            os.close(pidfd)
            if mutex is not None:
                mutex.close()
        if mine < 0:
            raise VMError(f"copying QEMU's userfaultfd out failed: {os.strerror(err)}")
        return int(mine)

    def _register(self) -> None:
        api = _UffdioApi(api=UFFD_API, features=FEATURES)
        ret = _ioctl(self.uffd, UFFDIO_API, api)
        if ret < 0 or api.features & FEATURES != FEATURES:
            why = os.strerror(-ret) if ret < 0 else f"features {api.features:#x}"
            raise Unsupported(
                f"this kernel has no asynchronous userfaultfd write-protect (WP_ASYNC, Linux 6.7+): {why}"
            )
        reg = _UffdioRegister(start=self.start_addr, len=self.end - self.start_addr, mode=UFFDIO_REGISTER_MODE_WP)
        ret = _ioctl(self.uffd, UFFDIO_REGISTER, reg)
        if ret == -errno.EBUSY:  # the kernel's word; smaps (a page-table walk, 75 ms/GiB) only names the kind
            held = ", ".join(uffd_holds(self.pid, self.start_addr, self.end)) or "unknown kind"
            raise VMError(
                f"the memory of process {self.pid} is already registered with another userfaultfd "
                f"({held}: another memvirt tracker, or QEMU's postcopy or background snapshot)"
            )
        if ret == -errno.EINVAL:
            raise Unsupported(f"the kernel cannot write-protect this mapping of process {self.pid} with userfaultfd")
        if ret < 0:
            raise VMError(f"registering process {self.pid}'s memory with userfaultfd failed: {os.strerror(-ret)}")

    def _protect_all(self) -> None:
        """Protect every page of the range, those QEMU has no page-table entry for included.

        A ``PAGEMAP_SCAN`` protects only what it reports (present, written pages): a file page
        QEMU never mapped (a migrated guest's RAM, written by the receiver before QEMU ran; a page
        punched and filled again) would stay unprotected, and QEMU's first write to it would map
        it writable unreported. ``UFFDIO_WRITEPROTECT`` puts a uffd-wp marker in every empty entry
        of a shmem (or, with ``WP_UNPOPULATED``, anonymous) range (Linux 5.19, b1f9e876862d
        "mm/uffd: enable write protection for shmem & hugetlbfs"), and zapping a page later keeps
        the marker, so the first write after any of these is seen. Costs about 4 ms per GiB."""
        wp = _UffdioWriteprotect(
            start=self.start_addr, len=self.end - self.start_addr, mode=UFFDIO_WRITEPROTECT_MODE_WP
        )
        ret = _ioctl(self.uffd, UFFDIO_WRITEPROTECT, wp)
        if ret < 0:
            raise VMError(f"write-protecting process {self.pid}'s memory failed: {os.strerror(-ret)}")

    def scan(self) -> np.ndarray:
        """Pages written since the last scan (indices into the range), protected again."""
        if self.uffd < 0:
            raise MemvirtError("the write tracker is not running")
        return self._scan(self._vec)

    def _scan(self, vec: np.ndarray | None) -> np.ndarray:
        found = []
        pos = self.start_addr
        while pos < self.end:
            arg = _PmScanArg(
                size=ctypes.sizeof(_PmScanArg),
                flags=PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                start=pos,
                end=self.end,
                vec=0 if vec is None else vec.ctypes.data,
                vec_len=0 if vec is None else len(vec),
                category_mask=PAGE_IS_WRITTEN,
                return_mask=PAGE_IS_WRITTEN,
            )
            n = _ioctl(self.pagemap, PAGEMAP_SCAN, arg)
            if n == -errno.ENOTTY:
                raise Unsupported("this kernel has no PAGEMAP_SCAN ioctl (Linux 6.7+)")
            if n == -errno.EPERM:
                raise VMError(f"write tracking of process {self.pid} was lost (its memory was unmapped or remapped)")
            if n in (-errno.ESRCH, -errno.EIO):
                raise VMError(f"process {self.pid} exited while memvirt tracked its writes")
            if n < 0:
                raise VMError(f"PAGEMAP_SCAN on process {self.pid} failed: {os.strerror(-n)}")
            if n and vec is not None:
                r = vec[:n].astype(np.int64)
                found.append(
                    _expand((r[:, 0] - self.start_addr) >> PAGE_SHIFT, (r[:, 1] - self.start_addr) >> PAGE_SHIFT)
                )
            if arg.walk_end <= pos:
                raise VMError(f"PAGEMAP_SCAN on process {self.pid} made no progress at {pos:#x}")
            pos = arg.walk_end
        return np.concatenate(found) if found else np.empty(0, dtype=np.int64)

    def close(self) -> None:
        """Stop tracking: closing the only descriptor unregisters and unprotects the range."""
        for name in ("uffd", "pagemap"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                os.close(fd)

    def __enter__(self) -> WriteTracker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _creation_mutex(pid: int) -> socket.socket | None:
    """A host-wide lock (an abstract socket name, gone when its holder dies) held from the
    ``userfaultfd()`` in QEMU ``pid`` to the close of QEMU's copy, so that only its holder closes
    never-initialised userfaultfds there. None after a second of trying (held by someone stuck or
    hostile): the caller then leaves strays alone, and if a holder closes the caller's own fresh
    descriptor as a stray, the caller's identity check makes that an error, never a wrong close."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    deadline = time.monotonic() + MUTEX_WAIT
    while True:
        try:
            s.bind(f"\0memvirt-dirty-uffd-{pid}")
            return s
        except OSError:
            if time.monotonic() > deadline:
                s.close()
                return None
            time.sleep(0.005)


def _same_file(pid: int, theirs: int, mine: int) -> bool:
    try:
        a, b = os.stat(f"/proc/{pid}/fd/{theirs}"), os.fstat(mine)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_sysctl(name: str) -> str:
    try:
        with open(f"/proc/sys/{name}") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


IN_OPEN = 0x20
IN_NONBLOCK_CLOEXEC = os.O_NONBLOCK | os.O_CLOEXEC


class OpenWatch:
    """Tells whether anyone opened a file since the last :meth:`opened` call (inotify ``IN_OPEN``,
    any process, any path to the inode, ``/proc/PID/fd`` reopens included), so the /proc walk for
    writers can be skipped when nobody did: holders can only appear by opening the file (or by
    inheriting a descriptor from a holder the last walk already judged). Any event, a queue
    overflow or a failed read counts as an open."""

    def __init__(self, path: str):
        self.fd = _libc.inotify_init1(IN_NONBLOCK_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if _libc.inotify_add_watch(self.fd, os.fsencode(path), IN_OPEN) < 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(err, f"inotify_add_watch {path}")

    def opened(self) -> bool:
        """Drain the events; True if there was any."""
        seen = False
        while True:
            try:
                if not os.read(self.fd, 65536):
                    return True
                seen = True
            except BlockingIOError:
                return seen
            except OSError:
                return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def ram_file_writers(path: str, owner: int) -> list[str]:
    """Processes other than ``owner`` that can write file ``path``: a writable shared mapping or a
    descriptor open for writing (their writes, and hole punches, would not be tracked). A memvirt
    puncher registered on the file (:func:`~memvirt.memory.holes.register_puncher`: it punches only
    through the journal) may hold a descriptor, never a writable mapping."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise VMError(f"cannot stat RAM file {path}: {e.strerror}") from e
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    ino = str(st.st_ino)
    real = os.path.realpath(path)
    names = {path, real, path + " (deleted)", real + " (deleted)"}
    out = []
    punchers = registered_punchers(path)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == owner:  # memvirt's own writes are not seen either
            continue
        pid = entry.name
        how = _maps_writable(pid, dev, ino)
        if not how and int(pid) not in punchers:  # a registered puncher's descriptor only punches, journaled
            how = _fd_writable(pid, names, st)
        if how:
            out.append(f"process {pid} ({_comm(pid)}) {how}")
    return out


def _maps_writable(pid: str, dev: str, ino: str) -> str:
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                fields = line.split(None, 5)
                if (
                    len(fields) >= 5
                    and fields[4] == ino
                    and fields[3] == dev
                    and fields[1][1] == "w"
                    and fields[1][3] == "s"
                ):
                    return "maps it writable"
    except OSError:
        pass
    return ""


def _fd_writable(pid: str, names: set[str], st: os.stat_result) -> str:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return ""
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") not in names:
                continue
            other = os.stat(f"/proc/{pid}/fd/{fd}")
            if (other.st_dev, other.st_ino) != (st.st_dev, st.st_ino):
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                flags = next((int(line.split()[1], 8) for line in f if line.startswith("flags:")), 0)
        except (OSError, ValueError):
            continue
        if flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
            return "has it open for writing"
    return ""


def _comm(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def host_to_guest(idx: np.ndarray, regions: tuple[Region, ...]) -> np.ndarray:
    """Guest frame numbers of page indices into a RAM backend laid out as ``regions``."""
    offs = np.array([r.offset >> PAGE_SHIFT for r in regions], dtype=np.int64)
    order = np.argsort(offs)
    offs = offs[order]
    gpas = np.array([regions[i].gpa >> PAGE_SHIFT for i in order], dtype=np.int64)
    sizes = np.array([regions[i].size >> PAGE_SHIFT for i in order], dtype=np.int64)
    k = np.searchsorted(offs, idx, side="right") - 1
    rel = idx - offs[np.maximum(k, 0)]
    ok = (k >= 0) & (rel < sizes[np.maximum(k, 0)])
    return gpas[k[ok]] + rel[ok]


class DirtyTracker(Protocol):
    """What ``memvirt dirty`` (and later migration) needs: guest frames written per scan."""

    method: str
    notice: str

    def scan(self) -> np.ndarray: ...

    def close(self) -> None: ...


class VMWriteTracker:
    """A :class:`WriteTracker` over a memvirt VM's RAM, answering in guest frame numbers."""

    method = WriteTracker.method

    def __init__(self, vm: VM):
        vm.require_alive()
        self.vm = vm
        self.notice = ""
        self.regions = vm.regions
        self.file = vm.config.ram_path if vm.config.ram == "shared" else ""
        self.watch: OpenWatch | None = None
        if self.file:  # before the first walk: an open after the watch is an event, one before is seen
            try:
                self.watch = OpenWatch(self.file)
            except OSError:
                self.watch = None  # every check walks /proc
        self.check_writers(force=True)
        start, size = vm.ram_mapping()
        self.tracker = WriteTracker(vm.config.pid, start, size)
        self.tracker.start()
        self.journal: PunchJournal | None = None
        self.punched = np.empty(0, dtype=np.int64)
        """Guest frames the last scan took from the punch journal (they read zero now: holes)."""
        if self.file:  # after registering: a punch before it precedes everything a caller reads
            try:
                self.journal = PunchJournal(self.file)
            except BaseException:
                self.tracker.close()
                raise
        if self.tracker.strays_closed:
            self.notice = f"closed {self.tracker.strays_closed} unused userfaultfd(s) an earlier tracker left in QEMU"

    def check_writers(self, force: bool = False) -> None:
        """Refuse (VMError) if a process other than QEMU can write the RAM file: its writes would
        not be seen. A walk of /proc (~80 ms with 120 processes on a loaded host), skipped unless
        ``force`` when nobody opened the file since the last walk (:class:`OpenWatch`)."""
        self._checked = time.monotonic()
        if not self.file:
            return
        opened = self.watch is None or self.watch.opened()  # drained before the walk: a later open is next time's
        if not (opened or force):
            return
        writers = ram_file_writers(self.file, self.vm.config.pid)
        if writers:
            raise VMError(
                f"{writers[0]}: VM {self.vm.name!r}'s RAM file {self.file} can be written outside QEMU, "
                f"and such writes are not tracked"
            )

    def scan(self, hold: bool = False, check: bool = True) -> np.ndarray:
        """Guest frames written since the last scan, memvirt's own hole punches included (the
        kernel does not report those). ``hold``: nobody punches this RAM from now until
        :meth:`close` (a migration's final round). ``check=False`` leaves the periodic look for
        other writers to the caller (a migration's pause: it calls :meth:`check_writers` while
        the target loads, not inside the downtime)."""
        punched = self.journal.take(hold) if self.journal is not None else None
        idx = self.tracker.scan()
        if check and time.monotonic() - self._checked >= WRITERS_EVERY:
            self.check_writers()
        written = host_to_guest(idx, self.regions)
        if self.journal is None:
            return written
        if punched is None:  # the journal overflowed: every frame counts as punched
            punched = np.concatenate([np.arange(r.gpa >> PAGE_SHIFT, r.end >> PAGE_SHIFT) for r in self.regions])
        self.punched = punched
        return np.union1d(written, punched) if len(punched) else written

    def close(self) -> None:
        self.tracker.close()
        if self.watch is not None:
            self.watch.close()
            self.watch = None
        if self.journal is not None:
            self.journal.close()
            self.journal = None


class FingerprintTracker:
    """Fallback: every page hashed per scan, the pages whose contents changed reported."""

    method = "fingerprint"

    def __init__(self, vm: VM, notice: str = ""):
        self.notice = notice
        self.mem = vm_memory(vm)
        self.pfns = self.mem.ram_pfns()
        self.prev = self._hashes()

    def _hashes(self) -> np.ndarray:
        return np.concatenate([hash_pages(chunk) for _gpa, chunk in self.mem.chunks()])

    def scan(self) -> np.ndarray:
        now = self._hashes()
        changed = self.pfns[now != self.prev]
        self.prev = now
        return changed

    def close(self) -> None:
        self.mem.close()


def track(vm: VM, method: str = "auto") -> DirtyTracker:
    """Start tracking ``vm``'s writes: ``uffd-wp``, ``fingerprint``, or ``auto`` (``uffd-wp``, else
    fingerprints with a one-line :attr:`notice` saying why)."""
    if method not in METHODS:
        raise UsageError(f"unknown tracking method {method!r}: use one of {', '.join(METHODS)}")
    vm.require_alive()
    if method == "fingerprint":
        return FingerprintTracker(vm)
    try:
        return VMWriteTracker(vm)
    except Unsupported as e:
        if method != "auto":
            raise
        return FingerprintTracker(vm, f"{e}; comparing page fingerprints instead (changed pages only, slower)")
