"""The service: one loop over discovery, the host trigger, KSM and metrics; signals; adoption.

Each round (``interval`` seconds): re-read the VMs (new ones get a worker, gone ones are
dropped with their metrics), evaluate the trigger, pace KSM, sample the host. SIGHUP reloads
the config (a bad one is refused with one line in the log; the old one stays). SIGTERM or
SIGINT winds down: workers put caps back as found, KSM's settings are given back.

Only one daemon runs per ``$MEMVIRT_HOME`` (an flock, released by the kernel even on SIGKILL).
A daemon started after one was killed *adopts*: it waits for the dead one's watchdogs (they
lift its caps and give back KSM's settings) and restores any borrow journal left without one,
so it never records the dead daemon's cap or setting as "how the host was" (no stacking).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from memvirt.daemon import config as config_mod
from memvirt.daemon import control, notify
from memvirt.daemon.discovery import AttachedSource, MemvirtSource, Source, discover
from memvirt.daemon.metrics import Metrics
from memvirt.daemon.policies import (
    HostTrigger,
    KsmPolicy,
    VMWorker,
    give_back_freed_memory,
    host_sample,
    one_malloc_arena,
    pausing_dir,
)
from memvirt.dedup import watchdog
from memvirt.errors import UsageError
from memvirt.introspect.buildcache import Shelf
from memvirt.paths import state_home
from memvirt.procs import end_watchdog, pid_alive

log = logging.getLogger("memvirtd")
WATCHDOG_MODULES = ("memvirt.compress.watchdog", "memvirt.borrow", "memvirt.dedup.watchdog")
ADOPT_WAIT = 15.0


def _watchdogs_of(pid: int) -> list[int]:
    """Live memvirt watchdog processes guarding ``pid`` (``python -m MODULE PID ...``)."""
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            argv = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for i, a in enumerate(argv[:-2]):
            if (
                a == b"-m"
                and argv[i + 1].decode(errors="replace") in WATCHDOG_MODULES
                and argv[i + 2] == str(pid).encode()
            ):
                out.append(int(p))
    return out


def adopt(previous: int) -> None:
    """Let a dead daemon's watchdogs finish, then restore borrow journals none is left to."""
    if previous <= 0 or previous == os.getpid() or pid_alive(previous):
        return
    deadline = time.monotonic() + ADOPT_WAIT
    while _watchdogs_of(previous) and time.monotonic() < deadline:
        time.sleep(0.2)
    from memvirt.borrow import _restore

    for name in watchdog.resume_marked(previous, pausing_dir()):
        log.warning("resumed VM %s, left paused by daemon %d", name, previous)
    folder = state_home() / "borrowed"
    for j in folder.glob(f"*-{previous}.json") if folder.is_dir() else []:
        try:
            st = json.loads(j.read_text()[: 1 << 20])
            _restore(st.get("before", {}), st.get("written", {}), ("/sys/kernel/mm/ksm/run",))
        except (OSError, ValueError, AttributeError) as e:
            log.warning("could not restore %s left by daemon %d: %s", j.name, previous, e)
            continue
        j.unlink(missing_ok=True)
        log.info("restored the host settings daemon %d had borrowed (%s)", previous, j.name)
    log.info("adopted the VMs of daemon %d (its watchdogs gave back what it held)", previous)


class Daemon:
    def __init__(
        self,
        config_path: Path | None,
        metrics_addr: tuple[str, int],
        socket_path: Path | None = None,
        sources: list[Source] | None = None,
    ):
        self.config_path = config_path
        self.cfg = config_mod.load(config_path)
        self.metrics_addr = metrics_addr
        self.socket_path = socket_path or control.default_socket()
        self.sources: list[Source] = sources if sources is not None else [MemvirtSource(), AttachedSource()]
        self.metrics = Metrics()
        self.workers: dict[str, VMWorker] = {}
        self.trigger = HostTrigger(self.cfg.trigger)
        self.engaged = threading.Event()
        self.ksm = KsmPolicy()
        self.shelf = Shelf()
        """Introspection bootstraps shared by the VMs of one kernel build (~12 MB each saved)."""
        self._wake = threading.Event()
        self._stop = False
        self._reload = False
        self._lock_fd: int | None = None
        self.started = time.time()
        self.metrics_port = 0
        self.host: dict[str, Any] = {}
        self.reloads: dict[str, Any] = {"ok": 0, "refused": 0, "last_error": None}
        t = os.times()
        self._cpu0 = t.user + t.system + t.children_user + t.children_system

    # -- lifecycle --------------------------------------------------------------------------------

    def lock(self) -> None:
        """Be the only daemon of this state folder; adopt from a dead predecessor."""
        path = control.run_dir() / "memvirtd.pid"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise UsageError(f"memvirtd already runs for {state_home()} (pid {other or '?'})") from None
        previous = os.read(fd, 32).decode(errors="replace").strip()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        if previous.isdigit():
            adopt(int(previous))

    def run(self) -> None:
        self.lock()
        one_malloc_arena()
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        server = None
        guard = watchdog.spawn(pausing_dir())
        try:
            self.metrics_port = self.metrics.serve(*self.metrics_addr)
            server = control.ControlServer(self.socket_path, self.status)
            log.info(
                "memvirtd %d: config %s, metrics on http://%s:%d/metrics, control %s",
                os.getpid(),
                self.cfg.path,
                self.metrics_addr[0],
                self.metrics_port,
                self.socket_path,
            )
            first = True
            wd = notify.watchdog_interval()
            while not self._stop:
                if self._reload:
                    self._reload = False
                    self.reload()
                try:
                    self.round()
                except Exception as e:
                    log.error("round failed: %s: %s", type(e).__name__, e)
                if first:
                    notify.notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=managing {len(self.workers)} VMs")
                    first = False
                if wd is not None:
                    notify.notify("WATCHDOG=1")
                self._wake.wait(min(self.cfg.interval, wd) if wd else self.cfg.interval)
                self._wake.clear()
        finally:
            notify.notify("STOPPING=1")
            log.info("stopping: giving back caps and host settings")
            self.shutdown()
            end_watchdog(guard)
            if server is not None:
                server.close()
            self.metrics.close()
            if self._lock_fd is not None:
                os.ftruncate(self._lock_fd, 0)
                os.close(self._lock_fd)
                self._lock_fd = None

    def _on_stop(self, *_: Any) -> None:
        self._stop = True
        self._wake.set()

    def _on_hup(self, *_: Any) -> None:
        self._reload = True
        self._wake.set()

    def shutdown(self) -> None:
        for w in self.workers.values():
            w._stop.set()
        for name in list(self.workers):
            self.workers.pop(name).stop()
        self.ksm.stop()

    def reload(self) -> None:
        """SIGHUP: the new config if it is valid, else the old one and one line in the log."""
        try:
            cfg = config_mod.load(self.config_path)
        except UsageError as e:
            self.reloads["refused"] += 1
            self.reloads["last_error"] = str(e)
            log.error("config reload refused, keeping the old one: %s", e)
            return
        self.cfg = cfg
        self.trigger = HostTrigger(cfg.trigger)
        for name, w in self.workers.items():
            w.set_policy(cfg.for_vm(name), cfg.interval, cfg.guest_free_every)
        self.reloads["ok"] += 1
        self.reloads["last_error"] = None
        log.info("config reloaded from %s", cfg.path)

    def round(self) -> None:
        """One turn of the loop; nothing in it may end the daemon."""
        try:
            engaged = self.trigger.evaluate()
        except Exception as e:
            log.warning("host trigger: %s", e)
            engaged = False
        if engaged:
            self.engaged.set()
        else:
            self.engaged.clear()
        found = discover(self.sources)
        for name in [n for n in self.workers if n not in found or found[n].pid != self.workers[n].target.pid]:
            w = self.workers.pop(name)
            log.info("dropping VM %s (stopped)", name)
            w.stop()
            self.metrics.drop_vm(name)
        for name, t in found.items():
            if name not in self.workers:
                w = VMWorker(
                    t,
                    self.cfg.for_vm(name),
                    self.metrics,
                    self.engaged,
                    self.cfg.interval,
                    self.shelf,
                    self.cfg.guest_free_every,
                )
                self.workers[name] = w
                w.start()
                log.info("managing VM %s (%s, pid %d)", name, t.source, t.pid)
        self.metrics.vms.set(len(self.workers))
        give_back_freed_memory()
        anon = any(w.target.vm.config.ram == "anonymous" for w in self.workers.values())
        try:
            self.ksm.step(self.cfg.ksm, engaged and anon)
        except Exception as e:
            log.warning("KSM: %s; settings given back", e)
            self.ksm.stop(f"error: {e}")
        try:
            self.host = host_sample(self.metrics, self._cpu0)
        except Exception as e:
            log.warning("host metrics: %s", e)

    def status(self) -> dict[str, Any]:
        """What ``memvirt status`` shows (called from the control thread)."""
        workers = list(self.workers.values())
        return {
            "pid": os.getpid(),
            "started": round(self.started, 1),
            "config": self.cfg.path,
            "interval": self.cfg.interval,
            "metrics": f"http://{self.metrics_addr[0]}:{self.metrics_port}/metrics",
            "trigger": {"mode": self.cfg.trigger.mode, "engaged": self.engaged.is_set(), "reason": self.trigger.reason},
            "ksm": self.ksm.state,
            "reloads": dict(self.reloads),
            "host": dict(self.host),
            "vms": [w.status() for w in workers],
        }
