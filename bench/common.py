"""Helpers the benches share: console, the common ending, machine description, timing, units, JSON output."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console

GB = 1e9
GIB = float(1 << 30)
RESULTS = Path(__file__).resolve().parent / "results"


def make_console(width: int = 200) -> Console:
    """A console whose tables stay whole when the output is a file or a pipe (CI logs)."""
    return Console(width=None if sys.stdout.isatty() else width, highlight=False)


def run_main(main: Callable[[], int | None]) -> NoReturn:
    """Every bench's ending: SIGTERM unwinds like Ctrl-C (guests stopped, host settings put back,
    exit 143), and what ``main`` returns is the exit code."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main() or 0)


def best_of(fn: Callable[[], Any], repeat: int) -> tuple[float, list[float]]:
    """Run ``fn`` ``repeat`` times; the fastest wall time and all of them (seconds)."""
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return min(runs), runs


def best_of_interleaved(fns: list[Callable[[], Any]], repeat: int) -> list[tuple[float, list[float]]]:
    """Like :func:`best_of` for several functions, run in turn (a, b, a, b, ...) so that a change
    in host load or cache state during the measurement affects all of them alike."""
    runs: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, out in zip(fns, runs, strict=True):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return [(min(r), r) for r in runs]


def fs_type(path: str | os.PathLike[str]) -> str:
    """The file system type of the mount holding ``path`` (``tmpfs``, ``ext4``, ...)."""
    real = os.path.realpath(path)
    best, kind = "", "?"
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            mnt = fields[1]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, kind = mnt, fields[2]
    return kind


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _mem_total() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def qemu_version(qemu: str) -> str:
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.splitlines()[0].strip() if out else "?"


def machine_info(qemu: str) -> dict[str, Any]:
    import numpy

    import memvirt

    try:
        ksm = Path("/sys/kernel/mm/ksm/run").read_text().strip()
    except OSError:
        ksm = "?"
    return {
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "host_kernel": platform.release(),
        "host_mem_bytes": _mem_total(),
        "qemu": qemu_version(qemu),
        "python": sys.version.split()[0],
        "numpy": numpy.__version__,
        "memvirt": memvirt.__version__,
        "ksm_run": ksm,
        "loadavg_at_start": os.getloadavg(),
    }


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.rename(path)
    return path


def gb(n: float) -> str:
    return f"{n / GB:.2f}"


def size_arg(text: str) -> int:
    """argparse type for sizes like 512M or 4G."""
    import argparse

    from memvirt.units import parse_size

    try:
        return parse_size(text)
    except ValueError as e:  # BadSize is a ValueError
        raise argparse.ArgumentTypeError(str(e)) from e


COUNTER = "/tmp/bench.count"
DATACHECK = "/tmp/bench.dc"


def start_workload(vm: Any, memtouch: str, datacheck_size: int) -> None:
    """Start ``memtouch`` (with a counter file) and ``datacheck`` in a guest; wait until both run."""
    vm.exec_background(f"{memtouch} --counter-file {COUNTER}", "/tmp/bench-mt.log")
    vm.exec_background(
        f"datacheck write --size {datacheck_size >> 20}M --seed 5 --state {DATACHECK}", "/tmp/bench-dc.log"
    )
    deadline = time.monotonic() + 300
    while vm.exec(f"test -s {COUNTER} && test -f {DATACHECK} && grep -q ready /tmp/bench-mt.log").rc:
        if time.monotonic() > deadline:
            raise RuntimeError("workload did not start")
        time.sleep(0.5)


def guest_health(vm: Any) -> str:
    """'' if the guest runs on (answers, its counter advances, its data verifies), else what is wrong."""
    from memvirt.errors import MemvirtError

    try:
        vm.channel.wait_ready(60, vm.alive)
        a = int(vm.exec(f"cat {COUNTER}").check("counter").text)
        time.sleep(1.0)
        if int(vm.exec(f"cat {COUNTER}").check("counter").text) <= a:
            return "counter stopped"
        res = vm.exec(f"datacheck verify --state {DATACHECK}")
        return "" if res.rc == 0 else f"datacheck: {res.text.strip()}"
    except (MemvirtError, ValueError) as e:
        return f"{e.__class__.__name__}: {e}"


def resident(vm: Any) -> int:
    """Host bytes backing the guest's RAM so far (tmpfs blocks of the RAM file, or QEMU's RssAnon)."""
    try:
        if vm.config.ram == "shared":
            return os.stat(vm.config.ram_path).st_blocks * 512
        with open(f"/proc/{vm.config.pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def fill_and_pause(
    vms: list[Any], cmd: str, log: str, timeout: float, say: Callable[[str], None], meminfo: bool = False
) -> dict[str, dict[str, Any]]:
    """Start ``cmd`` (memtouch) in each guest and pause each as soon as memtouch says ``ready``;
    per guest: the command, its ready line, seconds to fill, host bytes resident (and the guest's
    /proc/meminfo lines at ready, with ``meminfo``)."""
    started = {}
    for vm in vms:
        started[vm.name] = (vm.exec_background(cmd, log), time.monotonic())
        say(f"{vm.name}: {cmd}")
    info: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    last = 0.0
    while len(info) < len(vms):
        if time.monotonic() > deadline:
            raise RuntimeError(f"memtouch was not ready within {timeout:.0f} s")
        for vm in vms:
            if vm.name in info:
                continue
            pid, t0 = started[vm.name]
            vm.require_alive()
            res = vm.exec(f"cat {log}; kill -0 {pid} 2>/dev/null && echo __alive__", timeout=60)
            ready = [ln for ln in res.text.splitlines() if ln.startswith("memtouch ready")]
            if ready:
                mi = (
                    vm.exec("grep -E '^(MemTotal|MemFree|Cached|AnonPages|Slab):' /proc/meminfo", timeout=60).text
                    if meminfo
                    else ""
                )
                vm.pause()
                info[vm.name] = {
                    "command": cmd,
                    "ready_line": ready[0],
                    "fill_s": time.monotonic() - t0,
                    "host_resident_bytes": resident(vm),
                }
                if meminfo:
                    info[vm.name]["guest_meminfo_at_ready"] = mi.strip()
                say(
                    f"{vm.name}: memtouch ready after {info[vm.name]['fill_s']:.0f} s "
                    f"({info[vm.name]['host_resident_bytes'] / GIB:.2f} GiB resident on the host); paused"
                    + (f" ({' '.join(mi.split())})" if meminfo else "")
                )
            elif "__alive__" not in res.text:
                raise RuntimeError(f"memtouch exited in {vm.name} before it was ready: {res.text.strip()[-400:]}")
        if len(info) < len(vms):
            if time.monotonic() - last >= 15:
                last = time.monotonic()
                say(
                    "filling: "
                    + ", ".join(f"{vm.name} {resident(vm) / GIB:.2f} GiB" for vm in vms if vm.name not in info)
                )
            time.sleep(2)
    return info
