"""Throughput of the VM LAN between two machines, measured with the agents' own TCP stream."""

from __future__ import annotations

import re
import secrets
import time

from memvirt.errors import MemvirtError
from memvirt.qemu.vm import VM


def measure_link(src: VM, dst: VM, nbytes: int = 32 << 20) -> float:
    """Bytes per second from ``src`` to ``dst`` over their LAN (one TCP stream, what pmagent uses)."""
    ip = dst.config.lan_ip
    if not ip or src.config.lan != dst.config.lan:
        raise MemvirtError(f"{src.name!r} and {dst.name!r} are not on the same VM LAN")
    port = 20000 + secrets.randbelow(30000)
    dst.exec_background(f"pmagent netbench recv --listen {ip}:{port} --timeout 60", "/tmp/pm-netbench.log")
    deadline = time.monotonic() + 20
    while "listening" not in dst.exec("cat /tmp/pm-netbench.log").text:
        if time.monotonic() > deadline:
            raise MemvirtError(f"the link receiver on {dst.name!r} did not start")
        time.sleep(0.1)
    res = src.exec(f"pmagent netbench send --to {ip}:{port} --bytes {nbytes}", timeout=120).check("link measurement")
    m = re.search(r"bytes=(\d+) seconds=([\d.]+)", res.text)
    if not m or float(m.group(2)) <= 0:
        raise MemvirtError(f"link measurement gave no figure: {res.text.strip()[:200]}")
    return int(m.group(1)) / float(m.group(2))
