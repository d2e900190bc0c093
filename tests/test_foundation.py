"""The foundation on real guests: command channel, memory sources, VM lifecycle, bad input."""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest
from cli import assert_one_line_error, memvirt
from markers import mark, marker_pages

from memvirt.errors import BadImage
from memvirt.memory.ramfile import RamFileMemory
from memvirt.qemu.dump import dump_vm
from memvirt.qemu.vm import vm_memory
from memvirt.targets import open_memory


def test_channel_round_trip(guest):
    res = guest.exec("echo hello; echo err >&2; exit 3")
    assert res.rc == 3
    assert res.text == "hello\nerr\n"
    meminfo = guest.exec("cat /proc/meminfo").check("meminfo").text
    assert meminfo.startswith("MemTotal:")
    blob = guest.exec("head -c 65536 /dev/urandom > /tmp/blob; cat /tmp/blob").output
    digest = guest.exec("md5sum /tmp/blob").text.split()[0]
    import hashlib

    assert len(blob) == 65536 and hashlib.md5(blob).hexdigest() == digest


def test_cli_exec_and_status(guest):
    proc = memvirt("vm", "exec", guest.name, "--", "uname", "-r")
    assert proc.returncode == 0 and proc.stdout.strip() == guest.config.kernel_release
    proc = memvirt("vm", "exec", guest.name, "--", "false")
    assert proc.returncode == 1
    info = json.loads(memvirt("vm", "status", guest.name, "--json").stdout)
    assert info["status"] == "running" and info["memory"] == 512 << 20


def _assert_markers(mem, pfns: np.ndarray, seed: int) -> None:
    expect = marker_pages(seed, len(pfns))
    got = mem.read_pages(pfns)
    assert (got == expect).all(), f"{mem.describe()}: marker pages differ"
    for i, pfn in enumerate(pfns[:3].tolist()):
        assert (mem.read(pfn * 4096, 4096) == expect[i]).all()


def test_ram_file_reads_guest_marker(guest):
    pfns, pid = mark(guest, seed=0x1234, count=16)
    try:
        with vm_memory(guest) as mem:
            assert isinstance(mem, RamFileMemory)
            _assert_markers(mem, pfns, 0x1234)
    finally:
        guest.exec(f"kill {pid}")


def test_proc_mem_reads_guest_marker(anon_guest):
    pfns, pid = mark(anon_guest, seed=0x777, count=16)
    try:
        with vm_memory(anon_guest) as mem:
            assert mem.kind == "process memory"
            _assert_markers(mem, pfns, 0x777)
        with open_memory(f"pid:{anon_guest.config.pid}") as mem:
            _assert_markers(mem, pfns, 0x777)
    finally:
        anon_guest.exec(f"kill {pid}")


@pytest.mark.parametrize("fmt", ["elf", "kdump-zlib", "raw"])
def test_dump_reads_guest_marker(guest, tmp_path, fmt):
    pfns, pid = mark(guest, seed=0xD00 + len(fmt), count=8)
    try:
        path = dump_vm(guest, tmp_path / f"guest.{fmt}", fmt)
        assert guest.status() == "running"
        with open_memory(str(path)) as mem:
            _assert_markers(mem, pfns, 0xD00 + len(fmt))
            if fmt != "raw":
                assert (
                    mem.vmcoreinfo is not None
                    and b"OSRELEASE=" + guest.config.kernel_release.encode() in mem.vmcoreinfo
                )
    finally:
        guest.exec(f"kill {pid}")


def test_4g_guest_marker_above_4g(vm_factory, image):
    vm = vm_factory("big", image, memory=4096 << 20)
    pfns, _ = mark(vm, seed=0x4444, count=64)
    assert vm.regions[1].gpa == 1 << 32, vm.regions
    assert (pfns >= 1 << 20).any(), "expected the guest to place some pages above 4 GiB"
    with vm_memory(vm) as mem:
        _assert_markers(mem, pfns, 0x4444)
        present = mem.populated_pfns()
        assert present[pfns].all()
        assert not present[(3 << 18) : (4 << 18)].any(), "the PCI hole must not be RAM"


def test_killed_vm_is_reported_dead(vm_factory, image):
    vm = vm_factory("doomed", image, memory=256 << 20)
    os.kill(vm.config.pid, signal.SIGKILL)
    for _ in range(50):
        if vm.status() == "dead":
            break
        time.sleep(0.1)
    assert vm.status() == "dead"
    proc = memvirt("vm", "status", "doomed")
    assert proc.returncode == 1 and "dead" in proc.stdout
    listing = json.loads(memvirt("vm", "list", "--json").stdout)
    assert {"name": "doomed", "status": "dead"}.items() <= next(v for v in listing if v["name"] == "doomed").items()
    assert_one_line_error(memvirt("vm", "exec", "doomed", "--", "true"), 1, "dead")
    assert memvirt("vm", "stop", "doomed").returncode == 0
    assert_one_line_error(memvirt("vm", "status", "doomed"), 2, "no VM named")


def test_bad_input_gets_one_line_errors(tmp_path):
    assert_one_line_error(memvirt("image", "build", "--kernel", str(tmp_path / "nope")), 2, "does not exist")
    junk = tmp_path / "vmlinuz-junk"
    junk.write_bytes(os.urandom(4096))
    assert_one_line_error(memvirt("image", "build", "--kernel", str(junk)), 2, "bzImage")
    assert_one_line_error(memvirt("vm", "status", "no-such-vm"), 2, "no VM named")
    assert_one_line_error(memvirt("vm", "start", "bad/name"), 2, "invalid VM name")
    assert_one_line_error(memvirt("mem", "info", str(tmp_path / "missing.elf")), 2, "does not exist")
    odd = tmp_path / "odd.raw"
    odd.write_bytes(b"x" * 5000)
    assert_one_line_error(memvirt("mem", "info", str(odd)), 2, "4 KiB pages")
    small = tmp_path / "small.ram"
    small.write_bytes(b"\0" * (1 << 20))
    assert_one_line_error(memvirt("mem", "info", str(small), "--format", "ramfile", "--ram-size", "4G"), 2, "4096 MiB")
    assert_one_line_error(memvirt("mem", "info", "pid:999999999"), 2, "no process")


def test_corrupt_and_truncated_dumps(guest, tmp_path):
    path = dump_vm(guest, tmp_path / "guest.elf", "elf")
    data = path.read_bytes()
    cut = tmp_path / "cut.elf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImage, match="truncated"):
        open_memory(str(cut))
    assert_one_line_error(memvirt("mem", "info", str(cut)), 2, "truncated")
    kd = dump_vm(guest, tmp_path / "guest.kdump", "kdump-zlib")
    kcut = tmp_path / "cut.kdump"
    kcut.write_bytes(kd.read_bytes()[:20000])
    assert_one_line_error(memvirt("mem", "info", str(kcut)), 2, "truncated")
