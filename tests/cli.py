"""Run the memvirt CLI as a user would: a separate process, exit code and both streams."""

from __future__ import annotations

import subprocess
import sys


def memvirt(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memvirt", *args], capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    """A user error: the given exit code, one ``memvirt: error:`` line, no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("memvirt: error:"), proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def assert_error_after_progress(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    """Like :func:`assert_one_line_error` for commands that report progress on stderr first:
    exactly one ``memvirt: error:`` line, and it is the last one."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("memvirt: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    for n in needles:
        assert n in errors[0], (n, errors[0])
