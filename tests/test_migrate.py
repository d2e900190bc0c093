"""memvirt's live migration on real guests, receiver and sender as separate processes.

The receiver runs as another "host" (its own MEMVIRT_HOME and RAM folder). One migration of a
running, dirtying guest (dirty tracker, ``--verify full``) checks the invariant at the moment of
pause (the receiver holds the verified, paused target while the test compares both RAM files
against a census of the paused source), that the final round read only the pages written after
the last live round (physaddr writes a known set of marker pages then, with memtouch stopped),
then that the guest runs on on the target. A sender SIGKILLed while it tracks leaves the source
running with nothing registered in its QEMU. Fault tests use the shared guest as the
source and check it runs on after each fault: a peer without the secret, a forged client
sending a malformed frame, a connection dropped mid-stream, a byte flipped in flight, a
receiver killed while the source is paused for the switch-over, and a receiver killed right
before or after it resumes the target (its watchdog must not kill a target that may have run).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cli import assert_error_after_progress, assert_one_line_error

from memvirt.introspect import Introspector
from memvirt.memory import pagehash as fingerprint
from memvirt.memory.ramfile import RamFileMemory
from memvirt.migrate import codec
from memvirt.migrate.protocol import AuthError, Kind, ProtocolError, client_handshake
from memvirt.qemu.dirty import stray_uffds, track, uffd_holds
from memvirt.qemu.vm import VM

pytestmark = pytest.mark.guest

SECRET = "f21799cfda87af9b4177b25ca50957bbf5cc4764dd7c33b90f6f0aa421af2833"
OTHER_SECRET = "b50863f97c0105c8b4f418bb9a8b1a4291cfe5da524bce292bfdd173a140af33"
COUNTER = "/tmp/mig.count"
DATACHECK = "/tmp/mig.dc"
WORKLOAD = f"memtouch --hot 16M --cold 32M --content mix --dirty-rate 8M --counter-file {COUNTER}"


def _entry() -> list[str]:
    """The CLI as a user runs it."""
    return ["-m", "memvirt"]


@pytest.fixture
def host_b(tmp_path: Path) -> Iterator[dict[str, str]]:
    """The receiving host's environment: its own state and RAM folders."""
    ram = Path("/dev/shm") / f"mg-test-b-{os.getpid()}-{tmp_path.name}"
    env = {
        **os.environ,
        "MEMVIRT_HOME": str(tmp_path / "host-b"),
        "MEMVIRT_RAM_DIR": str(ram),
        "MEMVIRT_SECRET": SECRET,
    }
    yield env
    _stop_all(env)
    subprocess.run(["rm", "-rf", str(ram)], check=False)


def _stop_all(env: dict[str, str]) -> None:
    old = os.environ.get("MEMVIRT_HOME")
    os.environ["MEMVIRT_HOME"] = env["MEMVIRT_HOME"]
    try:
        for vm in VM.all():
            vm.stop()
    finally:
        os.environ["MEMVIRT_HOME"] = old or ""


def _leftovers(env: dict[str, str]) -> list[str]:
    vms = Path(env["MEMVIRT_HOME"]) / "vms"
    ram = Path(env["MEMVIRT_RAM_DIR"])
    return [
        p.name for p in (list(vms.iterdir()) if vms.exists() else []) + (list(ram.iterdir()) if ram.exists() else [])
    ]


class Receiver:
    """``memvirt receive`` in its own process, on an ephemeral loopback port."""

    def __init__(self, env: dict[str, str], *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, *_entry(), "receive", "--listen", "127.0.0.1:0", "--timeout", "240", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
        line = self.proc.stderr.readline()
        self.log.append(line)
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        assert m, line
        self.port = int(m.group(1))
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        self.log.extend(self.proc.stderr)

    def wait(self, timeout: float = 120) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _migrate(name: str, port: int, *args: str, secret: str = SECRET) -> subprocess.Popen[str]:
    env = {**os.environ, "MEMVIRT_SECRET": secret}
    return subprocess.Popen(
        [sys.executable, *_entry(), "migrate", name, "--to", f"127.0.0.1:{port}", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _counter(vm: VM) -> int:
    return int(vm.exec(f"cat {COUNTER}").check("reading the counter").text)


def _assert_runs_on(vm: VM) -> None:
    """The source survived a failed migration: running, its workload advancing."""
    assert vm.status() == "running"
    a = _counter(vm)
    time.sleep(1.0)
    assert _counter(vm) > a


@pytest.fixture(scope="module")
def source_guest(guest: VM) -> VM:
    """The shared guest with the test workload running (left running: tests leave it so)."""
    if guest.exec(f"test -f {COUNTER}").rc != 0:
        guest.exec_background(WORKLOAD, "/tmp/mig-memtouch.log")
        deadline = time.monotonic() + 60
        while guest.exec(f"test -s {COUNTER}").rc != 0 and time.monotonic() < deadline:
            time.sleep(0.3)
    return guest


class Proxy:
    """A loopback TCP relay that drops the connection or flips one byte after ``after`` bytes
    sender->receiver; its threads end with the connection."""

    def __init__(self, target_port: int, after: int, mode: str):
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.srv.settimeout(120)
        self.port = self.srv.getsockname()[1]
        self.target, self.after, self.mode = target_port, after, mode
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            a, _ = self.srv.accept()
        except OSError:
            return
        b = socket.create_connection(("127.0.0.1", self.target))
        for s in (a, b):
            s.settimeout(120)
        threading.Thread(target=self._pipe, args=(b, a, None), daemon=True).start()
        self._pipe(a, b, self.after)

    def _pipe(self, src: socket.socket, dst: socket.socket, after: int | None) -> None:
        seen = 0
        try:
            while data := src.recv(1 << 16):
                if after is not None and seen + len(data) > after:
                    if self.mode == "drop":
                        break
                    buf = bytearray(data)
                    buf[after - seen] ^= 0x40
                    data, after = bytes(buf), None
                seen += len(data)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self.srv.close()


def test_codec_and_fingerprint_units() -> None:
    """Runs and their inverse; XXH3-64 from the C loop equals the numpy one and xxhash's."""
    import xxhash

    pfns = np.array([3, 4, 5, 9, 10, 20])
    starts, lengths = codec.runs(pfns)
    assert starts.tolist() == [3, 9, 20] and lengths.tolist() == [3, 2, 1]
    assert codec.expand(starts, lengths).tolist() == pfns.tolist()
    pages = np.random.default_rng(3).integers(0, 256, 8 * 4096, dtype=np.uint8)
    pages[4096:8192] = 0
    want = [xxhash.xxh3_64_intdigest(pages[i * 4096 : (i + 1) * 4096].tobytes()) for i in range(8)]
    assert fingerprint.hash_pages(pages).tolist() == want
    words = pages.view("<u8").reshape(8, 512)
    assert fingerprint._numpy_hash(words).tolist() == want
    assert want[1] == fingerprint.ZERO_HASH
    for c in (codec.LZ4, codec.ZSTD, codec.NONE):
        blob = codec.compress(c, memoryview(pages))
        assert codec.decompress(c, memoryview(bytes(blob)), len(pages)) == pages.tobytes()
    with pytest.raises(ProtocolError):
        codec.decompress(codec.LZ4, memoryview(b"\xff" * 20), 4096)


def test_codec_chooser_tries_each_then_keeps_the_fastest(monkeypatch) -> None:
    """Auto mode gives lz4, none and zstd a trial each, then keeps the one the pipeline moved
    fastest, trying the others again now and then; a fixed codec is always used."""
    clock = [0.0]
    monkeypatch.setattr(codec.time, "perf_counter", lambda: clock[0])
    cost = {codec.LZ4: 2.0, codec.NONE: 1.0, codec.ZSTD: 3.0}
    ch = codec.CodecChooser("auto")
    page = memoryview(bytes(4096))
    seen = []
    for _ in range(codec.TRIAL * (3 + 2 * codec.EXPLORE_EVERY)):
        c, blob = ch.encode(page)
        assert codec.decompress(c, memoryview(bytes(blob)), 4096) == bytes(4096)
        seen.append(c)
        clock[0] += cost[c]
    assert (
        seen[: 3 * codec.TRIAL] == [codec.LZ4] * codec.TRIAL + [codec.NONE] * codec.TRIAL + [codec.ZSTD] * codec.TRIAL
    )
    assert max(ch.rates, key=ch.rates.get) == codec.NONE
    assert seen.count(codec.NONE) > 0.8 * len(seen) - 3 * codec.TRIAL
    assert {codec.LZ4, codec.ZSTD} <= set(seen[3 * codec.TRIAL :]), "no codec was tried again"
    fixed = codec.CodecChooser("zstd")
    assert {fixed.encode(page)[0] for _ in range(20)} == {codec.ZSTD}


def test_send_queue_keeps_order_and_reports_a_dead_link() -> None:
    """Frames queued for the sending thread arrive in order and open on the other side (into the
    channel's reused buffers or fresh ones); a send that fails on the thread is raised to the
    caller, not lost."""
    from memvirt.migrate.protocol import SendQueue, server_handshake

    srv = socket.create_server(("127.0.0.1", 0))
    got: list[bytes] = []

    def serve() -> None:
        conn, _ = srv.accept()
        chan = server_handshake(conn, b"k" * 32, 10)
        held = []
        for i in range(20):
            payload = chan.recv(Kind.DATA, borrow=i % 4 < 2)[1]
            got.append(bytes(payload))
            held[:] = [payload]  # a borrowed view still held when the next, larger frame comes in
        conn.close()

    t = threading.Thread(target=serve)
    t.start()
    chan = client_handshake(socket.create_connection(srv.getsockname()), b"k" * 32, 10)
    q = SendQueue(chan)
    frames = [bytes([i]) * (100 + i * 70000) for i in range(20)]
    for f in frames:
        q.send(Kind.DATA, [memoryview(f)[:50], memoryview(f)[50:]])
    q.flush()
    t.join(10)
    assert [bytes(g) for g in got] == frames
    time.sleep(0.2)
    with pytest.raises(ProtocolError):
        for _ in range(200):
            q.send(Kind.DATA, bytes(1 << 20))
        q.close()
    srv.close()


def test_populated_pages_grow_from_an_earlier_answer(tmp_path) -> None:
    """Probing only an earlier answer's holes finds what the full SEEK_DATA walk finds."""
    path = tmp_path / "ram"
    with open(path, "wb") as f:
        f.truncate(64 << 20)
    fd = os.open(path, os.O_RDWR)
    try:
        for pfn in (0, 1, 2, 100, 5000, 16383):
            os.pwrite(fd, b"x" * 4096, pfn * 4096)
        mem = RamFileMemory(path)
        first = mem.populated_pfns()
        assert np.flatnonzero(first).tolist() == [0, 1, 2, 100, 5000, 16383]
        for pfn in (3, 99, 101, 8000, 8001, 16382):
            os.pwrite(fd, b"y" * 4096, pfn * 4096)
        grown = mem.populated_pfns(first)
        assert (grown == mem.populated_pfns()).all() and grown.sum() == 12
        mem.close()
    finally:
        os.close(fd)


def _holds(vm: VM) -> list[str]:
    start, size = vm.ram_mapping()
    return uffd_holds(vm.config.pid, start, start + size)


MARKS = 1500
MARK_SEED = 0x316


def test_migrate_invariant_final_round_and_guest_runs_on(image, vm_factory, host_b) -> None:
    """A dirtying guest migrates with the dirty tracker and ``--verify full``. After the last live
    round memtouch is stopped and physaddr writes MARKS marker pages: the final round reads those
    and little else (not every page in use). At pause every non-free page is byte-identical on the
    target, every free page reads zero there, the marker pages hold physaddr's bytes; the guest's
    counter continues and its data checks out."""
    from markers import mark, marker_pages

    from memvirt.migrate.sender import migrate

    src = vm_factory("mg-src", image, memory=512 << 20)
    mt = src.exec_background(WORKLOAD, "/tmp/mig-memtouch.log")
    src.exec_background(f"datacheck write --size 24M --seed 11 --state {DATACHECK}", "/tmp/mig-dc.log")
    deadline = time.monotonic() + 60
    while src.exec(f"test -s {COUNTER} && test -f {DATACHECK}").rc != 0 and time.monotonic() < deadline:
        time.sleep(0.3)
    before = _counter(src)
    hold = Path(host_b["MEMVIRT_HOME"]) / "hold"
    rx = Receiver(host_b, "--hold-file", str(hold))
    marked: list[np.ndarray] = []

    def progress(st) -> None:
        if st.index == 1 and not st.final:  # the last live round (max_rounds=2): write a known set
            src.exec(f"kill -STOP {mt}").check("stopping memtouch")
            marked.append(mark(src, seed=MARK_SEED, count=MARKS)[0])

    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["report"] = migrate(
                "mg-src",
                "127.0.0.1",
                rx.port,
                SECRET.encode(),
                "mg-dst",
                max_rounds=2,
                progress=progress,
                dirty="uffd-wp",
                verify="full",
            )
        except BaseException as e:
            result["error"] = e

    tx = threading.Thread(target=run)
    tx.start()
    try:
        deadline = time.monotonic() + 240
        while not hold.exists():
            assert tx.is_alive(), result
            assert time.monotonic() < deadline, "the receiver never reached the switch-over"
            time.sleep(0.05)
        assert src.status() in ("postmigrate", "paused"), result
        assert _holds(src) == ["write-protect"], "the sender tracks the source's writes"
        target_ram = Path(host_b["MEMVIRT_RAM_DIR"]) / "mg-dst.ram"
        with RamFileMemory(src.config.ram_path, src.regions) as smem, RamFileMemory(target_ram, src.regions) as tmem:
            free = Introspector(smem).scan().free_mask
            for (gpa, a), (_, b) in zip(smem.chunks(32 << 20), tmem.chunks(32 << 20), strict=True):
                p0 = gpa >> 12
                pa, pb = a.reshape(-1, 4096), b.reshape(-1, 4096)
                f = free[p0 : p0 + len(pa)]
                differ = ~(pa == pb).all(axis=1)
                assert not (differ & ~f).any(), f"non-free pages differ at pfns {np.flatnonzero(differ & ~f)[:5] + p0}"
                assert not pb[f].any(), "a free page does not read zero on the target"
            got = np.stack([tmem.read(int(p) << 12, 4096) for p in marked[0]])
            assert (got == marker_pages(MARK_SEED, MARKS)).all(), "the marker pages did not reach the target"
        hold.unlink()
        tx.join(120)
        assert "error" not in result, result
        assert rx.wait() == 0, rx.log
    finally:
        hold.unlink(missing_ok=True)
        tx.join(120)
        rx.kill()
    report = result["report"].to_json()  # type: ignore[attr-defined]
    assert report["dirty_method"] == "uffd-wp" and report["verify"] == "full" and report["rounds"] == 3
    assert report["pages"]["data"] > 0 and report["pages"]["free_final"] > 0 and report["downtime_seconds"] > 0
    first, final = report["per_round"][0], report["per_round"][-1]
    # Written after the last live round: the marker pages and what the guest wrote meanwhile
    # (physaddr's start, the agent's polling, the kernel: 1,000-2,000 pages on a loaded host).
    assert final["final"] and MARKS <= final["written"] <= MARKS + 6000, final
    # Read in the final round: the written pages (and the few allocated since the last census
    # without a write), never a pass over the pages in use.
    assert MARKS <= final["hashed"] <= final["written"] + 256, final
    assert final["hashed"] < first["hashed"] // 4, (first, final)
    assert final["data"] >= MARKS, "the marker pages are unique: sent as data"
    assert not src.alive() and not src.dir.exists(), "the source must be stopped once the target runs"
    os.environ["MEMVIRT_HOME"], home = host_b["MEMVIRT_HOME"], os.environ["MEMVIRT_HOME"]
    try:
        dst = VM.load("mg-dst")
        assert dst.status() == "running"
        dst.exec(f"kill -CONT {mt}").check("resuming memtouch")
        first = _counter(dst)
        assert first >= before
        time.sleep(1.0)
        assert _counter(dst) > first
        res = dst.exec(f"datacheck verify --state {DATACHECK}")
        assert res.rc == 0 and res.text.startswith("OK"), res.text
    finally:
        os.environ["MEMVIRT_HOME"] = home


def test_refuses_peers_without_the_secret_and_malformed_frames(source_guest, host_b) -> None:
    """Wrong secret or --insecure: refused at the handshake. A peer with the secret that then sends
    a malformed frame: the receiver removes its partial VM and exits 1 with one line."""
    rx = Receiver(host_b, "--count", "1")
    try:
        for secret in (OTHER_SECRET.encode(), None):
            with socket.create_connection(("127.0.0.1", rx.port)) as s, pytest.raises(AuthError):
                client_handshake(s, secret, 10)
        proc = subprocess.run(
            [
                sys.executable,
                *_entry(),
                "migrate",
                source_guest.name,
                "--to",
                f"127.0.0.1:{rx.port}",
                "--as",
                "mg-evil",
            ],
            env={**os.environ, "MEMVIRT_SECRET": OTHER_SECRET},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert_error_after_progress(proc, 1, "runs on here, unchanged")
        s = socket.create_connection(("127.0.0.1", rx.port))
        chan = client_handshake(s, SECRET.encode(), 30)
        c = source_guest.config
        chan.send_json(
            Kind.SETUP,
            {
                "name": "mg-junk",
                "source": "x",
                "memory": c.memory,
                "cpus": c.cpus,
                "image": c.image,
                "accel": c.accel,
                "append": "",
                "regions": c.regions,
            },
        )
        chan.recv_json(Kind.READY)
        assert "mg-junk" in _leftovers(host_b)
        chan.send(Kind.DATA, codec.encode_data(codec.LZ4, np.array([1 << 40]), np.array([1]), b"junk"))
        with pytest.raises(ProtocolError, match="malformed DATA frame"):
            chan.recv(Kind.READY)
        chan.close()
        assert rx.wait(60) == 1
        errs = [line for line in rx.log if "error:" in line]
        assert len(errs) == 1 and "partial VM was removed" in errs[0], rx.log
        assert any("refused" in line for line in rx.log)
        assert _leftovers(host_b) == []
    finally:
        rx.kill()
    _assert_runs_on(source_guest)


@pytest.mark.parametrize("mode", ["drop", "flip"])
def test_link_fault_leaves_source_running(source_guest, host_b, mode) -> None:
    """The connection dropped, or one byte changed in flight, after 3 MiB: the sender fails with
    one line, the source runs on, the receiver removes its partial VM."""
    rx = Receiver(host_b)
    proxy = Proxy(rx.port, 3 << 20, mode)
    try:
        proc = subprocess.run(
            [
                sys.executable,
                *_entry(),
                "migrate",
                source_guest.name,
                "--to",
                f"127.0.0.1:{proxy.port}",
                "--as",
                "mg-fault",
                "--codec",
                "none",
            ],
            env={**os.environ, "MEMVIRT_SECRET": SECRET},
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert_error_after_progress(proc, 1, "runs on here, unchanged")
        assert rx.wait(60) == 1
        if mode == "flip":
            assert any("failed authentication" in line for line in rx.log), rx.log
    finally:
        rx.kill()
    assert _leftovers(host_b) == []
    _assert_runs_on(source_guest)


def test_receiver_killed_at_switch_over_resumes_source(source_guest, host_b) -> None:
    """The receiver dies while the source is paused for the switch-over: the source is resumed and
    runs on; the receiver's watchdog removes the target it never resumed."""
    hold = Path(host_b["MEMVIRT_HOME"]) / "hold"
    rx = Receiver(host_b, "--hold-file", str(hold))
    tx = _migrate(source_guest.name, rx.port, "--as", "mg-killed")
    try:
        deadline = time.monotonic() + 180
        while not hold.exists():
            assert tx.poll() is None, tx.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert source_guest.status() in ("postmigrate", "paused")
        rx.proc.send_signal(signal.SIGKILL)
        rx.wait()
        out, errs = tx.communicate(timeout=60)
        assert_error_after_progress(subprocess.CompletedProcess(tx.args, tx.returncode, out, errs), 1, "unchanged")
    finally:
        hold.unlink(missing_ok=True)
        tx.kill()
        rx.kill()
    _assert_runs_on(source_guest)
    deadline = time.monotonic() + 20
    while _leftovers(host_b) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _leftovers(host_b) == ["hold"] or _leftovers(host_b) == []


@pytest.mark.parametrize("point", ["committed", "resumed"])
def test_receiver_killed_around_cont_keeps_the_target(source_guest, host_b, point) -> None:
    """The receiver is SIGKILLed (fault injection at the exact point) after GO, just before or
    just after it resumes the target: its watchdog must leave the target alone (running after
    ``cont``, paused before it), since the sender committed and left the source paused."""
    env = {**host_b, "MEMVIRT_TEST_FAULT": point}
    rx = Receiver(env)
    tx = _migrate(source_guest.name, rx.port, "--as", f"mg-{point}")
    try:
        out, errs = tx.communicate(timeout=240)
        assert rx.wait(30) == -signal.SIGKILL, rx.log
        assert_error_after_progress(
            subprocess.CompletedProcess(tx.args, tx.returncode, out, errs), 1, "never runs twice"
        )
        time.sleep(2.0)  # ten times the watchdog's poll: it would have acted by now
        os.environ["MEMVIRT_HOME"], home = host_b["MEMVIRT_HOME"], os.environ["MEMVIRT_HOME"]
        try:
            target = VM.load(f"mg-{point}")
            assert target.status() == ("running" if point == "resumed" else "paused")
            if point == "committed":
                with target.monitor() as mon:
                    mon.command("cont")
            a = int(target.exec(f"cat {COUNTER}").check("reading the counter").text)
            time.sleep(1.0)
            assert int(target.exec(f"cat {COUNTER}").check("reading the counter").text) > a
            target.stop()
        finally:
            os.environ["MEMVIRT_HOME"] = home
    finally:
        tx.kill()
        rx.kill()
        from memvirt.migrate.watchdog import COMMITTED

        (source_guest.dir / COMMITTED).unlink(missing_ok=True)
        with source_guest.monitor() as mon:
            if mon.status() in ("paused", "postmigrate"):
                mon.command("cont")
    _assert_runs_on(source_guest)


def test_throttle_slows_the_guest_and_leaves_it_running(source_guest) -> None:
    """Auto-converge's duty cycle: held half the time, the guest's workload advances clearly
    slower than unthrottled over the same wall time; closed, the guest runs."""
    from memvirt.migrate.throttle import Throttle

    def progress(seconds: float) -> int:
        a = _counter(source_guest)
        time.sleep(seconds)
        return _counter(source_guest) - a

    free = progress(3.0)
    th = Throttle(source_guest)
    try:
        assert th.harder() == pytest.approx(0.2)
        while th.share < 0.6:
            th.harder()
        held = progress(3.0)
    finally:
        th.close()
    assert source_guest.status() == "running"
    assert held < 0.75 * free, (held, free)
    _assert_runs_on(source_guest)


@pytest.mark.parametrize("committed", [False, True])
def test_source_guard_resumes_a_held_source_unless_committed(source_guest, committed) -> None:
    """The sender dies while its source is paused: the guard resumes it, but never once the
    target was told to run (the guest must not run twice)."""
    from memvirt.migrate.watchdog import COMMITTED

    mark = source_guest.dir / COMMITTED
    sender = subprocess.Popen(["sleep", "0.5"])
    guard = subprocess.Popen(
        [sys.executable, "-m", "memvirt.migrate.watchdog", str(sender.pid), str(source_guest.dir), "source"]
    )
    try:
        if committed:
            mark.touch()
        with source_guest.monitor() as mon:
            mon.command("stop")
        sender.wait()
        guard.wait(30)
        time.sleep(0.3)
        assert source_guest.status() == ("paused" if committed else "running")
    finally:
        mark.unlink(missing_ok=True)
        guard.kill()
        with source_guest.monitor() as mon:
            if mon.status() == "paused":
                mon.command("cont")
    _assert_runs_on(source_guest)


def test_usage_errors(source_guest) -> None:
    """No secret: refused (secure by default), exit 2; bad endpoint, exit 2; nobody listening, exit 1."""
    env = {k: v for k, v in os.environ.items() if k != "MEMVIRT_SECRET"}
    run = [sys.executable, *_entry(), "migrate", source_guest.name]
    assert_one_line_error(
        subprocess.run([*run, "--to", "127.0.0.1:1"], env=env, capture_output=True, text=True), 2, "no shared secret"
    )
    env["MEMVIRT_SECRET"] = SECRET
    assert_one_line_error(
        subprocess.run([*run, "--to", "nowhere"], env=env, capture_output=True, text=True), 2, "not an endpoint"
    )
    assert_one_line_error(
        subprocess.run([*run, "--to", "127.0.0.1:1"], env=env, capture_output=True, text=True), 1, "cannot reach"
    )
    assert source_guest.status() == "running"


def test_a_sigkilled_sender_while_tracking_leaves_the_source_running_and_nothing_registered(
    source_guest, host_b
) -> None:
    """The sender (CLI, ``--dirty uffd-wp --verify full``) is SIGKILLed at the switch-over, its
    tracker registered over the source's RAM: the kernel unregisters it with the descriptor, the
    guard resumes the source, which runs on with no userfaultfd left in its QEMU; a new tracker
    starts at once."""
    hold = Path(host_b["MEMVIRT_HOME"]) / "hold"
    rx = Receiver(host_b, "--hold-file", str(hold))
    tx = _migrate(source_guest.name, rx.port, "--as", "mg-sigkill", "--dirty", "uffd-wp", "--verify", "full")
    try:
        deadline = time.monotonic() + 180
        while not hold.exists():
            assert tx.poll() is None, tx.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert _holds(source_guest) == ["write-protect"]
        tx.send_signal(signal.SIGKILL)
        tx.wait()
        hold.unlink()
        assert rx.wait(60) == 1
    finally:
        hold.unlink(missing_ok=True)
        tx.kill()
        rx.kill()
    deadline = time.monotonic() + 20
    while source_guest.status() != "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _holds(source_guest) == [] and stray_uffds(source_guest.config.pid) == []
    _assert_runs_on(source_guest)
    t = track(source_guest, "uffd-wp")
    t.close()
    assert _leftovers(host_b) == []


def test_memvirts_own_reclaim_is_not_a_foreign_writer_but_a_plain_writer_is(image, vm_factory, host_b) -> None:
    """A reclaim holding the RAM file open for writing and punching free pages throughout a
    tracked migration (``--verify full``) does not fail it, its punches reach the target as holes
    and the guest's data checks out there. A plain process opening the RAM file read-write while
    another migration tracks it fails that one, and the source runs on."""
    from memvirt.dedup.reclaim import Reclaimer
    from memvirt.migrate.sender import migrate

    src = vm_factory("mg-rec", image, memory=512 << 20)
    src.exec("memtouch --hot 192M --content text --duration 1 > /dev/null 2>&1", timeout=120)  # dirty free memory
    src.exec_background(WORKLOAD, "/tmp/mig-memtouch.log")
    src.exec_background(f"datacheck write --size 16M --seed 5 --state {DATACHECK}", "/tmp/mig-dc.log")
    deadline = time.monotonic() + 60
    while src.exec(f"test -s {COUNTER} && test -f {DATACHECK}").rc != 0 and time.monotonic() < deadline:
        time.sleep(0.3)
    rx = Receiver(host_b)
    rec = Reclaimer(src)  # opens the RAM file for writing before the tracker starts, and holds it
    passes: list[int] = []
    result: dict[str, object] = {}
    live = threading.Event()

    def reclaim() -> None:
        while not live.wait(0):
            try:
                passes.append(rec.run().verified_pages)
            except Exception as e:  # the source stops once the target runs
                result.setdefault("reclaim", e)
                return
            src.exec("memtouch --hot 64M --content text --duration 1 > /dev/null 2>&1", timeout=120)

    def progress(st) -> None:
        result["rounds"] = st.index + 1

    th = threading.Thread(target=reclaim)
    try:
        th.start()
        rep = migrate(
            "mg-rec",
            "127.0.0.1",
            rx.port,
            SECRET.encode(),
            "mg-rec-b",
            dirty="uffd-wp",
            verify="full",
            max_bandwidth=8 << 20,  # long enough for reclaim passes while it tracks
            progress=progress,
        )
        live.set()
        th.join(120)
        assert rx.wait() == 0, rx.log
    finally:
        live.set()
        th.join(120)
        rec.close()
        rx.kill()
    assert rep.dirty_method == "uffd-wp" and rep.verify == "full", rep.to_json()
    assert sum(passes) > 0, ("the reclaim punched nothing during the migration", passes, result)
    os.environ["MEMVIRT_HOME"], home = host_b["MEMVIRT_HOME"], os.environ["MEMVIRT_HOME"]
    try:
        dst = VM.load("mg-rec-b")
        assert dst.status() == "running"
        res = dst.exec(f"datacheck verify --state {DATACHECK}")
        assert res.rc == 0 and res.text.startswith("OK"), res.text
    finally:
        os.environ["MEMVIRT_HOME"] = home

    # A foreign writer appearing while a tracked migration runs (capped, so it is still running).
    other = vm_factory("mg-fw", image, memory=512 << 20)
    other.exec_background(WORKLOAD, "/tmp/mig-memtouch.log")
    deadline = time.monotonic() + 60
    while other.exec(f"test -s {COUNTER}").rc != 0 and time.monotonic() < deadline:
        time.sleep(0.3)
    rx = Receiver(host_b)
    writer: subprocess.Popen[str] | None = None
    try:
        tx = _migrate("mg-fw", rx.port, "--as", "mg-fw-b", "--dirty", "uffd-wp", "--max-bandwidth", "4M")
        deadline = time.monotonic() + 120
        while not (Path(host_b["MEMVIRT_RAM_DIR"]) / "mg-fw-b.ram").exists():  # the migration has started
            assert tx.poll() is None and time.monotonic() < deadline, tx.communicate()
            time.sleep(0.05)
        code = (
            f"import os, time; os.open({other.config.ram_path!r}, os.O_RDWR); "
            "print('ready', flush=True); time.sleep(300)"
        )
        writer = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        out, err = tx.communicate(timeout=300)
        proc = subprocess.CompletedProcess(tx.args, tx.returncode, out, err)
        assert_error_after_progress(proc, 1, f"process {writer.pid} ", "can be written outside QEMU", "runs on here")
    finally:
        if writer is not None:
            writer.kill()
            writer.wait()
        rx.kill()
    _assert_runs_on(other)
