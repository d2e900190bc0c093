"""The sending end: precopy rounds while the guest runs, then pause, final round, device state,
and the source stopped only once the target says its guest runs.

QEMU moves only device state: both QEMUs have ``x-ignore-shared``, so the source's ``migrate``
(to a local file, read back and sent in a DEVSTATE frame) leaves its RAM file out; the receiver
feeds it to the target only after all RAM was written and verified. Until the target confirms,
every failure (the receiver refusing or dying, the connection dropping, a malformed or forged
frame) resumes the source if this migration paused or throttled it: the source's RAM is only
ever read, so it runs on unchanged. If the sender itself dies, its watchdog resumes the source.
Once GO was sent the target may run, so from then on the source is never resumed automatically:
a guest must not run twice.

What each round sends comes from the dirty tracker (:mod:`memvirt.qemu.dirty`, userfaultfd
write-protect and ``PAGEMAP_SCAN``): round 0 every page in use, each later round the pages written
since the previous scan, the final round (guest paused) those written since the last, so downtime
follows the dirty rate, not the memory in use. When to stop is estimated from the measured dirty
rate. Where the kernel lacks the tracker (or another userfaultfd holds the RAM), each round
fingerprints every page in use instead, as before; the report's ``notice`` says so.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from memvirt.errors import MemvirtError, UsageError, VMError
from memvirt.memory.ramfile import RamFileMemory
from memvirt.migrate.codec import CodecChooser
from memvirt.migrate.precopy import Round, Tracker
from memvirt.migrate.protocol import (
    Channel,
    Kind,
    PeerError,
    ProtocolError,
    SendQueue,
    check_insecure,
    check_secret,
    client_handshake,
)
from memvirt.migrate.throttle import Throttle
from memvirt.migrate.watchdog import COMMITTED, spawn_source_guard
from memvirt.procs import end_watchdog
from memvirt.qemu.dirty import VMWriteTracker
from memvirt.qemu.monitor import Monitor
from memvirt.qemu.vm import VM, check_name

SESSION_TIMEOUT = 60.0
CONNECT_TIMEOUT = 10.0
DEVSTATE_TIMEOUT = 30.0
MAX_DEVSTATE = 1 << 28
FIXED_DOWNTIME = 0.05
"""Seconds the switch-over costs besides the final round: device state save and load, commit, cont."""
SHRINK = 0.9
DIRTY_METHODS = ("auto", "uffd-wp", "fingerprint")
VERIFY = ("digest", "full")

Progress = Callable[[Round], None]


@dataclass
class Report:
    """What ``memvirt migrate`` did."""

    vm: str
    target: str
    peer: str
    elide_free: bool
    downtime_target: float
    max_bandwidth: float = 0.0
    rounds: list[Round] = field(default_factory=list)
    stop_reason: str = ""
    wire_bytes: int = 0
    devstate_bytes: int = 0
    setup_seconds: float = 0.0
    bootstrap_seconds: float = 0.0
    total_seconds: float = 0.0
    """From connecting to the target confirming its guest runs (what QEMU's ``total-time`` counts)."""
    source_stop_seconds: float = 0.0
    downtime_seconds: float = 0.0
    final_round_seconds: float = 0.0
    max_throttle: float = 0.0
    """Largest share of time the guest was held to make precopy converge (auto-converge)."""
    codecs: dict[str, int] = field(default_factory=dict)
    dirty_method: str = ""
    """``uffd-wp`` (the dirty tracker) or ``fingerprint`` (every page in use hashed per round)."""
    notice: str = ""
    verify: str = "digest"
    verify_seconds: float = 0.0
    track_seconds: float = 0.0
    """Starting the dirty tracker (a look for other writers of the RAM file, the borrow, protecting all)."""
    drain_seconds: float = 0.0
    """Waiting, after each live round, for the receiver to write it."""
    switch_over: dict[str, float] = field(default_factory=dict)
    """Where the downtime went, seconds from the pause: final round done, device state saved,
    target verified and loaded (VERIFIED), target running (RUNNING)."""

    def pages(self) -> dict[str, int]:
        """Pages per class over all rounds; ``free_final`` were free at pause and never needed."""
        out = {k: sum(getattr(r, k) for r in self.rounds) for k in ("data", "zero", "dup", "discarded")}
        out["free_final"] = self.rounds[-1].free if self.rounds else 0
        return out

    def to_json(self) -> dict[str, object]:
        return {
            "vm": self.vm,
            "target": self.target,
            "peer": self.peer,
            "elide_free": self.elide_free,
            "rounds": len(self.rounds),
            "stop_reason": self.stop_reason,
            "pages": self.pages(),
            "wire_bytes": self.wire_bytes,
            "devstate_bytes": self.devstate_bytes,
            "setup_seconds": round(self.setup_seconds, 3),
            "bootstrap_seconds": round(self.bootstrap_seconds, 3),
            "total_seconds": round(self.total_seconds, 3),
            "source_stop_seconds": round(self.source_stop_seconds, 3),
            "downtime_seconds": round(self.downtime_seconds, 4),
            "final_round_seconds": round(self.final_round_seconds, 4),
            "downtime_target": self.downtime_target,
            "max_bandwidth": self.max_bandwidth,
            "max_throttle": self.max_throttle,
            "codecs": self.codecs,
            "dirty_method": self.dirty_method,
            "notice": self.notice,
            "verify": self.verify,
            "verify_seconds": round(self.verify_seconds, 4),
            "track_seconds": round(self.track_seconds, 4),
            "drain_seconds": round(self.drain_seconds, 4),
            "switch_over": {k: round(v, 4) for k, v in self.switch_over.items()},
            "per_round": [r.to_json() for r in self.rounds],
        }


def check_source(vm: VM) -> str:
    """Refuse a VM memvirt cannot migrate; returns its run state."""
    c = vm.config
    if c.ram != "shared":
        raise UsageError(f"VM {vm.name!r} has {c.ram} RAM: memvirt migrates VMs started with --ram shared")
    if vm.is_template:
        raise UsageError(f"VM {vm.name!r} is a frozen template backing clones: migrate a clone or resume it first")
    if c.lan:
        raise UsageError(
            f"VM {vm.name!r} is on VM LAN {c.lan!r}, which a receiving host does not have: "
            f"move it within the LAN with 'memvirt pm migrate {vm.name} --to OTHER'"
        )
    vm.require_alive()
    status = vm.status()
    if status not in ("running", "paused"):
        raise UsageError(f"VM {vm.name!r} is {status}: only a running or paused VM can be migrated")
    return status


def _free_mask(intro: object | None, n: int, live: bool) -> np.ndarray:
    """Pages the guest kernel holds free (buddy and per-cpu lists), from a census; none without one.

    A failed live scan only costs bandwidth (nothing is skipped that round); a failed paused scan
    likewise, so a census problem never breaks the migration's correctness."""
    free = np.zeros(n, dtype=bool)
    if intro is None:
        return free
    try:
        mask = intro.scan(live=live).free_mask  # type: ignore[attr-defined]
    except MemvirtError:
        return free
    m = min(n, len(mask))
    free[:m] = mask[:m]
    return free


def _page_seconds(st: Round, link_rate: float) -> float:
    """Seconds one changed page costs to send, as this round sent them at the pace the link showed."""
    moved = st.data + st.zero + st.dup + st.discarded
    if link_rate > 0 and moved:
        return (st.wire_bytes / moved) / link_rate
    return st.send_seconds / moved if moved else 0.0


def _estimate(st: Round, link_rate: float, tracked: bool) -> float:
    """Seconds a final round now would take. Fingerprinting: the same census and hashing of
    everything in use, and sending what changed during this round. Tracked: the census, and the
    pages the guest will have written by the pause at the dirty rate this round measured
    (written / interval), over as long as this round took, read, hashed and sent."""
    if not tracked:
        return _floor(st, tracked) + st.changed * _page_seconds(st, link_rate)
    rate = st.written / st.interval if st.interval > 0 else 0.0
    pages = rate * st.seconds
    hash_one = st.hash_seconds / st.hashed if st.hashed else 0.0
    return _floor(st, tracked) + pages * (_page_seconds(st, link_rate) + hash_one)


def _start_device_state(vm: VM, mon: Monitor) -> int:
    """Have the paused source save its device state (RAM excluded by ``x-ignore-shared``) into a
    memfd handed over QMP, in QEMU's own thread while the final round runs here; it ends
    ``postmigrate``. A descriptor, not ``exec:cat``: QEMU forking a shell and cat cost tens of ms
    of downtime on a loaded host (the receiver's load does the same)."""
    fd = os.memfd_create("memvirt-devstate", os.MFD_CLOEXEC)
    try:
        mon.send_fd(fd, "devstate-out")
        mon.command("migrate", uri="fd:devstate-out", timeout=DEVSTATE_TIMEOUT)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _finish_device_state(vm: VM, mon: Monitor, fd: int) -> bytes:
    """Wait for the save :func:`_start_device_state` began; the state's bytes. Waits on QEMU's
    ``MIGRATION`` events (capability ``events``) rather than polling ``query-migrate``: polls take
    the lock QEMU's migration thread needs to save the devices."""
    try:
        deadline = time.monotonic() + DEVSTATE_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            ev = mon.wait_event("MIGRATION", max(left, 0.0)) if left > 0 else None
            status = (ev or {}).get("data", {}).get("status")
            if ev is None:  # no event (none in time): ask once, so a failure still names its cause
                status = mon.command("query-migrate").get("status")
                if status not in ("completed", "failed", "cancelled"):
                    raise VMError(f"saving the device state of {vm.name!r} took over {DEVSTATE_TIMEOUT:.0f} s")
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                st = mon.command("query-migrate")
                raise VMError(f"QEMU could not save the device state of {vm.name!r}: {st.get('error-desc', '')}")
        size = os.fstat(fd).st_size
        if size > MAX_DEVSTATE:
            raise VMError(f"the device state of {vm.name!r} is {size} bytes (at most {MAX_DEVSTATE})")
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


def migrate(
    name: str,
    host: str,
    port: int,
    secret: bytes | None,
    target_name: str | None = None,
    downtime: float = 0.3,
    codec: str = "auto",
    elide_free: bool = True,
    max_rounds: int = 30,
    progress: Progress | None = None,
    max_bandwidth: float = 0.0,
    dirty: str = "auto",
    verify: str = "digest",
) -> Report:
    """Migrate VM ``name`` to the receiver at ``host:port``; on success the source is stopped.
    ``max_bandwidth`` (bytes per second, 0 for none) caps what is sent, as QEMU's parameter does.
    ``dirty``: how later rounds find what changed (:data:`DIRTY_METHODS`); ``verify``: ``digest``
    (the receiver's digest of what it received) or ``full`` (also every page in use fingerprinted
    at the pause and compared with what was sent, a longer downtime)."""
    if dirty not in DIRTY_METHODS:
        raise UsageError(f"unknown dirty tracking {dirty!r}: use one of {', '.join(DIRTY_METHODS)}")
    if verify not in VERIFY:
        raise UsageError(f"unknown verification {verify!r}: use one of {', '.join(VERIFY)}")
    if max_bandwidth < 0:
        raise UsageError("--max-bandwidth must not be negative")
    if downtime <= 0:
        raise UsageError("--downtime must be positive")
    if max_rounds < 1:
        raise UsageError("--max-rounds must be at least 1")
    if secret is None:
        check_insecure(host)
    else:
        check_secret(secret)
    chooser = CodecChooser(codec)
    vm = VM.load(name)
    state = check_source(vm)
    target = check_name(target_name or name)
    report = Report(name, target, f"{host}:{port}", elide_free, downtime, max_bandwidth, verify=verify)
    t0 = time.perf_counter()
    try:
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
    except OSError as e:
        raise MemvirtError(f"cannot reach a receiver at {host}:{port}: {e.strerror or e}") from e
    chan: Channel | None = None
    queue: SendQueue | None = None
    mon: Monitor | None = None
    throttle: Throttle | None = None
    wt: VMWriteTracker | None = None
    pause_hold = -1
    paused = committed = False
    (vm.dir / COMMITTED).unlink(missing_ok=True)
    guard = spawn_source_guard(vm.dir) if state == "running" else None
    try:
        chan = client_handshake(sock, secret, SESSION_TIMEOUT)
        chan.max_rate = max_bandwidth
        c = vm.config
        chan.send_json(
            Kind.SETUP,
            {
                "name": target,
                "source": name,
                "memory": c.memory,
                "cpus": c.cpus,
                "image": c.image,
                "accel": c.accel,
                "append": c.append,
                "regions": c.regions,
            },
        )
        with vm.monitor() as m:
            m.set_capabilities(x_ignore_shared=True, events=True)
        chan.recv_json(Kind.READY)
        report.setup_seconds = time.perf_counter() - t0
        with RamFileMemory(c.ram_path, vm.regions) as mem:
            intro = None
            if elide_free:
                from memvirt.introspect import Introspector

                t = time.perf_counter()
                intro = Introspector(mem)
                report.bootstrap_seconds = time.perf_counter() - t
            tracker = Tracker(mem, chooser)
            queue = SendQueue(chan)
            send = queue.send
            t = time.perf_counter()
            wt, report.notice = _start_tracking(vm, dirty) if state == "running" else (None, "")
            report.track_seconds = time.perf_counter() - t
            report.dirty_method = "uffd-wp" if wt is not None else "fingerprint"
            last_scan = time.perf_counter()
            prev_free: np.ndarray | None = None

            def one_round(final: bool) -> Round:
                nonlocal last_scan, prev_free
                t = time.perf_counter()
                cand = holes = None
                written = 0
                if wt is not None and report.rounds:
                    # The scan precedes every read of this round: a write after it is in the next.
                    frames = wt.scan(hold=final, check=not final)
                    holes, written = wt.punched, len(frames)
                    cand = np.zeros(tracker.max_pfn, dtype=bool)
                    cand[frames[frames < tracker.max_pfn]] = True
                interval, last_scan = t - last_scan, t
                free = _free_mask(intro, tracker.max_pfn, live=not final)
                if cand is not None and prev_free is not None:
                    cand |= prev_free & ~free  # allocated since the last census, perhaps never written
                prev_free = free
                scan = time.perf_counter() - t
                st = tracker.run(len(report.rounds), free, send, final, cand, holes)
                st.scan_seconds, st.written, st.interval = scan, written, interval
                st.throttle = throttle.share if throttle is not None else 0.0
                st.wire_bytes += queue.send_json_sized(Kind.ROUND_END, {"round": st.index, "final": final})
                if final:
                    queue.close()
                else:
                    # A live round ends when the receiver has written it: with the tracker the last
                    # rounds are short, and a backlog still in the socket at the pause would be
                    # downtime no estimate saw. The wait counts in the round's length, so the
                    # guest's writes during it are in the next round's estimate.
                    queue.flush()
                    d = time.perf_counter()
                    assert chan is not None  # the session is open for every round
                    if int(chan.recv_json(Kind.ROUND_ACK).get("round", -1)) != st.index:
                        raise ProtocolError(f"the receiver acknowledged a round other than {st.index}")
                    report.drain_seconds += time.perf_counter() - d
                st.seconds = time.perf_counter() - t
                report.rounds.append(st)
                if progress:
                    progress(st)
                return st

            tracked = wt is not None
            mon = vm.monitor()  # opened before the pause: a QMP handshake there would be downtime
            while state == "running":
                st = one_round(False)
                est, floor = _estimate(st, queue.rate(), tracked), _floor(st, tracked)
                prev = report.rounds[-2].changed if len(report.rounds) > 1 else None
                if len(report.rounds) > 1 and est <= downtime:
                    report.stop_reason = f"remainder fits the downtime target (est. {est * 1000:.0f} ms)"
                elif len(report.rounds) >= max_rounds:
                    report.stop_reason = f"--max-rounds {max_rounds} reached (est. {est * 1000:.0f} ms)"
                elif prev is None or st.changed < SHRINK * prev or len(report.rounds) < 3:
                    continue
                elif floor > downtime:
                    alone = (
                        "the census and switch-over alone take"
                        if tracked
                        else "fingerprinting the pages in use alone takes"
                    )
                    report.stop_reason = (
                        f"dirty set stopped shrinking, and {alone} {floor * 1000:.0f} ms (est. {est * 1000:.0f} ms)"
                    )
                elif throttle is None or not throttle.at_max:
                    throttle = throttle or Throttle(vm)
                    report.max_throttle = throttle.harder()
                    continue
                else:
                    report.stop_reason = f"dirty set stopped shrinking with the guest throttled to {throttle.share:.0%}"
                break
            if throttle is not None:
                throttle.close()
                throttle = None
            # Held until the source is stopped or resumed: a reclaim batch's cont would otherwise
            # resume the source during the final round (the reclaim waits its turn).
            pause_hold = vm.hold_pauses()
            t_pause = time.perf_counter()
            if state == "running":
                mon.command("stop")
                paused = True
            else:
                report.stop_reason = "the source was paused: one round"
            devpath = _start_device_state(vm, mon)
            last = one_round(True)
            if verify == "full":
                t = time.perf_counter()
                assert prev_free is not None
                bad = tracker.verify(prev_free)
                report.verify_seconds = time.perf_counter() - t
                if bad:
                    raise MemvirtError(
                        f"--verify full: {bad} page(s) in use differ from what was sent after the final "
                        f"round ({report.dirty_method} tracking, {last.index + 1} rounds)"
                    )
            report.final_round_seconds = report.switch_over["final_round"] = time.perf_counter() - t_pause
        devstate = _finish_device_state(vm, mon, devpath)
        report.switch_over["devstate"] = time.perf_counter() - t_pause
        mon.close()
        mon = None
        report.devstate_bytes = len(devstate)
        chan.send(Kind.DEVSTATE, devstate)
        chan.send_json(Kind.COMMIT, {"digest": tracker.digest(), "rounds": len(report.rounds)})
        report.switch_over["committed"] = time.perf_counter() - t_pause
        if wt is not None:  # while the target checks and loads: no one else could write the RAM file
            wt.check_writers()
            report.switch_over["writers_checked"] = time.perf_counter() - t_pause
        _receiver_marks(report, chan.recv_json(Kind.VERIFIED))
        report.switch_over["verified"] = time.perf_counter() - t_pause
        (vm.dir / COMMITTED).touch()
        committed = True
        chan.send_json(Kind.GO, {"resume": state == "running"})
        _receiver_marks(report, chan.recv_json(Kind.RUNNING))
        report.downtime_seconds = time.perf_counter() - t_pause if state == "running" else 0.0
        report.switch_over["running"] = time.perf_counter() - t_pause
    except BaseException as e:
        if queue is not None and not queue.abort():
            chan = None
        if chan is not None and not isinstance(e, PeerError):
            chan.send_error(f"sender: {e}")
        (chan.sock if chan is not None else sock).close()
        if throttle is not None:
            _quietly(throttle.close)
        if wt is not None:
            wt.close()
        try:
            if paused and not committed:
                _resume(vm, mon)
        finally:
            if pause_hold >= 0:
                os.close(pause_hold)
        if mon is not None:
            mon.close()
        end_watchdog(guard)
        if committed:
            raise MemvirtError(
                f"migration of {name!r}: the target was told to run but did not confirm ({e}); {name!r} is left "
                f"paused here so the guest never runs twice: check {target!r} on the receiver, then "
                f"'memvirt vm stop {name}' (or 'memvirt vm resume {name}' if the target is gone)"
            ) from e
        if isinstance(e, ProtocolError | MemvirtError):
            where = "receiver" if isinstance(e, PeerError) else "link" if isinstance(e, ProtocolError) else "source"
            raise MemvirtError(f"migration of {name!r} failed ({where}: {e}); {name!r} runs on here, unchanged") from e
        raise
    if wt is not None:
        wt.close()
    report.wire_bytes = chan.bytes_sent + chan.bytes_received
    report.codecs = dict(chooser.used)
    chan.close()
    report.total_seconds = time.perf_counter() - t0
    t = time.perf_counter()
    end_watchdog(guard)
    try:
        vm.stop()
    finally:
        os.close(pause_hold)
    report.source_stop_seconds = time.perf_counter() - t
    return report


def _receiver_marks(report: Report, msg: dict[str, object]) -> None:
    """The receiver's own switch-over steps (seconds from its receipt of the device state), kept
    when well-formed: they only inform the report."""
    marks = msg.get("marks")
    if isinstance(marks, dict):
        for k, v in list(marks.items())[:16]:
            if isinstance(k, str) and k.startswith("rx_") and isinstance(v, int | float) and 0 <= v < 1e4:
                report.switch_over[k[:32]] = float(v)


def _floor(st: Round, tracked: bool) -> float:
    """Seconds a final round takes even if nothing changed: the census and the tracker's scan (or,
    fingerprinting, hashing every page in use), plus the switch-over."""
    return st.scan_seconds + (0.0 if tracked else st.hash_seconds) + FIXED_DOWNTIME


def _start_tracking(vm: VM, method: str) -> tuple[VMWriteTracker | None, str]:
    """The dirty tracker on ``vm``'s RAM, or None and a one-line notice why fingerprints are used."""
    if method == "fingerprint":
        return None, ""
    try:
        return VMWriteTracker(vm), ""
    except MemvirtError as e:  # Unsupported, or the RAM is held by another userfaultfd or writer
        if method != "auto":
            raise
        return None, f"no dirty tracking ({e}): every round fingerprints the pages in use"


def _quietly(fn: Callable[[], None]) -> None:
    try:
        fn()
    except MemvirtError:
        pass


def _resume(vm: VM, mon: Monitor | None) -> None:
    """Give the source its CPUs back (from ``paused`` or ``postmigrate``), on a fresh QMP session
    if the migration's own broke."""
    try:
        try:
            if mon is None:
                raise VMError("no session")
            mon.command("cont")
        except VMError:
            with vm.monitor() as fresh:
                fresh.command("cont")
    except VMError as e:
        raise VMError(f"migration failed and the source {vm.name!r} could not be resumed: {e}") from e


__all__ = ["Report", "migrate"]
