"""Compressed swap in the machine's own RAM (zram), added only for one migration.

Without swap the kernel needs a free page for every page it saves, so a machine more than about
half full cannot hibernate (ENOMEM). With a zram swap device the kernel's image preallocation
swaps enough anonymous pages into zram to fit; the zram pool is kernel memory, so it is part of
the image and the swap entries stay valid on the target. memvirt adds a device of its own
(``hot_add``, so a zram device the machine already uses is never touched) and removes it again
afterwards, on the restored machine or on the thawed source: the machine keeps the memory
behaviour it had (no swap), and the pages come back into RAM, where they fit once the snapshot
copy is gone.
"""

from __future__ import annotations

from dataclasses import dataclass

from memvirt.errors import ZramError
from memvirt.qemu.vm import VM

STATE = "/run/memvirt-pm.zram"
"""Which zram device memvirt added (its number), so cleanup removes only that one."""
MARGIN = 16 << 20
"""How far under the no-swap limit the image is asked to be: the zram pool grows while the
kernel shrinks the image, so aiming exactly at the limit can still fail."""

SETUP = r"""
set -e
[ -e /sys/class/zram-control/hot_add ] || { echo "no zram support (zram module missing)"; exit 3; }
[ ! -e {state} ] || { echo "a zram device from an earlier migration is still there"; exit 3; }
id=$(cat /sys/class/zram-control/hot_add)
echo "$id" > {state}
d=/sys/block/zram$id
echo lz4 > $d/comp_algorithm 2>/dev/null || true
echo {size} > $d/disksize
mkswap /dev/zram$id > /dev/null
swapon /dev/zram$id
echo "zram=$id algorithm=$(sed 's/.*\[\(.*\)\].*/\1/' $d/comp_algorithm)"
"""

REMOVE = r"""
[ -f {state} ] || exit 0
id=$(cat {state})
set -- $(cat /sys/block/zram$id/mm_stat 2>/dev/null)
echo "stored=${1:-0} compressed=${2:-0} pool=${3:-0}"
t0=$(cut -d' ' -f1 /proc/uptime)
! grep -q "^/dev/zram$id " /proc/swaps || swapoff /dev/zram$id || exit 4
echo "$id" > /sys/class/zram-control/hot_remove || exit 5
rm -f {state}
echo "seconds=$(awk -v a="$t0" '{print $1 - a}' /proc/uptime)"
"""

PRESWAP = r"""
cg=/run/memvirt-pm.cgroup
mkdir -p $cg
mounted=0
[ -e $cg/memory.reclaim ] || { mount -t cgroup2 none $cg && mounted=1; }
t0=$(cut -d' ' -f1 /proc/uptime)
i=0
while [ $i -lt 8 ]; do
    free=$(awk '/^MemFree:/ {print $2 * 1024}' /proc/meminfo)
    over=$(( {ram} - free - {target} ))
    [ $over -le 0 ] && break
    chunk=$(( over * 2 < 33554432 ? over * 2 : 33554432 ))
    echo $chunk > $cg/memory.reclaim 2>/dev/null
    i=$((i + 1))
    awk -v a="$t0" '{exit !($1 - a > 30)}' /proc/uptime && break
done
[ $mounted = 1 ] && umount $cg
rmdir $cg 2>/dev/null
echo "over=$over rounds=$i seconds=$(awk -v a="$t0" '{print $1 - a}' /proc/uptime)"
"""


@dataclass
class ZramStats:
    """What zram held when it was removed (bytes; mm_stat), and how long swapoff took."""

    stored_bytes: int = 0
    compressed_bytes: int = 0
    pool_bytes: int = 0
    removal_seconds: float = 0.0


def add(vm: VM, size: int) -> str:
    """Add and swap on a zram device of ``size`` bytes (uncompressed capacity); its description."""
    res = vm.exec(SETUP.replace("{state}", STATE).replace("{size}", str(size)), timeout=30)
    if res.rc != 0:
        why = (res.text.strip().splitlines() or [f"rc {res.rc}"])[-1]
        if res.rc != 3:
            remove(vm)
        raise ZramError(f"cannot add zram swap on {vm.name!r}: {why}")
    return res.text.strip()


def remove(vm: VM, timeout: float = 300.0) -> ZramStats:
    """Swap off and remove the zram device memvirt added, if any (its pages come back into RAM)."""
    res = vm.exec(REMOVE.replace("{state}", STATE), timeout=timeout)
    if res.rc != 0:
        raise ZramError(f"cannot remove memvirt's zram swap on {vm.name!r} (rc {res.rc}): {res.text.strip()[:200]}")
    kv = dict(w.split("=", 1) for w in res.text.split() if "=" in w)
    try:
        return ZramStats(
            int(kv.get("stored", 0)), int(kv.get("compressed", 0)), int(kv.get("pool", 0)), float(kv.get("seconds", 0))
        )
    except ValueError as e:  # the machine's own words: not trusted to be numbers
        raise ZramError(f"{vm.name!r} reported garbage removing zram swap: {res.text.strip()[:200]!r}") from e


def preswap(vm: VM, ram: int, target: int) -> float:
    """Swap pages into zram while the machine runs, towards an image estimate (``ram`` - MemFree)
    of ``target``: the compressing happens before the freeze, not in the downtime, and the
    iterative scheme copies the settled zram pool ahead. Bounded (8 rounds of at most 32 MiB,
    30 s): pages that compress badly free little, and pushing on would thrash; the kernel
    swaps whatever is still needed when it makes the image. Seconds it took."""
    script = PRESWAP.replace("{ram}", str(ram)).replace("{target}", str(target))
    res = vm.exec(script, timeout=300)
    kv = dict(w.split("=", 1) for w in res.text.split() if "=" in w)
    try:
        if res.rc == 0:
            return float(kv["seconds"])
    except (KeyError, ValueError):
        pass
    raise ZramError(f"cannot swap pages into zram on {vm.name!r}: {res.text.strip()[:200]!r}")
