"""Lazy cloning on real guests: one 384 MiB guest is booted, frozen as a template and cloned.

The tests run in file order on that module's template: its clones continue from its state, a
write in one clone reaches neither the template nor another clone, the template is guarded while
clones live, clones of clones, bad input, failed starts that leave nothing behind, and finally
the template un-frozen once its clones are gone.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import xxhash
from cli import assert_one_line_error, memvirt
from markers import mark, marker_pages

from memvirt.clone.memory import mapping_usage
from memvirt.clone.template import state_file
from memvirt.memory.open import open_memory
from memvirt.qemu.vm import VM, start_vm, vms_root

pytestmark = pytest.mark.guest

TEMPLATE = "cl-tpl"
MEMORY = 384 << 20
COUNTER = "/tmp/memtouch.count"
DATACHECK = "/tmp/datacheck.state"


def counter(vm: VM) -> int:
    return int(vm.exec(f"cat {COUNTER}").check("reading the memtouch counter").text)


def file_digest(path: str) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def holds_tag(mem, seed: int) -> bool:
    """Whether any page of ``mem`` carries physaddr's marker tag for ``seed``."""
    tag = b"MEMVIRT_%08x" % (seed & 0xFFFFFFFF)
    return any(tag in chunk.tobytes() for _gpa, chunk in mem.chunks(32 << 20))


def qemu_pids_named(name: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"-name" in argv and argv[argv.index(b"-name") + 1 : argv.index(b"-name") + 2] == [name.encode()]:
                pids.append(int(d.name))
    return pids


@pytest.fixture(scope="module")
def template(image) -> Iterator[dict]:
    """The template and two lazy clones made through the CLI, with what the source showed before."""
    vm = start_vm(TEMPLATE, image, memory=MEMORY)
    try:
        vm.exec_background(f"memtouch --hot 4M --cold 16M --counter-file {COUNTER}", "/tmp/memtouch.log")
        vm.exec_background(f"datacheck write --size 24M --seed 77 --state {DATACHECK}", "/tmp/datacheck.log")
        for _ in range(100):
            if vm.exec(f"test -s {COUNTER} && test -e {DATACHECK}").rc == 0:
                break
            time.sleep(0.2)
        pids = vm.exec("pidof memtouch; pidof datacheck").check("pidof").text.split()
        before = counter(vm)
        time.sleep(0.5)
        assert counter(vm) > before, "memtouch does not count in the source"
        proc = memvirt("clone", TEMPLATE, "--count", "2", "--prefix", "cl-a", "--json")
        assert proc.returncode == 0, proc.stderr
        yield {"vm": VM.load(TEMPLATE), "counter": before, "pids": pids, "report": json.loads(proc.stdout)}
    finally:
        for v in VM.all():
            if v.config.clone_of:
                v.stop(force=True)
        VM.load(TEMPLATE).stop(force=True) if (vms_root() / TEMPLATE).exists() else None


def test_clone_report_and_relations(template, monkeypatch):
    report, tpl = template["report"], template["vm"]
    assert report["template"] == TEMPLATE and report["frozen_now"] is True
    assert 0 < report["state_bytes"] < 4 << 20, "x-ignore-shared must keep RAM out of the saved state"
    assert [c["name"] for c in report["clones"]] == ["cl-a-1", "cl-a-2"]
    for c in report["clones"]:
        assert c["lazy"] and c["copied_bytes"] == 0 and 0 < c["seconds"] < 10 and c["guest_seconds"] > 0
        assert VM.load(c["name"]).status() == "running" and VM.load(c["name"]).config.pid == c["pid"]
    assert tpl.status() == "postmigrate" and tpl.is_template
    assert stat.S_IMODE(os.stat(tpl.config.ram_path).st_mode) == 0o400
    listing = {v["name"]: v for v in json.loads(memvirt("vm", "list", "--json").stdout)}
    assert listing[TEMPLATE]["role"] == "template" and listing[TEMPLATE]["clones"] == ["cl-a-1", "cl-a-2"]
    assert listing["cl-a-1"]["clone_of"] == TEMPLATE and listing["cl-a-1"]["lazy"] is True
    monkeypatch.setenv("COLUMNS", "200")  # at 80 a 5-digit pid wraps "lazy clone of" in the ROLE column
    text = memvirt("vm", "list").stdout
    assert "template" in text and "lazy clone" in text


def test_clones_continue_from_template(template):
    for name in ("cl-a-1", "cl-a-2"):
        vm = VM.load(name)
        first = counter(vm)
        assert first >= template["counter"], "the clone's counter restarted instead of continuing"
        time.sleep(0.5)
        assert counter(vm) > first, "memtouch is not running in the clone"
        assert vm.exec("pidof memtouch; pidof datacheck").text.split() == template["pids"]
        res = vm.exec(f"datacheck verify --state {DATACHECK}", timeout=120)
        assert res.rc == 0 and res.text.startswith("OK"), res.text
        assert vm.exec("hostname").text.strip() == name


def test_writes_stay_private(template):
    tpl = template["vm"]
    a, b = VM.load("cl-a-1"), VM.load("cl-a-2")
    digest = file_digest(tpl.config.ram_path)
    priv_before = mapping_usage(a.config.pid, a.config.backing, MEMORY)["private"]
    pfns_a, pid_a = mark(a, seed=0xA11CE, count=32)
    pfns_b, pid_b = mark(b, seed=0xB0B, count=32)
    try:
        with a.memory() as mem_a, b.memory() as mem_b, open_memory(tpl.config.ram_path) as mem_t:
            assert (mem_a.read_pages(pfns_a) == marker_pages(0xA11CE, 32)).all(), "clone A's own write is not readable"
            assert (mem_b.read_pages(pfns_b) == marker_pages(0xB0B, 32)).all()
            rss_b = mapping_usage(b.config.pid, b.config.backing, MEMORY)["rss"]
            blocks = os.stat(tpl.config.ram_path).st_blocks
            assert not (mem_t.read_pages(pfns_a) == marker_pages(0xA11CE, 32)).all(axis=1).any()
            assert not holds_tag(mem_t, 0xA11CE) and not holds_tag(mem_t, 0xB0B), "a clone's write reached the template"
            assert not holds_tag(mem_b, 0xA11CE), "clone A's write is visible in clone B"
            assert not holds_tag(mem_a, 0xB0B), "clone B's write is visible in clone A"
            grown = mapping_usage(b.config.pid, b.config.backing, MEMORY)["rss"] - rss_b
            assert grown < 32 << 20, f"reading clone B faulted {grown >> 20} MiB into it"
            filled = (os.stat(tpl.config.ram_path).st_blocks - blocks) * 512
            assert filled < 8 << 20, f"reading the clones allocated {filled >> 20} MiB of the template's holes"
        assert mapping_usage(a.config.pid, a.config.backing, MEMORY)["private"] >= priv_before + 32 * 4096
        assert file_digest(tpl.config.ram_path) == digest, "the template's RAM file changed"
    finally:
        a.exec(f"kill {pid_a}")
        b.exec(f"kill {pid_b}")


def test_template_is_guarded(template):
    assert_one_line_error(memvirt("vm", "stop", TEMPLATE), 2, "2 running lazy clone(s)", "--force")
    assert_one_line_error(memvirt("vm", "resume", TEMPLATE), 2, "would corrupt them")
    assert_one_line_error(memvirt("vm", "exec", TEMPLATE, "--", "true"), 2, "frozen template")
    assert template["vm"].status() == "postmigrate"


def test_clone_of_clone(template):
    assert_one_line_error(memvirt("clone", "cl-a-1"), 2, "is a lazy clone of 'cl-tpl'", "--eager")
    proc = memvirt("clone", TEMPLATE, "--eager", "--prefix", "cl-e", "--json")
    assert proc.returncode == 0, proc.stderr
    eager = VM.load("cl-e-1")
    c = json.loads(proc.stdout)["clones"][0]
    assert not c["lazy"] and c["copied_bytes"] > 0 and eager.config.ram == "shared"
    assert eager.config.ram_path != template["vm"].config.ram_path and os.path.exists(eager.config.ram_path)
    assert counter(eager) >= template["counter"]
    proc = memvirt("clone", "cl-e-1", "--prefix", "cl-ee", "--json")
    assert proc.returncode == 0, proc.stderr
    grand = VM.load("cl-ee-1")
    assert grand.config.backing == eager.config.ram_path and VM.load("cl-e-1").is_template
    res = grand.exec(f"datacheck verify --state {DATACHECK}", timeout=120)
    assert res.rc == 0 and res.text.startswith("OK"), res.text
    assert_one_line_error(memvirt("vm", "stop", "cl-e-1"), 2, "cl-ee-1")
    assert memvirt("vm", "stop", "cl-ee-1").returncode == 0
    assert memvirt("vm", "stop", "cl-e-1").returncode == 0
    assert not os.path.exists(eager.config.ram_path)


def test_bad_input(template):
    assert_one_line_error(memvirt("clone", "no-such-vm"), 2, "no VM named")
    assert_one_line_error(memvirt("clone", TEMPLATE, "--count", "0"), 2, "--count")
    assert_one_line_error(memvirt("clone", TEMPLATE, "--prefix", "cl-a"), 2, "'cl-a-1' already exists")
    assert_one_line_error(memvirt("clone", TEMPLATE, "--prefix", "bad/name"), 2, "invalid VM name")
    proc = memvirt("clone", TEMPLATE, "--eager", "--prefix", "cl-dead", "--no-wait")
    assert proc.returncode == 0, proc.stderr
    dead = VM.load("cl-dead-1")
    os.kill(dead.config.pid, signal.SIGKILL)
    for _ in range(50):
        if not dead.alive():
            break
        time.sleep(0.1)
    assert_one_line_error(memvirt("clone", "cl-dead-1"), 2, "not running")
    assert memvirt("vm", "stop", "cl-dead-1").returncode == 0


def _assert_no_trace(name: str) -> None:
    assert not (vms_root() / name).exists(), f"state of {name} left behind"
    assert not any(p.name.startswith(name) for p in Path(os.environ["MEMVIRT_RAM_DIR"]).iterdir())
    assert qemu_pids_named(name) == [], f"QEMU of {name} left running"


@pytest.mark.parametrize("eager", [False, True], ids=["lazy", "eager"])
def test_failed_clone_leaves_nothing(template, eager):
    tpl = template["vm"]
    state = state_file(tpl)
    saved = state.read_bytes()
    digest = file_digest(tpl.config.ram_path)
    name = f"cl-fail-{'e' if eager else 'l'}"
    try:
        state.write_bytes(saved[: len(saved) // 2])
        proc = memvirt("clone", TEMPLATE, "--prefix", name, *(["--eager"] if eager else []))
        assert_one_line_error(proc, 1, f"clone '{name}-1'")
    finally:
        state.write_bytes(saved)
    _assert_no_trace(f"{name}-1")
    assert tpl.status() == "postmigrate" and file_digest(tpl.config.ram_path) == digest
    assert VM.load("cl-a-1").exec("echo alive").text == "alive\n"


def test_failed_first_clone_unfreezes_source(template, monkeypatch):
    proc = memvirt("clone", TEMPLATE, "--eager", "--prefix", "cl-src2", "--no-wait")
    assert proc.returncode == 0, proc.stderr
    src = VM.load("cl-src2-1")
    try:
        monkeypatch.setenv("MEMVIRT_QEMU", "false")
        assert_one_line_error(memvirt("clone", "cl-src2-1"), 1, "QEMU failed to start clone 'cl-src2-1-clone-1'")
        monkeypatch.delenv("MEMVIRT_QEMU")
        src = VM.load("cl-src2-1")
        assert not src.is_template and src.status() == "running"
        assert not state_file(src).exists()
        assert stat.S_IMODE(os.stat(src.config.ram_path).st_mode) & 0o200
        _assert_no_trace("cl-src2-1-clone-1")
    finally:
        src.stop(force=True)


def test_template_unfreezes_when_clones_are_gone(template):
    for name in ("cl-a-1", "cl-a-2"):
        assert memvirt("vm", "stop", name).returncode == 0
    assert memvirt("vm", "resume", TEMPLATE).returncode == 0
    tpl = VM.load(TEMPLATE)
    assert tpl.status() == "running" and not tpl.is_template and not state_file(tpl).exists()
    assert stat.S_IMODE(os.stat(tpl.config.ram_path).st_mode) == 0o600
    with tpl.monitor() as mon:
        caps = {c["capability"]: c["state"] for c in mon.command("query-migrate-capabilities")}
    assert caps["x-ignore-shared"] is False, "an unfrozen VM must migrate its RAM again"
    first = counter(tpl)
    time.sleep(0.5)
    assert counter(tpl) > first >= template["counter"]
    assert np.asarray(json.loads(memvirt("vm", "status", TEMPLATE, "--json").stdout)["clones"]).size == 0
