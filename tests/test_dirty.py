"""Dirty-page tracking on real guests: ``physaddr`` writes known pages, the tracker must name them.

Uses the session guests (shared-file and anonymous RAM); about a minute beside their boot.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from cli import assert_one_line_error, memvirt
from markers import mark

from memvirt.memory.source import PAGE_SIZE
from memvirt.procs import pid_alive
from memvirt.qemu.dirty import stray_uffds, track, uffd_holds
from memvirt.qemu.vm import VM

pytestmark = pytest.mark.guest

RAM_PAGES = (512 << 20) // PAGE_SIZE
DATACHECK = "/tmp/dirty-datacheck.state"


def holds(vm: VM) -> list[str]:
    start, size = vm.ram_mapping()
    return uffd_holds(vm.config.pid, start, start + size)


def wait_for(cond, timeout: float = 20.0, what: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("which", ["guest", "anon_guest"])
def test_the_tracker_reports_the_pages_the_guest_writes(request: pytest.FixtureRequest, which: str) -> None:
    vm: VM = request.getfixturevalue(which)
    t = track(vm)
    try:
        assert t.method == "uffd-wp" and not t.notice
        assert holds(vm) == ["write-protect"]
        time.sleep(1.0)
        background = len(t.scan())  # what an idle guest writes in a second (timers, the agent)
        t0 = time.monotonic()
        pfns, pid = mark(vm, seed=0xD1127 + len(which), count=2000)
        elapsed = time.monotonic() - t0
        written = t.scan()
        assert len(np.setdiff1d(pfns, written)) == 0, "a page the guest wrote was not reported"
        extra = len(np.setdiff1d(written, pfns))
        assert extra <= 1000 + 2 * background * max(1.0, elapsed), (extra, background, elapsed)
        assert np.all(np.diff(written) > 0) and written[-1] < RAM_PAGES, "sorted guest frames within RAM"
        t.scan()
        time.sleep(0.2)
        quiet = len(t.scan())
        assert quiet < RAM_PAGES // 100 and quiet <= 2 * background + 100, (
            f"nothing written by the test, yet {quiet} pages reported ({background}/s idle)"
        )
        vm.exec(f"kill {pid}")
    finally:
        t.close()
    assert holds(vm) == [], "closing the tracker unregisters QEMU's RAM"


def test_the_fingerprint_fallback_reports_the_changed_pages(guest: VM) -> None:
    t = track(guest, "fingerprint")
    try:
        assert t.method == "fingerprint" and holds(guest) == []
        pfns, pid = mark(guest, seed=0xF1F1, count=500)
        changed = t.scan()
        assert len(np.setdiff1d(pfns, changed)) == 0
        assert len(changed) < RAM_PAGES // 10
        guest.exec(f"kill {pid}")
    finally:
        t.close()


def test_auto_falls_back_with_a_notice_where_the_kernel_lacks_pagemap_scan(
    guest: VM, monkeypatch: pytest.MonkeyPatch
) -> None:
    import memvirt.qemu.dirty as dirty

    monkeypatch.setattr(dirty, "pagemap_scan_supported", lambda: False)
    t = track(guest)
    try:
        assert t.method == "fingerprint" and "no PAGEMAP_SCAN" in t.notice and "fingerprints instead" in t.notice
        assert holds(guest) == [], "nothing registered when falling back"
    finally:
        t.close()
    with pytest.raises(dirty.Unsupported, match="PAGEMAP_SCAN"):
        track(guest, "uffd-wp")


def test_tracking_never_changes_what_the_guest_computes_and_json(guest: VM) -> None:
    """datacheck writes 32 MiB while ``memvirt dirty`` scans every 0.1 s, then verifies them."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "memvirt", "dirty", guest.name, "--interval", "0.1", "--duration", "8", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: holds(guest) == ["write-protect"] or proc.poll() is not None, what="tracking to start")
        assert proc.poll() is None, proc.communicate()
        pid = guest.exec_background(f"datacheck write --size 32M --seed 16 --state {DATACHECK}", "/tmp/dirty-dc.log")
        wait_for(lambda: guest.exec(f"test -e {DATACHECK}").rc == 0, 60, "datacheck to write")
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "memvirt: error" not in stderr, stderr
    report = json.loads(stdout)
    assert report["vm"] == guest.name and report["method"] == "uffd-wp" and report["page_size"] == PAGE_SIZE
    rows = report["intervals"]
    assert 40 <= len(rows) <= 81 and abs(report["seconds"] - 8) < 1.0
    assert report["written_bytes"] >= 32 << 20, "datacheck's 32 MiB were written while tracked"
    assert report["written_pages"] == sum(b - a for a, b in report["written_set"])
    assert rows[-1]["set_pages"] == report["written_pages"]
    assert sum(r["pages"] for r in rows) == report["scanned_pages_total"] >= report["written_pages"]
    assert max(r["bytes_per_s"] for r in rows) == report["peak_bytes_per_s"] > 0
    assert all(r["pages"] * PAGE_SIZE == r["bytes"] and r["new_pages"] <= r["pages"] for r in rows)
    res = guest.exec(f"datacheck verify --state {DATACHECK}", timeout=120)
    assert res.rc == 0 and res.text.startswith("OK"), res.text
    guest.exec(f"kill {pid}")
    assert holds(guest) == []


def test_a_sigkilled_memvirt_dirty_leaves_qemu_running_and_nothing_registered(anon_guest: VM) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "memvirt", "dirty", anon_guest.name, "--interval", "0.05"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "written" in line and "pages/s" in line, line
        assert holds(anon_guest) == ["write-protect"]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    wait_for(lambda: holds(anon_guest) == [], 5, "the registration to go")
    assert pid_alive(anon_guest.config.pid) and anon_guest.status() == "running"
    assert stray_uffds(anon_guest.config.pid) == []
    assert anon_guest.exec("echo alive").text.strip() == "alive"
    t = track(anon_guest)  # tracked again at once
    try:
        assert t.method == "uffd-wp"
    finally:
        t.close()


def test_refusals_and_errors_are_one_line(guest: VM) -> None:
    assert_one_line_error(memvirt("dirty", "no-such-vm"), 2, "no VM named 'no-such-vm'")
    assert_one_line_error(memvirt("dirty", guest.name, "--interval", "0"), 2, "--interval")
    assert_one_line_error(memvirt("dirty", guest.name, "--duration", "-1"), 2, "--duration")
    assert_one_line_error(memvirt("dirty", guest.name, "--method", "soft-dirty"), 2, "--method")
    assert_one_line_error(memvirt("dirty", guest.name, "--plot", "/nonexistent/x.png"), 2, "--plot")
    t = track(guest)
    try:
        assert_one_line_error(memvirt("dirty", guest.name, "--duration", "1"), 1, "already registered")
    finally:
        t.close()
    fd = os.open(guest.config.ram_path, os.O_RDWR)  # as a vhost-user backend or a hole puncher would
    try:
        assert_one_line_error(
            memvirt("dirty", guest.name, "--duration", "1"),
            1,
            f"process {os.getpid()} ",
            "has it open for writing",
            "not tracked",
        )
    finally:
        os.close(fd)
    assert holds(guest) == []


def test_a_writer_appearing_while_tracking_ends_it(guest: VM, monkeypatch: pytest.MonkeyPatch) -> None:
    import memvirt.qemu.dirty as dirty

    t = track(guest)
    try:
        t.scan()
        monkeypatch.setattr(dirty, "WRITERS_EVERY", 0.0)
        t.scan()  # looked again: nobody
        fd = os.open(guest.config.ram_path, os.O_RDWR)
        try:
            with pytest.raises(dirty.VMError, match="can be written outside QEMU"):
                t.scan()
        finally:
            os.close(fd)
    finally:
        t.close()
    assert holds(guest) == []


def test_the_cli_can_be_told_to_compare_fingerprints(anon_guest: VM) -> None:
    proc = memvirt(
        "dirty", anon_guest.name, "--method", "fingerprint", "--interval", "0.5", "--duration", "1", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["method"] == "fingerprint" and 1 <= len(report["intervals"]) <= 2  # a pass takes ~0.5 s here
    assert report["written_pages"] > 0, "an idle guest still changes some pages"
    assert holds(anon_guest) == []


def test_plot_and_rows(guest: VM, tmp_path) -> None:  # type: ignore[no-untyped-def]
    png = tmp_path / "dirty.png"
    proc = memvirt("dirty", guest.name, "--interval", "0.25", "--duration", "1", "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stderr.splitlines() if "pages/s" in line]
    assert len(rows) == 4, proc.stderr
    assert "uffd-wp" in proc.stdout and f"plot: {png}" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
