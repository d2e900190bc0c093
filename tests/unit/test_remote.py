"""The ptrace borrow (memvirt.qemu.remote) against a small child process instead of QEMU
(issue 14, item 8): the borrowed thread keeps working whatever happens to the borrower, signals
sent to it while held reach it afterwards, the borrower's own signals wait, no pidfd is left."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from memvirt.errors import VMError
from memvirt.qemu import remote
from memvirt.qemu.remote import SYS_PIDFD_OPEN, RemoteProcess, close_stray_pidfds, self_pidfds

CHILD = textwrap.dedent("""
    import os, signal, threading, time
    got = []
    signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
    def tick():
        n = 0
        while True:
            time.sleep(0.01)
            n += 1
            os.write(1, b"%d %d\\n" % (n, len(got)))
    threading.Thread(target=tick, daemon=True).start()
    while True:
        time.sleep(0.01)
""")


class Child:
    """A process with an idle thread (blocked in ``clock_nanosleep`` between ticks) to borrow."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-S", "-c", CHILD], stdout=subprocess.PIPE)
        self.pid = self.proc.pid
        self.buf = b""
        self.ticks(2)

    def lines(self) -> list[tuple[int, int]]:
        fd = self.proc.stdout.fileno()
        while select.select([fd], [], [], 0)[0]:
            data = os.read(fd, 65536)
            if not data:
                break
            self.buf += data
        *full, self.buf = self.buf.split(b"\n")
        return [tuple(map(int, line.split())) for line in full]

    def ticks(self, n: int, timeout: float = 10) -> list[tuple[int, int]]:
        """Wait for ``n`` more ticks; the counter must go up by one each (the thread is sane)."""
        got: list[tuple[int, int]] = []
        deadline = time.monotonic() + timeout
        while len(got) < n:
            assert time.monotonic() < deadline, f"the borrowed thread stopped ticking: {got}"
            got += self.lines()
            time.sleep(0.01)
        counts = [c for c, _ in got]
        assert counts == list(range(counts[0], counts[0] + len(counts))), counts
        return got

    def tracer(self) -> int:
        """Who traces a thread of the child (0: nobody)."""
        found = 0
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            for line in (task / "status").read_text().splitlines():
                if line.startswith("TracerPid:"):
                    found = max(found, int(line.split()[1]))
        return found


def borrow(pid: int) -> RemoteProcess:
    """A borrow of the child's ticking thread, retried while it happens to be running (not idle)."""
    for _ in range(200):
        try:
            return RemoteProcess(pid)
        except VMError:
            time.sleep(0.003)
    raise AssertionError("the child's thread never looked idle")


BORROWER = """
import time
from memvirt.qemu.remote import remote_madvise
from memvirt.errors import VMError
for _ in range(200):
    try:
        with remote_madvise({pid}):
            break
    except VMError:
        time.sleep(0.003)
"""


@pytest.fixture
def child() -> Iterator[Child]:
    if os.geteuid() != 0 and Path("/proc/sys/kernel/yama/ptrace_scope").read_text().strip() != "0":
        pytest.skip("ptrace of a child needs ptrace_scope 0 or root")
    c = Child()
    yield c
    c.proc.kill()
    c.proc.wait()


def test_borrow_runs_syscalls_and_gives_the_thread_back(child: Child) -> None:
    with borrow(child.pid) as rp:
        assert child.tracer() == os.getpid()
        assert rp.syscall(39) == child.pid  # getpid, run by the child
        fd = rp.syscall(SYS_PIDFD_OPEN, child.pid, 0)
        assert self_pidfds(child.pid) == [fd]
        rp.syscall(remote.SYS_CLOSE, fd)
    assert child.tracer() == 0 and self_pidfds(child.pid) == []
    child.ticks(5)


def test_an_error_inside_the_borrow_still_restores_and_detaches(child: Child) -> None:
    with pytest.raises(KeyboardInterrupt), borrow(child.pid) as rp:
        rp.syscall(39)
        raise KeyboardInterrupt
    assert child.tracer() == 0
    child.ticks(5)


def test_own_signals_wait_until_the_thread_is_back(child: Child) -> None:
    seen: list[int] = []
    old = signal.signal(signal.SIGUSR2, lambda *a: seen.append(child.tracer()))
    try:
        with borrow(child.pid):
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.05)
            assert seen == []
        time.sleep(0.05)
        assert seen == [0]  # handled, and only once the child was detached
    finally:
        signal.signal(signal.SIGUSR2, old)


def test_signals_sent_to_the_held_thread_reach_it(child: Child) -> None:
    with borrow(child.pid) as rp:
        os.kill(child.pid, signal.SIGUSR1)  # the kernel routes it to a thread of the child
        rp.syscall(39)  # the held thread reports the signal, which must not be lost
        time.sleep(0.05)
    assert child.ticks(10)[-1][1] == 1


def test_borrower_killed_mid_borrow(child: Child, tmp_path: Path) -> None:
    """SIGKILL of the borrower inside the borrow (after it opened a pidfd in the target): the
    thread runs on with its own registers, and the stray pidfd is found and closed afterwards."""
    script = BORROWER.format(pid=child.pid)
    env = {**os.environ, "MEMVIRT_TEST_HOLD_BORROW": "60"}
    borrower = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.monotonic() + 30
        while not (child.tracer() == borrower.pid and self_pidfds(child.pid)):
            assert time.monotonic() < deadline and borrower.poll() is None, "the borrow did not start"
            time.sleep(0.01)
        time.sleep(0.3)  # past the pidfd_open's own few ptrace calls, into the hold
        borrower.kill()
        borrower.wait()
    finally:
        borrower.kill()
    child.ticks(10)
    assert child.tracer() == 0
    assert close_stray_pidfds(child.pid) == 1 and self_pidfds(child.pid) == []
    child.ticks(5)


def test_borrower_interrupted_mid_borrow(child: Child) -> None:
    """SIGINT inside the borrow waits for its end: the pidfd is closed, the thread detached."""
    script = BORROWER.format(pid=child.pid)
    env = {**os.environ, "MEMVIRT_TEST_HOLD_BORROW": "1.5"}
    borrower = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not (child.tracer() == borrower.pid and self_pidfds(child.pid)):
        assert time.monotonic() < deadline and borrower.poll() is None, "the borrow did not start"
        time.sleep(0.01)
    time.sleep(0.3)
    borrower.send_signal(signal.SIGINT)
    _, err = borrower.communicate(timeout=30)
    assert borrower.returncode != 0 and b"KeyboardInterrupt" in err
    assert child.tracer() == 0 and self_pidfds(child.pid) == []
    child.ticks(5)
