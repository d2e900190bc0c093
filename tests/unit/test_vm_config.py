"""``vm.json``: the typed config survives a save and load, files written before the typed fields
(the ``extra`` dict) still load, and one corrupt file hides no other VM from the registry."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli import assert_one_line_error, memvirt

from memvirt.errors import VMError
from memvirt.qemu.config import Frozen, Migrated, VMConfig, Workload
from memvirt.qemu.vm import VM, lan_members, vms_root

OLD = {
    "name": "old",
    "memory": 512 << 20,
    "cpus": 2,
    "ram": "shared",
    "image": "/cache/images/debian-6.1",
    "kernel_release": "6.1.0-28-amd64",
    "accel": "tcg",
    "append": "",
    "pid": 4242,
    "ram_path": "/dev/shm/memvirt/old.ram",
    "regions": [{"gpa": 0, "size": 512 << 20, "offset": 0}],
    "started": 1_700_000_000.5,
    "extra": {
        "memcg": "/sys/fs/cgroup/memvirt/old",
        "lan_ip": "10.77.0.2",
        "lan_mac": "02:aa:bb:cc:dd:ee",
        "lan_guest_mac": "02:11:22:33:44:55",
        "ram_file_mode": 0o600,
        "frozen": {"at": 1_700_000_100.0, "was": "running"},
        "workload": {"command": "memtouch --hot 64M", "pid": 321, "log": "/tmp/workload.log"},
        "incoming_by": 777,
        "migrated_from": "src",
        "migrated_at": 1_700_000_050.0,
    },
    "role": "template",
    "clone_of": "",
    "backing": "",
    "lan": "lan1",
}


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("MEMVIRT_HOME", str(tmp_path))
    return tmp_path


def write(name: str, data: object) -> None:
    d = vms_root() / name
    d.mkdir(mode=0o700)
    (d / "vm.json").write_text(data if isinstance(data, str) else json.dumps(data))


def test_round_trip_keeps_every_field(home: Path) -> None:
    config = VMConfig(
        name="vm1",
        memory=1 << 30,
        cpus=2,
        ram="cow",
        backing="/dev/shm/t.ram",
        clone_of="t",
        regions=[{"gpa": 0, "size": 1 << 30, "offset": 0}],
        lan="l",
        lan_ip="10.77.0.3",
        lan_mac="02:00:00:00:00:03",
        memcg="/sys/fs/cgroup/x",
        frozen=Frozen(1.5, "paused", 0o640),
        workload=Workload("memtouch", 12, "/tmp/w.log"),
        migrated=Migrated("src", 2.5, "pm"),
        incoming_by=99,
    )
    vm = VM(config)
    vm.dir.mkdir(mode=0o700)
    vm.save()
    assert (vm.dir / "vm.json").stat().st_mode & 0o777 == 0o600
    assert "extra" not in json.loads((vm.dir / "vm.json").read_text())
    assert VM.load("vm1").config == config


def test_old_extra_dict_loads_onto_the_typed_fields(home: Path) -> None:
    write("old", OLD)
    c = VM.load("old").config
    assert (c.memcg, c.lan_ip, c.lan_mac, c.lan_guest_mac) == (
        "/sys/fs/cgroup/memvirt/old",
        "10.77.0.2",
        "02:aa:bb:cc:dd:ee",
        "02:11:22:33:44:55",
    )
    assert c.frozen == Frozen(1_700_000_100.0, "running", 0o600)
    assert c.workload == Workload("memtouch --hot 64M", 321, "/tmp/workload.log")
    assert c.migrated == Migrated("src", 1_700_000_050.0, "migrate")
    assert c.incoming_by == 777
    assert (c.name, c.memory, c.cpus, c.pid, c.role, c.lan) == ("old", 512 << 20, 2, 4242, "template", "lan1")
    VM(c).save()  # written back in the typed form, read the same
    assert VM.load("old").config == c


def test_old_pm_origin_and_missing_extra(home: Path) -> None:
    pm = {k: v for k, v in OLD.items() if k != "extra"} | {
        "name": "moved",
        "extra": {"pm_migrated_from": {"name": "src", "at": 5.0}},
    }
    write("moved", pm)
    assert VM.load("moved").config.migrated == Migrated("src", 5.0, "pm")
    write("bare", {"name": "bare", "memory": 64 << 20})  # the oldest files had few keys
    bare = VM.load("bare").config
    assert (bare.ram, bare.frozen, bare.workload, bare.migrated, bare.incoming_by) == ("shared", None, None, None, 0)


def test_unknown_keys_of_a_newer_memvirt_are_ignored(home: Path) -> None:
    write("newer", {"name": "newer", "memory": 64 << 20, "balloon": {"size": 1}})
    assert VM.load("newer").config.memory == 64 << 20


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "[1, 2]",
        json.dumps({"name": "x"}),  # no memory
        json.dumps({"name": "x", "memory": "lots"}),
        json.dumps({"name": "x", "memory": 1, "ram": "balloon"}),
        json.dumps({"name": "x", "memory": 1, "frozen": 3}),
        json.dumps({"name": "x", "memory": 1, "workload": {"command": "w"}}),
        json.dumps({"name": "x", "memory": 1, "extra": []}),
    ],
)
def test_a_corrupt_file_is_one_vm_error(home: Path, text: str) -> None:
    write("x", text)
    with pytest.raises(VMError, match=r"state of VM 'x' is corrupt .*'memvirt vm stop x' cleans it up"):
        VM.load("x")


def test_registry_skips_a_corrupt_vm_with_a_warning(home: Path, caplog: pytest.LogCaptureFixture) -> None:
    write("a-good", {"name": "a-good", "memory": 64 << 20, "lan": "l1"})
    write("b-broken", "{not json")
    write("c-good", {"name": "c-good", "memory": 64 << 20, "lan": "l1", "role": "template"})
    (vms_root() / "d-empty").mkdir()  # a folder without vm.json is no VM
    with caplog.at_level(logging.WARNING, logger="memvirt"):
        assert [v.name for v in VM.all()] == ["a-good", "c-good"]
        assert [v.name for v in lan_members("l1")] == ["a-good", "c-good"]
        assert VM.load("c-good").lazy_clones() == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and all("skipping VM b-broken: state of VM 'b-broken' is corrupt" in w for w in warnings)


def test_vm_list_shows_the_others_and_warns_once(home: Path) -> None:
    write("a-good", {"name": "a-good", "memory": 64 << 20})
    write("b-broken", "{not json")
    proc = memvirt("vm", "list", "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [v["name"] for v in json.loads(proc.stdout)] == ["a-good"]
    assert proc.stderr.count("memvirt: warning: skipping VM b-broken") == 1
    assert_one_line_error(memvirt("vm", "status", "b-broken", timeout=120), 1, "is corrupt")


def test_reaper_stops_the_others_past_a_corrupt_vm(home: Path) -> None:
    from memvirt.qemu import reaper

    write("t-a", {"name": "t-a", "memory": 64 << 20})  # dead (pid 0): stopping removes its state
    write("t-b", "{not json")
    write("t-c", {"name": "t-c", "memory": 64 << 20})
    write("u-a", {"name": "u-a", "memory": 64 << 20})
    assert reaper.reap("t") == ["t-a", "t-c"]
    assert sorted(p.name for p in vms_root().iterdir()) == ["t-b", "u-a"]


def test_the_pause_lock_admits_one_pauser_at_a_time(home: Path) -> None:
    """A reclaim batch and a migration's switch-over never both pause (and resume) one guest: a
    second holder, here another process, waits its bound and fails with one line; the lock is
    free again once the first lets go, and a VM whose folder is gone is a VMError, not OSError."""
    vm = VM(VMConfig(name="vm1", memory=1 << 30, cpus=1))
    vm.dir.mkdir(mode=0o700)
    code = (
        "import sys, time; from memvirt.qemu.vm import VM; "
        "VM.load('vm1').hold_pauses(); print('held', flush=True); time.sleep(60)"
    )
    vm.save()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with pytest.raises(VMError, match="stayed paused by another memvirt operation"):
            vm.hold_pauses(wait=0.2)
    finally:
        proc.kill()
        proc.wait()
    os.close(vm.hold_pauses(wait=5))
    shutil.rmtree(vm.dir)
    with pytest.raises(VMError, match="is gone"):
        vm.hold_pauses(wait=0.2)
