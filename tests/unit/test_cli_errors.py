"""The CLI never shows a user a traceback: bad files are one ``memvirt: error:`` line (exit 2), and
an exception memvirt did not expect is one ``internal error`` line (exit 1) unless MEMVIRT_DEBUG=1."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli import assert_one_line_error, memvirt
from test_dumps_hostile import elf_paddr_huge, kdump_huge_bitmap_flattened


@pytest.mark.parametrize("build", [kdump_huge_bitmap_flattened, elf_paddr_huge])
def test_inspect_of_a_hostile_dump_is_one_line(build, tmp_path: Path) -> None:
    path = tmp_path / "hostile.dump"
    path.write_bytes(build())
    assert_one_line_error(memvirt("inspect", str(path), timeout=120), 2, str(path))
    assert_one_line_error(memvirt("mem", "info", str(path), timeout=120), 2, str(path))


def test_mem_info_of_a_directory_fifo_or_missing_file(tmp_path: Path) -> None:
    assert_one_line_error(memvirt("mem", "info", str(tmp_path), timeout=60), 2, "is a directory")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert_one_line_error(memvirt("mem", "info", str(fifo), timeout=60), 2, "not a regular file")
    assert_one_line_error(memvirt("inspect", str(fifo), timeout=60), 2, "not a regular file")
    assert_one_line_error(memvirt("mem", "info", str(tmp_path / "gone.raw"), timeout=60), 2, "does not exist")


def _without_read_override(args: list[str]) -> list[str]:
    """Root reads any file; without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH it obeys a file's mode like anyone."""
    if os.geteuid() != 0:
        return args
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is needed to drop root's read override")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--", *args]


@pytest.mark.parametrize("fmt", ["auto", "raw", "elf", "kdump", "ramfile"])
def test_mem_info_of_an_unreadable_file(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "secret.raw"
    path.write_bytes(bytes(8192))
    path.chmod(0)
    cmd = _without_read_override([sys.executable, "-m", "memvirt", "mem", "info", "-f", fmt, str(path)])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert_one_line_error(proc, 2, str(path), "Permission denied")


def test_mem_info_behind_an_unsearchable_folder(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "dump.elf").write_bytes(bytes(8192))
    locked.chmod(0)
    try:
        cmd = _without_read_override([sys.executable, "-m", "memvirt", "mem", "info", str(locked / "dump.elf")])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    finally:
        locked.chmod(0o700)
    assert_one_line_error(proc, 2, "Permission denied")


def _main_with(raiser: str, debug: bool = False) -> subprocess.CompletedProcess[str]:
    """The real ``main()`` running ``mem info``, whose ``open_memory`` raises what ``raiser`` defines."""
    code = (
        "import sys\n"
        "import memvirt.cli.mem as m\n"
        f"{raiser}\n"
        "m.open_memory = boom\n"
        "from memvirt.cli.main import main\n"
        "sys.argv = ['memvirt', 'mem', 'info', 'anything']\n"
        "main()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MEMVIRT_DEBUG"}
    if debug:
        env["MEMVIRT_DEBUG"] = "1"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)


RAISERS = {
    "RecursionError": "def boom(*a): return boom(*a)",
    "ValueError": "def boom(*a): raise ValueError('two\\nlines')",
    "IndexError": "def boom(*a): return [][1]",
    "MemoryError": "def boom(*a): return bytearray(1 << 62)",
    "PermissionError": "def boom(*a): raise PermissionError(13, 'Permission denied', '/somewhere')",
}


@pytest.mark.parametrize("name", sorted(RAISERS))
def test_unexpected_exception_is_one_internal_error_line(name: str) -> None:
    assert_one_line_error(_main_with(RAISERS[name]), 1, f"internal error: {name}", "MEMVIRT_DEBUG=1")


def test_memvirt_debug_shows_the_traceback() -> None:
    proc = _main_with(RAISERS["IndexError"], debug=True)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and "in boom" in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("memvirt: error: internal error: IndexError"), proc.stderr


def test_ctrl_c_is_still_130() -> None:
    proc = _main_with("def boom(*a): raise KeyboardInterrupt")
    assert proc.returncode == 130 and "Traceback" not in proc.stderr and "internal error" not in proc.stderr, (
        proc.stderr
    )


def test_image_build_with_an_unknown_suite_is_one_line() -> None:
    assert_one_line_error(memvirt("image", "build", "--kernel", "7.2", "--suite", "bogus", timeout=60), 2, "bogus")
