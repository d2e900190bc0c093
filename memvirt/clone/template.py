"""Freezing a running VM into a template: its RAM file stays put, its device state goes to a file.

QEMU's ``x-ignore-shared`` migration capability leaves RAM that lives in a shared named file out
of the migration stream, so "migrating" the paused VM into ``exec:cat > FILE`` saves only its
device state (a few hundred KiB, in milliseconds, whatever the RAM size). The VM stays paused in
QEMU's ``postmigrate`` state; its RAM file is made read-only (0400, owner only: it is guest memory)
and must never change again while a clone maps it, so memvirt refuses to resume or stop it then
(:meth:`memvirt.qemu.vm.VM.resume`).
"""

from __future__ import annotations

import fcntl
import os
import shlex
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from memvirt.errors import UsageError, VMError
from memvirt.paths import READONLY_FILE, touch_private
from memvirt.qemu.config import Frozen
from memvirt.qemu.monitor import Monitor
from memvirt.qemu.vm import TEMPLATE, TEMPLATE_STATE, VM

MIGRATE_TIMEOUT = 60.0


def state_file(vm: VM) -> Path:
    """The template's saved device state, which every clone loads."""
    return vm.dir / TEMPLATE_STATE


@contextmanager
def template_lock(vm: VM) -> Iterator[None]:
    """Serialise freezing and cloning of one VM across memvirt processes."""
    fd = os.open(vm.dir / "clone.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with open(fd, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def check_cloneable(vm: VM) -> None:
    """Refuse, with the reason, a VM that cannot be a template."""
    c = vm.config
    if c.ram == "cow":
        raise UsageError(
            f"VM {vm.name!r} is a lazy clone of {c.clone_of!r}: its RAM is private to its QEMU process, "
            f"so it cannot back clones; clone {c.clone_of!r} instead, or make an --eager clone and clone that"
        )
    if c.ram != "shared":
        raise UsageError(f"VM {vm.name!r} has {c.ram} RAM: only a VM started with --ram shared can be cloned")
    if not vm.alive():
        raise UsageError(f"VM {vm.name!r} is not running (its QEMU exited): only a live VM can be cloned")
    if c.lan:
        raise UsageError(
            f"VM {vm.name!r} is on VM LAN {c.lan!r}: clones would share its NIC's MAC and disks; "
            "clone a VM started without --lan"
        )


def wait_migration(mon: Monitor, what: str, timeout: float = MIGRATE_TIMEOUT) -> None:
    """Poll ``query-migrate`` until QEMU reports the migration completed."""
    deadline = time.monotonic() + timeout
    while True:
        st = mon.command("query-migrate")
        status = st.get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise VMError(f"{what} failed in QEMU: {st.get('error-desc', status)}")
        if time.monotonic() > deadline:
            raise VMError(f"{what} did not finish in {timeout:.0f} s")
        time.sleep(0.002)


def freeze(vm: VM) -> str | None:
    """Make ``vm`` a template (pause it, save its device state).

    Returns its run state before (``running`` or ``paused``), or None if it already was a template.
    """
    check_cloneable(vm)
    if vm.is_template:
        if not state_file(vm).exists():
            raise VMError(f"template {vm.name!r} lost its saved state {state_file(vm)}; resume it and clone again")
        return None
    with vm.monitor() as mon:
        was = mon.status()
        if was not in ("running", "paused"):
            raise UsageError(f"VM {vm.name!r} is {was}: only a running or paused VM can be cloned")
        tmp = state_file(vm).with_suffix(".partial")
        tmp.unlink(missing_ok=True)
        touch_private(tmp)
        mon.command("stop")
        try:
            mon.set_capabilities(x_ignore_shared=True)
            mon.command("migrate", uri=f"exec:cat > {shlex.quote(str(tmp))}")
            wait_migration(mon, f"saving the device state of VM {vm.name!r}")
        except BaseException:
            tmp.unlink(missing_ok=True)
            if was == "running":
                mon.command("cont")
            raise
    tmp.rename(state_file(vm))
    ram = Path(vm.config.ram_path)
    vm.config.frozen = Frozen(time.time(), was, stat.S_IMODE(ram.stat().st_mode))
    ram.chmod(READONLY_FILE)
    state_file(vm).chmod(READONLY_FILE)
    vm.config.role = TEMPLATE
    vm.save()
    return was


def unfreeze(vm: VM, was: str) -> None:
    """Undo a :func:`freeze` that no clone came of: the VM runs on (or stays paused) as before."""
    if was == "running":
        vm.resume()
    else:
        vm.drop_template()
