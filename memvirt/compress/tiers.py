"""The tiers below resident memory: a zram swap device (compressed RAM), optionally a disk swap file below it.

Swap is host-wide, so the tiers are shared by every VM; each VM's share is bounded by its own
memory cgroup (what its controller lets it swap), and zram's ``mem_limit`` caps what the
compressed tier may take from the host. zram gets the higher swap priority, so the kernel
fills it first and spills to disk only when it is full: resident, compressed, disk, the three
tiers of Gatun. What memvirt set up is recorded in ``state_home()/tiers.json`` so that
``memvirt tier down`` (or a later run after a crash) takes exactly that down, and nothing else.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from memvirt.errors import MemvirtError, UsageError
from memvirt.paths import cache_home, state_home

ZRAM_CONTROL = Path("/sys/class/zram-control")
SYS_BLOCK = Path("/sys/block")
ZRAM_PRIORITY = 100
DISK_PRIORITY = 10
MM_STAT = (
    "orig_data_size",
    "compr_data_size",
    "mem_used_total",
    "mem_limit",
    "mem_used_max",
    "same_pages",
    "pages_compacted",
    "huge_pages",
)


@dataclass
class Tiers:
    """What memvirt set up: the zram device (and whether memvirt created it), the disk swap file."""

    zram: str = ""
    hot_added: bool = False
    algorithm: str = ""
    disksize: int = 0
    mem_limit: int = 0
    disk_file: str = ""
    disk_size: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _state_file() -> Path:
    return state_home() / "tiers.json"


def _run(argv: list[str], what: str) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise UsageError(f"{argv[0]} is missing: install Debian's util-linux") from e
    if proc.returncode != 0:
        raise MemvirtError(f"{what} failed: {proc.stderr.strip() or proc.returncode}")


def active_swaps() -> dict[str, dict[str, int]]:
    """``/proc/swaps``: device or file -> size, used (bytes) and priority."""
    out = {}
    for line in Path("/proc/swaps").read_text().splitlines()[1:]:
        f = line.split()
        if len(f) >= 5:
            out[f[0]] = {"size": int(f[2]) * 1024, "used": int(f[3]) * 1024, "priority": int(f[4])}
    return out


def _free_zram() -> tuple[str, bool]:
    """An unused zram device (disksize 0, not swap): an existing one, else a hot-added one."""
    used = active_swaps()
    for d in sorted(SYS_BLOCK.glob("zram*")):
        if int((d / "disksize").read_text()) == 0 and f"/dev/{d.name}" not in used:
            return d.name, False
    try:
        n = int((ZRAM_CONTROL / "hot_add").read_text())
    except OSError as e:
        raise UsageError(
            "no free zram device and none can be added: this host kernel needs zram (CONFIG_ZRAM, 'modprobe zram')"
        ) from e
    return f"zram{n}", True


def load() -> Tiers | None:
    try:
        return Tiers(**json.loads(_state_file().read_text()))
    except FileNotFoundError:
        return None


def up(algorithm: str = "lz4", disksize: int | None = None, mem_limit: int | None = None, disk_swap: int = 0) -> Tiers:
    """Set up the compressed tier (and a disk tier of ``disk_swap`` bytes below it); idempotent.

    Defaults: zram sized to half of host RAM (uncompressed capacity), allowed to use a quarter
    of it once compressed.
    """
    current = load()
    if current is not None and f"/dev/{current.zram}" in active_swaps():
        return current
    if current is not None:
        down()
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    disksize = disksize or total // 2
    mem_limit = mem_limit if mem_limit is not None else total // 4
    name, hot_added = _free_zram()
    dev = SYS_BLOCK / name
    tiers = Tiers(name, hot_added, algorithm, disksize, mem_limit)
    _state_file().write_text(json.dumps(asdict(tiers)))
    try:
        offered = (dev / "comp_algorithm").read_text().replace("[", "").replace("]", "").split()
        if algorithm not in offered:
            raise UsageError(f"zram on this host offers {', '.join(offered)}, not {algorithm!r}")
        (dev / "comp_algorithm").write_text(algorithm)
        (dev / "disksize").write_text(str(disksize))
        (dev / "mem_limit").write_text(str(mem_limit))
        _run(["mkswap", f"/dev/{name}"], f"mkswap on /dev/{name}")
        _run(["swapon", "-p", str(ZRAM_PRIORITY), f"/dev/{name}"], f"swapon /dev/{name}")
        if disk_swap:
            path = cache_home() / "swap" / "memvirt.swap"
            path.parent.mkdir(parents=True, exist_ok=True)
            tiers.disk_file, tiers.disk_size = str(path), disk_swap
            _state_file().write_text(json.dumps(asdict(tiers)))
            _run(["fallocate", "-l", str(disk_swap), str(path)], f"allocating {path}")
            os.chmod(path, 0o600)
            _run(["mkswap", str(path)], f"mkswap on {path}")
            _run(["swapon", "-p", str(DISK_PRIORITY), str(path)], f"swapon {path}")
    except BaseException:
        down()
        raise
    return tiers


def down() -> Tiers | None:
    """Take down what :func:`up` set up: swap off (pages come back into RAM), zram reset."""
    tiers = load()
    if tiers is None:
        return None
    swaps = active_swaps()
    _check_room(tiers, swaps)
    if tiers.disk_file:
        if tiers.disk_file in swaps:
            _run(["swapoff", tiers.disk_file], f"swapoff {tiers.disk_file}")
        Path(tiers.disk_file).unlink(missing_ok=True)
    if tiers.zram:
        if f"/dev/{tiers.zram}" in swaps:
            _run(["swapoff", f"/dev/{tiers.zram}"], f"swapoff /dev/{tiers.zram}")
        dev = SYS_BLOCK / tiers.zram
        if dev.exists():
            (dev / "reset").write_text("1")
            if tiers.hot_added:
                try:
                    (ZRAM_CONTROL / "hot_remove").write_text(tiers.zram.removeprefix("zram"))
                except OSError:
                    pass
    _state_file().unlink(missing_ok=True)
    return tiers


def _check_room(tiers: Tiers, swaps: dict[str, dict[str, int]]) -> None:
    """Refuse to swap off more than the host can take back: swapoff pulls every swapped page into
    RAM, and a host short of it would OOM-kill (maybe a guest) halfway. zram's compressed copy is
    freed as its pages come in, so it counts as room."""
    names = ([tiers.disk_file] if tiers.disk_file else []) + ([f"/dev/{tiers.zram}"] if tiers.zram else [])
    need = sum(swaps[n]["used"] for n in names if n in swaps)
    if not need:
        return
    compressed = 0
    if tiers.zram and f"/dev/{tiers.zram}" in swaps:
        try:
            compressed = zram_stats(tiers.zram).get("mem_used_total", 0)
        except (OSError, ValueError):
            compressed = 0
    available = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            available = int(line.split()[1]) * 1024
    if need > available + compressed:
        raise MemvirtError(
            f"tier down would bring {need >> 20} MiB of swapped memory back into RAM, but the host "
            f"has {(available + compressed) >> 20} MiB available: free memory (stop a VM) first"
        )


def zram_stats(name: str) -> dict[str, int]:
    """The device's ``mm_stat`` (bytes): how much went in, what it takes compressed."""
    values = [int(x) for x in (SYS_BLOCK / name / "mm_stat").read_text().split()]
    return dict(zip(MM_STAT, values, strict=False))


def status() -> dict[str, Any]:
    """The tiers' state for ``memvirt tier status``: set up or not, usage, compression ratio."""
    tiers = load()
    swaps = active_swaps()
    out: dict[str, Any] = {"up": False, "swaps": swaps}
    if tiers is None or f"/dev/{tiers.zram}" not in swaps:
        return out
    st = zram_stats(tiers.zram)
    out.update(
        up=True,
        tiers=asdict(tiers),
        zram=st,
        ratio=(st["orig_data_size"] / st["compr_data_size"]) if st["compr_data_size"] else None,
    )
    return out
