"""Other local users and a killed memvirt (issue 14, items 2 and 8), on real guests.

Another user: a second, unprivileged account made for the test reads nothing memvirt keeps of a
guest (RAM file, template and its device state, LAN and store disks, dumps), even with the
folders above opened for it, and what it plants (a RAM folder, a symlink where a dump goes) is
refused or not followed. A killed reclaim: SIGKILL or Ctrl-C while it holds a QEMU thread and
the guest paused leaves QEMU running, its thread intact and the guest resumed within seconds.
"""

from __future__ import annotations

import os
import pwd
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cli import assert_one_line_error, memvirt

from memvirt.clone.template import freeze, state_file, unfreeze
from memvirt.dedup.watchdog import MARK, mark_paused, read_mark
from memvirt.paths import ram_dir, state_home
from memvirt.qemu import lan
from memvirt.qemu.remote import self_pidfds
from memvirt.qemu.vm import VM, VMConfig, vms_root

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (useradd, ptrace of QEMU)")

USER = f"mvsec{os.getpid() % 100000}"
DIRTY = "memtouch --hot 96M --content random --duration 1 >/dev/null"


@pytest.fixture(scope="module")
def other_user() -> Iterator[pwd.struct_passwd]:
    """A fresh unprivileged local user, always removed afterwards."""
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", USER], check=True)
    try:
        yield pwd.getpwnam(USER)
    finally:
        subprocess.run(["userdel", USER], check=False)


def as_user(user: pwd.struct_passwd, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--", *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_unreadable(user: pwd.struct_passwd, path: Path) -> None:
    """The file is 0600 or stricter and ``user`` cannot open it."""
    mode = stat.S_IMODE(os.lstat(path).st_mode)
    assert mode & 0o077 == 0, f"{path} is {mode:04o}"
    proc = as_user(user, "head", "-c", "1", str(path))
    assert proc.returncode != 0 and "Permission denied" in proc.stderr, (path, proc)


@contextmanager
def traversable(*dirs: Path) -> Iterator[None]:
    """Open the folders above for traversal (0711) so that only the files' own modes protect them."""
    for d in dirs:
        assert stat.S_IMODE(os.lstat(d).st_mode) & 0o077 == 0, f"{d} is not private"
        os.chmod(d, 0o711)
    try:
        yield
    finally:
        for d in dirs:
            os.chmod(d, 0o700)


@pytest.fixture(scope="module")
def small_guest(image) -> Iterator[VM]:
    from memvirt.qemu.vm import start_vm

    vm = start_vm("sec-shared", image, memory=256 << 20, ram="shared")
    yield vm
    vm.stop(force=True)


@pytest.fixture
def public() -> Iterator[Path]:
    """A folder every user can write to (sticky, like /tmp)."""
    d = Path(f"/tmp/mvsec-public-{os.getpid()}")
    d.mkdir()
    os.chmod(d, 0o1777)
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=False)


def test_other_user_reads_no_guest_memory(small_guest: VM, other_user: pwd.struct_passwd, public: Path) -> None:
    vm = small_guest
    ram = Path(vm.config.ram_path)
    # Folders: private; the other user cannot even list them.
    for d in (ram_dir(), state_home(), vms_root(), vm.dir):
        assert stat.S_IMODE(os.lstat(d).st_mode) == 0o700, d
    assert as_user(other_user, "ls", str(ram_dir())).returncode != 0
    with traversable(state_home(), vms_root(), vm.dir, ram_dir()):
        assert_unreadable(other_user, ram)
        assert_unreadable(other_user, vm.dir / "vm.json")
        assert_unreadable(other_user, vm.serial_log)
    # A template: RAM 0400 and saved device state 0400, the user's read still refused.
    was = freeze(vm)
    try:
        assert stat.S_IMODE(ram.stat().st_mode) == 0o400
        assert stat.S_IMODE(state_file(vm).stat().st_mode) == 0o400
        with traversable(state_home(), vms_root(), vm.dir, ram_dir()):
            assert_unreadable(other_user, ram)
            assert_unreadable(other_user, state_file(vm))
    finally:
        unfreeze(vm, was)
    assert stat.S_IMODE(ram.stat().st_mode) == 0o600 and vm.status() == "running"
    # A dump into a folder everyone can write: 0600, and a symlink planted where it goes is replaced, not followed.
    victim = public / "victim"
    assert as_user(other_user, "sh", "-c", f"echo mine > {victim} && ln -s {victim} {public}/vm.raw").returncode == 0
    proc = memvirt("vm", "dump", vm.name, str(public / "vm.raw"), "--format", "raw")
    assert proc.returncode == 0, proc.stderr
    assert victim.read_text() == "mine\n"
    dump = public / "vm.raw"
    assert not dump.is_symlink() and dump.stat().st_size >= 256 << 20
    assert_unreadable(other_user, dump)
    for fmt in ("elf", "kdump-zlib"):
        assert memvirt("vm", "dump", vm.name, str(public / f"vm.{fmt}"), "--format", fmt).returncode == 0
        assert_unreadable(other_user, public / f"vm.{fmt}")
    assert vm.status() == "running" and vm.exec("echo ok").text.strip() == "ok"


def test_other_user_reads_no_lan_disk(other_user: pwd.struct_passwd) -> None:
    """The LAN's shared disk and a VM's store disk (made as for a LAN VM's QEMU, none started)."""
    vm = VM(VMConfig(name="sec-lan", memory=64 << 20, lan="sec-lan", lan_mac="02:00:00:00:00:01"))
    os.mkdir(vm.dir, 0o700)
    try:
        lan.qemu_args(vm)
        shared, store = lan.shared_disk("sec-lan"), lan.store_disk(vm)
        for d in (state_home() / "lans", lan.lan_dir("sec-lan")):
            assert stat.S_IMODE(os.lstat(d).st_mode) == 0o700, d
        with traversable(state_home(), vms_root(), vm.dir, state_home() / "lans", lan.lan_dir("sec-lan")):
            assert_unreadable(other_user, shared)
            assert_unreadable(other_user, store)
    finally:
        lan.release(vm, [])
        subprocess.run(["rm", "-rf", str(vm.dir)], check=False)


@pytest.mark.parametrize("plant", ["folder", "private-folder", "symlink", "open-folder"])
def test_planted_ram_folder_is_refused(plant: str, other_user: pwd.struct_passwd) -> None:
    """The other user makes the RAM folder first (open, private to it with a symlink where the RAM
    file goes, or a link to its own folder), or ours is open for writing: memvirt refuses in one
    line, starts nothing, writes nothing."""
    planted = Path("/dev/shm") / f"mvsec-plant-{os.getpid()}-{plant}"
    target = Path("/dev/shm") / f"mvsec-target-{os.getpid()}-{plant}"
    try:
        script = {
            "folder": f"mkdir -m 777 {planted}",
            "private-folder": f"mkdir -m 700 {planted} && ln -s {target} {planted}/sec-plant.ram",
            "symlink": f"mkdir -m 700 {target} && ln -s {target} {planted}",
        }.get(plant)
        if script:
            assert as_user(other_user, "sh", "-c", script).returncode == 0
        else:
            planted.mkdir()
            os.chmod(planted, 0o777)
        env = {**os.environ, "MEMVIRT_RAM_DIR": str(planted)}
        proc = subprocess.run(
            [sys.executable, "-m", "memvirt", "vm", "start", "sec-plant", "--memory", "64M"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        why = {
            "folder": f"belongs to uid {other_user.pw_uid}",
            "private-folder": f"belongs to uid {other_user.pw_uid}",
            "symlink": "is a symlink",
            "open-folder": "its mode 0777 lets other users write",
        }[plant]
        assert_one_line_error(proc, 2, str(planted), why)
        assert not (vms_root() / "sec-plant").exists()
        assert not target.exists() or not any(target.iterdir())
        assert plant == "symlink" or [p.name for p in planted.iterdir()] == (
            ["sec-plant.ram"] if plant == "private-folder" else []
        )
    finally:
        subprocess.run(["rm", "-rf", str(planted), str(target)], check=False)


# ---- a reclaim killed while it borrows a QEMU thread and holds the guest paused ----------------


@pytest.fixture(scope="module")
def anon_small(image) -> Iterator[VM]:
    from memvirt.qemu.vm import start_vm

    vm = start_vm("sec-anon", image, memory=384 << 20, ram="anonymous")
    vm.exec_background("datacheck write --size 32M --seed 5 --state /tmp/dc.state", "/tmp/dc.log")
    for _ in range(300):
        if vm.exec("test -e /tmp/dc.state").rc == 0:
            break
        time.sleep(0.2)
    yield vm
    vm.stop(force=True)


def _tracer(pid: int) -> int:
    found = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "status").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("TracerPid:"):
                found = max(found, int(line.split()[1]))
    return found


def _reclaim_in_borrow(vm: VM, hold: float) -> subprocess.Popen[str]:
    """A ``memvirt reclaim`` that is inside its borrow of a QEMU thread (guest paused) on return."""
    vm.exec(DIRTY, timeout=120).check("dirtying free memory")
    env = {**os.environ, "MEMVIRT_TEST_HOLD_BORROW": str(hold)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "memvirt", "reclaim", vm.name],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while _tracer(vm.config.pid) != proc.pid:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "reclaim never borrowed a QEMU thread"
        time.sleep(0.02)
    time.sleep(0.3)  # past pidfd_open, into the hold (QMP is reclaim's now: its mark says it paused the guest)
    assert (mark := read_mark(vm.dir / MARK)) is not None and mark.pid == proc.pid
    assert self_pidfds(vm.config.pid)
    return proc


def _assert_recovered(vm: VM, within: float) -> None:
    deadline = time.monotonic() + within
    while vm.status() != "running":
        assert vm.alive(), "QEMU died"
        assert time.monotonic() < deadline, f"guest still {vm.status()} after {within} s"
        time.sleep(0.1)
    assert _tracer(vm.config.pid) == 0
    deadline = time.monotonic() + 5
    while self_pidfds(vm.config.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert self_pidfds(vm.config.pid) == [], "a pidfd was left inside QEMU"
    assert not (vm.dir / MARK).exists()
    assert vm.exec("echo ok", timeout=30).text.strip() == "ok"
    assert vm.exec("datacheck verify --state /tmp/dc.state --timeout 60", timeout=90).rc == 0


def test_reclaim_sigkilled_mid_borrow(anon_small: VM) -> None:
    proc = _reclaim_in_borrow(anon_small, 60)
    proc.kill()
    proc.communicate()
    _assert_recovered(anon_small, 5)


def test_reclaim_interrupted_mid_borrow(anon_small: VM) -> None:
    """Ctrl-C waits for the thread to be given back; then reclaim resumes the guest and exits 130."""
    proc = _reclaim_in_borrow(anon_small, 2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    _assert_recovered(anon_small, 5)


def test_reclaim_watchdog_leaves_a_user_paused_guest(anon_small: VM) -> None:
    """A dead reclaim that had not marked the pause its own: the guest the user paused stays paused."""
    vm = anon_small
    dead = subprocess.Popen(["true"])
    dead.wait()
    vm.pause()
    try:
        mark_paused(vm.dir / MARK, vm, pid=1)  # a pause marked by another process
        subprocess.run(
            [sys.executable, "-m", "memvirt.dedup.watchdog", str(dead.pid), str(vm.dir / MARK)],
            timeout=60,
            check=True,
        )
        assert vm.status() == "paused"
        (vm.dir / MARK).unlink()
        subprocess.run(
            [sys.executable, "-m", "memvirt.dedup.watchdog", str(dead.pid), str(vm.dir / MARK)],
            timeout=60,
            check=True,
        )
        assert vm.status() == "paused"
    finally:
        (vm.dir / MARK).unlink(missing_ok=True)
        vm.resume()
