"""memvirtd on real guests: three VMs under different policies from one config, metrics that
agree with ``memvirt inspect`` and /proc, VMs picked up and dropped while it runs, SIGHUP with a
bad config, SIGKILL leaving every guest running, uncapped and unpaused, a restart adopting, and
systemd's notify protocol.

One daemon runs through the module (the steps are ordered); guests: the session's ``guest``
(shared RAM) and ``anon_guest``, one small VM booted mid-run, and an outside QEMU that never
boots (``-S``, attached by its QMP socket: the policies fail on it and must not harm the rest).
KSM is switched on only by the daemon under test, within its budget, and must come back as found.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from memvirt.compress.wss import smaps_fields
from memvirt.daemon import control
from memvirt.dedup import ksm, watchdog
from memvirt.paths import state_home
from memvirt.qemu.memcg import UNLIMITED
from memvirt.qemu.vm import VM

pytestmark = pytest.mark.guest

ROOT = Path(__file__).parents[1]
CAP = 2 << 30
CONFIG = f"""
interval = 2
guest_free_every = 2

[reclaim]
enabled = false

[compress]
policy = "measure"
interval = 1

[ksm]
enabled = true
ksmd_cpu = "2%"
max_pages_to_scan = 200

[[vm]]
match = "shared-*"
[vm.reclaim]
enabled = true
every = 5
[vm.compress]
policy = "static"
limit = {CAP}

[[vm]]
match = "late-*"
[vm.reclaim]
enabled = true
every = 5
[vm.compress]
policy = "off"
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


class Daemon:
    """``python -m memvirt daemon`` as a child, with a NOTIFY_SOCKET the test reads."""

    def __init__(self, tmp: Path, config: Path):
        self.tmp, self.config = tmp, config
        self.sock = tmp / "control.sock"
        self.log = tmp / "memvirtd.log"
        self.notify_path = tmp / f"notify-{time.monotonic_ns()}"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify.settimeout(90)
        env = {**_env(), "NOTIFY_SOCKET": str(self.notify_path)}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "memvirt",
                "daemon",
                "--config",
                str(config),
                "--metrics",
                "127.0.0.1:0",
                "--socket",
                str(self.sock),
            ],
            env=env,
            stderr=open(self.log, "a"),
            stdout=subprocess.DEVNULL,
        )
        self.ready = self.notify.recv(4096).decode()
        self.url = self.status()["metrics"]

    def status(self) -> dict:
        return control.query(self.sock)

    def vm(self, name: str) -> dict | None:
        return next((v for v in self.status()["vms"] if v["vm"] == name), None)

    def metrics(self) -> dict[tuple[str, str], float]:
        """{(sample name, vm label or ''): value}."""
        text = urllib.request.urlopen(self.url, timeout=10).read().decode()
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, s.labels.get("vm", ""))] = s.value
        return out

    def wait(self, what: str, cond, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the daemon died: {self.log.read_text()[-2000:]}"
            v = cond()
            if v:
                return v
            time.sleep(0.5)
        raise AssertionError(f"{what} within {timeout} s; status: {json.dumps(self.status())[:3000]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)
        self.notify.close()


@pytest.fixture(scope="module")
def outside_qemu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen, Path]]:
    """A QEMU memvirt did not start: never run (-S), so it costs no CPU and has no kernel to read."""
    d = tmp_path_factory.mktemp("outside")
    qmp = d / "qmp.sock"
    p = subprocess.Popen(
        [
            "qemu-system-x86_64",
            "-name",
            "outside",
            "-m",
            "64",
            "-nodefaults",
            "-display",
            "none",
            "-S",
            "-qmp",
            f"unix:{qmp},server=on,wait=off",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not qmp.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    yield p, qmp
    p.kill()
    p.wait()


@pytest.fixture(scope="module")
def ksm_before() -> Iterator[dict[str, int]]:
    before = ksm.settings()
    yield before
    after = ksm.settings()
    if after != before:
        ksm.restore(before)
    assert after == before, "KSM's settings must come back as they were"


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory,
    guest: VM,
    anon_guest: VM,
    outside_qemu,
    ksm_before,
) -> Iterator[Daemon]:
    if ksm.other_tuners() or not ksm.available():
        pytest.skip("KSM is absent or tuned by another daemon here")
    tmp = tmp_path_factory.mktemp("memvirtd")
    cfg = tmp / "memvirtd.toml"
    cfg.write_text(CONFIG)
    p = subprocess.run(
        [sys.executable, "-m", "memvirt", "attach", "--qmp", str(outside_qemu[1]), "--json"],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["pid"] == outside_qemu[0].pid
    d = Daemon(tmp, cfg)
    holder = [d]
    yield holder  # type: ignore[misc]
    holder[-1].close()
    subprocess.run([sys.executable, "-m", "memvirt", "attach", "--forget", "outside"], env=_env())
    for vm in (guest, anon_guest):
        assert vm.status() == "running"
        assert vm.memcg() is None or vm.memcg().limit() == UNLIMITED


def _cur(holder: list[Daemon]) -> Daemon:
    return holder[-1]


def test_manages_vms_with_different_policies_and_notifies_systemd(daemon, guest: VM, anon_guest: VM) -> None:
    d = _cur(daemon)
    assert d.ready.startswith("READY=1") and f"MAINPID={d.proc.pid}" in d.ready
    sh = d.wait("a reclaim pass on shared-guest", lambda: (v := d.vm("shared-guest")) and v["passes"] >= 1 and v)
    assert sh["policy"] == {"reclaim": "every 5 s", "compress": "static"}
    assert sh["compress"] == "static: static"
    assert guest.memcg().limit() == CAP
    an = d.wait("anon-guest measured", lambda: (v := d.vm("anon-guest")) and "working_set_bytes" in v and v)
    assert an["policy"] == {"reclaim": "off", "compress": "measure"} and an["reclaim"] == "off"
    assert anon_guest.memcg() is None or anon_guest.memcg().limit() == UNLIMITED
    assert 0 < an["working_set_bytes"] <= anon_guest.config.memory
    out = d.wait(
        "the outside QEMU attached and its failure recorded",
        lambda: (v := d.vm("outside")) and v["errors"].get("guest_free") and v,
    )
    assert out["source"] == "attached" and out["pid"] > 0
    st = d.status()
    assert st["ksm"].startswith("on: pages_to_scan"), st["ksm"]
    assert ksm.read("run") == 1 and ksm.read("pages_to_scan") <= 200
    p = subprocess.run(
        [sys.executable, "-m", "memvirt", "status", "--socket", str(d.sock)], capture_output=True, text=True, env=_env()
    )
    assert p.returncode == 0 and "shared-guest" in p.stdout and "anon-guest" in p.stdout and "outside" in p.stdout


def _proc_resident(vm: VM) -> int:
    if vm.config.ram == "shared":
        return os.stat(vm.config.ram_path).st_blocks * 512
    start, _ = vm.ram_mapping()
    return smaps_fields(vm.config.pid, start, ("Pss",))["Pss"]


def test_metrics_agree_with_inspect_and_proc(daemon, guest: VM, anon_guest: VM) -> None:
    d = _cur(daemon)
    d.wait(
        "guest-free metrics",
        lambda: all(("memvirt_vm_guest_free_bytes", n) in d.metrics() for n in ("shared-guest", "anon-guest")),
    )
    for vm in (guest, anon_guest):
        p = subprocess.run(
            [sys.executable, "-m", "memvirt", "inspect", vm.name, "--json", "--no-content"],
            capture_output=True,
            text=True,
            env=_env(),
        )
        assert p.returncode == 0, p.stderr
        pages = json.loads(p.stdout)["pages"]
        free = (pages["free"] + pages["free_pcp"]) * 4096
        time.sleep(2.5)  # one more sample after the inspection, as close to it as the interval allows
        m = d.metrics()
        assert m[("memvirt_vm_ram_bytes", vm.name)] == vm.config.memory
        assert m[("memvirt_vm_guest_free_bytes", vm.name)] == pytest.approx(free, rel=0.02)
        # Resident moves with every reclaim pass and guest allocation, and the gauge is up to one
        # interval old: it must agree with /proc at some sample, and a wrong source never would.
        seen = []

        def agrees(vm: VM = vm, seen: list = seen) -> bool:
            metric, proc = d.metrics()[("memvirt_vm_resident_bytes", vm.name)], _proc_resident(vm)
            seen.append((metric, proc))
            return abs(metric - proc) <= 0.02 * proc

        try:
            d.wait("resident agreeing with /proc", agrees, timeout=20)
        except AssertionError:
            raise AssertionError(f"{vm.name}: (metric, /proc) samples {seen}") from None
        assert m[("memvirt_vm_swapped_bytes", vm.name)] >= 0
        assert m[("memvirt_vm_working_set_bytes", vm.name)] > 0
    m = d.metrics()
    assert m[("memvirt_vm_pause_seconds_count", "shared-guest")] >= 1
    assert ("memvirt_vm_reclaimed_bytes_total", "shared-guest") in m
    assert ("memvirt_vm_pause_seconds_count", "anon-guest") not in m, "reclaim is off for anon-guest"
    # MemAvailable of a host other jobs share moves by hundreds of MB within the gauge's age (one
    # interval): it must agree with /proc at some sample, as resident above.
    avails: list[tuple[float, int]] = []

    def avail_agrees() -> bool:
        metric = d.metrics()[("memvirt_host_mem_available_bytes", "")]
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        avails.append((metric, int(meminfo["MemAvailable"].split()[0]) * 1024))
        return abs(avails[-1][0] - avails[-1][1]) <= 0.02 * avails[-1][1]

    try:
        d.wait("MemAvailable agreeing with /proc", avail_agrees, timeout=20)
    except AssertionError:
        raise AssertionError(f"(metric, /proc) MemAvailable samples {avails}") from None
    assert 0 < m[("memvirt_daemon_resident_bytes", "")] < 200 << 20
    assert m[("memvirt_daemon_vms", "")] == 3
    assert ("memvirt_host_ksmd_cpu_seconds", "") in m and ("memvirt_host_zram_original_bytes", "") in m


def test_vm_started_and_stopped_while_running(daemon, vm_factory, image) -> None:
    d = _cur(daemon)
    late = vm_factory("late-one", image, memory=256 << 20, ram="anonymous", wait=False)
    t0 = time.monotonic()
    v = d.wait("the new VM picked up", lambda: d.vm("late-one"), timeout=10)
    assert time.monotonic() - t0 <= 2 + 3, "picked up within one interval (plus a round's work)"
    late.channel.wait_ready(180, late.alive)
    assert v["policy"] == {"reclaim": "every 5 s", "compress": "off"}
    d.wait(
        "a reclaim pass on the new VM (failures while it booted are retried)",
        lambda: (v := d.vm("late-one")) and v["passes"] >= 1,
    )
    late.stop()
    d.wait("the stopped VM dropped", lambda: d.vm("late-one") is None, timeout=10)
    assert not any(k[1] == "late-one" for k in d.metrics()), "a dropped VM's series are removed"
    assert d.proc.poll() is None


def test_sighup_refuses_a_bad_config_and_keeps_the_old(daemon) -> None:
    d = _cur(daemon)
    good = d.config.read_text()
    d.config.write_text(good + "\n[reclaim\n")
    d.proc.send_signal(signal.SIGHUP)
    d.wait("the reload refused", lambda: d.status()["reloads"]["refused"] == 1, timeout=15)
    st = d.status()
    assert "not valid TOML" in st["reloads"]["last_error"]
    assert next(v for v in st["vms"] if v["vm"] == "shared-guest")["policy"]["compress"] == "static"
    log = d.log.read_text()
    refused = [line for line in log.splitlines() if "reload refused" in line]
    assert len(refused) == 1 and refused[0].startswith("memvirtd: ERROR: config reload refused")
    # A good change is taken: anon-guest stops being measured.
    d.config.write_text(good + '\n[[vm]]\nmatch = "anon-*"\n[vm.compress]\npolicy = "off"\n')
    d.proc.send_signal(signal.SIGHUP)
    d.wait("the reload taken", lambda: d.status()["reloads"]["ok"] == 1, timeout=15)
    d.wait("anon-guest's compression off", lambda: (d.vm("anon-guest") or {}).get("compress") == "off", timeout=20)
    d.config.write_text(good)


def test_sigkill_leaves_guests_running_uncapped_unpaused_then_a_restart_adopts(
    daemon, guest: VM, anon_guest: VM, ksm_before
) -> None:
    d = _cur(daemon)
    d.wait("the cap set", lambda: guest.memcg().limit() == CAP)
    assert ksm.read("run") == 1
    # Killed inside a reclaim pause: the journal entry the worker keeps around a pass, and the
    # guest stopped, as Reclaimer leaves it between its 'stop' and its 'cont'.
    watchdog.mark_paused(state_home() / "memvirtd" / "pausing" / "anon-guest.json", anon_guest, pid=d.proc.pid)
    anon_guest.pause()
    assert anon_guest.status() == "paused"
    d.proc.kill()
    d.proc.wait()
    # The restart right away: it must wait for the dead daemon's watchdogs, not take their cap and
    # KSM setting for the host's own.
    d2 = Daemon(d.tmp, d.config)
    daemon.append(d2)
    assert guest.memcg().limit() in (CAP, UNLIMITED)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _watchdogs_alive(d.proc.pid):
        time.sleep(0.2)
    assert not _watchdogs_alive(d.proc.pid)
    for vm in (guest, anon_guest):
        assert vm.status() == "running"
        assert vm.exec("echo alive").text.strip() == "alive"
    assert not list((state_home() / "borrowed").glob(f"*-{d.proc.pid}.json")), "the borrow journal is used up"
    d2.wait(
        "the restarted daemon manages both guests",
        lambda: {"shared-guest", "anon-guest"} <= {v["vm"] for v in d2.status()["vms"]},
    )
    d2.wait("its cap set", lambda: guest.memcg().limit() == CAP, timeout=30)
    assert "adopted the VMs of daemon" in d.log.read_text()
    # Now a clean stop: had the restart stacked on the dead daemon's state, this would leave the
    # dead one's cap (recorded as "found") and its KSM settings in place.
    d2.proc.terminate()
    assert d2.proc.wait(60) == 0
    assert d2.notify.recv(4096).decode() == "STOPPING=1"
    assert guest.memcg().limit() == UNLIMITED
    assert ksm.settings() == ksm_before
    for vm in (guest, anon_guest):
        assert vm.status() == "running"
    assert not (d.sock).exists()


def _watchdogs_alive(pid: int) -> bool:
    from memvirt.daemon.service import _watchdogs_of

    return bool(_watchdogs_of(pid))
