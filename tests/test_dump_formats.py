"""ELF and kdump-compressed dumps: real QEMU output read back byte-exact, broken input rejected.

The QEMU tests need no guest kernel: the VM stays paused (``-S``) and markers are written
straight into its shared RAM file, where file offset equals guest-physical address below the
PCI hole. Synthetic dumps cover what this QEMU cannot produce (VMCOREINFO without a guest,
unflattened and zstd kdumps, pages left out of the dumped bitmap, PN_XNUM cores).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard
from dumpfiles import VMCOREINFO, elf_core, elf_note, flatten, kdump_image

from memvirt.errors import BadImage
from memvirt.memory.elfdump import ElfDumpMemory
from memvirt.memory.kdump import KdumpMemory
from memvirt.memory.source import PAGE_SIZE, GuestMemory

QEMU = shutil.which("qemu-system-x86_64")
GUEST_FIXTURES = {"dumps", "vm4g"}
"""These start QEMU (paused, no guest kernel) to get real dumps: tests using them are guest tests."""
MiB = 1 << 20
GiB = 1 << 30
RAM_SIZE = 64 * MiB
ROM_HOLE = (0xA0000, 0x100000)


@dataclass
class PausedVM:
    """A paused QEMU whose RAM is a shared file we can write markers into."""

    workdir: Path
    ram_size: int
    proc: subprocess.Popen[bytes] | None = None
    qmp: Any = None
    markers: dict[int, bytes] = field(default_factory=dict)

    @property
    def ram_path(self) -> Path:
        return self.workdir / "ram"

    def start(self) -> None:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        with self.ram_path.open("wb") as f:
            f.truncate(self.ram_size)
        sock = self.workdir / "qmp.sock"
        log = (self.workdir / "qemu.log").open("wb")
        self.proc = subprocess.Popen(
            [
                str(QEMU),
                "-machine",
                "pc,accel=tcg",
                "-m",
                f"{self.ram_size // MiB}M",
                "-nographic",
                "-nodefaults",
                "-S",
                "-object",
                f"memory-backend-file,id=m0,size={self.ram_size},mem-path={self.ram_path},share=on",
                "-machine",
                "memory-backend=m0",
                "-qmp",
                f"unix:{sock},server=on,wait=off",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"QEMU exited: {(self.workdir / 'qemu.log').read_text()}")
            if sock.exists():
                qmp = QEMUMonitorProtocol(str(sock))
                try:
                    qmp.connect()
                except OSError:
                    qmp.close()
                else:
                    qmp.settimeout(120)
                    self.qmp = qmp
                    return
            if time.monotonic() > deadline:
                raise RuntimeError("QEMU's QMP socket did not come up")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.qmp is not None:
            try:
                self.qmp.cmd("quit")
            except Exception:  # QEMU may close the socket before answering
                pass
            try:
                self.qmp.close()
            except Exception:
                pass
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=10)

    def poke(self, file_offset: int, data: bytes, gpa: int | None = None) -> None:
        """Write ``data`` into the RAM file and remember it as a marker at ``gpa``."""
        fd = os.open(self.ram_path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, file_offset)
        finally:
            os.close(fd)
        self.markers[file_offset if gpa is None else gpa] = data

    def capabilities(self) -> list[str]:
        return list(self.qmp.cmd("query-dump-guest-memory-capability")["formats"])

    def dump(self, path: Path, fmt: str, paging: bool = False, **extra: int) -> Path:
        self.qmp.cmd("dump-guest-memory", paging=paging, protocol=f"file:{path}", format=fmt, **extra)
        return path


def unflatten(src: Path, dst: Path) -> Path:
    """Replay a flattened kdump's records into a plain one, as ``makedumpfile -R`` does."""
    data = src.read_bytes()
    assert data.startswith(b"makedumpfile")
    out = bytearray()
    pos = 4096
    while True:
        offset, size = struct.unpack_from(">qq", data, pos)
        pos += 16
        if offset == -1:
            break
        if len(out) < offset + size:
            out.extend(bytes(offset + size - len(out)))
        out[offset : offset + size] = data[pos : pos + size]
        pos += size
    dst.write_bytes(bytes(out))
    return dst


def open_dump(path: Path) -> GuestMemory:
    with path.open("rb") as f:
        is_elf = f.read(4) == b"\x7fELF"
    return ElfDumpMemory(path) if is_elf else KdumpMemory(path)


def covered(mem: GuestMemory, start: int, end: int) -> bool:
    """Whether the regions cover guest-physical ``[start, end)`` without a hole."""
    pos = start
    for r in sorted(mem.regions, key=lambda r: r.gpa):
        if r.gpa <= pos < r.end:
            pos = r.end
    return pos >= end


def truncated_copy(src: Path, dst: Path, length: int) -> Path:
    with src.open("rb") as f:
        dst.write_bytes(f.read(length))
    return dst


# ---------------------------------------------------------------- a 64 MiB VM and its dumps


@dataclass
class Dumps:
    vm: PausedVM
    paths: dict[str, Path]
    ram: np.ndarray
    compressible_gpa: int
    unsupported: dict[str, str]


@pytest.fixture(scope="module")
def dumps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dumps]:
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    work = tmp_path_factory.mktemp("vm64")
    vm = PausedVM(work, RAM_SIZE)
    try:
        vm.start()
        rng = np.random.default_rng(1234)
        vm.poke(0x7000, rng.bytes(PAGE_SIZE))
        vm.poke(0x200000, rng.bytes(PAGE_SIZE))
        compressible = (b"memvirt compressible marker %d " % rng.integers(1 << 60)) * 200
        vm.poke(0x201000, compressible[:PAGE_SIZE])
        vm.poke(0x1234FD0, rng.bytes(100))
        vm.poke(0x2345678, rng.bytes(3 * PAGE_SIZE + 17))
        vm.poke(RAM_SIZE - PAGE_SIZE, rng.bytes(PAGE_SIZE))
        caps = vm.capabilities()
        paths = {
            "elf": vm.dump(work / "dump.elf", "elf"),
            "elf-paging": vm.dump(work / "dump-paging.elf", "elf", paging=True),
            "kdump-zlib": vm.dump(work / "dump.kdump-zlib", "kdump-zlib"),
        }
        paths["kdump-plain"] = unflatten(paths["kdump-zlib"], work / "dump-plain.kdump")
        unsupported = {}
        for fmt in ("kdump-lzo", "kdump-snappy"):
            if fmt in caps:
                paths[fmt] = vm.dump(work / f"dump.{fmt}", fmt)
            else:
                unsupported[fmt] = "this QEMU was built without it"
        ram = np.fromfile(vm.ram_path, dtype=np.uint8)
        yield Dumps(vm, paths, ram, 0x201000, unsupported)
    finally:
        vm.stop()


@pytest.fixture(params=["elf", "elf-paging", "kdump-zlib", "kdump-plain"])
def dump_mem(request: pytest.FixtureRequest, dumps: Dumps) -> Iterator[GuestMemory]:
    with open_dump(dumps.paths[request.param]) as mem:
        yield mem


def test_markers_read_back_at_their_addresses(dump_mem: GuestMemory, dumps: Dumps) -> None:
    for gpa, data in dumps.vm.markers.items():
        assert dump_mem.read(gpa, len(data)).tobytes() == data, f"marker at {gpa:#x}"


def test_whole_ram_matches_the_ram_file(dump_mem: GuestMemory, dumps: Dumps) -> None:
    low, high = ROM_HOLE
    assert np.array_equal(dump_mem.read(0, low), dumps.ram[:low])
    assert np.array_equal(dump_mem.read(high, RAM_SIZE - high), dumps.ram[high:])


def test_regions_cover_ram_and_are_sorted(dump_mem: GuestMemory) -> None:
    assert covered(dump_mem, 0, RAM_SIZE)
    gpas = [r.gpa for r in dump_mem.regions]
    assert gpas == sorted(gpas)
    assert all(a.end < b.gpa for a, b in zip(dump_mem.regions, dump_mem.regions[1:], strict=False))
    assert dump_mem.max_pfn >= RAM_SIZE // PAGE_SIZE


def test_untouched_page_reads_as_zeros(dump_mem: GuestMemory) -> None:
    assert not dump_mem.read(0x500000, PAGE_SIZE).any()
    assert not dump_mem.read_pages(np.array([0x500, 0x3000]))[0].any()


def test_read_pages_any_order(dump_mem: GuestMemory, dumps: Dumps) -> None:
    pfns = np.array([0x201, 0x7, 0x3FFF, 0x200, 0x201, 0x500, 0x2345, 0x2346], dtype=np.int64)
    expect = dumps.ram.reshape(-1, PAGE_SIZE)[pfns]
    assert np.array_equal(dump_mem.read_pages(pfns), expect)


def test_hole_is_not_ram(dump_mem: GuestMemory) -> None:
    with pytest.raises(BadImage, match="not RAM"):
        dump_mem.read(0x80000000, 16)
    with pytest.raises(BadImage, match="not RAM"):
        dump_mem.read_pages(np.array([0x80000]))


def test_chunks_walk_every_region(dump_mem: GuestMemory) -> None:
    total = sum(len(buf) for _, buf in dump_mem.chunks(8 * MiB))
    assert total == dump_mem.ram_size


def test_no_vmcoreinfo_without_a_guest_kernel(dump_mem: GuestMemory) -> None:
    assert dump_mem.vmcoreinfo is None


def test_qemu_kdump_is_flattened_and_dedups_zero_pages(dumps: Dumps) -> None:
    with KdumpMemory(dumps.paths["kdump-zlib"]) as mem:
        assert mem.flattened
    data = dumps.paths["kdump-plain"].read_bytes()
    desc_at = (1 + sum(struct.unpack_from("<II", data, 432))) * PAGE_SIZE
    descs = np.frombuffer(data, dtype=np.dtype("<u8,<u4,<u4,<u8"), offset=desc_at, count=RAM_SIZE // PAGE_SIZE)
    zero = descs[0x500]
    assert zero[2] == 0 and zero[1] == PAGE_SIZE
    assert (descs["f0"] == zero[0]).sum() > 1000


@pytest.mark.parametrize("fmt", ["kdump-lzo", "kdump-snappy"])
def test_lzo_and_snappy_are_read_or_clearly_refused(dumps: Dumps, fmt: str) -> None:
    if fmt not in dumps.paths:
        pytest.skip(f"{fmt}: {dumps.unsupported[fmt]}")
    try:
        with KdumpMemory(dumps.paths[fmt]) as mem:
            for gpa, data in dumps.vm.markers.items():
                assert mem.read(gpa, len(data)).tobytes() == data
            assert np.array_equal(mem.read(0x100000, RAM_SIZE - 0x100000), dumps.ram[0x100000:])
    except BadImage as e:
        assert f"{fmt} is not supported" in str(e) and "kdump-zlib" in str(e)


# ---------------------------------------------------------------- RAM above 4 GiB


@pytest.fixture(scope="module")
def vm4g(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PausedVM]:
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    vm = PausedVM(tmp_path_factory.mktemp("vm4g"), 4 * GiB)
    try:
        vm.start()
        yield vm
    finally:
        vm.stop()


def test_ram_above_4g_appears_at_4g(vm4g: PausedVM) -> None:
    """QEMU's pc machine keeps 3 GiB below the PCI hole and maps the rest of RAM at 4 GiB."""
    rng = np.random.default_rng(99)
    x = 0x123000
    high = rng.bytes(PAGE_SIZE)
    odd = rng.bytes(5000)
    low = rng.bytes(64)
    vm4g.poke(3 * GiB + x, high, gpa=4 * GiB + x)
    vm4g.poke(3 * GiB + 0x777F00, odd, gpa=4 * GiB + 0x777F00)
    vm4g.poke(x, low)
    kdump = vm4g.dump(vm4g.workdir / "dump.kdump", "kdump-zlib")
    # A full 4 GiB ELF dump writes every byte (9 s, 4 GiB of disk); a filtered one holds the
    # same kind of PT_LOAD for the range that matters.
    elf = vm4g.dump(vm4g.workdir / "dump.elf", "elf", begin=4 * GiB, length=16 * MiB)
    with KdumpMemory(kdump) as mem:
        assert mem.read(4 * GiB + x, PAGE_SIZE).tobytes() == high
        assert mem.read(4 * GiB + 0x777F00, len(odd)).tobytes() == odd
        assert mem.read(x, len(low)).tobytes() == low
        assert covered(mem, 0, 0xA0000) and covered(mem, 0x100000, 3 * GiB)
        assert covered(mem, 4 * GiB, 5 * GiB)
        assert mem.ram_size >= 4 * GiB
        with pytest.raises(BadImage, match="not RAM"):
            mem.read(3 * GiB + x, 8)
    with ElfDumpMemory(elf) as mem:
        assert [(r.gpa, r.size) for r in mem.regions] == [(4 * GiB, 16 * MiB)]
        assert mem.read(4 * GiB + x, PAGE_SIZE).tobytes() == high
        assert mem.read(4 * GiB + 0x777F00, len(odd)).tobytes() == odd


# ---------------------------------------------------------------- broken input


def assert_bad(path: Path, *needles: str) -> BadImage:
    """Opening (and reading all of) ``path`` fails with a BadImage naming the file and the problem."""
    with pytest.raises(BadImage) as info:
        with open_dump(path) as mem:
            for _ in mem.chunks(16 * MiB):
                pass
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    return info.value


def test_truncated_elf(dumps: Dumps, tmp_path: Path) -> None:
    src = dumps.paths["elf"]
    size = src.stat().st_size
    assert_bad(truncated_copy(src, tmp_path / "half.elf", size // 2), "truncated", "guest-physical")
    assert_bad(truncated_copy(src, tmp_path / "last.elf", size - 1), "truncated", "section")
    last_load_end = size - 11  # QEMU 7.2 ends the core with the 11-byte .shstrtab
    assert_bad(truncated_copy(src, tmp_path / "load.elf", last_load_end - 1), "truncated", "guest-physical")
    assert_bad(truncated_copy(src, tmp_path / "ehdr.elf", 40), "truncated", "ELF header")
    assert_bad(truncated_copy(src, tmp_path / "phdr.elf", 200), "truncated", "program headers")
    assert_bad(truncated_copy(src, tmp_path / "note.elf", 0x300), "truncated", "PT_NOTE")


def test_truncated_flattened_kdump(dumps: Dumps, tmp_path: Path) -> None:
    src = dumps.paths["kdump-zlib"]
    size = src.stat().st_size
    assert_bad(truncated_copy(src, tmp_path / "half.kdump", size // 2), "truncated")
    assert_bad(truncated_copy(src, tmp_path / "end.kdump", size - 16), "truncated", "end marker")
    assert_bad(truncated_copy(src, tmp_path / "hdr.kdump", 4096 + 16 + 200), "truncated")
    assert_bad(truncated_copy(src, tmp_path / "flat.kdump", 1000), "truncated")


def test_truncated_plain_kdump(dumps: Dumps, tmp_path: Path) -> None:
    src = dumps.paths["kdump-plain"]
    size = src.stat().st_size
    assert_bad(truncated_copy(src, tmp_path / "data.kdump", size - 50_000), "truncated", "pfn 0x")
    assert_bad(truncated_copy(src, tmp_path / "last.kdump", size - 1), "truncated", "pfn 0x")
    assert_bad(truncated_copy(src, tmp_path / "bitmap.kdump", 3 * PAGE_SIZE), "truncated", "bitmaps")
    desc_at = (1 + sum(struct.unpack_from("<II", src.read_bytes(), 432))) * PAGE_SIZE
    assert_bad(truncated_copy(src, tmp_path / "desc.kdump", desc_at + 1000), "truncated", "page descriptors")
    assert_bad(truncated_copy(src, tmp_path / "hdr.kdump", 200), "truncated", "disk_dump_header")
    assert_bad(truncated_copy(src, tmp_path / "sub.kdump", 4096 + 50), "truncated", "sub_header")


@pytest.mark.parametrize("fmt", ["elf", "kdump-zlib", "kdump-plain"])
def test_any_truncation_is_a_bad_image(dumps: Dumps, tmp_path: Path, fmt: str) -> None:
    src = dumps.paths[fmt]
    size = src.stat().st_size
    head = src.read_bytes()[: 64 * 1024] if fmt != "elf" else None
    cuts = {1, 7, 8, 20, 63, 64, 500, 4095, 4096, 4100, 4200, 8192, 12000, 20000}
    cuts = sorted(cuts | {size * k // 7 for k in range(1, 7)})
    for cut in cuts:
        if cut >= size:
            continue
        dst = tmp_path / f"cut-{cut}"
        if head is not None and cut <= len(head):
            dst.write_bytes(head[:cut])
        else:
            truncated_copy(src, dst, cut)
        assert_bad(dst)
        dst.unlink()


def test_random_bytes_and_empty_files(tmp_path: Path) -> None:
    noise = tmp_path / "noise.bin"
    noise.write_bytes(np.random.default_rng(5).bytes(64 * 1024))
    assert "not an ELF file" in str(pytest.raises(BadImage, ElfDumpMemory, noise).value)
    assert "not a kdump-compressed dump" in str(pytest.raises(BadImage, KdumpMemory, noise).value)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    for cls in (ElfDumpMemory, KdumpMemory):
        err = pytest.raises(BadImage, cls, empty).value
        assert "empty" in str(err) and str(empty) in str(err)


def test_wrong_reader_says_what_the_file_is(dumps: Dumps) -> None:
    assert "ELF core" in str(pytest.raises(BadImage, KdumpMemory, dumps.paths["elf"]).value)
    assert "not an ELF file" in str(pytest.raises(BadImage, ElfDumpMemory, dumps.paths["kdump-zlib"]).value)


def test_corrupt_compressed_page_names_its_pfn(dumps: Dumps, tmp_path: Path) -> None:
    data = bytearray(dumps.paths["kdump-plain"].read_bytes())
    pfn = dumps.compressible_gpa // PAGE_SIZE
    desc_at = (1 + sum(struct.unpack_from("<II", data, 432))) * PAGE_SIZE + pfn * 24
    offset, size, flags = struct.unpack_from("<QII", data, desc_at)
    assert flags == 1 and size < PAGE_SIZE, "QEMU stores the compressible marker zlib-compressed"
    data[offset : offset + size] = b"\xff" * size
    bad = tmp_path / "corrupt.kdump"
    bad.write_bytes(bytes(data))
    with KdumpMemory(bad) as mem:
        assert mem.read(0x200000, PAGE_SIZE).tobytes() == dumps.vm.markers[0x200000]
        with pytest.raises(BadImage, match=rf"pfn {pfn:#x} does not decompress \(kdump-zlib"):
            mem.read(dumps.compressible_gpa, 8)


def test_bad_block_size_and_signature(dumps: Dumps, tmp_path: Path) -> None:
    data = bytearray(dumps.paths["kdump-plain"].read_bytes()[: 1 << 20])
    struct.pack_into("<I", data, 428, 8192)
    path = tmp_path / "bs.kdump"
    path.write_bytes(bytes(data))
    assert_bad(path, "block_size is 8192")
    data[:8] = b"DISKDUMP"
    path.write_bytes(bytes(data))
    assert_bad(path, "not a kdump-compressed dump")


# ---------------------------------------------------------------- synthetic dumps


def test_synthetic_elf_merges_overlaps_and_finds_vmcoreinfo(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    blob = rng.bytes(6 * PAGE_SIZE)
    loads = [
        (0x10000, 2 * PAGE_SIZE, 4 * PAGE_SIZE),  # gpa 0x10000-0x14000
        (0x0, 0, 2 * PAGE_SIZE),  # gpa 0-0x2000
        (0x11000, 3 * PAGE_SIZE, PAGE_SIZE),  # a second view of gpa 0x11000 (paging dumps do this)
        (0x2000, 0, 0),  # not stored: offset -1, filesz 0
        (0x12000, 4 * PAGE_SIZE, 2 * PAGE_SIZE),  # overlaps 0x12000-0x14000, adds nothing new
    ]
    notes = elf_note(b"CORE", bytes(336), 1) + elf_note(b"VMCOREINFO", VMCOREINFO)
    for xnum in (False, True):
        path = tmp_path / f"core-{xnum}.elf"
        path.write_bytes(elf_core(loads, blob, notes, xnum=xnum))
        with ElfDumpMemory(path) as mem:
            assert [(r.gpa, r.size) for r in mem.regions] == [(0, 2 * PAGE_SIZE), (0x10000, 4 * PAGE_SIZE)]
            assert mem.vmcoreinfo == VMCOREINFO
            assert mem.read(0x10000, 4 * PAGE_SIZE).tobytes() == blob[2 * PAGE_SIZE :]
            assert mem.read(0x1FF0, 16).tobytes() == blob[0x1FF0:0x2000]


def test_synthetic_elf_rejects_other_machines(tmp_path: Path) -> None:
    core = bytearray(elf_core([(0, 0, PAGE_SIZE)], bytes(PAGE_SIZE)))
    path = tmp_path / "arm.elf"
    core[18:20] = struct.pack("<H", 183)
    path.write_bytes(bytes(core))
    assert_bad(path, "not an x86 core")
    core[18:20] = struct.pack("<H", 62)
    core[16:18] = struct.pack("<H", 2)
    path.write_bytes(bytes(core))
    assert_bad(path, "not a core file")
    core[16:18] = struct.pack("<H", 4)
    core[4] = 1
    path.write_bytes(bytes(core))
    assert_bad(path, "ELF64")
    path.write_bytes(elf_core([], b""))
    assert_bad(path, "no PT_LOAD")


def test_synthetic_kdump_plain_and_flattened(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    raw = rng.bytes(PAGE_SIZE)
    text = (b"compressible page " * 300)[:PAGE_SIZE]
    other = (b"another page, zstd " * 300)[:PAGE_SIZE]
    pages = {
        0: (0, raw),
        1: (1, zlib.compress(text)),
        3: (0x20, zstandard.ZstdCompressor().compress(other)),
        8: (1, zlib.compress(text[::-1])),
    }
    plain = kdump_image(pages, exists={0, 1, 2, 3, 8}, max_mapnr=9, vmcoreinfo=VMCOREINFO)
    n = len(plain)
    variants = {
        "plain": plain,
        # out of order, with a stale first copy of the data overwritten by a later record
        "flat": flatten(b"\xee" * n, [(5 * PAGE_SIZE, n)])[:-16]
        + flatten(plain, [(5 * PAGE_SIZE, n), (0, 200), (200, 5 * PAGE_SIZE)])[4096:],
    }
    for name, image in variants.items():
        path = tmp_path / f"{name}.kdump"
        path.write_bytes(image)
        with KdumpMemory(path) as mem:
            assert mem.flattened == (name == "flat")
            assert [(r.gpa, r.size) for r in mem.regions] == [(0, 4 * PAGE_SIZE), (8 * PAGE_SIZE, PAGE_SIZE)]
            assert mem.vmcoreinfo == VMCOREINFO and mem.phys_base == 0x1000000
            got = mem.read(0, 4 * PAGE_SIZE).reshape(4, PAGE_SIZE)
            assert got[0].tobytes() == raw and got[1].tobytes() == text
            assert not got[2].any(), "a page in the 1st bitmap only reads as zeros"
            assert got[3].tobytes() == other
            assert mem.read(8 * PAGE_SIZE + 10, 20).tobytes() == text[::-1][10:30]
            pages_back = mem.read_pages(np.array([8, 0, 2, 1]))
            assert pages_back[0].tobytes() == text[::-1] and pages_back[1].tobytes() == raw
            with pytest.raises(BadImage, match="not RAM"):
                mem.read(5 * PAGE_SIZE, 1)


def test_synthetic_kdump_rejects_bad_descriptors(tmp_path: Path) -> None:
    good = zlib.compress(b"x" * PAGE_SIZE)
    cases = {
        "past": ({0: (1, good)}, lambda img: img[:-5], "truncated: the data of pfn 0x0"),
        "flags": ({0: (0x40, good)}, lambda img: img, "corrupt page descriptor for pfn 0x0"),
        "rawsize": ({0: (0, b"short")}, lambda img: img, "corrupt page descriptor for pfn 0x0"),
        "garbage": ({0: (1, b"not zlib data")}, lambda img: img, "pfn 0x0 does not decompress"),
    }
    for name, (pages, mangle, needle) in cases.items():
        path = tmp_path / f"{name}.kdump"
        path.write_bytes(mangle(kdump_image(pages, exists={0}, max_mapnr=1)))
        assert_bad(path, needle)


def test_lzo_without_binding_is_refused_clearly(tmp_path: Path) -> None:
    if importlib.util.find_spec("lzo") is not None:
        pytest.skip("python-lzo is installed here")
    path = tmp_path / "lzo.kdump"
    image = bytearray(kdump_image({0: (2, b"\x11\0\0")}, exists={0}, max_mapnr=1))
    struct.pack_into("<I", image, 424, 2)
    path.write_bytes(bytes(image))
    assert_bad(path, "kdump-lzo is not supported", "kdump-zlib")
    struct.pack_into("<I", image, 424, 0)
    path.write_bytes(bytes(image))
    assert_bad(path, "kdump-lzo is not supported", "pfn 0x0")


def test_header_fuzz_only_raises_bad_image(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    text = (b"fuzz " * 1000)[:PAGE_SIZE]
    kdump = kdump_image({0: (1, zlib.compress(text)), 2: (0, rng.bytes(PAGE_SIZE))}, {0, 1, 2}, 3, VMCOREINFO)
    elf = elf_core(
        [(0, 0, 2 * PAGE_SIZE), (0x100000, 0, PAGE_SIZE)], rng.bytes(2 * PAGE_SIZE), elf_note(b"VMCOREINFO", VMCOREINFO)
    )
    flat = flatten(kdump, [(0, len(kdump))])
    for name, image, span in (("k", kdump, 5 * PAGE_SIZE), ("e", elf, 512), ("f", flat, 4200)):
        for i in range(150):
            mutated = bytearray(image)
            for at in rng.integers(0, min(span, len(image)), size=int(rng.integers(1, 6))):
                mutated[at] = int(rng.integers(256))
            path = tmp_path / f"{name}{i}"
            path.write_bytes(bytes(mutated))
            try:
                mem = open_dump(path)
            except BadImage as e:
                assert str(path) in str(e)
                continue
            with mem, contextlib.suppress(BadImage):
                for _ in mem.chunks(1 * MiB):
                    pass
                mem.read_pages(np.array([r.gpa // PAGE_SIZE for r in mem.regions]))
