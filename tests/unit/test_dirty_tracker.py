"""The write tracker on a real process: a child of the test writes known pages (no QEMU).

The child maps anonymous and shared (memfd) memory, keeps one thread blocked in ``read`` for the
borrow (as QEMU's I/O threads are), and writes the pages it is told to. Needs root (ptrace,
``pidfd_getfd``) and Linux 6.7+ (``PAGEMAP_SCAN``); skipped otherwise.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from memvirt.errors import VMError
from memvirt.memory.source import PAGE_SIZE, Region
from memvirt.qemu.dirty import (
    WriteTracker,
    _expand,
    host_to_guest,
    pagemap_scan_supported,
    ram_file_writers,
    stray_uffds,
    uffd_holds,
)

PAGES = 4096
CHILD = textwrap.dedent("""
    import ctypes, mmap, os, sys, threading
    n = int(sys.argv[1])
    anon = mmap.mmap(-1, n * 4096)
    mfd = os.memfd_create("dirty-test")
    os.ftruncate(mfd, n * 4096)
    shared = mmap.mmap(mfd, n * 4096, mmap.MAP_SHARED)
    cow = mmap.mmap(mfd, n * 4096, mmap.MAP_PRIVATE)  # as a lazy clone maps its template's RAM file
    maps = {"anon": anon, "shared": shared, "cow": cow}
    addr = {k: ctypes.addressof(ctypes.c_char.from_buffer(m)) for k, m in maps.items()}
    r, w = os.pipe()
    threading.Thread(target=os.read, args=(r, 1), daemon=True).start()
    libc = ctypes.CDLL(None, use_errno=True)
    print(addr["anon"], addr["shared"], addr["cow"], mfd, flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "write":
            m = maps[args[0]]
            for i in map(int, args[1:]):
                m[i * 4096 + 100] = (m[i * 4096 + 100] + 1) % 256
            print("ok", flush=True)
        elif cmd == "get":
            print(maps[args[0]][int(args[1]) * 4096 + 100], flush=True)
        elif cmd == "uffd":
            print(libc.syscall(323, os.O_CLOEXEC | os.O_NONBLOCK), flush=True)
""")


def _root_and_scan() -> str:
    if os.geteuid() != 0:
        return "needs root (ptrace, pidfd_getfd)"
    if not pagemap_scan_supported():
        return "kernel has no PAGEMAP_SCAN"
    return ""


pytestmark = pytest.mark.skipif(bool(_root_and_scan()), reason=_root_and_scan() or "ok")


class Child:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(PAGES)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        anon, shared, cow, mfd = self._line().split()
        self.addr = {"anon": int(anon), "shared": int(shared), "cow": int(cow)}
        self.memfd = int(mfd)

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def ask(self, text: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self._line()

    def write(self, kind: str, pages: list[int]) -> None:
        for i in range(0, len(pages), 500):
            assert self.ask(f"write {kind} " + " ".join(map(str, pages[i : i + 500]))) == "ok"

    def tracker(self, kind: str) -> WriteTracker:
        """A tracker over one mapping, once the borrowable thread waits in its read() again (a
        borrow just before leaves it runnable until the loaded host schedules it)."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            tids = os.listdir(f"/proc/{self.proc.pid}/task")
            if all(Path(f"/proc/{self.proc.pid}/task/{t}/syscall").read_text().split()[0] != "running" for t in tids):
                break
            time.sleep(0.01)
        return WriteTracker(self.proc.pid, self.addr[kind], PAGES * PAGE_SIZE)

    def holds(self, kind: str) -> list[str]:
        return uffd_holds(self.proc.pid, self.addr[kind], self.addr[kind] + PAGES * PAGE_SIZE)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def child() -> Iterator[Child]:
    c = Child()
    yield c
    c.close()


@pytest.mark.parametrize("kind", ["anon", "shared", "cow"])
def test_scan_reports_exactly_the_pages_written_since_the_last_scan(child: Child, kind: str) -> None:
    child.write(kind, list(range(0, PAGES, 7)))  # some pages populated before tracking starts
    with child.tracker(kind) as t:
        assert child.holds(kind) == ["write-protect"]
        assert len(t.scan()) == 0, "the start protects everything: nothing written yet"
        rng = np.random.default_rng(1)
        for count in (1, 37, 1500):
            pages = np.sort(rng.choice(PAGES, size=count, replace=False))
            child.write(kind, pages.tolist())
            got = t.scan()
            assert np.array_equal(got, pages), f"{count} pages written, {len(got)} reported"
            assert len(t.scan()) == 0, "a page is reported once per write interval"
        child.write(kind, list(range(PAGES)))
        assert np.array_equal(t.scan(), np.arange(PAGES)), "every page written, every page reported"
    assert child.holds(kind) == [], "closing the descriptor unregisters the range"
    before = int(child.ask(f"get {kind} 5"))
    child.write(kind, [5])
    assert int(child.ask(f"get {kind} 5")) == (before + 1) % 256, "the process writes on after tracking"


def test_many_scattered_regions_take_several_scans_calls(child: Child, monkeypatch: pytest.MonkeyPatch) -> None:
    import memvirt.qemu.dirty as dirty

    monkeypatch.setattr(dirty, "VEC_LEN", 16)
    with child.tracker("anon") as t:
        pages = list(range(0, PAGES, 3))  # 1366 separate regions, 16 per ioctl
        child.write("anon", pages)
        assert np.array_equal(t.scan(), pages)
        assert len(t.scan()) == 0


def test_a_second_tracker_on_the_same_memory_is_refused(child: Child) -> None:
    fds = sorted(os.listdir("/proc/self/fd"))
    with child.tracker("shared"):
        with pytest.raises(VMError, match=r"already registered with another userfaultfd \(write-protect"):
            child.tracker("shared").start()
    assert child.holds("shared") == []
    assert sorted(os.listdir("/proc/self/fd")) == fds, "no descriptor left open in memvirt"
    assert stray_uffds(child.proc.pid) == [] and "userfaultfd" not in " ".join(
        os.readlink(f"/proc/{child.proc.pid}/fd/{fd}")
        for fd in os.listdir(f"/proc/{child.proc.pid}/fd")
        if os.path.exists(f"/proc/{child.proc.pid}/fd/{fd}")
    ), "nor in the tracked process"


def test_writes_through_the_file_by_another_process_are_not_seen(child: Child) -> None:
    """The documented blind spot: the protection lives in the tracked process's page tables."""
    with child.tracker("shared") as t:
        fd = os.open(f"/proc/{child.proc.pid}/fd/{child.memfd}", os.O_RDWR)
        try:
            os.pwrite(fd, b"x", 10 * PAGE_SIZE)
        finally:
            os.close(fd)
        assert len(t.scan()) == 0
        child.write("shared", [10])
        assert t.scan().tolist() == [10]


def test_a_sigkilled_tracker_leaves_nothing_registered(child: Child) -> None:
    code = textwrap.dedent(f"""
        import time
        from memvirt.qemu.dirty import WriteTracker
        t = WriteTracker({child.proc.pid}, {child.addr["anon"]}, {PAGES * PAGE_SIZE})
        t.start()
        print("tracking", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "tracking"
        assert child.holds("anon") == ["write-protect"]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    deadline = time.monotonic() + 5
    while child.holds("anon") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert child.holds("anon") == [], "the registration died with the tracker"
    assert stray_uffds(child.proc.pid) == [], "no userfaultfd left in the tracked process"
    child.write("anon", [1, 2, 3])
    with child.tracker("anon") as t:  # and it can be tracked again
        child.write("anon", [4])
        assert t.scan().tolist() == [4]


def test_an_uninitialised_userfaultfd_left_in_the_process_is_closed(child: Child) -> None:
    fd = int(child.ask("uffd"))
    assert fd >= 0
    assert stray_uffds(child.proc.pid) == [fd]
    with child.tracker("anon") as t:
        assert t.strays_closed == 1
    assert stray_uffds(child.proc.pid) == []


def test_without_the_creation_lock_strays_are_left_alone(child: Child, monkeypatch: pytest.MonkeyPatch) -> None:
    """Someone holding the lock (stuck, or squatting its name) must not stop tracking, and then no
    descriptor in the process is closed but the tracker's own."""
    import memvirt.qemu.dirty as dirty

    monkeypatch.setattr(dirty, "MUTEX_WAIT", 0.05)
    fd = int(child.ask("uffd"))
    squat = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    squat.bind(f"\0memvirt-dirty-uffd-{child.proc.pid}")
    try:
        with child.tracker("anon") as t:
            assert t.strays_closed == 0
            child.write("anon", [9])
            assert t.scan().tolist() == [9]
        assert stray_uffds(child.proc.pid) == [fd]
    finally:
        squat.close()


def test_ram_file_writers_names_other_mappers_and_writers(tmp_path: Path) -> None:
    path = tmp_path / "ram"
    path.write_bytes(bytes(4 * PAGE_SIZE))
    code = textwrap.dedent(f"""
        import mmap, os, sys, time
        from memvirt.memory.holes import register_puncher
        if sys.argv[1].startswith("puncher"):
            reg = register_puncher({str(path)!r})
        fd = os.open({str(path)!r}, os.O_RDWR if sys.argv[1] != "ro" else os.O_RDONLY)
        if sys.argv[1].endswith("map"):
            m = mmap.mmap(fd, 0, mmap.MAP_SHARED)
            os.close(fd)
        print("ready", flush=True)
        time.sleep(60)
    """)
    for mode, expect in (
        ("ro", None),
        ("fd", "has it open for writing"),
        ("map", "maps it writable"),
        ("puncher", None),  # memvirt's reclaim: registered, its punches journaled
        ("puncher-map", "maps it writable"),  # registered, but a mapping writes behind the journal
    ):
        proc = subprocess.Popen([sys.executable, "-c", code, mode], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            found = ram_file_writers(str(path), owner=1)
            mine = [w for w in found if w.startswith(f"process {proc.pid} ")]
            assert mine == ([] if expect is None else [f"process {proc.pid} (python3) {expect}"]) or (
                expect is not None and len(mine) == 1 and mine[0].endswith(expect)
            ), (mode, found)
            assert ram_file_writers(str(path), owner=proc.pid) == [], "the owner itself does not count"
        finally:
            proc.kill()
            proc.wait()


def test_expand_and_guest_frames() -> None:
    assert _expand(np.array([0, 5, 9]), np.array([2, 6, 12])).tolist() == [0, 1, 5, 9, 10, 11]
    assert _expand(np.array([], dtype=np.int64), np.array([], dtype=np.int64)).tolist() == []
    regions = (Region(0, 3 << 30, 0), Region(4 << 30, 1 << 30, 3 << 30))
    idx = np.array([0, (3 << 30 >> 12) - 1, 3 << 30 >> 12, (4 << 30 >> 12) - 1])
    assert host_to_guest(idx, regions).tolist() == [0, (3 << 30 >> 12) - 1, 4 << 30 >> 12, (5 << 30 >> 12) - 1]
    assert host_to_guest(np.array([4 << 30 >> 12]), regions).tolist() == [], "past the end: no frame"
