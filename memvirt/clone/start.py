"""Starting clones: a new QEMU that maps the template's RAM and loads the template's device state.

A lazy clone maps the template's RAM file with ``share=off``: QEMU's mapping is private, so
nothing is copied or even mapped up front; each page (and its host page-table entry) appears when
the clone first touches it, and a write copies only that page. An eager clone (the baseline)
first copies the RAM file, then runs on its copy like any shared-RAM VM. Either way QEMU starts
with ``-incoming defer`` and an inherited descriptor of the template's saved device state, which
``migrate-incoming fd:N`` loads with ``x-ignore-shared`` on (QEMU 7.2 cannot set that capability
from its command line), skipping the RAM the clone already has.

Run-state pitfall: the saved state records that the template was *paused* when it was saved, so
after loading it QEMU leaves the clone ``paused`` rather than running; memvirt sends ``cont``. The guest inside
still believes it is the template (hostname, ``memvirt.name`` on its
command line), so once its agent answers memvirt sets its hostname to the clone's name.
"""

from __future__ import annotations

import errno
import os
import shlex
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from memvirt.clone.template import check_cloneable, freeze, state_file, template_lock, unfreeze
from memvirt.errors import MemvirtError, UsageError, VMError
from memvirt.image.build import load_image
from memvirt.paths import private_dir, private_file, ram_dir
from memvirt.qemu.vm import VM, VMConfig, check_name, launch_qemu, vms_root

Progress = Callable[[str, int, int], None]
RESTORE_TIMEOUT = 60.0
GUEST_TIMEOUT = 60.0
COPY_CHUNK = 64 << 20


@dataclass
class Clone:
    """One started clone and what its start cost (seconds)."""

    name: str
    pid: int
    lazy: bool
    seconds: float
    qemu_seconds: float
    restore_seconds: float
    copy_seconds: float = 0.0
    copied_bytes: int = 0
    guest_seconds: float | None = None
    t0: float = field(default=0.0, repr=False)

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d.pop("t0")
        return d


@dataclass
class CloneReport:
    """What ``memvirt clone`` did: the template, whether it was frozen now, and the clones."""

    template: str
    frozen_now: bool
    freeze_seconds: float
    state_bytes: int
    clones: list[Clone]

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "clones": [c.to_json() for c in self.clones]}


def clone_names(source: str, count: int, prefix: str | None) -> list[str]:
    """``PREFIX-1`` .. ``PREFIX-N`` (default prefix ``SOURCE-clone``), all new and valid."""
    if count < 1:
        raise UsageError(f"--count must be at least 1, not {count}")
    stem = prefix if prefix is not None else f"{source}-clone"
    names = [f"{stem}-{i}" for i in range(1, count + 1)]
    for n in names:
        check_name(n)
        if (vms_root() / n).exists():
            raise UsageError(f"a VM named {n!r} already exists: choose another --prefix")
    return names


def clone(
    source: str,
    count: int = 1,
    prefix: str | None = None,
    eager: bool = False,
    wait_guest: bool = True,
    progress: Progress | None = None,
) -> CloneReport:
    """Freeze ``source`` as a template (unless it is one) and start ``count`` clones of it.

    A clone that fails to start leaves nothing behind; if no clone came of a freeze made here,
    the source is unfrozen and runs on as before.
    """
    names = clone_names(source, count, prefix)
    src = VM.load(source)
    check_cloneable(src)
    report = CloneReport(source, False, 0.0, 0, [])
    with template_lock(src):
        src = VM.load(source)
        t0 = time.perf_counter()
        was = freeze(src)
        report.frozen_now = was is not None
        report.freeze_seconds = time.perf_counter() - t0
        report.state_bytes = state_file(src).stat().st_size
        try:
            for i, name in enumerate(names):
                if progress:
                    progress(f"starting {name}", i, count)
                report.clones.append(start_clone(src, name, eager, progress))
        except BaseException as e:
            if was is not None and not report.clones:
                unfreeze(src, was)
            if report.clones and isinstance(e, MemvirtError):
                made = ", ".join(c.name for c in report.clones)
                raise type(e)(f"{e} (clones already running: {made})") from e
            raise
    if wait_guest:
        for i, c in enumerate(report.clones):
            if progress:
                progress(f"waiting for the guest of {c.name}", i, count)
            settle(VM.load(c.name), c)
    return report


def start_clone(template: VM, name: str, eager: bool = False, progress: Progress | None = None) -> Clone:
    """Start clone ``name`` of a frozen template; on any failure remove every trace of it."""
    t0 = time.perf_counter()
    vdir = vms_root() / name
    rams = ram_dir() if eager else None
    try:
        private_dir(vdir, exclusive=True)
    except FileExistsError as e:
        raise UsageError(f"a VM named {name!r} already exists: choose another --prefix") from e
    c = template.config
    config = VMConfig(
        name=name,
        memory=c.memory,
        cpus=c.cpus,
        arch=c.arch,
        ram="shared" if eager else "cow",
        image=c.image,
        kernel_release=c.kernel_release,
        accel=c.accel,
        append=c.append,
        regions=c.regions,
        started=time.time(),
        workload=c.workload,  # the guest's processes, its workload among them, go on in the clone
        migrated=c.migrated,
        clone_of=template.name,
        ram_path=str(rams / f"{name}.ram") if rams else "",
        backing="" if eager else c.ram_path,
    )
    vm = VM(config)
    result = Clone(name, 0, not eager, 0.0, 0.0, 0.0, t0=t0)
    try:
        if eager:
            t = time.perf_counter()
            result.copied_bytes = copy_ram(c.ram_path, config.ram_path, progress)
            result.copy_seconds = time.perf_counter() - t
        image = load_image(Path(c.image))
        t = time.perf_counter()
        with open(state_file(template), "rb") as state:
            state_fd = state.fileno()
            launch_qemu(vm, image, "clone", incoming="defer", pass_fds=(state_fd,))
        vm.save()
        result.qemu_seconds = time.perf_counter() - t
        t = time.perf_counter()
        running = restore(vm, state_fd)
        result.restore_seconds = running - t
    except BaseException:
        vm.discard()
        raise
    result.pid = config.pid
    result.seconds = running - t0
    return result


def restore(vm: VM, state_fd: int) -> float:
    """Load the template's device state (QEMU's inherited descriptor ``state_fd``) into a clone and run it.

    Returns the ``perf_counter`` time QEMU confirmed the clone runs.
    """
    what = f"loading the template's device state into clone {vm.name!r}"
    try:
        with vm.monitor(timeout=RESTORE_TIMEOUT) as mon:
            mon.set_capabilities(x_ignore_shared=True)
            mon.command("migrate-incoming", uri=f"fd:{state_fd}")
            deadline = time.monotonic() + RESTORE_TIMEOUT
            while (status := mon.status()) == "inmigrate":
                if time.monotonic() > deadline:
                    raise VMError(f"{what} did not finish in {RESTORE_TIMEOUT:.0f} s")
                time.sleep(0.001)
            if status == "paused":
                mon.command("cont")
                status = "running"
            running = time.perf_counter()
    except VMError as e:
        if not vm.alive():
            raise VMError(f"{what} failed: QEMU exited (is the saved state corrupt or from another QEMU?)") from e
        raise VMError(f"{what} failed: {e}") from e
    if status != "running":
        raise VMError(f"{what} left it {status}, not running")
    return running


def settle(vm: VM, result: Clone | None = None, timeout: float = GUEST_TIMEOUT) -> None:
    """Wait until the clone's guest answers, then give it its own hostname."""
    vm.channel.wait_ready(timeout, vm.alive)
    vm.exec(f"hostname {shlex.quote(vm.name)}").check("setting the clone's hostname")
    if result is not None:
        result.guest_seconds = time.perf_counter() - result.t0


def copy_ram(src: str, dst: str, progress: Progress | None = None) -> int:
    """Copy a RAM file's data extents (holes stay holes) in the kernel; returns bytes copied."""
    fi = os.open(src, os.O_RDONLY)
    try:
        fo = private_file(dst, flags=os.O_WRONLY)
        try:
            size = os.fstat(fi).st_size
            os.ftruncate(fo, size)
            extents = list(_data_extents(fi, size))
            total = sum(b - a for a, b in extents)
            done = 0
            for start, end in extents:
                off = start
                while off < end:
                    n = _copy_chunk(fi, fo, off, min(COPY_CHUNK, end - off))
                    off += n
                    done += n
                    if progress:
                        progress(f"copying RAM to {Path(dst).name}", done, total)
            return done
        finally:
            os.close(fo)
    finally:
        os.close(fi)


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    out = []
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            raise
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        out.append((data, hole))
        pos = hole
    return out


def _copy_chunk(fi: int, fo: int, off: int, n: int) -> int:
    try:
        done = os.copy_file_range(fi, fo, n, off, off)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
        done = os.pwrite(fo, os.pread(fi, n, off), off)
    if done <= 0:
        raise VMError(f"copying RAM stopped at byte {off:#x}")
    return done
