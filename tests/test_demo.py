"""The main job end to end, and no guest outliving the command or test session that started it.

Each test runs memvirt in its own process with its own state and RAM folders, as a user would,
so what it leaves behind (QEMU processes, RAM files, swap, kdamonds) is visible and counted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from memvirt.compress import damon, tiers
from memvirt.procs import pid_alive

pytestmark = pytest.mark.guest


@pytest.fixture
def home() -> Iterator[dict[str, str]]:
    """An environment with a state and RAM folder of its own."""
    state = Path(tempfile.mkdtemp(prefix="memvirt-demo-test-"))
    ram = Path("/dev/shm") / state.name
    env = {**os.environ, "MEMVIRT_HOME": str(state), "MEMVIRT_RAM_DIR": str(ram)}
    try:
        yield env
    finally:
        subprocess.run(
            [sys.executable, "-c", "from memvirt.qemu import reaper; reaper.reap('*')"], env=env, timeout=120
        )
        subprocess.run(["rm", "-rf", str(state), str(ram)])


def _qemu_pids(env: dict[str, str]) -> list[int]:
    """QEMU processes started with this RAM folder (they inherit memvirt's environment)."""
    mark = f"MEMVIRT_RAM_DIR={env['MEMVIRT_RAM_DIR']}".encode()
    pids = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            if b"qemu-system" not in Path(f"/proc/{p}/cmdline").read_bytes():
                continue
            if mark in Path(f"/proc/{p}/environ").read_bytes().split(b"\0"):
                pids.append(int(p))
        except OSError:
            continue
    return [p for p in pids if pid_alive(p)]


def _gone(env: dict[str, str], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while _qemu_pids(env):
        assert time.monotonic() < deadline, f"guests outlived their command: {_qemu_pids(env)}"
        time.sleep(0.5)
    ram = Path(env["MEMVIRT_RAM_DIR"])
    assert not ram.exists() or not any(ram.iterdir()), f"RAM files left: {list(ram.iterdir())}"


def _wait_for_guest(env: dict[str, str], proc: subprocess.Popen[str], seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while not _qemu_pids(env):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "no guest started"
        time.sleep(0.5)
    time.sleep(3)


@pytest.mark.parametrize("arch", ["amd64", pytest.param("arm64", marks=pytest.mark.kernels)])
def test_demo_runs_every_step_on_this_host(home: dict[str, str], tmp_path: Path, arch: str) -> None:
    """Every step, compression included, whether DAMON is free or held by another tool; the host's
    swap and kdamonds are as they were, and no guest is left. ``--arch arm64`` runs the same steps
    on an arm64 guest under TCG (in the kernel matrix, ``-m kernels``)."""
    swaps, kdamonds = tiers.active_swaps(), damon.kdamonds()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "memvirt",
            "demo",
            "--no-pm",
            "--json",
            "--arch",
            arch,
            "--map",
            str(tmp_path / "map.png"),
        ],
        env=home,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    report = json.loads(proc.stdout)
    status = {s["step"]: (s["status"], s.get("reason", "")) for s in report["steps"]}
    assert proc.returncode == 0, (status, proc.stderr[-2000:])
    assert all(v[0] == "ok" for v in status.values()), status
    assert list(status) == [
        "image",
        "boot",
        "workload",
        "inspection",
        "reclaim",
        "compression",
        "daemon",
        "clone",
        "migration",
    ]
    ins = report["inspection"]
    assert ins["pages"]["free"] == ins["guest_says"]["free"], "the paused census must match the guest's MemFree"
    comp = report["compression"]
    assert comp["method"] == ("damon" if damon.unavailable_reason() is None else "referenced")
    if comp["method"] == "referenced":
        assert "DAMON" in comp["method_notice"]
    assert comp["zram_orig"] > 0, "nothing of the cold set reached zram"
    assert report["reclaim"]["guest_alive"] and report["clone"]["workload_runs_on"]
    dm = report["daemon"]
    (mine,) = [v for v in dm["status"]["vms"] if v["vm"] == "memvirt-demo"]
    assert mine["passes"] >= 2 and mine["working_set_bytes"] > 0 and not mine["errors"]
    assert dm["exit_code"] == 0 and dm["guest_alive"] and dm["guest_status"] == "running" and dm["socket_removed"]
    assert tiers.active_swaps().keys() == swaps.keys(), "the demo left the host's swap changed"
    assert damon.kdamonds() == kdamonds
    assert "demo: 9 steps ok, 0 failed, 0 skipped" in proc.stderr
    _gone(home, 30)


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_demo_leaves_no_guest(home: dict[str, str], how: signal.Signals) -> None:
    """SIGTERM unwinds the demo like Ctrl-C (exit 143); after SIGKILL its reaper stops the guests."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "memvirt", "demo", "--no-pm", "--map", os.devnull],
        env=home,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_guest(home, proc)
        proc.send_signal(how)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    if how == signal.SIGTERM:
        assert proc.returncode == 143 and "Traceback" not in err, err
    _gone(home, 60)


def test_a_terminated_test_session_leaves_no_guest(home: dict[str, str], tmp_path: Path) -> None:
    """pytest ended by SIGTERM mid-test (as CI's time limit or a person would) stops its guests."""
    tests = Path(__file__).parent
    for helper in ("conftest.py", "support.py"):
        (tmp_path / helper).write_text((tests / helper).read_text())
    (tmp_path / "test_sleeps.py").write_text(
        textwrap.dedent("""
        import time

        def test_holds_a_guest(guest):
            time.sleep(600)
    """)
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env=home,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    inner = {**home, "MEMVIRT_RAM_DIR": f"/dev/shm/memvirt-test-{proc.pid}"}
    try:
        _wait_for_guest(inner, proc)
        pids = _qemu_pids(inner)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 30
    while any(pid_alive(p) for p in pids):
        assert time.monotonic() < deadline, "the terminated session's guest is still running"
        time.sleep(0.5)
    assert not Path(f"/dev/shm/memvirt-test-{proc.pid}").exists()
