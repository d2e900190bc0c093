"""memvirtd's parts that need no QEMU: trigger, sd_notify, control socket, metrics address,
discovery of corrupt state and bad attach requests."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memvirt.daemon import control, discovery, notify
from memvirt.daemon.config import Trigger
from memvirt.daemon.metrics import parse_addr
from memvirt.daemon.policies import HostTrigger, meminfo, psi_some_avg10
from memvirt.errors import UsageError


def test_psi_trigger(tmp_path: Path) -> None:
    psi = tmp_path / "psi"
    psi.write_text("some avg10=12.50 avg60=3.00 avg300=1.00 total=5\nfull avg10=1.00 avg60=0 avg300=0 total=1\n")
    assert psi_some_avg10(psi) == 12.5
    t = HostTrigger(Trigger("pressure", psi_some_avg10=10), psi, tmp_path / "none")
    assert t.evaluate() and "PSI" in t.reason
    psi.write_text("some avg10=6.00 avg60=3.00 avg300=1.00 total=5\n")
    assert t.evaluate(), "released only below half the threshold"
    psi.write_text("some avg10=2.00 avg60=3.00 avg300=1.00 total=5\n")
    assert not t.evaluate()
    psi.write_text("some avg10=6.00 avg60=3.00 avg300=1.00 total=5\n")
    assert not t.evaluate(), "and engaged again only above it"


def test_memavailable_trigger_where_the_kernel_has_no_psi(tmp_path: Path) -> None:
    mi = tmp_path / "meminfo"
    mi.write_text("MemTotal:       1000000 kB\nMemFree: 5 kB\nMemAvailable:    150000 kB\nHugePages_Total: 0\n")
    assert meminfo(mi)["MemAvailable"] == 150000 * 1024 and meminfo(mi)["HugePages_Total"] == 0
    t = HostTrigger(Trigger("pressure", mem_available_below=20), tmp_path / "no-psi", mi)
    assert t.evaluate() and "MemAvailable 15.0 %" in t.reason
    mi.write_text("MemTotal: 1000000 kB\nMemAvailable: 230000 kB\n")
    assert t.evaluate(), "released only 5 points above the threshold"
    mi.write_text("MemTotal: 1000000 kB\nMemAvailable: 500000 kB\n")
    assert not t.evaluate()
    assert HostTrigger(Trigger("always")).evaluate()


def test_sd_notify_datagram(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert notify.notify("READY=1")
        assert s.recv(100) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not notify.notify("READY=1")


def test_sd_notify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"memvirt-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.notify("STOPPING=1")
        assert s.recv(100) == b"STOPPING=1"


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert notify.watchdog_interval() == 10.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert notify.watchdog_interval() is None


def test_control_socket_is_private_and_answers(tmp_path: Path) -> None:
    path = tmp_path / "run" / "c.sock"
    srv = control.ControlServer(path, lambda: {"vms": [], "pid": 1})
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert control.query(path) == {"vms": [], "pid": 1}
        assert "unknown request" in control.query(path, "shutdown")["error"]
        # A client that sends a huge line without newline gets an answer or a close, not a hang.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(path))
            s.sendall(b"x" * 4000)
            assert b"unknown request" in s.recv(1000)
        # A silent client is dropped after its 2 s; the server still answers the next one.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(path))
            assert control.query(path)["pid"] == 1
    finally:
        srv.close()
    assert not path.exists()
    with pytest.raises(UsageError, match="no memvirtd control socket"):
        control.query(path)


def test_status_without_a_daemon_is_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "MEMVIRT_HOME": str(tmp_path)}
    p = subprocess.run([sys.executable, "-m", "memvirt", "status"], capture_output=True, text=True, env=env)
    assert p.returncode == 2 and p.stderr.startswith("memvirt: error: no memvirtd control socket")
    assert len(p.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("text", ["9187", "localhost", ":80", "127.0.0.1:99999", "127.0.0.1:x"])
def test_bad_metrics_addresses(text: str) -> None:
    with pytest.raises(UsageError, match="--metrics takes ADDR:PORT"):
        parse_addr(text)


def test_metrics_addresses() -> None:
    assert parse_addr("127.0.0.1:9735") == ("127.0.0.1", 9735)
    assert parse_addr("[::1]:0") == ("::1", 0)


def test_discovery_skips_corrupt_vms_and_dead_ones(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEMVIRT_HOME", str(tmp_path))
    vms = tmp_path / "vms"
    (vms / "broken").mkdir(parents=True)
    (vms / "broken" / "vm.json").write_text("{not json")
    (vms / "odd").mkdir()
    (vms / "odd" / "vm.json").write_text(json.dumps({"name": "odd", "memory": 1, "surprise": 1}))
    (vms / "dead").mkdir()
    (vms / "dead" / "vm.json").write_text(json.dumps({"name": "dead", "memory": 64 << 20, "pid": 999999999}))
    att = tmp_path / "attached"
    att.mkdir()
    (att / "junk.json").write_text("[1, 2")
    (att / "gone.json").write_text(json.dumps({"name": "gone", "qmp": "/x", "pid": 999999999, "memory": 1}))
    found = discovery.discover([discovery.MemvirtSource(), discovery.AttachedSource()])
    assert found == {}


def test_attach_refuses_what_is_not_a_qemu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEMVIRT_HOME", str(tmp_path))
    with pytest.raises(UsageError, match="not a Unix socket"):
        discovery.register(str(tmp_path / "missing.sock"), None, None)
    sock_path = tmp_path / "fake.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(sock_path))
        s.listen(1)
        with pytest.raises(UsageError, match="no single QEMU process listens"):
            discovery.register(str(sock_path), None, None)
        with pytest.raises(UsageError, match=f"pid {os.getpid()} is not a running QEMU"):
            discovery.register(str(sock_path), os.getpid(), None)
    env = {**os.environ, "MEMVIRT_HOME": str(tmp_path)}
    p = subprocess.run(
        [sys.executable, "-m", "memvirt", "attach", "--qmp", str(tmp_path), "--pid", "1"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert p.returncode == 2 and p.stderr.strip() == f"memvirt: error: --qmp {tmp_path}: not a Unix socket"


def test_second_daemon_refused_and_bad_config_at_start(tmp_path: Path) -> None:
    env = {**os.environ, "MEMVIRT_HOME": str(tmp_path)}
    bad = tmp_path / "bad.toml"
    bad.write_text("[compress]\npolicy = 'squeeze'\n")
    p = subprocess.run(
        [sys.executable, "-m", "memvirt", "daemon", "--config", str(bad)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert p.returncode == 2 and p.stderr.startswith("memvirt: error: ") and len(p.stderr.splitlines()) == 1
    d = subprocess.Popen(
        [sys.executable, "-m", "memvirt", "daemon", "--metrics", "127.0.0.1:0"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        sock = tmp_path / "memvirtd" / "control.sock"
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert control.query(sock)["pid"] == d.pid
        p = subprocess.run(
            [sys.executable, "-m", "memvirt", "daemon", "--metrics", "127.0.0.1:0"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert p.returncode == 2 and f"memvirtd already runs for {tmp_path} (pid {d.pid})" in p.stderr
    finally:
        d.terminate()
        assert d.wait(30) == 0
    assert not sock.exists()


def test_a_failing_vm_is_retried_with_backoff_and_never_ends_the_worker(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A VM whose QEMU is gone: every policy fails, is recorded once, retried later; stop() still works."""
    import threading

    from memvirt.daemon import policies
    from memvirt.daemon.config import Compress, Reclaim, VMPolicy
    from memvirt.daemon.discovery import Target
    from memvirt.daemon.metrics import Metrics
    from memvirt.qemu.vm import VM, VMConfig

    monkeypatch.setenv("MEMVIRT_HOME", str(tmp_path))
    monkeypatch.setattr(policies, "BACKOFF", (0.2, 0.8))
    vm = VM(VMConfig(name="ghost", memory=64 << 20, ram="anonymous", pid=999999999))
    engaged = threading.Event()
    engaged.set()
    m = Metrics()
    w = policies.VMWorker(
        Target("ghost", vm, "memvirt"), VMPolicy(Reclaim(every=5), Compress("measure")), m, engaged, 0.1
    )
    w._next_reclaim = 0.0
    w.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(w.status()["errors"]) < 2:
            time.sleep(0.1)
        st = w.status()
        assert set(st["errors"]) == {"compress", "metrics"}, st
        assert "dead" in st["errors"]["compress"] and st["compress"].startswith("error (retry in")
        assert st["reclaim"] == "skipped: guest dead"
        time.sleep(2.0)
        assert w.thread.is_alive()
        fails = m.policy_errors.labels(vm="ghost", policy="compress")._value.get()
        assert 2 <= fails <= 6, "retried, with growing waits (0.2, 0.4, 0.8, 0.8 ... s)"
    finally:
        w.stop(10)
    assert not w.thread.is_alive()


def test_the_memvirtd_entry_point_is_memvirt_daemon(tmp_path: Path) -> None:
    """``memvirtd`` (pyproject's console script) runs ``memvirt daemon`` with its one-line errors,
    without loading the CLI stack (typer, rich: ~11 MiB the resident service never uses)."""
    env = {**os.environ, "MEMVIRT_HOME": str(tmp_path)}
    code = (
        "import sys; sys.argv = ['memvirtd', *sys.argv[1:]]; from memvirt.daemon.main import main\n"
        "try:\n    main()\nfinally:\n    assert not {'typer', 'rich'} & set(sys.modules), 'CLI stack loaded'"
    )
    p = subprocess.run([sys.executable, "-c", code, "--check"], capture_output=True, text=True, env=env)
    assert p.returncode == 0 and json.loads(p.stdout)["reclaim"]["every"] == 60
    p = subprocess.run(
        [sys.executable, "-c", code, "--check", "--config", str(tmp_path / "x.toml")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert p.returncode == 2 and p.stderr.strip() == f"memvirt: error: {tmp_path / 'x.toml'}: no such config file"


def test_without_host_pressure_nothing_is_taken(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Trigger not engaged: reclaim and caps idle (the dead VM is never even touched by them)."""
    import threading

    from memvirt.daemon import policies
    from memvirt.daemon.config import Compress, Reclaim, VMPolicy
    from memvirt.daemon.discovery import Target
    from memvirt.daemon.metrics import Metrics
    from memvirt.qemu.vm import VM, VMConfig

    monkeypatch.setenv("MEMVIRT_HOME", str(tmp_path))
    vm = VM(VMConfig(name="calm", memory=64 << 20, ram="anonymous", pid=999999999))
    w = policies.VMWorker(
        Target("calm", vm, "memvirt"),
        VMPolicy(Reclaim(every=5), Compress("static", limit=1 << 30)),
        Metrics(),
        threading.Event(),
        60.0,
    )
    w._next_reclaim = 0.0
    w._next_sample = 1e18
    w.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and w.status()["reclaim"] == "waiting":
            time.sleep(0.1)
        st = w.status()
        assert st["reclaim"] == "idle: host not under pressure"
        assert st["compress"] == "idle: host not under pressure"
        assert st["errors"] == {} and w.ctl is None and w.rec is None
    finally:
        w.stop(10)


def test_control_socket_survives_a_failing_handler(tmp_path: Path) -> None:
    calls = []

    def handler() -> dict:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return {"ok": True}

    srv = control.ControlServer(tmp_path / "c.sock", handler)
    try:
        assert control.query(tmp_path / "c.sock") == {"error": "status failed: boom"}
        assert control.query(tmp_path / "c.sock") == {"ok": True}
    finally:
        srv.close()


def test_daemon_speaks_sd_notify_ready_watchdog_stopping(tmp_path: Path) -> None:
    """With no VM at all: READY=1 after the first round, WATCHDOG=1 at half WATCHDOG_USEC, STOPPING=1 on SIGTERM."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.settimeout(30)
        env = {**os.environ, "MEMVIRT_HOME": str(tmp_path), "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"}
        d = subprocess.Popen(
            [sys.executable, "-m", "memvirt", "daemon", "--metrics", "127.0.0.1:0"], env=env, stderr=subprocess.DEVNULL
        )
        try:
            ready = s.recv(4096).decode()
            assert ready.startswith("READY=1\n") and f"MAINPID={d.pid}" in ready
            t0 = time.monotonic()
            assert s.recv(4096) == b"WATCHDOG=1"
            assert s.recv(4096) == b"WATCHDOG=1"
            assert time.monotonic() - t0 < 3
            d.terminate()
            while (msg := s.recv(4096)) == b"WATCHDOG=1":
                pass
            assert msg == b"STOPPING=1"
            assert d.wait(30) == 0
        finally:
            if d.poll() is None:
                d.kill()


def test_pause_marks_name_their_process(tmp_path: Path) -> None:
    """The watchdog acts only on marks of the process it guarded; marks of others and corrupt
    files are left alone, and a mark whose QEMU is gone is used up without any QMP."""
    from types import SimpleNamespace

    from memvirt.dedup import watchdog

    gone = subprocess.Popen(["true"])
    gone.wait()
    vm = SimpleNamespace(config=SimpleNamespace(pid=gone.pid), qmp_path=tmp_path / "none.sock", name="v")
    watchdog.mark_paused(tmp_path / "dead.json", vm, pid=gone.pid)
    watchdog.mark_paused(tmp_path / "other.json", vm, pid=os.getpid())
    (tmp_path / "junk.json").write_text("{")
    assert (tmp_path / "dead.json").stat().st_mode & 0o777 == 0o600
    assert watchdog.read_mark(tmp_path / "other.json") == watchdog.PauseMark(
        os.getpid(), gone.pid, str(vm.qmp_path), "v"
    )
    assert watchdog.read_mark(tmp_path / "junk.json") is None
    assert watchdog.resume_marked(gone.pid, tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.json", "other.json"]
