"""Shared fixtures: an isolated memvirt state, the default image, and booted guests.

Guests are slow to boot under TCG (~10 s), so one 512 MiB guest per RAM mode is shared by the
whole session; tests that harm their guest boot their own through ``vm_factory``.

No guest outlives the session: SIGTERM unwinds it like Ctrl-C (fixtures torn down, every VM
stopped), and a reaper process stops them and removes the state and RAM folders if pytest is
killed outright. The host's own DAMON users (kdamond 0 on these hosts) must be exactly as they
were when the session ends.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_STATE = Path(tempfile.mkdtemp(prefix="memvirt-test-state-"))
_RAM = Path("/dev/shm") / f"memvirt-test-{os.getpid()}"
os.environ["MEMVIRT_HOME"] = str(_STATE)
os.environ["MEMVIRT_RAM_DIR"] = str(_RAM)

from support import Recorder, guests_of  # noqa: E402

from memvirt.compress import damon  # noqa: E402
from memvirt.image.build import Image, default_image  # noqa: E402
from memvirt.procs import end_watchdog  # noqa: E402
from memvirt.qemu import reaper  # noqa: E402
from memvirt.qemu.vm import VM, start_vm  # noqa: E402

_REAPER = reaper.spawn(reaper.EVERY, str(_STATE), str(_RAM))
SUPPORT = Recorder()
"""What this session's guest tests ran on, for docs/support.md (tests/support.py)."""


def _interrupt(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt("SIGTERM")


signal.signal(signal.SIGTERM, _interrupt)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    SUPPORT.save()
    reaper.reap(reaper.EVERY)
    shutil.rmtree(_STATE, ignore_errors=True)
    shutil.rmtree(_RAM, ignore_errors=True)
    end_watchdog(_REAPER)


@pytest.fixture(scope="session", autouse=True)
def host_damon_untouched() -> Iterator[None]:
    """Another tool's kdamonds (state, pid, operations, schemes) are the same after the session."""
    before = [k for k in damon.kdamonds() if k.state == "on"]
    yield
    after = [k for k in damon.kdamonds() if k.index in {b.index for b in before}]
    assert after == before, f"the host's DAMON changed during the tests: {before} -> {after}"


@pytest.fixture(scope="session")
def image() -> Image:
    """The default image (newest Debian 6.1 amd64 kernel), downloaded and built once."""
    return default_image("6.1")


@pytest.fixture(scope="session")
def image_612() -> Image:
    return default_image("6.12")


GUEST_FIXTURES = frozenset({"guest", "anon_guest", "vm_factory", "image", "image_612"})
"""Fixtures that boot a guest (or build the image to boot one): a test using one, directly or
through another fixture, is a guest test whatever its module says. A module whose fixtures start
QEMU by other means names them in its own ``GUEST_FIXTURES``."""
LOG_DIR = Path(os.environ.get("MEMVIRT_TEST_LOGS", "/tmp/memvirt-test-logs"))
"""Where a failed test's guests leave their serial logs (their state folder goes with them)."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that boots a guest ``guest``, so ``-m "not guest"`` really boots none.
    Tests marked ``kernels`` (the full kernel matrix) are skipped unless ``-m`` names that
    marker or MEMVIRT_KERNEL_MATRIX=1: a plain run (CI) keeps one smoke test per kernel series."""
    matrix = "kernels" in (config.option.markexpr or "") or os.environ.get("MEMVIRT_KERNEL_MATRIX") == "1"
    for item in items:
        booting = GUEST_FIXTURES | set(getattr(getattr(item, "module", None), "GUEST_FIXTURES", ()))
        if booting & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.guest)
        if not matrix and item.get_closest_marker("kernels"):
            item.add_marker(pytest.mark.skip(reason="kernel matrix: run with -m kernels or MEMVIRT_KERNEL_MATRIX=1"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    """On a failure, keep the serial logs of the test's guests (copied to LOG_DIR) and show their
    last lines in the report: the guest's side of the story is gone once the VM is stopped."""
    rep: pytest.TestReport = yield
    if rep.when == "call" or rep.failed:
        marks = [str(a) for m in item.iter_markers("support") for a in m.args]
        module = getattr(getattr(item, "module", None), "__name__", "").rpartition(".")[2]
        guests = guests_of(getattr(item, "funcargs", {}).values())
        SUPPORT.record(item.nodeid, module, marks, guests, "failed" if rep.failed else "passed" if rep.passed else "")
    if rep.failed and rep.when in ("setup", "call"):
        vms: list[VM] = []
        for value in getattr(item, "funcargs", {}).values():
            vms += value.vms if isinstance(value, VMFactory) else [value] if isinstance(value, VM) else []
        for vm in vms:
            try:
                log = vm.serial_log.read_bytes()[-(1 << 20) :]
            except OSError:
                continue
            dest = LOG_DIR / item.name.replace("/", "_") / f"{vm.name}.serial.log"
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(log)
            tail = "\n".join(log.decode(errors="replace").splitlines()[-40:])
            rep.sections.append((f"guest {vm.name}: serial log (kept in {dest})", tail))
    return rep


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
