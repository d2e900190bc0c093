"""System calls run inside another process (QEMU) through ptrace, for what no remote interface does.

Anonymous guest RAM can only be given back by ``madvise(MADV_DONTNEED)`` from inside QEMU:
``process_madvise`` from another process accepts only COLD, PAGEOUT, WILLNEED and COLLAPSE (and
PAGEOUT frees nothing without swap), while since Linux 6.13 a process may apply *any* advice to
itself through it. So one idle QEMU thread is borrowed the way a debugger calls a function in its
inferior: stop it (``PTRACE_SEIZE`` + ``PTRACE_INTERRUPT``), save its registers, point it at a
``syscall`` instruction it already executes (the one it is blocked in), single-step, read the
result, put every register back and let it go. The thread's interrupted system call restarts as
it would after any signal. The other QEMU threads never stop.

The thread must come back intact whatever happens to memvirt: after every single call its
registers are its own again and it waits in its interrupt stop (so even a SIGKILL of memvirt,
whose exit detaches it, leaves it at most an injected descriptor, see :func:`close_stray_pidfds`;
only a SIGKILL landing while the thread runs the injected call itself, microseconds to a few ms
per call, can still hurt it: it then returns from that call with memvirt's registers, or gets
the single-step SIGTRAP, which ends QEMU; closing that needs the borrow in a process of its own
that outlives memvirt). memvirt holds its own signals during the borrow (a Ctrl-C or SIGTERM is
acted on once the thread is given back); any path out restores and detaches; and signals sent
to the thread while it was held are sent to it again afterwards.
``MEMVIRT_TEST_HOLD_BORROW=SECONDS`` (a test hook) sleeps inside the borrow, to aim at it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from memvirt.errors import VMError

PTRACE_CONT = 7
PTRACE_SINGLESTEP = 9
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_EVENT_STOP = 128
SYS_CLOSE = 3
SYS_MADVISE = 28
SYS_PIDFD_OPEN = 434
SYS_PROCESS_MADVISE = 440
MADV_DONTNEED = 4
UIO_MAXIOV = 1024
SYSCALL_INSN = b"\x0f\x05"
WALL = 0x40000000
STACK_SKIP = 4096
FIND_TRIES = 20
"""Looks for an idle thread (each may be running at the instant it is looked at)."""
"""Bytes left untouched below the borrowed thread's stack pointer (red zone and more)."""


class Regs(ctypes.Structure):
    """``struct user_regs_struct`` of x86-64."""

    _fields_ = [
        (n, ctypes.c_ulonglong)
        for n in (
            "r15",
            "r14",
            "r13",
            "r12",
            "rbp",
            "rbx",
            "r11",
            "r10",
            "r9",
            "r8",
            "rax",
            "rcx",
            "rdx",
            "rsi",
            "rdi",
            "orig_rax",
            "rip",
            "cs",
            "eflags",
            "rsp",
            "ss",
            "fs_base",
            "gs_base",
            "ds",
            "es",
            "fs",
            "gs",
        )
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_libc.ptrace.restype = ctypes.c_long
_libc.tgkill.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]


def _ptrace(req: int, tid: int, addr: int = 0, data: object = None) -> None:
    arg = ctypes.cast(ctypes.pointer(data), ctypes.c_void_p) if isinstance(data, ctypes.Structure) else data
    if _libc.ptrace(req, tid, addr, arg) < 0:
        e = ctypes.get_errno()
        raise VMError(f"cannot borrow QEMU thread {tid} (ptrace {req:#x}: {os.strerror(e)}); is a debugger attached?")


def _wait_stop(tid: int) -> tuple[int, int]:
    """The next stop of ``tid``: ``(signal, ptrace event)``."""
    while True:
        try:
            _, status = os.waitpid(tid, WALL)
            break
        except InterruptedError:
            continue
    if not os.WIFSTOPPED(status):
        raise VMError(f"QEMU thread {tid} ended while memvirt borrowed it")
    return os.WSTOPSIG(status), status >> 16


def _test_hold() -> None:
    """Test hook: ``MEMVIRT_TEST_HOLD_BORROW=SECONDS`` waits inside the borrow (tests kill memvirt there)."""
    hold = os.environ.get("MEMVIRT_TEST_HOLD_BORROW")
    if hold:
        time.sleep(float(hold))


def _blocked_thread(pid: int) -> tuple[int, int]:
    """A non-main thread blocked in a system call, and the address of its ``syscall`` instruction."""
    for attempt in range(FIND_TRIES):
        try:
            return _find_blocked(pid)
        except OSError as e:
            raise VMError(f"cannot inspect QEMU process {pid}: {e.strerror}") from e
        except VMError:
            if attempt == FIND_TRIES - 1:
                raise
            time.sleep(0.005)
    raise AssertionError("unreachable")


def _find_blocked(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for tid in sorted(int(t) for t in os.listdir(f"/proc/{pid}/task")):
            if tid == pid:
                continue
            try:
                with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                    fields = f.read().split()
            except OSError:
                continue
            if len(fields) < 9 or fields[0] in ("running", "-1"):
                continue
            pc = int(fields[-1], 16) - 2
            if os.pread(mem.fileno(), 2, pc) == SYSCALL_INSN:
                return tid, pc
    raise VMError(f"QEMU process {pid} has no idle thread blocked in a system call to borrow")


_DEFERRED = tuple(
    getattr(signal, n)
    for n in (
        "SIGINT",
        "SIGTERM",
        "SIGHUP",
        "SIGQUIT",
        "SIGUSR1",
        "SIGUSR2",
        "SIGALRM",
        "SIGTSTP",
        "SIGTTIN",
        "SIGTTOU",
        "SIGXCPU",
        "SIGXFSZ",
        "SIGVTALRM",
        "SIGPROF",
        "SIGPWR",
        "SIGIO",
    )
    if hasattr(signal, n)
)
"""Signals that would end or stop memvirt (or raise KeyboardInterrupt) in the middle of a borrow."""


class _SignalsHeld:
    """Holds memvirt's own signals for the length of a borrow and delivers them after it.

    Blocking them in this thread is not enough: a process-directed signal (Ctrl-C) then goes to
    another thread (numpy's), whose C handler makes Python act on it in this one anyway, and a
    default action (SIGTERM) kills the whole process. So, from the main thread, each such signal
    also gets a handler that only records it; the originals come back and the recorded signals are
    raised again once the thread is given back.
    """

    def __init__(self) -> None:
        self.got: list[int] = []
        self.handlers: dict[int, Any] = {}
        self.mask: set[int] | None = None

    def __enter__(self) -> _SignalsHeld:
        if threading.current_thread() is threading.main_thread():
            for sig in _DEFERRED:
                old = signal.getsignal(sig)
                if old not in (signal.SIG_IGN, None):
                    self.handlers[sig] = old
                    signal.signal(sig, self._record)
        self.mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        return self

    def _record(self, sig: int, _frame: object) -> None:
        if sig not in self.got:
            self.got.append(sig)

    def __exit__(self, *exc: object) -> None:
        for sig, old in self.handlers.items():
            signal.signal(sig, old)
        if self.mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)
        for sig in self.got:
            signal.raise_signal(sig)


class RemoteProcess:
    """Run system calls inside process ``pid`` through one of its idle threads (context manager)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.tid, self.gadget = _blocked_thread(pid)
        self._saved = Regs()
        self._attached = False
        self._have_regs = False
        self._signals: list[int] = []
        """Signals the thread received while held: suppressed then, sent again after the detach."""
        self._held: _SignalsHeld | None = None
        try:
            self._mem = os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise VMError(f"cannot open /proc/{pid}/mem for writing: {e.strerror}") from e

    def __enter__(self) -> RemoteProcess:
        self._held = _SignalsHeld().__enter__()
        try:
            _ptrace(PTRACE_SEIZE, self.tid)
            self._attached = True
            _ptrace(PTRACE_INTERRUPT, self.tid)
            self._park()
            _ptrace(PTRACE_GETREGS, self.tid, 0, self._saved)
            self._have_regs = True
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._release()

    def _park(self) -> None:
        """Wait for the thread's interrupt stop (``PTRACE_EVENT_STOP``), letting any signal stop
        before it go on suppressed (noted, to be sent again). Only there may the thread wait: if
        memvirt dies, the kernel resumes it as if nothing happened, where from a single-step stop
        it would deliver it the SIGTRAP, which kills QEMU."""
        while True:
            sig, event = _wait_stop(self.tid)
            if event == PTRACE_EVENT_STOP:
                return
            self._note(sig, event)
            _ptrace(PTRACE_CONT, self.tid, 0, None)

    def _note(self, sig: int, event: int) -> None:
        """Keep a signal (not a ptrace event or our single-step trap) the held thread was sent."""
        if event == 0 and sig != signal.SIGTRAP and sig not in self._signals:
            self._signals.append(sig)

    def _release(self) -> None:
        """Registers back, detach, re-send the thread its signals, unblock ours; on every path."""
        try:
            if self._attached:
                try:
                    if self._have_regs:
                        _ptrace(PTRACE_SETREGS, self.tid, 0, self._saved)
                finally:
                    self._attached = False
                    _ptrace(PTRACE_DETACH, self.tid, 0, None)
                for sig in self._signals:
                    _libc.tgkill(self.pid, self.tid, sig)
        finally:
            os.close(self._mem)
            if self._held is not None:
                held, self._held = self._held, None
                held.__exit__()

    @property
    def scratch(self) -> int:
        """An address on the borrowed thread's stack, below anything it uses, for arguments."""
        return (self._saved.rsp - STACK_SKIP - UIO_MAXIOV * 16) & ~0xF

    def syscall(self, nr: int, *args: int) -> int:
        """``syscall(nr, args...)`` in the target; returns its result (negative errno on failure)."""
        regs = Regs.from_buffer_copy(self._saved)
        regs.rip, regs.rax, regs.orig_rax = self.gadget, nr, (1 << 64) - 1
        for name, value in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args, strict=False):
            setattr(regs, name, value & ((1 << 64) - 1))
        _ptrace(PTRACE_SETREGS, self.tid, 0, regs)
        try:
            while True:
                _ptrace(PTRACE_SINGLESTEP, self.tid, 0, None)
                sig, event = _wait_stop(self.tid)
                if sig == signal.SIGTRAP and event == 0:
                    break
                self._note(sig, event)
            _ptrace(PTRACE_GETREGS, self.tid, 0, regs)
        finally:
            _ptrace(PTRACE_SETREGS, self.tid, 0, self._saved)
            _ptrace(PTRACE_INTERRUPT, self.tid)
            _ptrace(PTRACE_CONT, self.tid, 0, None)
            self._park()
        if regs.rip != self.gadget + 2:
            raise VMError(f"borrowed QEMU thread {self.tid} stopped at {regs.rip:#x}, not after its syscall")
        ret = regs.rax
        return ret - (1 << 64) if ret >= 1 << 63 else ret

    def write(self, addr: int, data: bytes) -> None:
        if os.pwrite(self._mem, data, addr) != len(data):
            raise VMError(f"short write into QEMU process {self.pid}")


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise VMError(f"{what} in QEMU failed: {os.strerror(-ret)}")
    return ret


@contextmanager
def remote_madvise(pid: int) -> Iterator[Callable[[np.ndarray, np.ndarray], None]]:
    """Yields ``dontneed(starts, lengths)``: ``MADV_DONTNEED`` over host ranges of process ``pid``,
    1024 ranges per ``process_madvise`` call (one ``madvise`` per range before Linux 6.13)."""
    with RemoteProcess(pid) as rp:
        pidfd = _check(rp.syscall(SYS_PIDFD_OPEN, pid, 0), "pidfd_open")
        try:
            _test_hold()
            batch = [True]

            def dontneed(starts: np.ndarray, lengths: np.ndarray) -> None:
                for i in range(0, len(starts), UIO_MAXIOV):
                    s, n = starts[i : i + UIO_MAXIOV], lengths[i : i + UIO_MAXIOV]
                    if batch[0]:
                        iov = np.empty((len(s), 2), dtype="<u8")
                        iov[:, 0], iov[:, 1] = s, n
                        rp.write(rp.scratch, iov.tobytes())
                        ret = rp.syscall(SYS_PROCESS_MADVISE, pidfd, rp.scratch, len(s), MADV_DONTNEED, 0)
                        if ret == -errno.EINVAL:
                            batch[0] = False
                        else:
                            if _check(ret, "process_madvise") != int(n.sum()):
                                raise VMError(f"process_madvise in QEMU advised {ret} of {int(n.sum())} bytes")
                            continue
                    for a, b in zip(s.tolist(), n.tolist(), strict=True):
                        _check(rp.syscall(SYS_MADVISE, a, b, MADV_DONTNEED), "madvise")

            yield dontneed
        finally:
            rp.syscall(SYS_CLOSE, pidfd)


def anon_fds(pid: int, kind: str) -> list[tuple[int, list[str]]]:
    """(descriptor, its fdinfo lines) of each ``anon_inode:[KIND]`` descriptor of process ``pid``
    (what a borrow cut short may have left inside it)."""
    found = []
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    for name in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") != f"anon_inode:[{kind}]":
                continue
            with open(f"/proc/{pid}/fdinfo/{name}") as f:
                found.append((int(name), f.read().splitlines()))
        except (OSError, ValueError):
            continue
    return sorted(found)


def self_pidfds(pid: int) -> list[int]:
    """Descriptors in process ``pid`` that are pidfds of ``pid`` itself: only a borrow cut short
    (memvirt SIGKILLed between ``pidfd_open`` and its ``close``) leaves one; QEMU makes none."""
    return [fd for fd, info in anon_fds(pid, "pidfd") if any(line.split() == ["Pid:", str(pid)] for line in info)]


def close_stray_pidfds(pid: int) -> int:
    """Close what :func:`self_pidfds` finds, from inside ``pid``; returns how many."""
    fds = self_pidfds(pid)
    if fds:
        with RemoteProcess(pid) as rp:
            for fd in fds:
                rp.syscall(SYS_CLOSE, fd)
    return len(fds)
