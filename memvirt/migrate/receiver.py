"""The receiving end: starts a matching VM waiting for device state, writes RAM into its fresh RAM
file as frames arrive, verifies, and only then loads the device state and resumes it.

The target QEMU is started with ``-incoming defer`` while the first RAM arrives (its start-up
overlaps the first round and stays out of the downtime) and does not run a single guest
instruction until the sender said GO after the receiver checked that its RAM matches what the
sender meant to send (the XXH3-128 of both sides' per-page fingerprints). On any failure before
the target runs - a frame that fails to open, a malformed frame, the sender gone - the receiver
kills that QEMU and deletes its RAM file and state. Should the receiver itself be killed, its
watchdog (:mod:`memvirt.migrate.watchdog`) does the same.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import shlex
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from memvirt.errors import MemvirtError, UsageError, VMError
from memvirt.image.build import Image, load_image
from memvirt.memory import rammap
from memvirt.memory.source import Region
from memvirt.migrate import codec
from memvirt.migrate.fingerprint import ZERO_HASH, hash_pages
from memvirt.migrate.protocol import Channel, Kind, ProtocolError, server_handshake
from memvirt.paths import ram_dir
from memvirt.procs import spawn_watchdog
from memvirt.qemu.monitor import Monitor
from memvirt.qemu.vm import VM, VMConfig, check_name, launch_qemu, vms_root

PAGE = 4096
IGNORE_SHARED = [{"capability": "x-ignore-shared", "state": True}]
INCOMING = "incoming_by"
"""``vm.json`` extra key: pid of the receiver still filling this VM (absent once it runs)."""
SESSION_TIMEOUT = 60.0
LOAD_TIMEOUT = 60.0
_libc = ctypes.CDLL(None, use_errno=True)
_PUNCH = 0x01 | 0x02

Log = Callable[[str], None]


@dataclass
class Received:
    """What one incoming migration did, from the receiver's side."""

    name: str
    source: str
    peer: str
    rounds: int = 0
    pages: dict[str, int] = field(default_factory=lambda: {"data": 0, "zero": 0, "discard": 0, "dup": 0})
    bytes_received: int = 0
    seconds: float = 0.0
    ok: bool = False
    error: str = ""


class TargetRam:
    """The target's RAM file: pages written, punched and copied, and what each frame now holds."""

    def __init__(self, path: Path, regions: tuple[Region, ...]):
        self.fd = os.open(path, os.O_RDWR)
        self.regions = regions
        self.max_pfn = max(r.end for r in regions) // PAGE
        self.held = np.full(self.max_pfn, ZERO_HASH, dtype=np.uint64)
        self._starts = np.array([r.gpa // PAGE for r in regions], dtype=np.int64)
        self._ends = np.array([r.end // PAGE for r in regions], dtype=np.int64)
        self._offs = np.array([r.offset for r in regions], dtype=np.int64)
        self._map: mmap.mmap | None = None
        self._pages: np.ndarray | None = None

    def close(self) -> None:
        self._pages = None
        if self._map is not None:
            self._map.close()
            self._map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def digest(self) -> str:
        return xxhash.xxh3_128_hexdigest(self.held.tobytes())

    def _offsets(self, starts: np.ndarray, lengths: np.ndarray, what: str) -> np.ndarray:
        """File offsets of runs, each of which must lie inside one RAM region."""
        if len(starts) and (lengths.min() < 1 or starts.min() < 0):
            raise ProtocolError(f"malformed {what} frame: empty or negative run")
        i = np.searchsorted(self._starts, starts, side="right") - 1
        bad = (i < 0) | (starts + lengths > self._ends[np.maximum(i, 0)])
        if bad.any():
            raise ProtocolError(f"malformed {what} frame: pages outside guest RAM")
        return self._offs[i] + (starts - self._starts[i]) * PAGE

    def write(self, starts: np.ndarray, lengths: np.ndarray, data: bytes | memoryview) -> int:
        offs = self._offsets(starts, lengths, "DATA")
        view = memoryview(data)
        pos = 0
        for off, n in zip(offs.tolist(), (lengths * PAGE).tolist(), strict=True):
            os.pwrite(self.fd, view[pos:pos + n], off)
            pos += n
        self.held[codec.expand(starts, lengths)] = hash_pages(np.frombuffer(data, np.uint8))
        return int(lengths.sum())

    def punch(self, starts: np.ndarray, lengths: np.ndarray, what: str) -> int:
        for off, n in zip(self._offsets(starts, lengths, what).tolist(), (lengths * PAGE).tolist(), strict=True):
            if _libc.fallocate(self.fd, _PUNCH, ctypes.c_int64(off), ctypes.c_int64(n)) != 0:
                raise MemvirtError(f"cannot punch the target RAM file: {os.strerror(ctypes.get_errno())}")
        self.held[codec.expand(starts, lengths)] = ZERO_HASH
        return int(lengths.sum())

    def copy(self, dst: np.ndarray, src: np.ndarray) -> int:
        """``dst <- src`` page copies through a mapping of the file, vectorized: all sources are
        gathered before any destination is written."""
        ones = np.ones(len(dst), dtype=np.int64)
        sidx = self._offsets(src, ones, "DUP") // PAGE
        didx = self._offsets(dst, ones, "DUP") // PAGE
        pages = self._mapped()
        pages[didx] = pages[sidx]
        self.held[dst] = self.held[src]
        return len(dst)

    def _mapped(self) -> np.ndarray:
        """The file mapped read-write as ``(pages, 4096)`` (made on first use)."""
        if self._map is None:
            self._map = mmap.mmap(self.fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self._pages = np.frombuffer(self._map, dtype=np.uint8).reshape(-1, PAGE)
        assert self._pages is not None
        return self._pages


def start_target(setup: dict[str, Any], log: Log, ignore_shared: bool = True) -> VM:
    """A QEMU matching the source's machine, on a fresh RAM file, waiting with ``-incoming defer``
    (``ignore_shared=False`` for QEMU's own migration, which carries the RAM in its stream)."""
    vm, image = prepare_target(setup)
    try:
        launch_target(vm, image, log, ignore_shared)
    except BaseException:
        vm.discard()
        raise
    return vm


def prepare_target(setup: dict[str, Any]) -> tuple[VM, Image]:
    """The target VM's state and its fresh (all-holes) RAM file, watched by a watchdog; its QEMU
    is not started yet, so RAM can be written while it starts."""
    try:
        name = check_name(str(setup["name"]))
        memory, cpus = int(setup["memory"]), int(setup["cpus"])
        regions = rammap.from_dict(setup["regions"])
        image = load_image(Path(setup["image"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ProtocolError(f"malformed SETUP frame ({e.__class__.__name__}: {e})") from None
    vdir = vms_root() / name
    try:
        vdir.mkdir()
    except FileExistsError:
        raise UsageError(f"a VM named {name!r} already exists on the receiving host (migrate with --as NEW)") from None
    ram_path = ram_dir() / f"{name}.ram"
    config = VMConfig(
        name=name, memory=memory, cpus=cpus, ram="shared", image=str(image.path), kernel_release=image.release,
        accel=str(setup["accel"]), append=str(setup.get("append", "")), ram_path=str(ram_path),
        regions=rammap.to_dict(regions), started=time.time(),
        extra={INCOMING: os.getpid(), "migrated_from": str(setup.get("source", ""))},
    )
    vm = VM(config)
    vm.save()
    try:
        ram_path.unlink(missing_ok=True)
        fd = os.open(ram_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            os.ftruncate(fd, max(r.offset + r.size for r in regions))
        finally:
            os.close(fd)
        _watchdog(vm)
    except BaseException:
        vm.discard()
        raise
    return vm, image


def launch_target(vm: VM, image: Image, log: Log, ignore_shared: bool = True) -> None:
    """Start the prepared target's QEMU with ``-incoming defer``: it maps the RAM file but runs
    no guest instruction until device state is loaded and it is told ``cont``."""
    proc = launch_qemu(vm, image, incoming="defer")
    pidfile = vm.dir / "qemu.pid"
    if pidfile.exists():
        vm.config.pid = int(pidfile.read_text().strip() or 0)
        vm.save()
    if proc.returncode != 0:
        msg = proc.stderr.strip().splitlines()
        raise VMError(f"QEMU failed to start target VM {vm.name!r}: {msg[-1] if msg else proc.returncode}")
    with vm.monitor() as mon:
        mon.command("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": ignore_shared}])
    log(f"target VM {vm.name!r} started (pid {vm.config.pid}), waiting for RAM")


def _watchdog(vm: VM) -> None:
    """A detached process that removes the partial VM if this receiver dies before it runs."""
    spawn_watchdog("memvirt.migrate.watchdog", str(vm.dir))



def _load_device_state(vm: VM, mon: Monitor, state: bytes) -> None:
    """Feed the source's device state to the waiting QEMU; it must end ``paused`` (not running)."""
    path = vm.dir / "incoming.state"
    path.write_bytes(state)
    mon.command("migrate-incoming", uri=f"exec:cat {shlex.quote(str(path))}", timeout=LOAD_TIMEOUT)
    deadline = time.monotonic() + LOAD_TIMEOUT
    while (status := mon.status()) == "inmigrate":
        if time.monotonic() > deadline:
            raise VMError(f"target VM {vm.name!r} did not load the device state in {LOAD_TIMEOUT:.0f} s")
        time.sleep(0.0005)
    path.unlink(missing_ok=True)
    if status != "paused":
        raise VMError(f"target VM {vm.name!r} is {status} after loading the device state, expected paused")


def _hold(hold_file: Path | None, log: Log) -> None:
    """Test hook: with the target verified and paused, create ``hold_file`` and wait until it is removed."""
    if hold_file is None:
        return
    hold_file.write_text(str(os.getpid()))
    log(f"holding before resume until {hold_file} is removed")
    deadline = time.monotonic() + SESSION_TIMEOUT
    while hold_file.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    hold_file.unlink(missing_ok=True)


def receive_one(chan: Channel, peer: str, log: Log, hold_file: Path | None = None) -> Received:
    """Run one authenticated migration session to its end; raises (after cleaning up) on failure."""
    t0 = time.perf_counter()
    setup = chan.recv_json(Kind.SETUP)
    res = Received(name=str(setup.get("name", "?")), source=str(setup.get("source", "?")), peer=peer)
    vm, image = prepare_target(setup)
    ram: TargetRam | None = None
    mon: Monitor | None = None
    running = False
    pool = ThreadPoolExecutor(1, thread_name_prefix="memvirt-target")
    try:
        qemu = pool.submit(launch_target, vm, image, log)
        ram = TargetRam(Path(vm.config.ram_path), vm.regions)
        chan.send_json(Kind.READY, {"name": vm.name})
        state = b""
        while True:
            kind, payload = chan.recv(Kind.DATA, Kind.ZERO, Kind.DISCARD, Kind.DUP, Kind.ROUND_END, Kind.DEVSTATE,
                                      borrow=True)
            if kind == Kind.DATA:
                c, starts, lengths, blob = codec.decode_data(payload)
                res.pages["data"] += ram.write(starts, lengths, codec.decompress(c, blob, int(lengths.sum()) * PAGE))
            elif kind in (Kind.ZERO, Kind.DISCARD):
                starts, lengths = codec.decode_pairs(payload, kind.name)
                res.pages[kind.name.lower()] += ram.punch(starts, lengths, kind.name)
            elif kind == Kind.DUP:
                dst, src = codec.decode_pairs(payload, "DUP")
                res.pages["dup"] += ram.copy(dst, src)
            elif kind == Kind.ROUND_END:
                res.rounds += 1
                if qemu.done():
                    qemu.result()
            else:
                state = bytes(payload)
                break
        commit = chan.recv_json(Kind.COMMIT)
        if commit.get("digest") != ram.digest():
            raise ProtocolError("the target's RAM does not match what the sender sent (final digest differs)")
        ram.close()
        qemu.result()
        mon = vm.monitor()
        _load_device_state(vm, mon, state)
        _hold(hold_file, log)
        chan.send_json(Kind.VERIFIED, {"digest": commit["digest"]})
        if chan.recv_json(Kind.GO).get("resume", True):
            mon.command("cont")
            if (status := mon.status()) != "running":
                raise VMError(f"target VM {vm.name!r} is {status} after cont")
        running = True
        vm.config.extra.pop(INCOMING, None)
        vm.config.extra["migrated_at"] = time.time()
        vm.save()
        chan.send_json(Kind.RUNNING, {"name": vm.name, "pid": vm.config.pid})
        mon.close()
    except BaseException as e:
        pool.shutdown(wait=True)
        if ram is not None:
            ram.close()
        if mon is not None:
            mon.close()
        if not running:
            vm.discard()
        msg = str(e) if isinstance(e, MemvirtError) else f"{e.__class__.__name__}: {e}"
        chan.send_error(f"receiver: {msg}; target VM removed" if not running else f"receiver: {msg}")
        raise
    pool.shutdown()
    res.bytes_received = chan.bytes_received
    res.seconds = time.perf_counter() - t0
    res.ok = True
    return res


def serve(
    host: str, port: int, secret: bytes | None, count: int = 1, timeout: float = 600.0,
    hold_file: Path | None = None, log: Log = print, listening: Callable[[str, int], None] | None = None,
) -> list[Received]:
    """Accept up to ``count`` migrations (failed ones count too) within ``timeout`` seconds.

    Peers that fail the handshake are refused and do not count. Raises if the last migration failed.
    """
    if count < 1:
        raise UsageError("--count must be at least 1")
    try:
        srv = socket.create_server((host, port), reuse_port=False)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    results: list[Received] = []
    deadline = time.monotonic() + timeout
    with srv:
        bound = srv.getsockname()
        if listening:
            listening(bound[0], bound[1])
        while len(results) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise MemvirtError(f"no sender came in {timeout:.0f} s ({len(results)} of {count} migrations received)")
            srv.settimeout(left)
            try:
                conn, addr = srv.accept()
            except TimeoutError:
                continue
            peer = f"{addr[0]}:{addr[1]}"
            try:
                chan = server_handshake(conn, secret, SESSION_TIMEOUT)
            except ProtocolError as e:
                log(f"refused {peer}: {e}")
                conn.close()
                continue
            try:
                res = receive_one(chan, peer, log, hold_file)
                log(f"received {res.name!r} from {peer}: running")
            except Exception as e:
                msg = str(e) if isinstance(e, MemvirtError) else f"{e.__class__.__name__}: {e}"
                res = Received(name="?", source="?", peer=peer, error=msg)
                log(f"migration from {peer} failed: {msg}")
            finally:
                chan.close()
            results.append(res)
    if not results[-1].ok:
        raise MemvirtError(f"incoming migration failed: {results[-1].error}; the partial VM was removed")
    return results
