"""What a machine must offer to migrate, read through its command channel, and the checks on it.

The checks run before anything is frozen so a doomed migration is refused with a clear message;
the agents repeat the kernel and memory checks on their own (a mismatch is also refused by the
kernel when the image header is written).
"""

from __future__ import annotations

from dataclasses import dataclass

from memvirt.errors import MemvirtError, UsageError
from memvirt.qemu.lan import SHARED_SERIAL, STORE_SERIAL
from memvirt.qemu.vm import VM

FACTS_SCRIPT = r"""
echo "release=$(uname -r)"
echo "version=$(uname -v)"
echo "power_state=$(cat /sys/power/state 2>/dev/null)"
[ -c /dev/snapshot ] && echo snapshot=1 || echo snapshot=0
command -v pmagent >/dev/null && echo pmagent=1 || echo pmagent=0
awk '/^(MemTotal|MemFree|MemAvailable):/ {print $1 "=" $2 * 1024}' /proc/meminfo | tr -d :
for b in /sys/block/vd*; do [ -f "$b/serial" ] && echo "disk_$(cat "$b/serial")=/dev/${b##*/}"; done
true
"""
IMAGE_MARGIN = 32 << 20
"""Room the target's kernel needs beside the image while it loads it (metadata, buffers)."""


class PMRefused(UsageError):
    """The two machines cannot migrate (different kernels, no hibernation support, ...)."""


class PMFailed(MemvirtError):
    """The migration started and failed; the source was thawed and runs on."""


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
            name=name, release=kv["release"], version=kv["version"], power_state=kv.get("power_state", ""),
            snapshot=kv.get("snapshot") == "1", pmagent=kv.get("pmagent") == "1", ram=ram,
            mem_total=int(kv["MemTotal"]), mem_free=int(kv["MemFree"]), mem_available=int(kv["MemAvailable"]),
            disks={k[5:]: v for k, v in kv.items() if k.startswith("disk_")},
        )
    except (KeyError, ValueError):
        raise MemvirtError(f"VM {name!r} did not report its kernel and memory: {text.strip()[:200]}") from None


def read_facts(vm: VM) -> Facts:
    return parse_facts(vm.name, vm.config.memory, vm.exec(FACTS_SCRIPT, timeout=30).check("reading machine facts").text)


def check_pair(src: Facts, dst: Facts, scheme: str) -> None:
    """Refuse a migration that cannot work, before anything is frozen."""
    for f in (src, dst):
        if not f.hibernation:
            raise PMRefused(
                f"the kernel of {f.name!r} ({f.release}) does not support hibernation "
                f"(/sys/power/state: {f.power_state or 'missing'!r}, /dev/snapshot {'present' if f.snapshot else 'missing'})"
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
    if need > cap or need + IMAGE_MARGIN > dst.mem_available:
        raise PMFailed(
            f"image too large for free memory: about {need >> 20} MiB image, at most {cap >> 20} MiB fit on "
            f"{src.name!r} and {(dst.mem_available - IMAGE_MARGIN) >> 20} MiB on {dst.name!r} (without swap the "
            "kernel needs a free page for every page it saves: free some memory on the source)"
        )
    wanted = {"disk": [SHARED_SERIAL], "iterative": [STORE_SERIAL]}.get(scheme, [])
    for serial in wanted:
        for f in (src, dst):
            if serial not in f.disks:
                raise PMRefused(f"{f.name!r} has no {serial} disk: start both machines with --lan")
