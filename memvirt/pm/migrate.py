"""Orchestrate one physical-machine migration from the host: checks, agents, events, names.

The host never touches the image: it checks both machines, hands both agents a fresh key over
the command channel, starts the target's receiver and then the source's sender, and follows
their console events until the restored machine runs on the target or the source has thawed.

The host is also the arbiter when the two agents cannot tell the outcome (the target's ACK was
lost: it may have restored): the frozen source waits for the host's verdict on its own store disk
(which only the host and that machine see), and the host gives it from what the target's console
and QEMU say: ``off`` once the restored machine runs on the target, ``thaw`` once the target
cannot run it (its agent failed or is gone, its QEMU died, or the host paused it as a fence).
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable

from memvirt.errors import MemvirtError, UsageError
from memvirt.pm import stream
from memvirt.pm import zram as zr
from memvirt.pm.events import ConsoleTail, Event
from memvirt.pm.facts import Facts, PMFailed, PMRefused, check_pair, read_facts
from memvirt.pm.report import PMReport
from memvirt.qemu import lan
from memvirt.qemu.config import Migrated
from memvirt.qemu.vm import VM

SCHEMES = ("memory", "disk", "iterative")
CODECS = ("lz4", "zstd", "none")
KEY_FILE = "/run/memvirt-pm.key"
RECV_LOG = "/tmp/pmagent-recv.log"
SEND_LOG = "/tmp/pmagent-send.log"
LISTEN_TIMEOUT = 30.0
THAW_TIMEOUT = 200.0
"""The source's sockets time out after 120 s; by then it has thawed on its own."""
RESTORE_TIMEOUT = 120.0
"""How long a target that said ``restoring`` gets to say it runs (or failed) before the host, with
the source waiting for its verdict, fences it (pauses its QEMU) and thaws the source."""
VERDICT_BLOCK = 4096

log = logging.getLogger("memvirt.pm")

Progress = Callable[[Event], None]


def migrate(
    source: str,
    target: str,
    scheme: str = "memory",
    compress: str = "lz4",
    shrink: bool = False,
    timeout: float = 600.0,
    progress: Progress | None = None,
    zram: bool | None = None,
) -> PMReport:
    """Move the running machine ``source`` onto machine ``target`` (both VMs on one LAN).

    ``zram``: compressed swap in the source's RAM for the migration (None: only if the image would
    not fit without it; see :mod:`memvirt.pm.zram`).

    On success the VM named ``target`` runs the source's machine and ``source`` is gone; on
    failure :class:`PMFailed` is raised and the source runs on.
    """
    if compress not in CODECS:
        raise UsageError(f"--compress must be one of {', '.join(CODECS)}, not {compress!r}")
    src, dst, facts, use_zram = preflight(source, target, scheme, zram)
    held = lan.lock(src.config.lan)
    try:
        m = _Migration(src, dst, scheme, compress, shrink, progress or (lambda e: None))
        m.report.zram = use_zram
        return m.run(timeout, *facts)
    finally:
        os.close(held)


def preflight(
    source: str, target: str, scheme: str = "memory", zram: bool | None = None
) -> tuple[VM, VM, tuple[Facts, Facts], bool]:
    """Load both machines and refuse a migration that cannot work; nothing is frozen. The last
    item says whether the migration needs zram swap on the source."""
    if scheme not in SCHEMES:
        raise UsageError(f"--scheme must be one of {', '.join(SCHEMES)}, not {scheme!r}")
    src, dst = VM.load(source), VM.load(target)
    if src.name == dst.name:
        raise UsageError("source and target are the same VM")
    for vm in (src, dst):
        vm.require_alive()
    if not src.config.lan or src.config.lan != dst.config.lan:
        raise PMRefused(f"{source!r} and {target!r} must be on the same VM LAN (start both with --lan NAME)")
    if src.config.lan_ip == dst.config.lan_ip:
        raise PMRefused(f"{source!r} and {target!r} have the same LAN address {src.config.lan_ip or None}")
    facts = read_facts(src), read_facts(dst)
    use_zram = check_pair(*facts, scheme, zram)
    return src, dst, facts, use_zram


def _wipe_store(vm: VM) -> None:
    """Drop the pages an iterative migration left on the target's store disk (the source's memory;
    only needed during the migration). The file stays as large, sparse."""
    path = lan.store_disk(vm)
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        os.ftruncate(fd, 0)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _give_key(vm: VM, key: str) -> None:
    vm.exec(f"umask 077 && printf '%s\\n' {key} > {KEY_FILE}").check("handing over the key")


class _Migration:
    def __init__(self, src: VM, dst: VM, scheme: str, compress: str, shrink: bool, progress: Progress):
        self.src, self.dst = src, dst
        self.report = PMReport(src.name, dst.name, scheme, compress, shrink, ram_bytes=src.config.memory)
        self.progress = progress
        self.events: dict[tuple[str, str], Event] = {}
        # Events are keyed by the console they came from: the target cannot speak for the source.
        self.tails = [
            ConsoleTail(src.serial_log, src.name, ("source",)),
            ConsoleTail(dst.serial_log, dst.name, ("target", "resumed")),
        ]
        self.key = b""
        self.verdict = ""
        self.verdict_at = 0.0
        self.rx_pid = -1
        self.sending = False

    def _poll(self) -> None:
        for tail in self.tails:
            for e in tail.poll():
                self.events.setdefault((e.role, e.name), e)
                self.progress(e)
        self.report.ignored_events = [f"{t.machine}: {line}" for t in self.tails for line in t.ignored]

    def _seen(self, role: str, name: str) -> Event | None:
        return self.events.get((role, name))

    def run(self, timeout: float, src_facts: Facts, dst_facts: Facts) -> PMReport:
        src, dst, r = self.src, self.dst, self.report
        t0 = time.monotonic()
        key = secrets.token_hex(32)
        self.key = bytes.fromhex(key)
        port = 20000 + secrets.randbelow(30000)
        ip = dst.config.lan_ip
        recv = f"pmagent recv --listen {ip}:{port} --timeout {int(LISTEN_TIMEOUT + 30)}"
        send = (
            f"pmagent send --to {ip}:{port} --scheme {r.scheme} --compress {r.compress} "
            f"--verdict {src_facts.disks[lan.STORE_SERIAL]}"
        )
        if r.scheme == "disk":
            recv += f" --disk {dst_facts.disks[lan.SHARED_SERIAL]}"
            send += f" --disk {src_facts.disks[lan.SHARED_SERIAL]}"
        if r.scheme == "iterative":
            recv += f" --store {dst_facts.disks[lan.STORE_SERIAL]}"
        if r.shrink:
            send += " --shrink"
        elif r.zram:
            send += f" --image-size {src_facts.image_limit - zr.MARGIN}"
        if r.zram:
            r.zram_device = zr.add(src, src_facts.ram)
        try:
            self._write_verdict_block(bytes(VERDICT_BLOCK))  # no verdict of an earlier migration
            if r.zram:
                r.preswap_seconds = zr.preswap(src, src_facts.ram, src_facts.image_limit)
            _give_key(dst, key)
            _give_key(src, key)
            self.rx_pid = dst.exec_background(f"PMAGENT_KEY_FILE={KEY_FILE} exec {recv}", RECV_LOG)
            self._await_listening()
            self.sending = True
            src.exec_background(f"PMAGENT_KEY_FILE={KEY_FILE} exec {send}", SEND_LOG)
            self._follow(t0 + timeout)
        except BaseException:
            self._clean_up_failure()
            raise
        self._fill_report(t0)
        self._adopt()
        return r

    def _await_listening(self) -> None:
        deadline = time.monotonic() + LISTEN_TIMEOUT
        while not self._seen("target", "listening"):
            self._poll()
            failed = self._seen("target", "failed")
            if failed:
                raise PMFailed(f"the receiver on {self.dst.name!r} failed: {failed.fields.get('error')}")
            if time.monotonic() > deadline:
                raise PMFailed(f"the receiver on {self.dst.name!r} did not start (see {RECV_LOG} there)")
            time.sleep(0.05)

    def _follow(self, deadline: float) -> None:
        """Until the machine runs on the target, or the source reports it thawed."""
        killed = False
        while True:
            self._poll()
            if self._seen("resumed", "running"):
                self._give_verdict(thaw=False)  # a source still waiting for the ACK powers off
                return
            for role, name in (("source", "thawed"), ("source", "failed")):
                e = self._seen(role, name)
                if e:
                    tgt = self._seen("target", "failed")
                    why = e.fields.get("error", "")
                    if tgt and (why.startswith(("peer failed", "sending failed")) or self.report.ack_lost):
                        why = tgt.fields.get("error", why)  # the target stopped first and said why
                    raise PMFailed(
                        f"migration failed, {self.src.name!r} runs on: {why}"
                        + (f" ({self.fenced})" if self.fenced else "")
                    )
            if self._seen("source", "uncertain") and not self.verdict:
                self._arbitrate()
                continue
            if self.verdict == "thaw":
                if time.monotonic() > self.verdict_at + 60 or not self.src.alive():
                    raise PMFailed(
                        f"{self.src.name!r} did not thaw after the host's verdict (see {self.src.serial_log})"
                    )
                time.sleep(0.05)
                continue
            lost = self._seen("target", "failed")
            if lost and self._seen("target", "restoring") and self._seen("source", "acked"):
                # The only window without a way back: the source had its ack and powered off.
                raise PMFailed(
                    f"{self.dst.name!r} acknowledged the image but could not restore it "
                    f"({lost.fields.get('error')}); {self.src.name!r} has powered off"
                )
            if not self.src.alive() and not self._seen("source", "acked"):
                raise PMFailed(f"{self.src.name!r} died during the migration (see {self.src.serial_log})")
            if not self.dst.alive():
                raise PMFailed(f"{self.dst.name!r} died during the migration (see {self.dst.serial_log})")
            if time.monotonic() > deadline and not killed:
                # Ending the receiver makes the source's stream fail, so the source thaws.
                self._kill_receiver()
                killed, deadline = True, time.monotonic() + THAW_TIMEOUT
            elif time.monotonic() > deadline:
                raise PMFailed(f"no outcome within the timeout; check {self.src.name!r} and {self.dst.name!r}")
            time.sleep(0.02)

    fenced = ""

    def _arbitrate(self, wait: float = RESTORE_TIMEOUT) -> None:
        """The source cannot tell whether the target restored (its ACK was lost): decide from the
        target's console and QEMU, and give the source its verdict."""
        if self._seen("source", "uncertain"):
            log.warning(
                "%s did not get the target's answer; the host decides whether it powers off or thaws", self.src.name
            )
        deadline = time.monotonic() + wait
        next_probe = 0.0
        while True:
            self._poll()
            if self._seen("resumed", "running"):
                self._give_verdict(thaw=False)
                return
            if self._seen("target", "failed") or not self.dst.alive():
                self._give_verdict(thaw=True)  # the target kept (or lost) its own state, not ours
                return
            now = time.monotonic()
            if not self._seen("target", "restoring") and now >= next_probe:
                next_probe = now + 2.0
                if self._receiver_alive() is False:
                    self._poll()  # "restoring" is written before the restore: read it if it came
                    if not self._seen("target", "restoring") and not self._seen("resumed", "running"):
                        self._give_verdict(thaw=True)
                        return
            if now > deadline:
                self._fence_target()
                self._give_verdict(thaw=True)
                return
            time.sleep(0.05)

    def _receiver_alive(self) -> bool | None:
        """Whether the target's receiver still runs (None: cannot tell, e.g. the target is frozen)."""
        if self.rx_pid <= 0:
            return None
        try:
            res = self.dst.exec(f"grep -qs pmagent /proc/{self.rx_pid}/cmdline", timeout=5)  # a zombie's is empty
        except MemvirtError:
            return None
        return res.rc == 0

    def _fence_target(self) -> None:
        """Make sure the target cannot run the machine: pause its QEMU (left for the admin to look at)."""
        try:
            self.dst.pause()
            self.fenced = f"{self.dst.name!r} did not finish its restore and was paused"
        except MemvirtError:
            self.fenced = f"{self.dst.name!r} did not finish its restore; pausing it failed"
        log.warning("%s", self.fenced)

    def _write_verdict_block(self, block: bytes) -> None:
        """Block 0 of the source's store disk (its verdict device; only that machine and the host see it)."""
        path = lan.store_disk(self.src)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.pwrite(fd, block, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise PMFailed(f"cannot write the host's verdict to {path}: {e.strerror}") from e

    def _give_verdict(self, thaw: bool) -> None:
        """Tell the source, if it waits, to thaw or to power off (once: the first verdict stands)."""
        if self.verdict or not self.key:
            return
        self._write_verdict_block(stream.verdict_block(self.key, thaw))
        self.verdict, self.verdict_at = ("thaw" if thaw else "off"), time.monotonic()
        self.report.verdict = self.verdict
        self.report.ack_lost = bool(self._seen("source", "uncertain"))

    def _kill_receiver(self) -> None:
        try:
            self.dst.exec(f"kill {self.rx_pid} 2>/dev/null; rm -f {KEY_FILE}", timeout=10)
        except MemvirtError:
            pass

    def _clean_up_failure(self) -> None:
        """The source thaws by itself, or on the host's verdict; make sure the receiver is gone, the
        source is not left waiting for a verdict, no key or image is left, and the source has no
        zram swap of ours."""
        self._poll()
        if self.rx_pid > 0 and self.dst.alive() and not self._seen("target", "restoring"):
            self._kill_receiver()
        if self.sending and not self.verdict and self.src.alive() and not self._seen("source", "thawed"):
            try:
                self._arbitrate(wait=60.0)
            except BaseException:
                log.warning("%s may be left frozen, waiting for a verdict", self.src.name)
        if self.src.alive():
            try:
                self.src.channel.wait_ready(60, self.src.alive)
                self.src.exec(f"rm -f {KEY_FILE}", timeout=10)
                if self.report.zram:
                    zr.remove(self.src)
            except MemvirtError:
                pass
        if self.report.scheme == "disk":
            lan.wipe_shared_disk(self.dst.config.lan)  # the agent zeroes what it wrote, too
        if self.report.scheme == "iterative" and self.dst.dir.exists():
            try:
                _wipe_store(self.dst)
            except OSError as e:
                log.warning("could not wipe %s's store disk: %s", self.dst.name, e.strerror)

    def _fill_report(self, t0: float) -> None:
        r, ev = self.report, self._seen
        freezing, frozen, created = ev("source", "freezing"), ev("source", "frozen"), ev("source", "created")
        sent, restoring, running = ev("source", "sent"), ev("target", "restoring"), ev("resumed", "running")
        if not (freezing and frozen and created and restoring and running):
            raise MemvirtError("the migration succeeded but its events are incomplete (serial logs)")
        r.used_bytes = int(freezing.num("used"))
        r.image_bytes = int(created.num("image"))
        r.swapped_bytes = int(created.num("swapped"))
        r.freeze_seconds = frozen.num("seconds")
        r.create_seconds = created.num("seconds")
        r.transfer_seconds = restoring.at - created.at
        r.restore_seconds = running.at - restoring.at
        r.downtime_seconds = running.at - freezing.at
        r.total_seconds = running.at - t0
        if sent:
            r.wire_bytes = int(sent.num("wire"))
            r.disk_bytes = int(sent.num("disk"))
            r.pages = {k: int(sent.num(k)) for k in ("literal", "zero", "ref")}
            r.source_stages = {k: sent.num(k) for k in ("read", "scan", "compress", "send")}
        received = ev("target", "received")
        if received:
            r.target_stages = {k: received.num(k) for k in ("recv", "decompress", "store", "hash", "write")}
        pre = ev("source", "precopied")
        if pre:
            r.precopy_pages = int(pre.num("pages"))
            r.precopy_wire_bytes = int(pre.num("wire"))
            r.precopy_seconds = pre.num("seconds")

    def _adopt(self) -> None:
        """Names after success: DST is the machine now; the source VM, powered off, is removed."""
        src, dst = self.src, self.dst
        deadline = time.monotonic() + 30
        while src.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        self._poll()
        acked = self._seen("source", "acked")
        self.report.ack_lost = bool(self._seen("source", "uncertain") or (acked and acked.fields.get("verdict")))
        if src.config.workload is not None:
            dst.config.workload = src.config.workload
        dst.config.lan_ip = src.config.lan_ip
        dst.config.lan_guest_mac = src.config.lan_mac
        dst.config.migrated = Migrated(src.name, time.time(), "pm")
        dst.save()
        self.report.address = dst.config.lan_ip
        src.stop()
        if self.report.scheme == "disk":
            lan.wipe_shared_disk(dst.config.lan)
        if self.report.scheme == "iterative":
            _wipe_store(dst)
        dst.channel.wait_ready(60, dst.alive)
        try:
            dst.exec(f"rm -f {KEY_FILE}; {lan.announce_script(self.report.address)}", timeout=10)
        except MemvirtError:
            pass
        if self.report.zram:
            try:
                self.report.zram_stats = zr.remove(dst)
            except MemvirtError as e:
                self.report.zram_error = str(e)
