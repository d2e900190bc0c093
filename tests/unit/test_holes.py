"""The punch journal: a tracker on a RAM file learns every memvirt punch of it, and no one else's
punches are written down when no tracker is there (memvirt.memory.holes)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from memvirt.memory.holes import PunchJournal, journal_path, punch_frames, registered_punchers

PAGE = 4096


def _ram(tmp_path, pages: int = 64) -> tuple[str, int]:
    path = str(tmp_path / "g.ram")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.write(fd, b"\xab" * pages * PAGE)
    return path, fd


def _punch(fd: int, path: str, starts: list[int], ends: list[int]) -> None:
    s, e = np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64)
    punch_frames(fd, path, s, e, s * PAGE, (e - s) * PAGE)


def test_tracker_reads_each_punch_once_and_pages_read_zero(tmp_path):
    path, fd = _ram(tmp_path)
    _punch(fd, path, [1], [2])  # before any tracker: punched, not journaled
    assert os.pread(fd, PAGE, PAGE) == bytes(PAGE)
    assert not os.path.exists(journal_path(path))
    j = PunchJournal(path)
    try:
        _punch(fd, path, [3, 10], [5, 12])
        _punch(fd, path, [4], [6])
        assert j.take().tolist() == [3, 4, 5, 10, 11]
        assert j.take().tolist() == []
        assert os.pread(fd, 2 * PAGE, 10 * PAGE) == bytes(2 * PAGE)
        assert os.pread(fd, PAGE, 12 * PAGE) == b"\xab" * PAGE
    finally:
        j.close()
    assert not os.path.exists(journal_path(path))
    os.close(fd)


def test_a_killed_trackers_files_do_not_journal_and_do_not_block_the_next(tmp_path):
    path, fd = _ram(tmp_path)
    code = f"from memvirt.memory.holes import PunchJournal; PunchJournal({path!r}); import os; os._exit(0)"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert os.path.exists(path + ".tracked")
    _punch(fd, path, [7], [8])
    assert not os.path.exists(journal_path(path)) or os.path.getsize(journal_path(path)) == 0
    j = PunchJournal(path)
    _punch(fd, path, [9], [10])
    assert j.take().tolist() == [9]
    j.close()
    os.close(fd)


def test_a_puncher_is_registered_while_it_lives_and_only_then(tmp_path):
    """The registry a tracker's writer check trusts names exactly the live registered pids."""
    ram = str(tmp_path / "ram")
    code = (
        "import sys, time; from memvirt.memory.holes import register_puncher; "
        f"register_puncher({ram!r}); print('ready', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        assert registered_punchers(ram) == {proc.pid}
    finally:
        proc.kill()
        proc.wait()
    assert registered_punchers(ram) == set(), "the kernel drops a dead puncher's registration"
    assert registered_punchers(str(tmp_path / "other")) == set()
