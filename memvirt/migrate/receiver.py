"""The receiving end: starts a matching VM waiting for device state, writes RAM into its fresh RAM
file as frames arrive, verifies, and only then loads the device state and resumes it.

The target QEMU is started with ``-incoming defer`` while the first RAM arrives (its start-up
overlaps the first round and stays out of the downtime) and does not run a single guest
instruction until the sender said GO after the receiver checked that its RAM matches what the
sender meant to send (the XXH3-128 of both sides' per-page fingerprints). On any failure before
the target runs - a frame that fails to open, a malformed frame, the sender gone - the receiver
kills that QEMU and deletes its RAM file and state. Should the receiver itself be killed, its
watchdog (:mod:`memvirt.migrate.watchdog`) does the same, up to the moment the receiver commits
(clears its mark, then resumes the target): from then on the target is never removed.

Everything from the peer is checked before use, even after it proved the secret: SETUP field by
field (:func:`check_setup`), every page run against the RAM regions in exact integers before
anything is decompressed or written (:meth:`TargetRam.apply`).
"""

from __future__ import annotations

import mmap
import os
import queue
import re
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import numpy as np
import xxhash

from memvirt.arch import ARCHES
from memvirt.errors import MemvirtError, UsageError, VMError
from memvirt.image.build import Image, load_image
from memvirt.memory import rammap
from memvirt.memory.holes import punch
from memvirt.memory.pagehash import ZERO_HASH, hash_pages
from memvirt.memory.source import PAGE_SIZE, Region
from memvirt.migrate import codec
from memvirt.migrate.protocol import (
    HANDSHAKE_TIMEOUT,
    MAX_FRAME,
    Channel,
    Kind,
    ProtocolError,
    check_insecure,
    check_secret,
    parse_json,
    server_handshake,
)
from memvirt.paths import cache_home, private_dir, ram_dir, touch_private
from memvirt.procs import spawn_watchdog
from memvirt.qemu.config import Migrated
from memvirt.qemu.monitor import Monitor
from memvirt.qemu.vm import VM, VMConfig, check_name, launch_qemu, vms_root

SESSION_TIMEOUT = 60.0
LOAD_TIMEOUT = 60.0
MAX_HANDSHAKES = 8
"""Handshakes a receiver runs at once (each over within HANDSHAKE_TIMEOUT)."""
SETUP_KEYS = {"name", "source", "memory", "cpus", "image", "accel", "append", "regions"}
ACCELS = ("kvm", "tcg")
MIB = 1 << 20
MIN_MEMORY = 64 << 20
MAX_CPUS = 64
MAX_APPEND = 1024
FAULT_ENV = "MEMVIRT_TEST_FAULT"

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
    """The target's RAM file: pages written, punched and copied, and what each frame now holds.

    ``regions`` must be sorted, non-overlapping and page-aligned (:func:`check_setup`); the file is
    exactly their bytes, and no frame, however crafted, reaches a byte outside them or grows it."""

    def __init__(self, path: Path, regions: tuple[Region, ...]):
        self.regions = regions
        self.max_pfn = max(r.end for r in regions) // PAGE_SIZE
        if self.max_pfn >= 1 << 32:
            raise ProtocolError("guest RAM map reaches beyond 16 TiB")
        self.fd = os.open(path, os.O_RDWR)
        self.held = np.full(self.max_pfn, ZERO_HASH, dtype=np.uint64)
        self._starts = np.array([r.gpa // PAGE_SIZE for r in regions], dtype=np.int64)
        self._ends = np.array([r.end // PAGE_SIZE for r in regions], dtype=np.int64)
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

    def apply(self, kind: Kind, payload: bytes | memoryview) -> int:
        """Carry out one DATA, ZERO, DISCARD or DUP frame; returns the pages it covered. Every run
        is checked against the regions before anything is decompressed or written, so a malformed
        frame raises :class:`ProtocolError` and changes nothing."""
        if kind == Kind.DATA:
            c, starts, lengths, blob = codec.decode_data(payload)
            offs, n = self._offsets(starts, lengths, "DATA", min(MAX_FRAME // PAGE_SIZE, self.max_pfn))
            return self._write(offs, starts, lengths, codec.decompress(c, blob, n * PAGE_SIZE))
        if kind in (Kind.ZERO, Kind.DISCARD):
            starts, lengths = codec.decode_pairs(payload, kind.name)
            offs, _ = self._offsets(starts, lengths, kind.name, self.max_pfn)
            return self._punch(offs, starts, lengths)
        if kind == Kind.DUP:
            dst, src = codec.decode_pairs(payload, "DUP")
            return self._copy(dst, src)
        raise ProtocolError(f"unexpected {kind.name} frame")

    def _offsets(self, starts: np.ndarray, lengths: np.ndarray, what: str, most: int) -> tuple[np.ndarray, int]:
        """File offsets of runs (peer's uint64s), each of which must lie inside one RAM region, and
        the pages they cover, at most ``most``. Starts and lengths are bounded by the RAM's size
        before they are added or multiplied, so no sum can wrap around."""
        if len(starts) == 0:
            return np.empty(0, np.int64), 0
        if int(lengths.min()) < 1 or int(lengths.max()) > self.max_pfn or int(starts.max()) >= self.max_pfn:
            raise ProtocolError(f"malformed {what} frame: empty run or pages outside guest RAM")
        starts, lengths = starts.astype(np.int64), lengths.astype(np.int64)
        i = np.searchsorted(self._starts, starts, side="right") - 1
        if ((i < 0) | (starts + lengths > self._ends[np.maximum(i, 0)])).any():
            raise ProtocolError(f"malformed {what} frame: pages outside guest RAM")
        n = int(lengths.sum())
        if n > most:
            raise ProtocolError(f"malformed {what} frame: {n} pages in one frame (at most {most})")
        return self._offs[i] + (starts - self._starts[i]) * PAGE_SIZE, n

    def _write(self, offs: np.ndarray, starts: np.ndarray, lengths: np.ndarray, data: bytes | memoryview) -> int:
        view = memoryview(data)
        pos = 0
        for off, n in zip(offs.tolist(), (lengths.astype(np.int64) * PAGE_SIZE).tolist(), strict=True):
            os.pwrite(self.fd, view[pos : pos + n], off)
            pos += n
        self.held[codec.expand(starts.astype(np.int64), lengths.astype(np.int64))] = hash_pages(
            np.frombuffer(data, np.uint8)
        )
        return int(lengths.sum())

    def _punch(self, offs: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> int:
        punch(self.fd, offs, lengths.astype(np.int64) * PAGE_SIZE, "the target RAM file")
        self.held[codec.expand(starts.astype(np.int64), lengths.astype(np.int64))] = ZERO_HASH
        return int(lengths.sum())

    def _copy(self, dst: np.ndarray, src: np.ndarray) -> int:
        """``dst <- src`` page copies through a mapping of the file, vectorized: all sources are
        gathered before any destination is written."""
        ones = np.ones(len(dst), dtype=np.uint64)
        soff, _ = self._offsets(src, ones, "DUP", self.max_pfn)
        doff, _ = self._offsets(dst, ones, "DUP", self.max_pfn)
        pages = self._mapped()
        pages[doff // PAGE_SIZE] = pages[soff // PAGE_SIZE]
        self.held[dst.astype(np.int64)] = self.held[src.astype(np.int64)]
        return len(dst)

    def _mapped(self) -> np.ndarray:
        """The file mapped read-write as ``(pages, 4096)`` (made on first use)."""
        if self._map is None:
            self._map = mmap.mmap(self.fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self._pages = np.frombuffer(self._map, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        assert self._pages is not None
        return self._pages


@dataclass
class Setup:
    """A SETUP frame, checked: what the target VM is made from."""

    name: str
    source: str
    memory: int
    cpus: int
    image: Path
    accel: str
    append: str
    regions: tuple[Region, ...]


def check_setup(setup: object) -> Setup:
    """Validate every field of a SETUP frame, even from an authenticated peer: its strings reach
    QEMU's command line (``-machine pc,accel=...`` would take a comma as a new option) and its
    numbers size files and arrays here. Raises :class:`ProtocolError` naming the first bad field.

    The image is looked up by name in this host's own image cache (the peer's path is not used),
    and the region list must be the ``pc`` machine's map for the memory size, which is what
    QEMU builds from ``-m``: any other list would write pages where the guest does not see them."""

    def bad(what: str) -> ProtocolError:
        return ProtocolError(f"refused SETUP: {what}")

    if not isinstance(setup, dict):
        raise bad("not a JSON object")
    extra = set(setup) - SETUP_KEYS
    if extra:
        raise bad(f"unknown field {sorted(extra)[0]!r}"[:200])
    missing = SETUP_KEYS - {"source", "append"} - set(setup)
    if missing:
        raise bad(f"missing field {sorted(missing)[0]!r}")

    def text(key: str, limit: int) -> str:
        v = setup.get(key, "")
        if not isinstance(v, str) or len(v) > limit or not re.fullmatch(r"[\x20-\x7e]*", v):
            raise bad(f"{key} must be at most {limit} printable ASCII characters")
        return v

    def number(key: str, lo: int, hi: int) -> int:
        v = setup[key]
        if type(v) is not int or not lo <= v <= hi:
            raise bad(f"{key} must be a whole number from {lo} to {hi}")
        return v

    try:
        name = check_name(text("name", 64))
    except UsageError as e:
        raise bad(str(e)) from e
    accel = setup["accel"]
    if accel not in ACCELS:
        raise bad(f"accel must be one of {', '.join(ACCELS)}, not {str(accel)[:40]!r}")
    memory = number("memory", MIN_MEMORY, max_memory())
    if memory % MIB:
        raise bad("memory must be a whole number of MiB")
    image = setup["image"]
    if not isinstance(image, str) or len(image) > 4096:
        raise bad("image must be the image's path on the source (a string)")
    image_name = image.rpartition("/")[2]  # only the name is used: the folder is this host's cache
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}", image_name):
        raise bad(f"image name {image_name[:80]!r} is not a memvirt image name")
    return Setup(
        name=name,
        source=text("source", 256),
        memory=memory,
        cpus=number("cpus", 1, MAX_CPUS),
        image=cache_home() / "images" / image_name,
        accel=accel,
        append=text("append", MAX_APPEND),
        regions=check_regions(setup["regions"], memory),
    )


def check_regions(items: object, memory: int) -> tuple[Region, ...]:
    """The SETUP region list as Regions: page-aligned, sorted, overlapping neither in guest-physical
    space nor in the file, summing to ``memory``, and the ``pc`` machine's map for it."""

    def bad(what: str) -> ProtocolError:
        return ProtocolError(f"refused SETUP: regions {what}")

    if not isinstance(items, list) or not 1 <= len(items) <= 8:
        raise bad("must be a list of 1 to 8 regions")
    regions = []
    for r in items:
        if not isinstance(r, dict) or set(r) != {"gpa", "size", "offset"}:
            raise bad("must each have exactly gpa, size and offset")
        vals = [r["gpa"], r["size"], r["offset"]]
        if any(type(v) is not int or not 0 <= v < 1 << 52 or v % PAGE_SIZE for v in vals) or r["size"] == 0:
            raise bad("must have page-aligned gpa, size and offset below 4 PiB, and a size")
        regions.append(Region(*vals))
    by_gpa = sorted(regions, key=lambda r: r.gpa)
    by_off = sorted(regions, key=lambda r: r.offset)
    if by_gpa != regions or any(a.end > b.gpa for a, b in pairwise(by_gpa)):
        raise bad("overlap or are not in guest-physical order")
    if any(a.offset + a.size > b.offset for a, b in pairwise(by_off)):
        raise bad("overlap in the RAM file")
    if sum(r.size for r in regions) != memory:
        raise bad(f"add up to {sum(r.size for r in regions)} bytes, not the memory size {memory}")
    if tuple(regions) not in {rammap.machine_ram_map(a, memory) for a in ARCHES}:
        raise bad(f"are not the RAM map of a machine memvirt starts (pc, arm64 virt) for {memory >> 20} MiB")
    return tuple(regions)


def max_memory() -> int:
    """Largest guest received here: this host's RAM (its RAM file lives on tmpfs), at most 1 TiB."""
    return min(1 << 40, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def start_target(setup: object, log: Log, ignore_shared: bool = True) -> VM:
    """A QEMU matching the source's machine, on a fresh RAM file, waiting with ``-incoming defer``
    (``ignore_shared=False`` for QEMU's own migration, which carries the RAM in its stream)."""
    vm, image = prepare_target(setup)
    try:
        launch_target(vm, image, log, ignore_shared)
    except BaseException:
        vm.discard()
        raise
    return vm


def prepare_target(setup: object) -> tuple[VM, Image]:
    """The target VM's state and its fresh (all-holes) RAM file, watched by a watchdog; its QEMU
    is not started yet, so RAM can be written while it starts. ``setup`` is checked first
    (:func:`check_setup`)."""
    st = check_setup(setup)
    image = load_image(st.image)
    if tuple(st.regions) != rammap.machine_ram_map(image.arch, st.memory):
        raise UsageError(f"the source's RAM map is not that of an {image.arch} guest of image {image.name}")
    vdir = vms_root() / st.name
    ram_path = ram_dir() / f"{st.name}.ram"
    try:
        private_dir(vdir, exclusive=True)
    except FileExistsError:
        raise UsageError(
            f"a VM named {st.name!r} already exists on the receiving host (migrate with --as NEW)"
        ) from None
    config = VMConfig(
        name=st.name,
        memory=st.memory,
        cpus=st.cpus,
        arch=image.arch,
        ram="shared",
        image=str(image.path),
        kernel_release=image.release,
        accel=st.accel,
        append=st.append,
        ram_path=str(ram_path),
        regions=rammap.to_dict(st.regions),
        started=time.time(),
        incoming_by=os.getpid(),
        migrated=Migrated(st.source),
    )
    vm = VM(config)
    vm.save()
    try:
        ram_path.unlink(missing_ok=True)
        touch_private(ram_path, max(r.offset + r.size for r in st.regions))
        _watchdog(vm)
    except BaseException:
        vm.discard()
        raise
    return vm, image


def launch_target(vm: VM, image: Image, log: Log, ignore_shared: bool = True) -> None:
    """Start the prepared target's QEMU with ``-incoming defer``: it maps the RAM file but runs
    no guest instruction until device state is loaded and it is told ``cont``."""
    try:
        launch_qemu(vm, image, "target VM", incoming="defer")
    finally:
        if vm.config.pid:  # the watchdog kills this QEMU should the receiver die
            vm.save()
    with vm.monitor() as mon:
        # events: the receiver waits for the load's MIGRATION event instead of polling query-status.
        mon.set_capabilities(x_ignore_shared=ignore_shared, events=True)
    log(f"target VM {vm.name!r} started (pid {vm.config.pid}), waiting for RAM")


def _watchdog(vm: VM) -> None:
    """A detached process that removes the partial VM if this receiver dies before it runs."""
    spawn_watchdog("memvirt.migrate.watchdog", str(vm.dir))


class Marks:
    """Seconds since the device state arrived at each step of the switch-over here, sent back to the
    sender for its report (durations on this host's clock: the two hosts' clocks are never compared)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.points: dict[str, float] = {}

    def mark(self, name: str) -> None:
        self.points[name] = round(time.perf_counter() - self.t0, 5)


def _load_device_state(vm: VM, mon: Monitor, state: bytes, marks: Marks | None = None) -> None:
    """Feed the source's device state to the waiting QEMU; it must end ``paused`` (not running)."""
    fd = os.memfd_create("memvirt-devstate", os.MFD_CLOEXEC)  # no file to write, sync or remove
    try:
        view = memoryview(state)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)  # QEMU reads from the offset its copy shares with this one
        # A descriptor, not exec:cat: QEMU forking a shell and cat was ~50-100 ms of downtime on a loaded host.
        mon.send_fd(fd, "devstate")
    finally:
        os.close(fd)
    if marks:
        marks.mark("rx_file")
    mon.command("migrate-incoming", uri="fd:devstate", timeout=LOAD_TIMEOUT)
    if marks:
        marks.mark("rx_incoming")
    # The MIGRATION event (capability ``events``, set at launch) ends the wait; polling
    # query-status every half millisecond took the lock QEMU's load runs under.
    deadline = time.monotonic() + LOAD_TIMEOUT
    while (left := deadline - time.monotonic()) > 0:
        ev = mon.wait_event("MIGRATION", left)
        if ev is None or ev.get("data", {}).get("status") in ("completed", "failed", "cancelled"):
            break
    status = mon.status()
    if status == "inmigrate":
        raise VMError(f"target VM {vm.name!r} did not load the device state in {LOAD_TIMEOUT:.0f} s")
    if marks:
        marks.mark("rx_loaded")
    if status != "paused":
        raise VMError(f"target VM {vm.name!r} is {status} after loading the device state, expected paused")


def _fault(point: str) -> None:
    """Fault injection for tests: SIGKILL this receiver at ``point`` when ``$MEMVIRT_TEST_FAULT``
    names it (a real kill at an exact moment, which no outside timing can hit)."""
    if os.environ.get(FAULT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


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
    res = Received(name=str(setup.get("name", "?"))[:64], source=str(setup.get("source", "?"))[:256], peer=peer)
    try:
        vm, image = prepare_target(setup)
    except Exception as e:
        chan.send_error(f"receiver: {e}" if isinstance(e, MemvirtError) else f"receiver: {e.__class__.__name__}: {e}")
        raise
    ram: TargetRam | None = None
    mon: Monitor | None = None
    committed = False
    pool = ThreadPoolExecutor(1, thread_name_prefix="memvirt-target")
    qemu: Future[Monitor] | None = None
    try:

        def launch() -> Monitor:
            launch_target(vm, image, log)
            return vm.monitor()  # opened now: a QMP handshake at the switch-over would be downtime

        qemu = pool.submit(launch)
        ram = TargetRam(Path(vm.config.ram_path), vm.regions)
        chan.send_json(Kind.READY, {"name": vm.name})
        state = b""
        while True:
            kind, payload = chan.recv(
                Kind.DATA, Kind.ZERO, Kind.DISCARD, Kind.DUP, Kind.ROUND_END, Kind.DEVSTATE, borrow=True
            )
            if kind == Kind.ROUND_END:
                res.rounds += 1
                if not parse_json(Kind.ROUND_END, payload).get("final"):
                    chan.send_json(Kind.ROUND_ACK, {"round": res.rounds - 1})
                if qemu.done():
                    qemu.result()
            elif kind == Kind.DEVSTATE:
                state = bytes(payload)
                marks = Marks()
                break
            else:
                res.pages[kind.name.lower()] += ram.apply(kind, payload)
        commit = chan.recv_json(Kind.COMMIT)
        marks.mark("rx_commit")
        if commit.get("digest") != ram.digest():
            raise ProtocolError("the target's RAM does not match what the sender sent (final digest differs)")
        # The RAM stays open (and its mapping, if a DUP frame made one) until the target runs:
        # unmapping a 2 GiB mapping here was 50 ms of downtime on a loaded host; every byte is
        # already in the file, which QEMU maps itself.
        marks.mark("rx_digest")
        mon = qemu.result()
        _load_device_state(vm, mon, state, marks)
        _hold(hold_file, log)
        chan.send_json(Kind.VERIFIED, {"digest": commit["digest"], "marks": marks.points})
        resume = chan.recv_json(Kind.GO).get("resume", True)
        marks.mark("rx_go")
        # The mark goes before cont: once it is gone the watchdog leaves the target alone, so a
        # receiver killed from here on leaves a target that may run (or waits paused), never
        # one killed after it ran.
        vm.config.incoming_by = 0
        if vm.config.migrated is not None:
            vm.config.migrated.at = time.time()
        vm.save()
        committed = True
        _fault("committed")
        marks.mark("rx_saved")
        if resume:
            mon.command("cont")
            marks.mark("rx_cont")
            _fault("resumed")
            if (status := mon.status()) != "running":
                raise VMError(f"target VM {vm.name!r} is {status} after cont")
        marks.mark("rx_running")
        chan.send_json(Kind.RUNNING, {"name": vm.name, "pid": vm.config.pid, "marks": marks.points})
        ram.close()
        mon.close()
    except BaseException as e:
        pool.shutdown(wait=True)
        if ram is not None:
            ram.close()
        if mon is None and qemu is not None and qemu.done() and qemu.exception() is None:
            mon = qemu.result()
        if mon is not None:
            mon.close()
        if not committed:
            vm.discard()
        msg = str(e) if isinstance(e, MemvirtError) else f"{e.__class__.__name__}: {e}"
        chan.send_error(
            f"receiver: {msg}; target VM removed"
            if not committed
            else f"receiver: {msg}; target VM {vm.name!r} left as it is (it may have run)"
        )
        raise
    pool.shutdown()
    res.bytes_received = chan.bytes_received
    res.seconds = time.perf_counter() - t0
    res.ok = True
    return res


def serve(
    host: str,
    port: int,
    secret: bytes | None,
    count: int = 1,
    timeout: float = 600.0,
    hold_file: Path | None = None,
    log: Log = print,
    listening: Callable[[str, int], None] | None = None,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> list[Received]:
    """Accept up to ``count`` migrations (failed ones count too) within ``timeout`` seconds.

    Handshakes run on threads of their own, up to :data:`MAX_HANDSHAKES` at once, each over within
    ``handshake_timeout`` seconds (:data:`~memvirt.migrate.protocol.HANDSHAKE_TIMEOUT` by default):
    a peer without the secret holds a slot for at most that long and never keeps a good sender
    waiting (unless it floods every slot; then newcomers are refused at once, not queued).
    Authenticated sessions are served one after the other, in the order they proved the secret.
    Peers that fail the handshake are refused and do not count. Raises if the last migration failed.
    """
    if count < 1:
        raise UsageError("--count must be at least 1")
    if not 0 < handshake_timeout <= 600:
        raise UsageError("--handshake-timeout must be more than 0 and at most 600 seconds")
    if secret is None:
        check_insecure(host)
    else:
        check_secret(secret)
    try:
        srv = socket.create_server((host, port), reuse_port=False)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    results: list[Received] = []
    deadline = time.monotonic() + timeout
    ready: queue.Queue[tuple[Channel, str]] = queue.Queue()
    slots = threading.BoundedSemaphore(MAX_HANDSHAKES)
    lock = threading.Lock()
    stopped = False

    def handshake(conn: socket.socket, peer: str) -> None:
        try:
            chan = server_handshake(conn, secret, SESSION_TIMEOUT, handshake_timeout)
        except Exception as e:
            log(f"refused {peer}: {e}")
            conn.close()
            return
        finally:
            slots.release()
        with lock:
            if not stopped:
                ready.put((chan, peer))
                return
        chan.send_error("receiver: no longer accepting migrations")
        chan.close()

    def accept() -> None:
        while not stopped:
            try:
                conn, addr = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            peer = f"{addr[0]}:{addr[1]}"
            if not slots.acquire(blocking=False):
                log(f"refused {peer}: {MAX_HANDSHAKES} handshakes already in progress")
                conn.close()
                continue
            threading.Thread(target=handshake, args=(conn, peer), name="memvirt-handshake", daemon=True).start()

    with srv:
        srv.settimeout(0.2)
        bound = srv.getsockname()
        if listening:
            listening(bound[0], bound[1])
        acceptor = threading.Thread(target=accept, name="memvirt-accept", daemon=True)
        acceptor.start()
        try:
            while len(results) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise MemvirtError(
                        f"no sender came in {timeout:.0f} s ({len(results)} of {count} migrations received)"
                    )
                try:
                    chan, peer = ready.get(timeout=left)
                except queue.Empty:
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
        finally:
            with lock:
                stopped = True
            acceptor.join()
            while not ready.empty():
                chan, _ = ready.get()
                chan.send_error("receiver: no longer accepting migrations")
                chan.close()
    if not results[-1].ok:
        raise MemvirtError(f"incoming migration failed: {results[-1].error}; the partial VM was removed")
    return results
