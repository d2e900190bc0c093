"""A private Ethernet segment between VMs on this host (``memvirt vm start NAME --lan LAN``).

Every VM on a LAN gets the same devices, in the same order, so one machine's kernel state can be
restored on another (physical-machine migration, :mod:`memvirt.pm`):

* a virtio-net NIC on a QEMU ``socket`` netdev joined to a multicast group that lives on the
  loopback interface only (``localaddr=127.0.0.1``, TTL 1): nothing outside this host can join,
  and the group and port are derived from the state folder and LAN name, so separate memvirt
  states never share a segment;
* the LAN's shared disk (a sparse raw file every VM of the LAN opens, ``share-rw``), serial
  ``memvirt-shared``: the shared disk (SAN) of the disk migration scheme;
* a disk of the VM's own (serial ``memvirt-store``), as large as its RAM: where the target of
  an iterative migration keeps the pages sent before the freeze.

The host gives each VM an address in ``10.77.0.0/24`` through the command channel.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from memvirt.errors import UsageError
from memvirt.paths import private_dir, state_home, touch_private

if TYPE_CHECKING:
    from memvirt.qemu.vm import VM

SUBNET = ipaddress.ip_network("10.77.0.0/24")
SHARED_DISK_SIZE = 4 << 30
SHARED_SERIAL = "memvirt-shared"
STORE_SERIAL = "memvirt-store"


def lan_dir(lan: str) -> Path:
    """The LAN's folder (its shared disk, locks): private, like the folders above it."""
    return private_dir(private_dir(state_home() / "lans") / lan)


def check_lan_name(lan: str) -> str:
    if not lan or not all(ch.isalnum() or ch in "-_." for ch in lan) or len(lan) > 64:
        raise UsageError(f"invalid LAN name {lan!r}: use letters, digits, '.', '_' or '-' (max 64)")
    return lan


def mcast_endpoint(lan: str) -> str:
    """The LAN's multicast group and port (organisation-local scope, 239.0.0.0/8)."""
    h = hashlib.sha256(f"{state_home().resolve()}\0{lan}".encode()).digest()
    return f"239.{h[0]}.{h[1]}.{1 + h[2] % 254}:{20000 + int.from_bytes(h[3:5], 'big') % 30000}"


def shared_disk(lan: str) -> Path:
    """The LAN's shared disk, created sparse on first use."""
    path = lan_dir(lan) / "shared.raw"
    if not path.exists():
        touch_private(path, SHARED_DISK_SIZE)
    return path


def wipe_shared_disk(lan: str) -> None:
    """Drop whatever a disk-scheme migration left on the shared disk (a machine's memory)."""
    path = lan_dir(lan) / "shared.raw"
    if path.exists():
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, 0)
            os.ftruncate(fd, SHARED_DISK_SIZE)
        finally:
            os.close(fd)


def lock(lan: str) -> int:
    """An exclusive lock on the LAN (one migration at a time uses its shared disk); returns the fd
    to keep open while it is held."""
    path = lan_dir(lan) / "lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        os.close(fd)
        raise UsageError(f"another migration is using LAN {lan!r}") from e
    return fd


@contextmanager
def allocation_lock(lan: str) -> Iterator[None]:
    """Held while a VM picks its address and saves it, so VMs started together differ."""
    path = lan_dir(lan) / "alloc.lock"
    with open(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600), "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def allocate(vm: VM, members: list[VM]) -> None:
    """Give ``vm`` a free address and a fresh locally administered MAC (stored in its config)."""
    used = {m.config.lan_ip for m in members if m.name != vm.name}
    for host in list(SUBNET.hosts())[1:]:
        if str(host) not in used:
            vm.config.lan_ip = str(host)
            break
    else:
        raise UsageError(f"LAN {vm.config.lan!r} is full")
    vm.config.lan_mac = "02:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(5))


def store_disk(vm: VM) -> Path:
    return vm.dir / "store.raw"


def qemu_args(vm: VM) -> list[str]:
    """NIC on the LAN, the shared disk, the VM's own store disk (same order on every VM)."""
    lan = vm.config.lan
    store = store_disk(vm)
    if not store.exists():
        touch_private(store, vm.config.memory)
    return [
        "-netdev",
        f"socket,id=lan0,mcast={mcast_endpoint(lan)},localaddr=127.0.0.1",
        "-device",
        f"virtio-net-pci,netdev=lan0,mac={vm.config.lan_mac}",
        "-drive",
        f"file={shared_disk(lan)},if=none,id=shared0,format=raw,file.locking=off",
        "-device",
        f"virtio-blk-pci,drive=shared0,serial={SHARED_SERIAL},share-rw=on",
        "-drive",
        f"file={store},if=none,id=store0,format=raw",
        "-device",
        f"virtio-blk-pci,drive=store0,serial={STORE_SERIAL}",
    ]


def configure_script(mac: str, ip: str) -> str:
    """Guest shell that brings up the NIC with MAC ``mac`` at ``ip``."""
    return (
        f'for d in /sys/class/net/*; do [ "$(cat $d/address)" = {mac} ] && dev=${{d##*/}}; done; '
        f'[ -n "$dev" ] || {{ echo "no NIC with MAC {mac}"; exit 1; }}; '
        f"ip addr flush dev $dev && ip addr add {ip}/{SUBNET.prefixlen} dev $dev && ip link set $dev up && "
        f"(setsid arping -U -c 1 -I $dev {ip} >/dev/null 2>&1 < /dev/null &)"
    )


def announce_script(ip: str) -> str:
    """Guest shell for a machine that just moved to new hardware: forget the neighbours it knew
    (an address may now belong to another MAC) and tell the LAN where ``ip`` lives now."""
    return (
        f"dev=$(ip -o -4 addr show | awk '$4 ~ /^{ip}\\//{{print $2}}'); [ -n \"$dev\" ] || exit 0; "
        f"ip neigh flush dev $dev; (setsid arping -U -c 2 -I $dev {ip} >/dev/null 2>&1 < /dev/null &)"
    )


def configure(vm: VM) -> None:
    """Bring up the guest's LAN interface at its address."""
    vm.exec(configure_script(vm.config.lan_mac, vm.config.lan_ip)).check("configuring the LAN")


def release(vm: VM, members: list[VM]) -> None:
    """After ``vm`` stopped: remove the LAN's folder (shared disk) once no VM uses it."""
    if not any(m.name != vm.name and m.alive() for m in members):
        shutil.rmtree(state_home() / "lans" / vm.config.lan, ignore_errors=True)
