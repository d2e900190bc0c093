"""What a machine must offer to migrate, read through its command channel, and the checks on it.

The checks run before anything is frozen so a doomed migration is refused with a clear message;
the agents repeat the kernel and memory checks on their own (a mismatch is also refused by the
kernel when the image header is written).
"""

from __future__ import annotations

from dataclasses import dataclass

from memvirt.errors import MemvirtError, PMFailed, PMRefused
from memvirt.qemu.lan import SHARED_SERIAL, STORE_SERIAL
from memvirt.qemu.vm import VM

FACTS_SCRIPT = r"""
echo "release=$(uname -r)"
echo "version=$(uname -v)"
echo "power_state=$(cat /sys/power/state 2>/dev/null)"
[ -c /dev/snapshot ] && echo snapshot=1 || echo snapshot=0
command -v pmagent >/dev/null && echo pmagent=1 || echo pmagent=0
[ -e /sys/class/zram-control/hot_add ] && echo zram=1 || echo zram=0
awk '/^(MemTotal|MemFree|MemAvailable):/ {print $1 "=" $2 * 1024}' /proc/meminfo | tr -d :
for b in /sys/block/vd*; do [ -f "$b/serial" ] && echo "disk_$(cat "$b/serial")=/dev/${b##*/}"; done
true
"""
IMAGE_MARGIN = 32 << 20
"""Room the target's kernel needs beside the image while it loads it (metadata, buffers)."""


@dataclass(frozen=True)
class Facts:
    """A machine's kernel identity, hibernation support and memory (bytes)."""

    name: str
    release: str
    version: str
    power_state: str
    snapshot: bool
    pmagent: bool
    ram: int
    mem_total: int
    mem_free: int
    mem_available: int
    disks: dict[str, str]
    zram: bool = False
    """zram can be added (module loaded): swap in RAM for an image above :attr:`image_limit`."""

    @property
    def hibernation(self) -> bool:
        return "disk" in self.power_state.split() and self.snapshot

    @property
    def image_estimate(self) -> int:
        """What the hibernation image will hold: every page that is not free, the kernel's own
        reserved memory included (measured: 172 MiB image for 175 MiB estimated)."""
        return self.ram - self.mem_free

    @property
    def image_limit(self) -> int:
        """The largest image the kernel can make here without swap: its snapshot copy must fit in
        free pages, so about half of what it manages (hibernate_preallocate_memory's max_size;
        measured: 200 MiB images work, 252 MiB fail with ENOMEM on a 512 MiB machine)."""
        return self.mem_total // 2 - (4 << 20)


def parse_facts(name: str, ram: int, text: str) -> Facts:
    """Facts from the output of :data:`FACTS_SCRIPT`."""
    kv = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    try:
        return Facts(
            name=name,
            release=kv["release"],
            version=kv["version"],
            power_state=kv.get("power_state", ""),
            snapshot=kv.get("snapshot") == "1",
            pmagent=kv.get("pmagent") == "1",
            ram=ram,
            mem_total=int(kv["MemTotal"]),
            mem_free=int(kv["MemFree"]),
            mem_available=int(kv["MemAvailable"]),
            disks={k[5:]: v for k, v in kv.items() if k.startswith("disk_")},
            zram=kv.get("zram") == "1",
        )
    except (KeyError, ValueError) as e:
        raise MemvirtError(f"VM {name!r} did not report its kernel and memory: {text.strip()[:200]}") from e


def read_facts(vm: VM) -> Facts:
    return parse_facts(vm.name, vm.config.memory, vm.exec(FACTS_SCRIPT, timeout=30).check("reading machine facts").text)


def check_pair(src: Facts, dst: Facts, scheme: str, zram: bool | None = None) -> bool:
    """Refuse a migration that cannot work, before anything is frozen; whether it needs zram.

    ``zram`` None: add zram swap only when the image would not fit without it (it costs downtime
    to compress pages into it, and without it such a migration fails for certain); True/False
    forces it on or off.
    """
    for f in (src, dst):
        if not f.hibernation:
            raise PMRefused(
                f"the kernel of {f.name!r} ({f.release}) does not support hibernation "
                f"(/sys/power/state: {f.power_state or 'missing'!r}, /dev/snapshot "
                f"{'present' if f.snapshot else 'missing'})"
            )
        if not f.pmagent:
            raise PMRefused(f"{f.name!r} has no pmagent: its image predates physical-machine migration (rebuild it)")
    if (src.release, src.version) != (dst.release, dst.version):
        raise PMRefused(
            f"kernel mismatch: {src.name!r} runs {src.release} ({src.version}), {dst.name!r} runs {dst.release} "
            f"({dst.version}); a hibernation image restores only on the same kernel"
        )
    if src.mem_total != dst.mem_total:
        raise PMRefused(
            f"memory size mismatch: {src.name!r} has {src.mem_total >> 20} MiB, {dst.name!r} {dst.mem_total >> 20} MiB"
        )
    need, cap = src.image_estimate, src.image_limit
    use_zram = need > cap if zram is None else zram
    if use_zram and not src.zram:
        raise PMRefused(
            f"{src.name!r} cannot add zram swap (no zram module): its image predates zram support (rebuild it)"
        )
    if use_zram:
        need = min(need, cap)  # the kernel swaps into zram until the image fits
    if need > cap or need + IMAGE_MARGIN > dst.mem_available:
        hint = "migrate with --zram, or free some memory on the source" if need > cap else "free some memory there"
        raise PMFailed(
            f"image too large for free memory: about {need >> 20} MiB image, at most {cap >> 20} MiB fit on "
            f"{src.name!r} and {(dst.mem_available - IMAGE_MARGIN) >> 20} MiB on {dst.name!r} (without swap the "
            f"kernel needs a free page for every page it saves: {hint})"
        )
    if STORE_SERIAL not in src.disks:
        raise PMRefused(
            f"{src.name!r} has no {STORE_SERIAL} disk (where the host's verdict goes if the target's "
            "answer is lost): start both machines with --lan"
        )
    wanted = {"disk": [SHARED_SERIAL], "iterative": [STORE_SERIAL]}.get(scheme, [])
    for serial in wanted:
        for f in (src, dst):
            if serial not in f.disks:
                raise PMRefused(f"{f.name!r} has no {serial} disk: start both machines with --lan")
    return use_zram
