"""The guest's own memory figures (/proc/meminfo, /proc/zoneinfo, /proc/vmstat), frozen at a pause.

What the host reads in guest memory while the VM is paused inside :class:`FrozenFigures`
describes the same moment as the figures the guest reported.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from memvirt.errors import GuestError
from memvirt.qemu.vm import VM


@dataclass
class GuestFigures:
    """What the guest kernel itself reported, in pages (4 KiB) unless the name says otherwise."""

    meminfo_kb: dict[str, int]
    zone_pcp: dict[str, int] = field(default_factory=dict)
    zone_free: dict[str, int] = field(default_factory=dict)
    vmstat: dict[str, int] = field(default_factory=dict)

    def pages(self, key: str, page_size: int = 4096) -> int:
        """A /proc/meminfo figure (kB) in pages of ``page_size`` (the guest's: 16 KiB on arm64-16k)."""
        return self.meminfo_kb[key] * 1024 // page_size

    @property
    def pcp_total(self) -> int:
        return sum(self.zone_pcp.values())


def parse_meminfo(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([\w()]+):\s+(\d+)", line)
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


def parse_zoneinfo(text: str) -> tuple[dict[str, int], dict[str, int]]:
    """Per zone (``Node 0, zone DMA32``): the per-cpu list counts summed, and nr_free_pages."""
    pcp: dict[str, int] = {}
    free: dict[str, int] = {}
    zone = None
    for line in text.splitlines():
        m = re.match(r"^Node (\d+), zone\s+(\w+)", line)
        if m:
            zone = f"{m.group(1)}:{m.group(2)}"
            pcp[zone] = 0
            continue
        if zone is None:
            continue
        s = line.split()
        if len(s) == 2 and s[0] == "count:":
            pcp[zone] += int(s[1])
        elif len(s) == 2 and s[0] == "nr_free_pages":
            free[zone] = int(s[1])
    return pcp, free


def _split(text: str) -> dict[str, str]:
    parts: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^==> (.*) <==$", line)
        if m:
            current = m.group(1)
            parts[current] = []
        elif current:
            parts[current].append(line)
    return {k: "".join(f"{line}\n" for line in v) for k, v in parts.items()}


class FrozenFigures:
    """Context manager: on entry the VM is paused at the moment ``memsnap`` read the guest's
    figures; on exit it runs again and :attr:`figures` holds them.

    ``memsnap --freeze`` reads /proc into memory it touched beforehand, writes the result over a
    file it filled beforehand, then stops the VM itself through QEMU's pvpanic device (memvirt
    VMs run with ``-action panic=pause``), so the guest does nothing between its reading and the
    pause: not even the exit of the program that read.
    """

    OUT = "/tmp/memsnap.out"

    def __init__(self, vm: VM, timeout: float = 60.0, delay_ms: int = 300):
        """``delay_ms``: memsnap waits this long first, so that the shells that started it have
        exited (their pages freed) before it reads; a slow guest (arm64 under TCG on a busy
        host) needs more than the default."""
        self.vm = vm
        self.timeout = timeout
        self.delay_ms = delay_ms
        self.figures: GuestFigures | None = None

    def __enter__(self) -> FrozenFigures:
        self.vm.exec_background(f"memsnap --freeze --delay {self.delay_ms} --out {self.OUT}", "/dev/null")
        deadline = time.monotonic() + self.timeout
        with self.vm.monitor() as mon:
            while mon.status() != "guest-panicked":
                if time.monotonic() > deadline:
                    raise GuestError(f"memsnap did not freeze VM {self.vm.name!r} within {self.timeout:.0f} s")
                time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.vm.resume()
        raw = self.vm.exec(f"cat {self.OUT}; rm -f {self.OUT}").check("reading memsnap output").output
        self.figures = parse_snapshot(raw.rstrip(b"\0").decode(errors="replace"))


def parse_snapshot(text: str) -> GuestFigures:
    """The figures in memsnap's output; the guest wrote it, so text that does not parse is a
    :class:`GuestError`, not a ValueError."""
    parts = _split(text.replace("\r", ""))
    try:
        pcp, free = parse_zoneinfo(parts.get("/proc/zoneinfo", ""))
        vmstat = {k: int(v) for k, v in (ln.split() for ln in parts.get("/proc/vmstat", "").splitlines() if ln.strip())}
    except ValueError as e:
        raise GuestError(f"the guest's memsnap output does not parse: {str(e)[:80]}") from e
    return GuestFigures(parse_meminfo(parts.get("/proc/meminfo", "")), pcp, free, vmstat)
