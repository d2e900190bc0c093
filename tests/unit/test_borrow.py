"""Borrowed host settings, over plain files standing in for sysfs knobs (no QEMU, no root knobs)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from memvirt.borrow import Borrowed


def _knobs(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "pages_to_scan", tmp_path / "run"
    a.write_text("100\n")
    b.write_text("0\n")
    return a, b


def test_restore_gives_back_only_what_still_holds_memvirts_value(tmp_path: Path) -> None:
    a, b = _knobs(tmp_path)
    with Borrowed("t") as borrowed:
        borrowed.set(a, 500)
        borrowed.set(b, 1)
        borrowed.set(a, 600)  # the first previous value is the one kept
        assert borrowed.journal.exists()
        assert borrowed.check() == []
        a.write_text("777\n")  # another tuner
        assert borrowed.check() == [(str(a), "600", "777")]
        journal = borrowed.journal
    assert a.read_text() == "777\n", "another tool's value must stay"
    assert b.read_text() == "0\n"
    assert not journal.exists()


def test_a_killed_borrower_is_undone_by_its_watchdog(tmp_path: Path) -> None:
    a, b = _knobs(tmp_path)
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from memvirt.borrow import Borrowed
        b = Borrowed("t")
        b.guard(order=({str(b)!r},))
        b.set(Path({str(a)!r}), 321)
        b.set(Path({str(b)!r}), 1)
        print("set", flush=True)
        time.sleep(60)
    """)
    env = {**os.environ, "MEMVIRT_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "set"
        assert a.read_text() == "321\n" and b.read_text() == "1\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 10
    while a.read_text() != "100\n" or b.read_text() != "0\n":
        assert time.monotonic() < deadline, "the watchdog did not restore the settings"
        time.sleep(0.1)
    assert not list((tmp_path / "home" / "borrowed").glob("*.json"))
