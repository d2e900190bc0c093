"""memvirtd's own cost: CPU and RSS of the daemon managing N idle guests (issue #17's goal:
<= 2 % of one core and <= 100 MiB RSS for 10 idle 1 GiB VMs).

Boots ``--guests`` idle guests (anonymous RAM, ``--memory`` each) in a state folder of its own,
starts ``memvirt daemon`` with the default config (or ``--config``) on a free metrics port, lets it
settle for ``--warmup`` seconds (every VM bootstrapped, one reclaim pass each), then samples for
``--observe`` seconds: the daemon's CPU (itself and its helpers, from its metrics'
``memvirt_daemon_cpu_seconds``, checked against /proc), RSS and anonymous RSS (/proc/PID/status).
The same with no guest first, for the baseline.

    python bench/daemon.py [--guests 10] [--memory 1G] [--warmup 90] [--observe 120] [--json FILE]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from common import RESULTS, machine_info, size_arg, write_json

os.environ.setdefault("MEMVIRT_HOME", "/tmp/bench-daemon-state")
os.environ.setdefault("MEMVIRT_RAM_DIR", "/dev/shm/bench-daemon-ram")

T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"{time.monotonic() - T0:7.1f}s {msg}", flush=True)


def status_kb(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024
    return out


def metric(port: int, name: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


def start_daemon(config: Path | None, tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    """The daemon, and its metrics port once it serves (read from its log line)."""
    log = tmp / "memvirtd.log"
    argv = [sys.executable, "-m", "memvirt.daemon.main", "--metrics", "127.0.0.1:0", "--socket", str(tmp / "ctl.sock")]
    if config is not None:
        argv += ["--config", str(config)]
    with open(log, "wb") as lf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=lf, stderr=lf)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if "/metrics" in text:
            port = int(text.split("http://127.0.0.1:", 1)[1].split("/", 1)[0])
            return proc, port
        if proc.poll() is not None:
            raise RuntimeError(f"memvirtd exited: {text[-500:]}")
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("memvirtd did not start")


def measure(config: Path | None, warmup: float, observe: float, every: float = 5.0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-daemon-") as t:
        tmp = Path(t)
        proc, port = start_daemon(config, tmp)
        try:
            time.sleep(warmup)
            cpu0, t0 = metric(port, "memvirt_daemon_cpu_seconds") or 0.0, time.monotonic()
            samples = []
            while (el := time.monotonic() - t0) < observe:
                samples.append({"t": round(el, 1), **status_kb(proc.pid)})
                time.sleep(every)
            cpu = (metric(port, "memvirt_daemon_cpu_seconds") or 0.0) - cpu0
            el = time.monotonic() - t0
            vms = metric(port, "memvirt_daemon_vms")
            errors = [ln for ln in (tmp / "memvirtd.log").read_text(errors="replace").splitlines() if "WARNING" in ln]
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(120)
    last = samples[-1]
    return {
        "vms": vms,
        "cpu_seconds": round(cpu, 3),
        "seconds": round(el, 1),
        "cpu_share_of_one_core": round(cpu / el, 4),
        "rss_bytes": last["VmRSS"],
        "rss_anon_bytes": last["RssAnon"],
        "rss_max_bytes": max(s["VmRSS"] for s in samples),
        "hwm_bytes": last["VmHWM"],
        "exit_code": rc,
        "warnings": errors[-5:],
        "samples": samples,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guests", type=int, default=10)
    ap.add_argument("--memory", type=size_arg, default=size_arg("1G"))
    ap.add_argument("--warmup", type=float, default=90.0)
    ap.add_argument("--observe", type=float, default=120.0)
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--json", default=str(RESULTS / "daemon.json"))
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    import memvirt.qemu.vm as vmmod
    from memvirt.image.build import default_image

    data: dict[str, Any] = {"machine": machine_info("qemu-system-x86_64"), "args": {**vars(args)}}
    data["args"]["config"] = str(args.config) if args.config else "defaults"
    say("baseline: the daemon with no VM")
    data["no_vm"] = measure(args.config, min(args.warmup, 20.0), min(args.observe, 30.0))
    say(f"  {data['no_vm']['rss_bytes'] >> 20} MiB RSS ({data['no_vm']['rss_anon_bytes'] >> 20} MiB anonymous)")
    image = default_image("6.1")
    vms: list[Any] = []
    try:
        say(f"booting {args.guests} idle guests of {args.memory >> 20} MiB (anonymous RAM)")
        for i in range(args.guests):
            vms.append(vmmod.start_vm(f"idle-{i}", image, memory=args.memory, ram="anonymous", wait=False))
        for vm in vms:
            vm.channel.wait_ready(vmmod.BOOT_TIMEOUT, vm.alive)
        say(f"measuring: {args.warmup:.0f} s to settle, then {args.observe:.0f} s")
        data["guests"] = measure(args.config, args.warmup, args.observe)
    finally:
        for vm in vms:
            vm.stop()
        write_json(Path(args.json).resolve(), data)
    g, b = data["guests"], data["no_vm"]
    say(
        f"{g['vms']:.0f} VMs: daemon CPU {g['cpu_seconds']} s over {g['seconds']} s = "
        f"{100 * g['cpu_share_of_one_core']:.2f} % of one core; RSS {g['rss_bytes'] / 2**20:.1f} MiB "
        f"(anonymous {g['rss_anon_bytes'] / 2**20:.1f}, max {g['rss_max_bytes'] / 2**20:.1f}, "
        f"peak {g['hwm_bytes'] / 2**20:.1f}); "
        f"no VM: {b['rss_bytes'] / 2**20:.1f} MiB, {100 * b['cpu_share_of_one_core']:.2f} %"
    )
    say(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
