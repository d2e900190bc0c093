"""Shared fixtures: an isolated memvirt state, the default image, and booted guests.

Guests are slow to boot under TCG (~10 s), so one 512 MiB guest per RAM mode is shared by the
whole session; tests that harm their guest boot their own through ``vm_factory``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_STATE = Path(tempfile.mkdtemp(prefix="memvirt-test-state-"))
_RAM = Path("/dev/shm") / f"memvirt-test-{os.getpid()}"
os.environ["MEMVIRT_HOME"] = str(_STATE)
os.environ["MEMVIRT_RAM_DIR"] = str(_RAM)

from memvirt.image.build import Image, default_image  # noqa: E402
from memvirt.qemu.vm import VM, start_vm  # noqa: E402


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for vm in VM.all():
        vm.stop(force=True)
    shutil.rmtree(_STATE, ignore_errors=True)
    shutil.rmtree(_RAM, ignore_errors=True)


@pytest.fixture(scope="session")
def image() -> Image:
    """The default image (newest Debian 6.1 amd64 kernel), downloaded and built once."""
    return default_image("6.1")


@pytest.fixture(scope="session")
def image_612() -> Image:
    return default_image("6.12")


class VMFactory:
    def __init__(self) -> None:
        self.vms: list[VM] = []

    def __call__(self, name: str, image: Image, **kw: object) -> VM:
        vm = start_vm(name, image, **kw)
        self.vms.append(vm)
        return vm

    def cleanup(self) -> None:
        for vm in self.vms:
            vm.stop()


@pytest.fixture
def vm_factory() -> Iterator[VMFactory]:
    f = VMFactory()
    yield f
    f.cleanup()


@pytest.fixture(scope="session")
def guest(image: Image) -> Iterator[VM]:
    """A shared 512 MiB guest with shared-file RAM. Tests must leave it running and unpaused."""
    vm = start_vm("shared-guest", image, memory=512 << 20, ram="shared")
    yield vm
    vm.stop()


@pytest.fixture(scope="session")
def anon_guest(image: Image) -> Iterator[VM]:
    """A shared 512 MiB guest with anonymous RAM (read through /proc/PID/mem)."""
    vm = start_vm("anon-guest", image, memory=512 << 20, ram="anonymous")
    yield vm
    vm.stop()
