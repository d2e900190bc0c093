"""The bench's guests, their dumps, and makedumpfile as the reference."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

from common import GIB, fs_type

from intro import (
    WORKER_TIMEOUT,
    say,
)
from intro.worker import _children_cpu

# --- guests -------------------------------------------------------------------------------------


def boot(image: Any, memory: int, names: list[tuple[str, str]], cpus: int) -> list[Any]:
    from memvirt.errors import VMError
    from memvirt.qemu.vm import BOOT_TIMEOUT, _tail, start_vm

    vms: list[Any] = []
    try:
        for name, ram in names:
            say(f"booting {name} ({ram} RAM, {memory / GIB:.1f} GiB, {cpus} CPU)")
            vms.append(start_vm(name, image, memory=memory, cpus=cpus, ram=ram, wait=False))
        for vm in vms:
            try:
                vm.channel.wait_ready(BOOT_TIMEOUT, vm.alive)
            except Exception:
                raise VMError(f"VM {vm.name!r} did not boot: {_tail(vm.serial_log)}") from None
    except BaseException:
        for vm in vms:
            vm.stop()
        raise
    say(f"booted ({vms[0].config.accel})")
    return vms


# --- dumps and makedumpfile ---------------------------------------------------------------------

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")


def make_dump(vm: Any, fmt: str, dest: Path) -> dict[str, Any]:
    from memvirt.qemu.dump import dump_vm

    say(f"dumping {vm.name} as {fmt} to {dest}")
    t = time.perf_counter()
    dump_vm(vm, dest, fmt)
    dump_s = time.perf_counter() - t
    os.chmod(dest, 0o600)
    st = os.stat(dest)
    say(f"dump {fmt}: {dump_s:.1f} s, {st.st_size / GIB:.2f} GiB")
    return {"format": fmt, "path": str(dest), "seconds": dump_s, "size_bytes": st.st_size, "fs": fs_type(dest)}


def elf_for_makedumpfile(path: Path) -> dict[str, Any]:
    """Rewrite the headers of QEMU's ELF core so that makedumpfile reads it, in place.

    makedumpfile assumes the program headers follow the 64-byte ELF header (as in the kernel's
    /proc/vmcore); QEMU 7.2 puts its section headers there. The program headers move to offset 64
    and the section header table to the end of the file; segments and notes stay where they are.
    """
    with open(path, "r+b") as f:
        raw = f.read(_EHDR.size)
        (ident, e_type, mach, ver, entry, phoff, shoff, flags, ehsize, phentsize, phnum, shentsize, shnum, shstrndx) = (
            _EHDR.unpack(raw)
        )
        before = {"e_phoff": phoff, "e_shoff": shoff, "e_ehsize": ehsize, "e_phnum": phnum, "e_shnum": shnum}
        if phoff == _EHDR.size:
            return {"changed": False, "before": before}
        if phnum == 0xFFFF:
            raise RuntimeError("PN_XNUM dump (paging=true form): too many program headers to move in place")
        f.seek(phoff)
        phdrs = f.read(phnum * phentsize)
        first_data = min(struct.unpack_from("<IIQ", phdrs, i * phentsize)[2] for i in range(phnum))
        if _EHDR.size + len(phdrs) > first_data:
            raise RuntimeError(f"program headers would overwrite data at {first_data:#x}")
        shdrs = b""
        if shoff and shnum:
            f.seek(shoff)
            shdrs = f.read(shnum * shentsize)
        end = f.seek(0, os.SEEK_END)
        new_shoff = (end + 7) & ~7 if shdrs else 0
        if shdrs:
            f.seek(end)
            f.write(b"\0" * (new_shoff - end) + shdrs)
        f.seek(0)
        f.write(
            _EHDR.pack(
                ident,
                e_type,
                mach,
                ver,
                entry,
                _EHDR.size,
                new_shoff,
                flags,
                _EHDR.size,
                phentsize,
                phnum,
                shentsize,
                shnum if shdrs else 0,
                shstrndx if shdrs else 0,
            )
        )
        f.write(phdrs)
    after = {"e_phoff": _EHDR.size, "e_shoff": new_shoff, "e_ehsize": _EHDR.size, "e_phnum": phnum, "e_shnum": shnum}
    return {"changed": True, "before": before, "after": after}


_HEX = r"0x([0-9a-fA-F]+)"


def parse_makedumpfile(text: str) -> dict[str, Any]:
    """Figures from makedumpfile's report (``--message-level 31``)."""
    out: dict[str, Any] = {}
    for key, label in [
        ("original_pages", "Original pages"),
        ("excluded_pages", "Excluded pages"),
        ("free_pages", "Free pages"),
        ("zero_pages", "Pages filled with zero"),
        ("remaining_pages", "Remaining pages"),
        ("memory_hole_pages", "Memory Hole"),
    ]:
        m = re.search(rf"{label}\s*:\s*{_HEX}", text)
        if m:
            out[key] = int(m[1], 16)
    steps: dict[str, float] = {}
    for name, secs in re.findall(r"STEP \[([^\]]+?)\s*\]\s*:\s*([0-9.]+) seconds", text):
        steps[name] = steps.get(name, 0.0) + float(secs)
    out["steps_s"] = steps
    out["notes"] = sorted(
        {ln.strip() for ln in text.splitlines() if "not supported" in ln or "may be incomplete" in ln or "mmap()" in ln}
    )
    return out


def run_makedumpfile(args: list[str], what: str, stdin: Path | None = None) -> dict[str, Any]:
    t, c0 = time.perf_counter(), _children_cpu()
    with open(stdin, "rb") if stdin else open(os.devnull, "rb") as inp:
        proc = subprocess.run(
            ["makedumpfile", *args], stdin=inp, capture_output=True, text=True, errors="replace", timeout=WORKER_TIMEOUT
        )
    wall, cpu = time.perf_counter() - t, _children_cpu() - c0
    text = proc.stdout + "\n" + proc.stderr
    res = {
        "argv": ["makedumpfile", *args],
        "returncode": proc.returncode,
        "wall_s": wall,
        "cpu_s": cpu,
        **parse_makedumpfile(text),
    }
    if proc.returncode != 0:
        tail = [
            ln
            for ln in text.replace("\r", "\n").splitlines()
            if ln.strip() and "%]" not in ln and not ln.startswith(("mem_map", "  "))
        ]
        res["error_tail"] = tail[-6:]
        say(f"makedumpfile ({what}) failed: {' | '.join(tail[-4:])}")
    return res


def makedumpfile_version() -> str:
    try:
        out = subprocess.run(["makedumpfile", "-v"], capture_output=True, text=True, timeout=10)
        return (out.stdout + out.stderr).splitlines()[0].strip()
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "not installed"


def vmcoreinfo_number(path: Path, key: str) -> int | None:
    from memvirt.targets import open_memory

    with open_memory(str(path)) as mem:
        text = (mem.vmcoreinfo or b"").decode(errors="replace")
    m = re.search(rf"^NUMBER\({re.escape(key)}\)=(-?\d+)$", text, re.M)
    return int(m[1]) if m else None


def fix_kdump_phys_base(path: Path, phys_base: int) -> dict[str, Any]:
    """QEMU 7.2 fills the kdump sub-header's ``phys_base`` by reading VMCOREINFO's decimal
    ``NUMBER(phys_base)`` as hex; makedumpfile trusts that field when it re-filters a kdump file."""
    with open(path, "r+b") as f:
        hdr = f.read(4096)
        if hdr[:8] != b"KDUMP   ":
            raise RuntimeError(f"{path} is not a plain kdump-compressed file")
        block_size = struct.unpack_from("<i", hdr, 428)[0]
        f.seek(block_size)
        old = struct.unpack("<Q", f.read(8))[0]
        if old != phys_base:
            f.seek(block_size)
            f.write(struct.pack("<Q", phys_base))
    return {"header_phys_base": old, "vmcoreinfo_phys_base": phys_base, "changed": old != phys_base}
