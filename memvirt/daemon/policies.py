"""The policies, each reusing the engine of its one-shot command, and the host trigger.

Per VM, a :class:`VMWorker` thread runs free-page reclaim (:class:`memvirt.dedup.reclaim.Reclaimer`:
pauses within its budget) and compression (a one-VM :class:`memvirt.compress.controller.Controller`:
its watchdog lifts the cap if the daemon dies, its close puts the cap back as found). A VM per
thread keeps one slow or broken guest from holding the others up. Anything a policy raises is
logged once, shown in ``memvirt status``, and retried later; it never ends the daemon.

Host-wide, :class:`KsmPolicy` borrows KSM's settings (:func:`memvirt.dedup.ksm.configured`: a
journal and a watchdog restore them however the daemon ends) and paces ksmd within a CPU
budget. The :class:`HostTrigger` says whether VM policies that take memory away (reclaim, caps,
KSM) act now; measuring goes on regardless.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from memvirt.daemon.config import Ksm, Trigger, VMPolicy
from memvirt.daemon.discovery import Target
from memvirt.daemon.metrics import Metrics

log = logging.getLogger("memvirtd")
RETRY = 30.0
"""Seconds before a failed host-wide step (KSM) is tried again, times four."""
BACKOFF = (2.0, 300.0)
"""A failed VM policy is retried after 2 s, then twice as long each time it fails again, at most
5 min: a guest still booting is managed soon after, a broken one costs next to nothing."""


def _libc() -> Any:
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


_LIBC = _libc()
M_ARENA_MAX = -8
_BOOTSTRAP = threading.Lock()
"""One introspection bootstrap at a time: their transient peaks (~50 MB each) don't add up."""


def one_malloc_arena() -> None:
    """All threads in glibc's main arena: a per-VM thread otherwise keeps a heap of its own that
    the introspection bootstrap's freed peak (~30 MB per VM) stays in."""
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(M_ARENA_MAX, 1)


def give_back_freed_memory() -> None:
    """``malloc_trim``: return what the heap freed to the host (measured: a Reclaimer's bootstrap
    peaks near 50 MB and keeps 18)."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def pausing_dir() -> Path:
    """The pause marks of the daemon's reclaims (:mod:`memvirt.dedup.watchdog`: the daemon's one
    watchdog resumes a guest marked here if the daemon dies inside its pause)."""
    from memvirt.daemon.control import run_dir

    d = run_dir() / "pausing"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def psi_some_avg10(path: Path = Path("/proc/pressure/memory")) -> float | None:
    """``some avg10`` of the host's memory PSI, None where the kernel has none."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith("some "):
                return float(dict(kv.split("=") for kv in line.split()[1:])["avg10"])
    except (OSError, ValueError, KeyError):
        return None
    return None


def meminfo(path: Path = Path("/proc/meminfo")) -> dict[str, int]:
    out = {}
    for line in path.read_text().splitlines():
        k, _, v = line.partition(":")
        parts = v.split()
        if parts and parts[0].isdigit():
            out[k] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    return out


class HostTrigger:
    """Whether the host needs memory now (``always``, or PSI / MemAvailable past a threshold)."""

    def __init__(
        self,
        trigger: Trigger,
        psi_path: Path = Path("/proc/pressure/memory"),
        meminfo_path: Path = Path("/proc/meminfo"),
    ):
        self.trigger, self.psi_path, self.meminfo_path = trigger, psi_path, meminfo_path
        self.engaged = trigger.mode == "always"
        self.reason = "always" if self.engaged else "not evaluated yet"

    def evaluate(self) -> bool:
        t = self.trigger
        if t.mode == "always":
            self.engaged, self.reason = True, "always"
            return True
        psi = psi_some_avg10(self.psi_path)
        if psi is not None:
            # Hysteresis: engaged above the threshold, released only below half of it, so caps
            # are not set and lifted every round around the threshold.
            self.engaged = psi > t.psi_some_avg10 or (self.engaged and psi >= t.psi_some_avg10 / 2)
            self.reason = f"memory PSI some avg10 {psi:.1f} % (threshold {t.psi_some_avg10:g} %)"
        else:
            m = meminfo(self.meminfo_path)
            share = 100.0 * m.get("MemAvailable", 0) / max(m.get("MemTotal", 1), 1)
            self.engaged = share < t.mem_available_below or (self.engaged and share <= t.mem_available_below + 5)
            self.reason = f"MemAvailable {share:.1f} % (threshold {t.mem_available_below:g} %)"
        return self.engaged


def vm_memory(vm: Any) -> tuple[int, int]:
    """(resident, swapped) bytes of a VM's RAM on the host, from its RAM file or QEMU's mapping."""
    from memvirt.compress.wss import smaps_fields
    from memvirt.dedup.discard import host_usage

    resident = host_usage(vm)
    start, _ = vm.ram_mapping()
    swapped = smaps_fields(vm.config.pid, start, ("Swap",))["Swap"]
    return resident, swapped


class VMWorker:
    """One VM's policies in a thread of its own."""

    def __init__(
        self,
        target: Target,
        policy: VMPolicy,
        metrics: Metrics,
        engaged: threading.Event,
        sample_every: float,
        shelf: Any = None,
        free_every: float = 30.0,
    ):
        self.target, self.policy, self.metrics = target, policy, metrics
        self.shelf = shelf
        self.free_every = free_every
        self.engaged = engaged
        self.sample_every = sample_every
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.rec: Any = None
        self.ctl: Any = None
        self._ctl_policy: Any = None
        self.state: dict[str, Any] = {
            "reclaim": "waiting",
            "compress": "waiting",
            "errors": {},
            "reclaimed_bytes": 0,
            "passes": 0,
            "last_pause_ms": None,
        }
        self._retry: dict[str, float] = {}
        self._backoff: dict[str, float] = {}
        self._next_reclaim = time.monotonic() + 2.0
        self._next_sample = 0.0
        self._next_free = 0.0
        self.thread = threading.Thread(target=self._run, name=f"vm:{target.name}", daemon=True)

    @property
    def name(self) -> str:
        return self.target.name

    def start(self) -> None:
        self.thread.start()

    def set_policy(self, policy: VMPolicy, sample_every: float, free_every: float = 30.0) -> None:
        """A reloaded config: the loop picks it up at its next turn (a changed compression policy
        restarts the controller, the cap going back as found in between)."""
        with self._lock:
            self.policy, self.sample_every, self.free_every = policy, sample_every, free_every

    def stop(self, wait: float = 30.0) -> None:
        self._stop.set()
        self.thread.join(wait)

    def status(self) -> dict[str, Any]:
        p = self.policy
        with self._lock:
            return {
                "vm": self.name,
                "source": self.target.source,
                "pid": self.target.pid,
                "ram": self.target.vm.config.ram,
                "policy": {
                    "reclaim": f"every {p.reclaim.every:g} s" if p.reclaim.enabled else "off",
                    "compress": p.compress.policy,
                },
                **{k: (dict(v) if isinstance(v, dict) else v) for k, v in self.state.items()},
            }

    # -- the loop ---------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                with self._lock:
                    policy = self.policy
                stepped = self._guarded("compress", lambda p=policy: self._compress(p))
                if self._stop.is_set():
                    break
                self._guarded("reclaim", lambda p=policy: self._reclaim(p))
                self._guarded("metrics", self._sample)
                if not stepped:
                    self._stop.wait(1.0)
        finally:
            self._close_ctl()
            if self.rec is not None:
                try:
                    self.rec.close()
                except Exception:
                    pass
                self.rec = None

    def _guarded(self, what: str, fn: Any) -> Any:
        """Run one policy step; a failure is logged once, recorded and retried (:data:`BACKOFF`)."""
        now = time.monotonic()
        if self._retry.get(what, 0.0) > now:
            return False
        try:
            out = fn()
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            with self._lock:
                known = self.state["errors"].get(what)
                self.state["errors"][what] = msg
                wait = self._backoff[what] = min(self._backoff.get(what, BACKOFF[0] / 2) * 2, BACKOFF[1])
                if what != "metrics":
                    self.state[what] = f"error (retry in {wait:.0f} s)"
            if known != msg:
                log.warning("%s: %s failed: %s", self.name, what, msg)
            self._retry[what] = now + wait
            self.metrics.policy_errors.labels(vm=self.name, policy=what).inc()
            if what == "compress":
                self._close_ctl()
            if what == "reclaim" and self.rec is not None:
                self.rec.close()
                self.rec = None
            return False
        if out is not None:  # the step did its work (None: nothing was due)
            self._backoff.pop(what, None)
            with self._lock:
                if self.state["errors"].pop(what, None) is not None:
                    log.info("%s: %s works again", self.name, what)
        return out

    def _compress(self, policy: VMPolicy) -> bool:
        """One controller step (it measures over ``interval``); True when it took that time."""
        c = policy.compress
        caps = c.policy in ("adaptive", "static")
        if c.policy == "off" or (caps and not self.engaged.is_set()):
            if self.ctl is not None:
                self._close_ctl()
            with self._lock:
                self.state["compress"] = "off" if c.policy == "off" else "idle: host not under pressure"
            return False
        if self.ctl is not None and self._ctl_policy != c:
            self._close_ctl()
        if self.ctl is None:
            self.ctl = self._controller(c)
            self._ctl_policy = c
        samples = self.ctl.step()
        for st in self.ctl.states:
            st.samples.clear()  # the controller keeps its run's history; a service must not
        s = samples[-1]
        m, n = self.metrics, self.name
        m.working_set.labels(vm=n).set(s.wss)
        m.cap.labels(vm=n).set(s.limit)
        m.refaulted.labels(vm=n).inc(s.refaulted)
        with self._lock:
            self.state["compress"] = f"{c.policy}: {s.action}"
            self.state["working_set_bytes"] = s.wss
            self.state["cap_bytes"] = s.limit
        return True

    def _controller(self, c: Any) -> Any:
        from memvirt.compress import tiers
        from memvirt.compress.controller import Controller, Policy
        from memvirt.errors import UsageError

        if c.policy == "adaptive" and not tiers.active_swaps():
            raise UsageError(
                "adaptive compression needs a swap tier on the host ('memvirt tier up'): "
                "without one a cap could only stall the guest"
            )
        name = {"measure": "none"}.get(c.policy, c.policy)
        pol = Policy(name, c.margin, c.limit or None)
        return Controller([self.target.vm], pol, interval=c.interval, method=c.method)

    def _close_ctl(self) -> None:
        ctl, self.ctl = self.ctl, None
        if ctl is not None:
            try:
                ctl.close()
            except Exception as e:
                log.warning("%s: closing compression failed: %s", self.name, e)

    def _reclaimer(self, goal: float) -> Any:
        from memvirt.dedup.reclaim import Reclaimer

        if self.rec is not None and self.rec.budget_ms != max(4.0, goal * self.target.vm.config.memory / (1 << 30)):
            self.rec.close()
            self.rec = None
        if self.rec is None:
            with _BOOTSTRAP:
                mark = pausing_dir() / f"{self.name}.json"
                self.rec = Reclaimer(self.target.vm, goal_ms_per_gib=goal, mark=mark, shelf=self.shelf)
                give_back_freed_memory()
        return self.rec

    def _reclaim(self, policy: VMPolicy) -> bool | None:
        r = policy.reclaim
        now = time.monotonic()
        if not r.enabled:
            with self._lock:
                self.state["reclaim"] = "off"
            return True
        if not self.engaged.is_set():
            with self._lock:
                self.state["reclaim"] = "idle: host not under pressure"
            return True
        if now < self._next_reclaim:
            return None
        self._next_reclaim = now + r.every
        vm = self.target.vm
        st = vm.status()
        if st != "running":
            with self._lock:
                self.state["reclaim"] = f"skipped: guest {st}"
            return True
        rep = self._reclaimer(r.goal_ms_per_gib).run()
        m, n = self.metrics, self.name
        m.reclaimed.labels(vm=n).inc(max(rep.reclaimed_bytes, 0))
        for p in rep.pauses_ms:
            m.pause.labels(vm=n).observe(p / 1000)
        with self._lock:
            self.state["reclaimed_bytes"] += max(rep.reclaimed_bytes, 0)
            self.state["passes"] += 1
            self.state["last_pause_ms"] = round(max(rep.pauses_ms or [0.0]), 2)
            self.state["reclaim"] = (
                f"{self.state['passes']} passes; last: {max(rep.reclaimed_bytes, 0) >> 20} MiB "
                f"back, {len(rep.pauses_ms)} pauses <= {self.state['last_pause_ms']} ms"
            )
        return True

    def _sample(self) -> bool | None:
        """The VM's gauges: RAM, resident, swapped, guest-free (introspected), KSM sharing."""
        now = time.monotonic()
        if now < self._next_sample:
            return None
        self._next_sample = now + self.sample_every
        from memvirt.dedup import ksm

        vm, m, n = self.target.vm, self.metrics, self.name
        resident, swapped = vm_memory(vm)
        m.ram.labels(vm=n).set(vm.config.memory)
        m.resident.labels(vm=n).set(resident)
        m.swapped.labels(vm=n).set(swapped)
        st = ksm.process_stat(vm.config.pid)
        m.ksm_merging.labels(vm=n).set(st.get("ksm_merging_pages", 0) * 4096)
        with self._lock:
            self.state.update(resident_bytes=resident, swapped_bytes=swapped)
        if self._retry.get("free", 0) > now or now < self._next_free:
            return True
        self._next_free = now + self.free_every
        try:
            census, _ = self._reclaimer(self.policy.reclaim.goal_ms_per_gib).scan()
        except Exception as e:
            wait = self._backoff["free"] = min(self._backoff.get("free", BACKOFF[0] / 2) * 2, BACKOFF[1])
            self._retry["free"] = now + wait
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            with self._lock:
                known = self.state["errors"].get("guest_free")
                self.state["errors"]["guest_free"] = msg
            if known != msg:
                log.warning("%s: guest-free introspection failed: %s", self.name, msg)
            return True
        self._backoff.pop("free", None)
        free = (census.counts.get("free", 0) + census.counts.get("free_pcp", 0)) * 4096
        m.guest_free.labels(vm=n).set(free)
        with self._lock:
            if self.state["errors"].pop("guest_free", None) is not None:
                log.info("%s: guest-free introspection works again", self.name)
            self.state["guest_free_bytes"] = free
        return True


class KsmPolicy:
    """KSM for the whole host, borrowed while wanted, paced within a ksmd CPU budget."""

    def __init__(self) -> None:
        self._stack: ExitStack | None = None
        self.pacer: Any = None
        self.borrowed: Any = None
        self.settings: Ksm | None = None
        self.state = "off"
        self._refused_until = 0.0

    def step(self, cfg: Ksm, want: bool) -> None:
        """Start, pace or stop KSM for this round; conflicts with another tuner stop it (logged)."""
        from memvirt.dedup import ksm
        from memvirt.errors import MemvirtError

        if not (cfg.enabled and want):
            self.stop("off" if not cfg.enabled else "idle")
            return
        if not ksm.available():
            self.state = "unavailable: no /sys/kernel/mm/ksm"
            return
        if time.monotonic() < self._refused_until:
            return
        try:
            if self._stack is not None and self.settings != cfg:
                self.stop("reconfiguring")
            if self._stack is None:
                ksm.refuse_other_tuners()
                stack = ExitStack()
                self.borrowed = stack.enter_context(
                    ksm.configured(
                        run=1,
                        pages_to_scan=cfg.max_pages_to_scan,
                        sleep_millisecs=cfg.sleep_millisecs,
                        use_zero_pages=int(cfg.use_zero_pages),
                    )
                )
                self._stack, self.settings = stack, cfg
                self.pacer = ksm.Pacer(cfg.ksmd_cpu, cfg.max_pages_to_scan, self.borrowed)
                log.info("KSM on (borrowed; ksmd within %.2f %% of a CPU)", cfg.ksmd_cpu * 100)
            for path, mine, now in self.borrowed.check():
                raise MemvirtError(f"another tool changed {path} ({mine} -> {now})")
            pages = self.pacer.step()
            self.state = f"on: pages_to_scan {pages} (ksmd budget {cfg.ksmd_cpu * 100:.2f} % of a CPU)"
        except MemvirtError as e:
            log.warning("KSM: %s; KSM settings given back, tried again in %.0f s", e, RETRY * 4)
            self.stop(f"refused: {e}")
            self._refused_until = time.monotonic() + RETRY * 4

    def stop(self, state: str = "off") -> None:
        """Give the settings back (those another tool changed since stay as they are)."""
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()
            log.info("KSM settings restored")
        self.pacer = self.borrowed = self.settings = None
        self.state = state


def host_sample(metrics: Metrics, cpu0: float) -> dict[str, Any]:
    """Host gauges: MemAvailable, zram totals, KSM, ksmd and the daemon's own CPU and RSS."""
    from memvirt.dedup import ksm

    m = meminfo()
    metrics.mem_available.set(m.get("MemAvailable", 0))
    orig = compr = used = 0
    for d in Path("/sys/block").glob("zram*"):
        try:
            f = (d / "mm_stat").read_text().split()
            orig, compr, used = orig + int(f[0]), compr + int(f[1]), used + int(f[2])
        except (OSError, ValueError, IndexError):
            continue
    metrics.zram_orig.set(orig)
    metrics.zram_compr.set(compr)
    metrics.zram_used.set(used)
    saving = ksm.saving_bytes() if ksm.available() else 0
    metrics.ksm_saving.set(saving)
    ksmd = ksm.ksmd_cpu_seconds() if ksm.available() else 0.0
    metrics.ksmd_cpu.set(ksmd)
    t = os.times()
    cpu = t.user + t.system + t.children_user + t.children_system - cpu0
    metrics.daemon_cpu.set(cpu)
    rss = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    metrics.daemon_rss.set(rss)
    return {
        "mem_available_bytes": m.get("MemAvailable", 0),
        "zram_orig_bytes": orig,
        "zram_compr_bytes": compr,
        "ksm_saving_bytes": saving,
        "ksmd_cpu_seconds": round(ksmd, 3),
        "daemon_cpu_seconds": round(cpu, 3),
        "daemon_rss_bytes": rss,
    }
