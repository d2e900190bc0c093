"""Physical-machine migration (``memvirt pm``): real guests move through their hibernation image.

Each migration test boots its own pair of 512 MiB guests on a LAN (the source is consumed). The
stream parser of the in-guest agent is also driven directly, on the host, with frames built by
:mod:`memvirt.pm.stream`: the checks that reject a bad peer run before ``/dev/snapshot`` is
opened, so the host's own kernel is never involved.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import pytest
from cli import assert_error_after_progress, assert_one_line_error, memvirt

from memvirt.image.build import Image
from memvirt.pm import stream
from memvirt.pm.events import parse_line
from memvirt.pm.facts import Facts, PMFailed, PMRefused, check_pair
from memvirt.qemu import lan
from memvirt.qemu.vm import VM

COUNTER = "/tmp/pm.count"
DATACHECK = "/tmp/pm.dc"
WORKLOAD = f"memtouch --hot 16M --cold 32M --content mix --dirty-rate 1M --counter-file {COUNTER}"
WORKLOAD_FULL = f"memtouch --hot 16M --cold 150M --content mix --dirty-rate 1M --counter-file {COUNTER}"
"""With the datacheck file and the system, about 200 MiB in use: above what hibernates without swap."""
KEY = bytes(range(32))
_PAIRS = itertools.count(1)


# --- checks on machine facts (no guest) -------------------------------------------------------


def _facts(name: str, **kw: object) -> Facts:
    base: dict[str, object] = dict(
        name=name,
        release="6.1.0-56-amd64",
        version="#1 SMP PREEMPT_DYNAMIC Debian 6.1.158-1",
        power_state="freeze mem disk",
        snapshot=True,
        pmagent=True,
        ram=512 << 20,
        mem_total=457 << 20,
        mem_free=380 << 20,
        mem_available=390 << 20,
        disks={"memvirt-shared": "/dev/vda", "memvirt-store": "/dev/vdb"},
    )
    base.update(kw)
    return Facts(**base)  # type: ignore[arg-type]


def test_checks_refuse_mismatch_missing_hibernation_and_oversized_images() -> None:
    check_pair(_facts("a"), _facts("b"), "iterative")
    with pytest.raises(PMRefused, match="kernel mismatch: 'a' runs 6.1.0-56-amd64.*'b' runs 6.12"):
        check_pair(_facts("a"), _facts("b", release="6.12.48-amd64"), "memory")
    with pytest.raises(PMRefused, match="kernel mismatch"):
        check_pair(_facts("a"), _facts("b", version="#1 SMP Debian 6.1.99-1"), "memory")
    with pytest.raises(PMRefused, match="'b' .* does not support hibernation"):
        check_pair(_facts("a"), _facts("b", power_state="freeze mem"), "memory")
    with pytest.raises(PMRefused, match="does not support hibernation .*/dev/snapshot missing"):
        check_pair(_facts("a", snapshot=False), _facts("b"), "memory")
    with pytest.raises(PMRefused, match="memory size mismatch"):
        check_pair(_facts("a"), _facts("b", mem_total=900 << 20), "memory")
    assert check_pair(_facts("a"), _facts("b"), "memory") is False, "an image that fits needs no zram"
    full = _facts("a", mem_free=250 << 20, zram=True)
    assert check_pair(full, _facts("b"), "memory") is True, "zram is added when the image would not fit"
    with pytest.raises(PMFailed, match="image too large for free memory.*migrate with --zram"):
        check_pair(full, _facts("b"), "memory", zram=False)
    with pytest.raises(PMRefused, match="cannot add zram swap .no zram module"):
        check_pair(_facts("a", mem_free=250 << 20), _facts("b"), "memory")
    with pytest.raises(PMRefused, match="no memvirt-shared disk"):
        check_pair(_facts("a"), _facts("b", disks={}), "disk")
    with pytest.raises(PMRefused, match="'a' has no memvirt-store disk .where the host's verdict goes"):
        check_pair(_facts("a", disks={"memvirt-shared": "/dev/vda"}), _facts("b"), "memory")


def test_console_events_parse() -> None:
    e = parse_line('\rmemvirt-pm: source thawed error="bad tag: wrong key" t=1.5', 7.0)
    assert e is not None and (e.role, e.name, e.fields["error"], e.at) == (
        "source",
        "thawed",
        "bad tag: wrong key",
        7.0,
    )
    assert parse_line("[    1.0] virtio_net virtio1 eth0: renamed", 0) is None


# --- the agent's stream parser, on the host ---------------------------------------------------


@pytest.fixture(scope="module")
def host_pmagent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pmagent built for the host the way the image builder builds it."""
    if not shutil.which("gcc"):
        pytest.skip("no gcc")
    src = resources.files("memvirt.image").joinpath("guest", "pmagent.c").read_bytes()
    d = tmp_path_factory.mktemp("pmagent")
    (d / "pmagent.c").write_bytes(src)
    proc = subprocess.run(
        ["gcc", "-O2", "-o", str(d / "pmagent"), str(d / "pmagent.c"), "-llz4", "-lzstd", "-lcrypto"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return d / "pmagent"


class Receiver:
    """``pmagent recv`` on loopback, and a client socket to it."""

    def __init__(self, binary: Path, key: bytes = KEY):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = {**os.environ, "PMAGENT_KEY": key.hex(), "PMAGENT_NO_CONSOLE": "1"}
        self.proc = subprocess.Popen(
            [str(binary), "recv", "--listen", f"127.0.0.1:{self.port}", "--timeout", "20"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "pmagent recv did not listen"
                time.sleep(0.05)
        self.to_target = stream.direction_key(KEY, stream.TO_TARGET)
        self.to_source = stream.direction_key(KEY, stream.TO_SOURCE)

    def error(self) -> str:
        self.sock.close()
        _, errs = self.proc.communicate(timeout=20)
        assert self.proc.returncode == 1, errs
        return [line for line in errs.splitlines() if line.startswith("pmagent:")][-1]

    def read_frame(self, seq: int) -> tuple[int, bytes]:
        data = b""
        while (
            len(data) < stream.HEADER.size + stream.TAG
            or len(data) < stream.HEADER.size + stream.TAG + stream.HEADER.unpack_from(data)[3]
        ):
            chunk = self.sock.recv(1 << 16)
            assert chunk, "receiver closed"
            data += chunk
        kind, payload, _ = stream.decode(self.to_source, data, seq)
        return kind, payload


def _open(ram_ok: bool = True, release: str | None = None) -> bytes:
    u = os.uname()
    with open("/proc/meminfo") as f:
        total = int(f.readline().split()[1]) * 1024
    return stream.open_payload(release or u.release, u.version, total if ram_ok else total + 4096)


@pytest.mark.parametrize(
    "case, needle",
    [
        ("wrong-key", "bad tag: wrong key or tampered stream"),
        ("tampered", "bad tag"),
        ("truncated", "stream truncated"),
        ("oversized", "malformed frame"),
        ("out-of-sequence", "frame out of sequence"),
        ("wrong-type", "unexpected frame type"),
        ("kernel", "kernel mismatch"),
        ("memory", "memory size mismatch"),
        ("peer-error", "peer failed"),
    ],
)
def test_agent_rejects_bad_streams(host_pmagent: Path, case: str, needle: str) -> None:
    rx = Receiver(host_pmagent)
    k = rx.to_target
    frame = {
        "wrong-key": stream.encode(stream.direction_key(b"x" * 32, stream.TO_TARGET), stream.Frame.OPEN, _open(), 0),
        "tampered": bytearray(stream.encode(k, stream.Frame.OPEN, _open(), 0)),
        "truncated": stream.encode(k, stream.Frame.OPEN, _open(), 0)[:100],
        "oversized": stream.HEADER.pack(stream.Frame.OPEN, 0, 0, 1 << 30, 0),
        "out-of-sequence": stream.encode(k, stream.Frame.OPEN, _open(), 1),
        "wrong-type": stream.encode(k, stream.Frame.HELLO, struct.pack("<Q", 1 << 20), 0),
        "kernel": stream.encode(k, stream.Frame.OPEN, _open(release="5.10.0-99-amd64"), 0),
        "memory": stream.encode(k, stream.Frame.OPEN, _open(ram_ok=False), 0),
        "peer-error": stream.encode(k, stream.Frame.ERR, b"", 0),
    }[case]
    if case == "tampered":
        frame[40] ^= 1  # type: ignore[index]
    rx.sock.sendall(bytes(frame))
    if case == "truncated":
        rx.sock.shutdown(socket.SHUT_WR)
    assert needle in rx.error()


def test_agent_authenticates_its_answer_and_refuses_an_oversized_image(host_pmagent: Path) -> None:
    """A good OPEN gets a READY under the reverse key; an image larger than free memory is refused
    before /dev/snapshot is opened."""
    rx = Receiver(host_pmagent)
    rx.sock.sendall(stream.encode(rx.to_target, stream.Frame.OPEN, _open(), 0))
    kind, payload = rx.read_frame(0)
    assert kind == stream.Frame.READY and stream.READY.unpack(payload)[0] > 0
    payload_on_wire = stream.encode(rx.to_target, stream.Frame.OPEN, _open(), 0)[stream.HEADER.size : -stream.TAG]
    assert (
        _open()[:5] == b"MVPM1"
        and b"MVPM1" not in payload_on_wire
        and os.uname().release.encode() not in payload_on_wire
    ), "the payload must be encrypted"
    with pytest.raises(stream.StreamError, match="bad tag"):
        stream.decode(rx.to_target, stream.encode(rx.to_source, kind, payload, 0), 0)
    rx.sock.sendall(stream.encode(rx.to_target, stream.Frame.HELLO, stream.HELLO.pack(1 << 50), 1))
    assert "image too large for free memory" in rx.error()


# --- real guests ------------------------------------------------------------------------------


def _boot_pair(image: Image, vm_factory, workload: str) -> tuple[VM, VM]:
    """Two fresh 512 MiB guests on one LAN, booted side by side; the first runs ``workload``."""
    n = next(_PAIRS)
    names, lan = (f"pm-s{n}", f"pm-t{n}"), f"pm-lan{n}"
    with ThreadPoolExecutor(2) as pool:
        src, dst = pool.map(lambda n: vm_factory(n, image, memory=512 << 20, lan_name=lan), names)
    assert src.config.lan_ip != dst.config.lan_ip
    src.exec_background(workload, "/tmp/pm-memtouch.log")
    src.exec_background(f"datacheck write --size 24M --seed 21 --state {DATACHECK}", "/tmp/pm-dc.log")
    deadline = time.monotonic() + 120
    while src.exec(f"test -s {COUNTER} && test -f {DATACHECK} && grep -q ready /tmp/pm-memtouch.log").rc != 0:
        assert time.monotonic() < deadline, "workload did not start"
        time.sleep(0.3)
    return src, dst


@pytest.fixture
def pair(image: Image, vm_factory) -> Iterator[tuple[VM, VM]]:
    yield _boot_pair(image, vm_factory, WORKLOAD)


def _counter(vm: VM) -> int:
    return int(vm.exec(f"cat {COUNTER}").check("counter").text)


def _assert_runs_on(vm: VM, since: int) -> None:
    first = _counter(vm)
    assert first >= since
    time.sleep(1.0)
    assert _counter(vm) > first, "the counter stopped"
    res = vm.exec(f"datacheck verify --state {DATACHECK}")
    assert res.rc == 0 and res.text.startswith("OK"), res.text


@pytest.mark.timeout(600)
@pytest.mark.parametrize("scheme, compress", [("memory", "lz4"), ("disk", "zstd"), ("iterative", "lz4")])
def test_machine_moves_and_its_workload_continues(pair: tuple[VM, VM], scheme: str, compress: str) -> None:
    src, dst = pair
    before = _counter(src)
    src_ip = src.config.lan_ip
    proc = memvirt(
        "pm", "migrate", src.name, "--to", dst.name, "--scheme", scheme, "--compress", compress, "--json", timeout=500
    )
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["scheme"] == scheme and r["image_bytes"] > r["used_bytes"] * 0.8 > 0
    assert 0 < r["freeze_seconds"] and 0 < r["create_seconds"] and 0 < r["restore_seconds"]
    parts = r["freeze_seconds"] + r["create_seconds"] + r["transfer_seconds"] + r["restore_seconds"]
    assert abs(parts - r["downtime_seconds"]) < 1.0, r
    assert r["stream_bytes"] < r["image_bytes"] and r["compression_ratio"] > 1
    assert r["pages"]["zero"] > 0
    if scheme == "iterative":
        assert r["precopy_pages"] > 0 and r["pages"]["ref"] > r["pages"]["literal"]
        assert lan.store_disk(VM.load(dst.name)).stat().st_blocks == 0, "the pre-copied pages must not stay behind"
    if scheme == "disk":
        assert r["disk_bytes"] > 0 and r["wire_bytes"] < 4096
        shared = lan.lan_dir(dst.config.lan) / "shared.raw"
        assert shared.stat().st_blocks == 0, "the machine's image must not stay on the shared disk"
    assert not src.alive() and not src.dir.exists(), "the powered-off source must be gone"
    moved = VM.load(dst.name)
    assert (
        moved.config.lan_ip == src_ip and moved.config.migrated is not None and moved.config.migrated.source == src.name
    )
    assert moved.config.migrated.by == "pm"
    assert moved.exec("hostname").text.strip() == src.name, "the target must run the source's machine"
    _assert_runs_on(moved, before)
    ip = moved.exec(f"ip -o -4 addr show | grep -c ' {src_ip}/'")
    assert ip.text.strip() == "1", "the machine keeps its address"


@pytest.mark.timeout(900)
def test_machine_more_than_half_full_moves_through_zram(image: Image, vm_factory) -> None:
    """About 200 MiB in use of 512 MiB (realistic mixed content): without swap the kernel cannot
    make the image (ENOMEM), so memvirt adds zram swap on the source, the image is made to fit,
    the machine and its swapped pages continue on the target, and the zram device is gone after."""
    src, dst = _boot_pair(image, vm_factory, WORKLOAD_FULL)
    used = src.exec("awk '/^MemTotal:/ {t = $2} /^MemFree:/ {f = $2} END {print (t - f) * 1024}' /proc/meminfo").text
    assert int(used) > 190 << 20, used
    check = json.loads(memvirt("pm", "check", src.name, "--to", dst.name, "--json").stdout)
    assert check["zram"] is True and check["image_estimate_bytes"] > check["image_limit_bytes"]
    before = _counter(src)
    proc = memvirt("pm", "migrate", src.name, "--to", dst.name, "--json", timeout=800)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["zram"] and r["swapped_bytes"] > 0 and not r["zram_error"], r
    assert r["image_bytes"] < check["image_estimate_bytes"], "the kernel must have shrunk the image into zram"
    z = r["zram_stats"]
    assert z["stored_bytes"] > z["compressed_bytes"] > 0, z
    moved = VM.load(dst.name)
    assert moved.exec("hostname").text.strip() == src.name
    _assert_runs_on(moved, before)
    assert "zram" not in moved.exec("cat /proc/swaps").text, "memvirt's zram swap must be gone after the migration"


def _refusals(src: VM, dst: VM) -> None:
    """Cheap refusals on a real pair: unknown or identical machines, a bad scheme, cloning or
    live-migrating a LAN machine, and a kernel without hibernation support (the real machine's
    facts with /dev/snapshot hidden)."""
    from memvirt.pm.facts import read_facts

    assert_one_line_error(memvirt("pm", "migrate", "pm-nonexistent", "--to", dst.name), 2, "no VM named")
    assert_one_line_error(memvirt("pm", "migrate", src.name, "--to", src.name), 2, "same VM")
    assert_one_line_error(
        memvirt("pm", "migrate", src.name, "--to", dst.name, "--scheme", "pigeon"), 2, "--scheme must be one of"
    )
    assert_one_line_error(memvirt("clone", src.name), 2, "is on VM LAN")
    assert_one_line_error(memvirt("migrate", src.name, "--to", "127.0.0.1:9", "--insecure"), 2, "is on VM LAN")
    ok = memvirt("pm", "check", src.name, "--to", dst.name, "--scheme", "iterative", "--json")
    assert (
        ok.returncode == 0
        and json.loads(ok.stdout)["image_limit_bytes"] > json.loads(ok.stdout)["image_estimate_bytes"]
    )
    real = read_facts(dst)
    assert real.hibernation and real.pmagent
    check_pair(read_facts(src), real, "iterative")
    with pytest.raises(PMRefused, match=f"kernel of '{dst.name}' .* does not support hibernation"):
        check_pair(read_facts(src), Facts(**{**real.__dict__, "snapshot": False}), "memory")


@pytest.mark.timeout(600)
def test_failed_transfer_leaves_the_source_running(pair: tuple[VM, VM]) -> None:
    """The target's receiver dies mid-stream: the source thaws, its workload goes on and the zram
    swap added for the migration (forced on) is gone; the same pair then migrates fine."""
    src, dst = pair
    _refusals(src, dst)
    proc = subprocess.Popen(
        [sys.executable, "-m", "memvirt", "pm", "migrate", src.name, "--to", dst.name, "--compress", "none", "--zram"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while "target receiving" not in dst.serial_log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        time.sleep(1.0)
        dst.exec("kill -9 $(pidof pmagent)").check("killing the receiver")
        out, errs = proc.communicate(timeout=300)
    finally:
        proc.kill()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, errs)
    assert_error_after_progress(result, 1, "migration failed", f"{src.name!r} runs on")
    assert src.alive() and dst.alive()
    assert "thawed" in src.exec("cat /tmp/pmagent-send.log").text
    assert "zram" not in src.exec("cat /proc/swaps").text, "the zram swap added for the migration must be gone"
    _assert_runs_on(src, 0)
    assert dst.exec("hostname").text.strip() == dst.name, "the target must be untouched"
    proc2 = memvirt("pm", "migrate", src.name, "--to", dst.name, "--json", timeout=500)
    assert proc2.returncode == 0, proc2.stderr
    _assert_runs_on(VM.load(dst.name), 0)


@pytest.mark.timeout(1200)
def test_lost_answers_are_settled_by_the_host_and_forged_roles_ignored(pair: tuple[VM, VM]) -> None:
    """The split-brain windows, forced by pmagent's test faults on the target.

    1. Disk scheme, the target's agent dies right after checking the whole image (no ACK, no ERR):
       the frozen source cannot know whether it restored, waits for the host, which sees the
       receiver gone and says "thaw"; the source runs on and no image is left on the shared disk.
    2. The target restores without acknowledging, and its console claims the source failed: the
       host ignores the forged lines, tells the waiting source to power off, and exactly one copy
       of the machine runs, on the target.
    """
    src, dst = pair
    before = _counter(src)
    shared = lan.lan_dir(dst.config.lan) / "shared.raw"
    dst.exec("echo vanish > /run/memvirt-pm.fault").check("setting the fault")
    proc = memvirt("pm", "migrate", src.name, "--to", dst.name, "--scheme", "disk", "--compress", "lz4", timeout=600)
    assert_error_after_progress(proc, 1, "migration failed", f"{src.name!r} runs on")
    assert "waits, frozen, for the host's verdict" in proc.stderr, proc.stderr
    log = src.exec("cat /tmp/pmagent-send.log").text
    assert "source uncertain" in log and "verdict thaw" in log and "source thawed" in log, log
    assert src.alive() and dst.alive()
    _assert_runs_on(src, before)
    assert shared.stat().st_blocks == 0, "the machine's image must not stay on the shared disk after a failure"
    assert dst.exec("hostname").text.strip() == dst.name, "the target must be untouched"

    before = _counter(src)
    dst.exec("echo drop-ack > /run/memvirt-pm.fault").check("setting the fault")
    seen = dst.serial_log.stat().st_size
    run = subprocess.Popen(
        [sys.executable, "-m", "memvirt", "pm", "migrate", src.name, "--to", dst.name, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while b"target listening" not in dst.serial_log.read_bytes()[seen:]:
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()
            time.sleep(0.1)
        forged = ("memvirt-pm: source failed error=forged t=1", "memvirt-pm: source thawed error=forged t=1")
        dst.exec("; ".join(f"echo '{line}' > /dev/console" for line in forged)).check("forging lines")
        out, errs = run.communicate(timeout=600)
    finally:
        run.kill()
    assert run.returncode == 0, errs
    r = json.loads(out)
    assert r["verdict"] == "off" and r["ack_lost"], r
    assert f"{dst.name}: source failed" in r["ignored_events"] and f"{dst.name}: source thawed" in r["ignored_events"]
    assert f"ignored an event from {dst.name}'s console claiming role 'source'" in errs
    assert not src.alive(), "the source must be powered off: one copy of the machine"
    moved = VM.load(dst.name)
    assert moved.exec("hostname").text.strip() == src.name
    _assert_runs_on(moved, before)
