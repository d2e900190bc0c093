"""Dump a VM's memory: QEMU's ELF and kdump-compressed formats, or a raw image.

ELF and kdump dumps come from QEMU's ``dump-guest-memory`` (QEMU stops the guest while it
dumps). A raw image is written by memvirt from the guest's RAM with the VM paused: file offset
equals guest-physical address, and all-zero chunks are left as holes so the file stays sparse.
A dump is the guest's memory: memvirt creates it 0600 (never through a link or over an existing
file) before QEMU or memvirt writes it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from memvirt.errors import UsageError, VMError
from memvirt.paths import private_file
from memvirt.qemu.vm import DUMP_FORMATS, VM, vm_memory

Progress = Callable[[int, int], None]
RESUME_WAIT = 30.0


def dump_vm(vm: VM, dest: Path, fmt: str = "elf", progress: Progress | None = None) -> Path:
    """Write ``vm``'s memory to ``dest`` in ``fmt``; returns the path written."""
    if fmt not in DUMP_FORMATS:
        raise UsageError(f"unknown dump format {fmt!r}: choose one of {', '.join(DUMP_FORMATS)}")
    dest = Path(dest).absolute()
    if not dest.parent.is_dir():
        raise UsageError(f"folder {dest.parent} does not exist")
    tmp = dest.with_name(f".{dest.name}.partial")
    try:
        tmp.unlink(missing_ok=True)
    except OSError as e:
        raise UsageError(f"cannot remove {tmp} (left by someone else?): {e.strerror}") from e
    fd = private_file(tmp)
    try:
        if fmt == "raw":
            _dump_raw(vm, fd, progress)
        else:
            _dump_qemu(vm, tmp, fmt, progress)
        tmp.rename(dest)
    finally:
        os.close(fd)
        tmp.unlink(missing_ok=True)
    return dest


def _dump_qemu(vm: VM, path: Path, fmt: str, progress: Progress | None) -> None:
    with vm.monitor() as mon:
        mon.command("dump-guest-memory", paging=False, protocol=f"file:{path}", format=fmt, detach=True)
        while True:
            st = mon.command("query-dump")
            if progress:
                progress(int(st.get("completed", 0)), int(st.get("total", 0)) or 1)
            if st["status"] == "completed":
                break
            if st["status"] == "failed":
                raise VMError(f"QEMU failed to dump VM {vm.name!r} (disk full or unwritable {path.parent}?)")
            time.sleep(0.1)
        # QEMU reports "completed" (and sends DUMP_COMPLETED) before its dump thread resumes the
        # guest in dump_cleanup(), so right after it the guest is still in "save-vm": wait for the
        # resume, so that a finished dump leaves the guest as it found it.
        deadline = time.monotonic() + RESUME_WAIT
        while mon.status() == "save-vm":
            if time.monotonic() > deadline:
                raise VMError(f"QEMU finished dumping VM {vm.name!r} but did not resume it within {RESUME_WAIT:.0f} s")
            time.sleep(0.05)


def _dump_raw(vm: VM, fd: int, progress: Progress | None) -> None:
    was_running = vm.status() == "running"
    if was_running:
        vm.pause()
    try:
        mem = vm_memory(vm)
        total = mem.ram_size
        done = 0
        os.ftruncate(fd, max(r.end for r in mem.regions))
        for gpa, chunk in mem.chunks(16 << 20):
            if np.any(chunk.view(np.uint64)):
                os.pwrite(fd, chunk.data, gpa)
            done += len(chunk)
            if progress:
                progress(done, total)
        mem.close()
    finally:
        if was_running:
            vm.resume()
