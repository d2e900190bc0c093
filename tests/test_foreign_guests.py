"""Guests memvirt did not start: its RAM map found without being told (issue 19).

Each test boots a plain ``qemu-system-x86_64`` built here (memvirt's image kernel and initramfs,
no ``vmcoreinfo`` device, no memvirt state), freezes it where the guest read its own figures, and
runs ``memvirt inspect`` with no layout flags: free pages must equal the guest's MemFree. The
sizes sit on both sides of each machine's split (q35 from 2.75 GiB on keeps 2 GiB below 4 GiB,
pc from 3.5 GiB on keeps 3 GiB): q35 2 GiB (no split), q35 3 GiB (split; pc would not split
it), pc 3 GiB (no split; q35 would), pc 4 GiB (split). RAM is a shared file (read as a file)
or anonymous (read as ``pid:N``). Guests boot one at a time and stop right after; their RAM is
mostly untouched, so a 4 GiB guest costs the host ~200 MiB.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cli import assert_one_line_error, memvirt

from memvirt.image.build import Image
from memvirt.introspect.groundtruth import FrozenFigures
from memvirt.qemu.channel import GuestChannel, Result
from memvirt.qemu.monitor import Monitor

pytestmark = pytest.mark.guest
GiB = 1 << 30


class ForeignQemu:
    """A QEMU run by hand, with just enough of memvirt's guest channel to ask the guest for its
    figures (``FrozenFigures`` uses ``exec``, ``exec_background``, ``monitor`` and ``resume``)."""

    def __init__(self, workdir: Path, image: Image, machine: str, ram: int, shared: bool):
        self.dir = workdir
        self.name = f"foreign-{machine}-{ram >> 20}m"
        self.ram_path = Path("/dev/shm") / f"memvirt-foreign-{os.getpid()}-{workdir.name}.ram"
        self.qmp = workdir / "qmp.sock"
        self.channel = GuestChannel(workdir / "cmd.sock", workdir / "cmd.lock", self.name)
        if shared:
            os.close(os.open(self.ram_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))  # guest memory: 0600
            backend = f"memory-backend-file,id=m0,size={ram},mem-path={self.ram_path},share=on"
        else:
            backend = f"memory-backend-ram,id=m0,size={ram}"
        argv = [
            shutil.which("qemu-system-x86_64") or "qemu-system-x86_64",
            "-machine",
            f"{machine},accel=tcg,memory-backend=m0",
            "-m",
            f"{ram >> 20}M",
            "-object",
            backend,
            "-smp",
            "1",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
            str(image.vmlinuz),
            "-initrd",
            str(image.initrd),
            "-append",
            f"console=ttyS0 panic=-1 quiet memvirt.name={self.name}",
            "-serial",
            f"file:{workdir / 'serial.log'}",
            "-qmp",
            f"unix:{self.qmp},server=on,wait=off",
            "-device",
            "virtio-serial-pci,id=vser0",
            "-chardev",
            f"socket,id=cmdch,path={workdir / 'cmd.sock'},server=on,wait=off",
            "-device",
            "virtserialport,bus=vser0.0,chardev=cmdch,name=org.memvirt.cmd",
            "-device",
            "pvpanic",
            "-action",
            "panic=pause",
        ]
        with (workdir / "qemu.log").open("wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            self.channel.wait_ready(600, lambda: self.proc.poll() is None)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exec(self, script: str, timeout: float = 60.0) -> Result:
        return self.channel.run(script, timeout)

    def exec_background(self, script: str, log: str) -> int:
        quoted = script.replace("'", "'\\''")
        return int(self.exec(f"setsid sh -c '{quoted}' > {log} 2>&1 < /dev/null & echo $!").text.split()[-1])

    def monitor(self) -> Monitor:
        return Monitor(self.qmp, self.name)

    def resume(self) -> None:
        with self.monitor() as mon:
            mon.command("cont")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self.ram_path.unlink(missing_ok=True)


@pytest.fixture
def foreign(image: Image, tmp_path: Path) -> Iterator[Callable[[str, int, bool], ForeignQemu]]:
    started: list[ForeignQemu] = []

    def boot(machine: str, ram: int, shared: bool) -> ForeignQemu:
        vm = ForeignQemu(tmp_path, image, machine, ram, shared)
        started.append(vm)
        return vm

    yield boot
    for vm in started:
        vm.stop()


def _inspect_frozen(vm: ForeignQemu, *sources: str) -> tuple[list[dict], int, int]:
    """``memvirt inspect --json`` of each source while the guest is frozen where it read its
    figures: the reports, the guest's MemFree and its zones' nr_free_pages, in pages. A source
    ``raw:PATH`` is first written as a raw image of the RAM file PATH, inside the freeze."""
    reports = []
    with FrozenFigures(vm) as snap:  # type: ignore[arg-type]
        for source in sources:
            if source.startswith("raw:"):
                source = str(_raw_image(Path(source[4:]), vm.dir / "guest.raw"))
            proc = memvirt("inspect", source, "--json", "--no-content", timeout=900)
            assert proc.returncode == 0, proc.stderr
            reports.append(json.loads(proc.stdout))
    figs = snap.figures
    assert figs is not None
    return reports, figs.pages("MemFree"), sum(figs.zone_free.values())


def _raw_image(ram_file: Path, out: Path) -> Path:
    """The pc 4 GiB guest's RAM file as a raw image (offset == guest-physical, the hole sparse):
    what ``memvirt dump --format raw`` writes, made of the file's data extents only."""
    size = ram_file.stat().st_size
    with ram_file.open("rb") as src, out.open("wb") as dst:
        dst.truncate(size + GiB)
        pos = 0
        while pos < size:
            try:
                data = os.lseek(src.fileno(), pos, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(src.fileno(), data, os.SEEK_HOLE)
            at = data
            while at < hole:  # pieces never straddle file offset 3 GiB, where the hole goes
                n = min(64 << 20, hole - at, (3 * GiB - at) if at < 3 * GiB else hole - at)
                os.pwrite(dst.fileno(), os.pread(src.fileno(), n, at), at if at < 3 * GiB else at + GiB)
                at += n
            pos = hole
    return out


def _mem_info(source: str, *flags: str) -> dict:
    proc = memvirt("mem", "info", source, "--json", *flags)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


CASES = [
    # machine, RAM, shared file?, (gpa, size) of each region QEMU maps
    ("q35", 2 * GiB, True, [(0, 2 * GiB)]),
    ("q35", 3 * GiB, True, [(0, 2 * GiB), (4 * GiB, 1 * GiB)]),
    ("q35", 3 * GiB, False, [(0, 2 * GiB), (4 * GiB, 1 * GiB)]),
    ("pc", 3 * GiB, True, [(0, 3 * GiB)]),
    ("pc", 4 * GiB, True, [(0, 3 * GiB), (4 * GiB, 1 * GiB)]),
    ("pc", 4 * GiB, False, [(0, 3 * GiB), (4 * GiB, 1 * GiB)]),
]


@pytest.mark.parametrize(
    ("machine", "ram", "shared", "regions"),
    CASES,
    ids=[f"{m}-{r >> 30}g-{'file' if s else 'anon'}" for m, r, s, _ in CASES],
)
def test_inspect_foreign_guest_without_flags(
    foreign: Callable[[str, int, bool], ForeignQemu], machine: str, ram: int, shared: bool, regions: list
) -> None:
    vm = foreign(machine, ram, shared)
    source = str(vm.ram_path) if shared else f"pid:{vm.pid}"
    info = _mem_info(source)
    assert [(r["gpa"], r["size"]) for r in info["regions"]] == regions, info
    assert info["layout"], info
    raw = machine == "pc" and shared and len(regions) == 2
    reports, mem_free, zone_free = _inspect_frozen(vm, source, *([f"raw:{source}"] if raw else []))
    for report in reports:
        assert report["pages"]["free"] == zone_free, (report["pages"], zone_free)
        if mem_free == zone_free:
            assert report["pages"]["free"] == mem_free
    assert reports[0]["ram_map"] == info["layout"]
    if raw:
        # A raw image of the same guest: the RAM file's maps and the hole-less flat one all fail
        # the kernel's e820 table but the pc one.
        assert reports[1]["ram_map"].startswith("raw image, pc (3072 MiB below 4 GiB"), reports[1]["ram_map"]
        (vm.dir / "guest.raw").unlink()
    if shared and len(regions) == 2:
        # The family QEMU did not use is refused, in one line naming what was tried.
        wrong = "pc" if machine == "q35" else "q35"
        assert_one_line_error(memvirt("mem", "info", source, "--machine", wrong), 2, "--machine", wrong)
    if not shared:
        # QEMU's own memory tree gives the same map.
        by_qmp = _mem_info(source, "--qmp", str(vm.qmp))
        assert by_qmp["regions"] == info["regions"] and "QMP" in by_qmp["layout"]
        # The socket alone names the process (its peer credentials).
        assert _mem_info("qmp", "--qmp", str(vm.qmp))["source"] == f"/proc/{vm.pid}/mem"
