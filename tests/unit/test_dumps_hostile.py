"""Hostile dump files: headers that claim more than the file holds end in one BadImage line,
with host memory and time bounded.

Every case is opened in a child process under an address-space ceiling (RLIMIT_AS) and a CPU
and wall-clock ceiling, so a reader that allocates or loops by what a header claims fails the
test (MemoryError, a timeout, or memory growth beyond the budget) instead of slowing the host.
The fuzz loop mutates small valid images built here and accepts only success or a MemvirtError.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard
from dumpfiles import PAGE_SIZE, VMCOREINFO, elf_core, elf_note, flatten, kdump_image

AS_CEILING = 512 << 20  # the child's whole address space; python + numpy + pytest take ~160 MiB of it
CPU_SECONDS = 30
WALL_SECONDS = 60
RSS_BUDGET = 48 << 20  # peak RSS growth allowed while opening a small hostile file
HERE = Path(__file__).resolve().parent
MAX_PFN = 1 << 40  # x86-64 physical addresses have at most 52 bits
MAX_REGIONS = 1 << 16  # far more RAM ranges than a machine's memory map holds

# disk_dump_header and kdump_sub_header field offsets (little-endian)
KD_BITMAP_BLOCKS = 436
KD_MAX_MAPNR = 440
KD_SUB = PAGE_SIZE
KD_SUB_VMCI_OFFSET = KD_SUB + 32
KD_SUB_VMCI_SIZE = KD_SUB + 40
KD_SUB_MAX_MAPNR_64 = KD_SUB + 96


# ---------------------------------------------------------------- the child side


class _Slow(BaseException):
    """One fuzz case ran past its time ceiling (a BaseException, so no reader can swallow it)."""


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10


def _exercise(mem: Any) -> None:
    """Touch what a command would: sizes, the first page of each region, a few chunks."""
    from memvirt.memory.source import PAGE_SHIFT

    _ = (mem.ram_size, mem.max_pfn, mem.vmcoreinfo, mem.describe())
    firsts = np.array([r.gpa >> PAGE_SHIFT for r in mem.regions[:64] if r.size >= PAGE_SIZE], dtype=np.int64)
    mem.read_pages(firsts)
    for r in mem.regions[:4]:
        mem.read(r.gpa, min(r.size, 64 << 10))
    for n, _chunk in enumerate(mem.chunks(256 << 10)):
        if n == 3:
            break


def probe(path: str, fmt: str = "auto", full: bool = False) -> dict[str, Any]:
    """Open and exercise ``path`` (``full``: read all its RAM); what happened, how long it took and
    how much RSS it cost."""
    from memvirt.errors import MemvirtError
    from memvirt.memory.open import open_memory

    rss0 = _maxrss()
    t0, c0 = time.monotonic(), time.process_time()
    result: dict[str, Any]
    try:
        with open_memory(path, fmt) as mem:
            _exercise(mem)
            for _ in mem.chunks(1 << 20) if full else ():
                pass
            result = {"outcome": "ok", "max_pfn": mem.max_pfn, "regions": len(mem.regions)}
    except MemvirtError as e:
        result = {"outcome": type(e).__name__, "message": str(e)}
    except BaseException as e:  # noqa: B036 - a MemoryError or a bug is exactly what we look for
        result = {"outcome": "crash", "message": f"{type(e).__name__}: {e}"}
    result["seconds"] = time.monotonic() - t0
    # CPU time, not wall time, bounds the work: a loaded host stretches the second, not the first.
    result["cpu_seconds"] = time.process_time() - c0
    result["rss_growth"] = _maxrss() - rss0
    return result


INTERESTING = [0, 1, 0xFF, 0xFFFF, 1 << 20, 1 << 31, 0xFFFFFFFF, 1 << 32, 1 << 40, 1 << 52, 1 << 62, (1 << 63) - 8,
               (1 << 64) - 1]  # fmt: skip


def _mutate(rng: np.random.Generator, image: bytes, span: int, fields: list[tuple[int, str]]) -> bytes:
    """One to three mutations: size-like values in known header fields or anywhere in the headers,
    flipped bytes, a cut."""
    data = bytearray(image)
    for _ in range(int(rng.integers(1, 4))):
        kind = rng.integers(5)
        if kind <= 2:
            if fields and rng.random() < 0.7:
                at, fmt = fields[int(rng.integers(len(fields)))]
            else:
                fmt = ("<" if rng.random() < 0.8 else ">") + ("Q" if kind == 0 else "I")
                at = int(rng.integers(0, max(1, min(span, len(data)) - 8))) & (-4 if rng.random() < 0.8 else -1)
            pick = int(rng.integers(len(INTERESTING)))
            value = INTERESTING[pick] if rng.random() < 0.8 else int(rng.integers(1 << 62))
            width = struct.calcsize(fmt)
            value &= (1 << (8 * width)) - 1
            if fmt[1] == "q" and value >= 1 << 63:  # signed: the flattened records
                value -= 1 << 64
            if at + width <= len(data):
                struct.pack_into(fmt, data, at, value)
        elif kind == 3:
            for at in rng.integers(0, min(span, len(data)), size=int(rng.integers(1, 7))):
                data[at] = int(rng.integers(256))
        elif len(data) > 1:
            del data[int(rng.integers(1, len(data))) :]
    return bytes(data)


def fuzz(workdir: str, seed: int, per_image: int) -> dict[str, Any]:
    """Mutate every base image ``per_image`` times; failures are outcomes other than ok/MemvirtError."""
    rng = np.random.default_rng(seed)
    bases = base_images()
    failures: list[dict[str, Any]] = []
    counts: dict[str, int] = {}

    def alarm(*_: object) -> None:
        raise _Slow

    signal.signal(signal.SIGALRM, alarm)
    path = os.path.join(workdir, "case")
    rss0 = _maxrss()
    for name, (image, span, fields) in bases.items():
        for i in range(per_image):
            mutated = _mutate(rng, image, span, fields)
            with open(path, "wb") as f:
                f.write(mutated)
            signal.setitimer(signal.ITIMER_REAL, 5)
            try:
                result = probe(path)
            except _Slow:
                result = {"outcome": "crash", "message": "over 5 s"}
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            counts[result["outcome"]] = counts.get(result["outcome"], 0) + 1
            impossible = result.get("max_pfn", 0) > MAX_PFN or result.get("regions", 0) > MAX_REGIONS
            if result["outcome"] == "crash" or impossible or "\n" in result.get("message", ""):
                failures.append({"image": name, "case": i, **result})
    return {"counts": counts, "failures": failures[:20], "rss_growth": (_maxrss() - rss0)}


def _child_main() -> None:
    """Entry point of the child: ``probe`` or ``fuzz`` with JSON arguments, result as JSON on stdout."""
    what, args = sys.argv[1], json.loads(sys.argv[2])
    result = probe(*args) if what == "probe" else fuzz(*args)
    sys.stdout.write(json.dumps(result) + "\n")


# ---------------------------------------------------------------- the parent side


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (AS_CEILING, AS_CEILING))
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_SECONDS, CPU_SECONDS))


def in_child(what: str, *args: object) -> dict[str, Any]:
    """Run ``probe``/``fuzz`` of this module in a fresh interpreter under the ceilings."""
    paths = [str(HERE), str(HERE.parent)]
    code = f"import sys; sys.path[:0] = {paths!r}; import {Path(__file__).stem} as t; t._child_main()"
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, what, json.dumps(args)],
            capture_output=True, text=True, timeout=WALL_SECONDS, preexec_fn=_limits, env=env,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what}{args} ran past {WALL_SECONDS} s")
    assert proc.returncode == 0 and proc.stdout, (proc.returncode, proc.stdout, proc.stderr[-3000:])
    return json.loads(proc.stdout.splitlines()[-1])


KDUMP_FIELDS = [(8, "<I"), (424, "<I"), (428, "<I"), (432, "<I"), (KD_BITMAP_BLOCKS, "<I"), (KD_MAX_MAPNR, "<I"),
                (KD_SUB_VMCI_OFFSET, "<Q"), (KD_SUB_VMCI_SIZE, "<Q"), (KD_SUB_MAX_MAPNR_64, "<Q")]  # fmt: skip
ELF_FIELDS = [(32, "<Q"), (40, "<Q"), (54, "<H"), (56, "<H"), (58, "<H"), (60, "<H")]


def base_images() -> dict[str, tuple[bytes, int, list[tuple[int, str]]]]:
    """Small valid images of every format, how many leading bytes hold their headers, and where
    their size-like fields are (offset, struct format)."""
    rng = np.random.default_rng(1)
    text = (b"hostile " * 600)[:PAGE_SIZE]
    pages = {0: (1, zlib.compress(text)), 2: (0, rng.bytes(PAGE_SIZE)), 3: (0x20, zstandard.compress(text[::-1]))}
    kdump = kdump_image(pages, exists={0, 1, 2, 3, 8}, max_mapnr=9, vmcoreinfo=VMCOREINFO)
    desc_at = 4 * PAGE_SIZE
    kfields = KDUMP_FIELDS + [
        (desc_at + 24 * i + d, f) for i in range(3) for d, f in ((0, "<Q"), (8, "<I"), (12, "<I"))
    ]
    pieces = [(0, 300), (300, 5 * PAGE_SIZE), (5 * PAGE_SIZE, len(kdump))]
    flat = flatten(kdump, pieces)
    starts = np.cumsum([PAGE_SIZE] + [16 + b - a for a, b in pieces])  # where each record header is

    def in_flat(at: int) -> int:
        k = next(i for i, (a, b) in enumerate(pieces) if a <= at < b)
        return int(starts[k]) + 16 + at - pieces[k][0]

    ffields = [(int(p) + d, ">q") for p in starts for d in (0, 8)] + [(in_flat(a), f) for a, f in kfields]
    notes = elf_note(b"CORE", bytes(336), 1) + elf_note(b"VMCOREINFO", VMCOREINFO)
    loads = [(0, 0, 2 * PAGE_SIZE), (0x100000, 0, PAGE_SIZE), (0x1000, PAGE_SIZE, PAGE_SIZE)]
    blob = rng.bytes(2 * PAGE_SIZE)
    efields = ELF_FIELDS + [
        (64 + 56 * i + d, f) for i in range(4) for d, f in ((0, "<I"), (8, "<Q"), (24, "<Q"), (32, "<Q"))
    ]
    shoff = 64 + 56 * 4
    xfields = efields + [(shoff + 32, "<Q"), (shoff + 44, "<I")]
    return {
        "kdump": (kdump, 5 * PAGE_SIZE + 200, kfields),
        "flat": (flat, PAGE_SIZE + 400, ffields),
        "elf": (elf_core(loads, blob, notes), 600, efields),
        "elf-xnum": (elf_core(loads, blob, notes, xnum=True), 700, xfields),
        "raw": (rng.bytes(4 * PAGE_SIZE), 16, []),
    }


def _kdump() -> bytearray:
    return bytearray(base_images()["kdump"][0])


def _flat_with_far_record(plain: bytes, far: int) -> bytes:
    """``plain`` flattened, plus one byte placed at logical offset ``far``: a huge, nearly empty logical file."""
    return flatten(plain, [(0, len(plain))])[:-16] + struct.pack(">qq", far, 1) + b"\0" + struct.pack(">qq", -1, -1)


def _set(data: bytearray, fmt: str, at: int, value: int) -> bytearray:
    struct.pack_into(fmt, data, at, value)
    return data


def kdump_huge_bitmap_flattened() -> bytes:
    """2 GiB bitmaps and 2^36 pfns claimed; the records hold 12 KiB and one far byte."""
    d = _set(_set(_kdump(), "<I", KD_BITMAP_BLOCKS, 1 << 20), "<Q", KD_SUB_MAX_MAPNR_64, 1 << 36)
    return _flat_with_far_record(bytes(d), 1 << 40)


def kdump_12k_costs_49m() -> bytes:
    """The issue's case: 6 MiB bitmaps claimed by a ~12 KiB flattened file."""
    d = _set(_set(_kdump(), "<I", KD_BITMAP_BLOCKS, 3000), "<Q", KD_SUB_MAX_MAPNR_64, 1 << 26)
    return _flat_with_far_record(bytes(d), 1 << 34)


def kdump_huge_max_mapnr() -> bytes:
    return bytes(_set(_kdump(), "<Q", KD_SUB_MAX_MAPNR_64, 1 << 60))


def kdump_huge_vmcoreinfo() -> bytes:
    return _flat_with_far_record(bytes(_set(_kdump(), "<Q", KD_SUB_VMCI_SIZE, 1 << 33)), 1 << 40)


def kdump_huge_bitmap_blocks_plain() -> bytes:
    return bytes(_set(_kdump(), "<I", KD_BITMAP_BLOCKS, 0x7FFFFFFF))


def kdump_four_million_runs() -> bytes:
    """A 1 MiB 1st bitmap of alternating bits: 4 Mi one-page RAM ranges."""
    d = _kdump()[: 2 * PAGE_SIZE]
    _set(_set(_set(d, "<I", KD_BITMAP_BLOCKS, 512), "<I", KD_MAX_MAPNR, 8 << 20), "<Q", KD_SUB_MAX_MAPNR_64, 8 << 20)
    return bytes(d) + b"\x55" * (1 << 20) + bytes(1 << 20)


def kdump_record_wraps() -> bytes:
    plain = bytes(_kdump())
    return flatten(plain, [(0, len(plain))])[:-16] + struct.pack(">qq", (1 << 63) - 8, 16) + bytes(16) + b"\xff" * 16


def kdump_truncated_flattened() -> bytes:
    plain = bytes(_kdump())
    return flatten(plain, [(0, len(plain))])[: 4096 + 16 + 3 * PAGE_SIZE]


def elf_base(**kw: Any) -> bytearray:
    return bytearray(elf_core([(0, 0, 2 * PAGE_SIZE)], bytes(2 * PAGE_SIZE), **kw))


def elf_xnum_huge() -> bytes:
    """PN_XNUM with 2^32 - 1 program headers claimed in section 0."""
    d = elf_base(xnum=True)
    shoff = struct.unpack_from("<Q", d, 40)[0]
    return bytes(_set(d, "<I", shoff + 44, 0xFFFFFFFF))


def elf_paddr_huge() -> bytes:
    return bytes(_set(elf_base(), "<Q", 64 + 56 + 24, 1 << 63))


def elf_paddr_wraps() -> bytes:
    d = _set(elf_base(), "<Q", 64 + 56 + 24, (1 << 64) - PAGE_SIZE)
    return bytes(d)


def _phdrs(n: int) -> np.ndarray:
    return np.zeros(n, dtype=[("type", "<u4"), ("flags", "<u4"), ("offset", "<u8"), ("vaddr", "<u8"),
                              ("paddr", "<u8"), ("filesz", "<u8"), ("memsz", "<u8"), ("align", "<u8")])  # fmt: skip


def _elf_with(phdrs: np.ndarray, tail: bytes) -> bytes:
    ehdr = bytearray(elf_base()[:64])
    struct.pack_into("<QQ", ehdr, 32, 64, 0)  # phoff, shoff
    struct.pack_into("<H", ehdr, 56, 0xFFFF if len(phdrs) >= 0xFFFF else len(phdrs))
    if len(phdrs) >= 0xFFFF:
        shoff = 64 + phdrs.nbytes
        struct.pack_into("<QHH", ehdr, 40, shoff, 0, 0)
        struct.pack_into("<HHH", ehdr, 58, 64, 1, 0)
        shdr = struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, len(phdrs), 0, 0)
        return bytes(ehdr) + phdrs.tobytes() + shdr + tail
    return bytes(ehdr) + phdrs.tobytes() + tail


def elf_million_loads() -> bytes:
    """1 Mi PT_LOADs, one page each, every other page of guest memory, all sharing one page of data."""
    n = 1 << 20
    p = _phdrs(n)
    p["type"], p["filesz"], p["memsz"] = 1, PAGE_SIZE, PAGE_SIZE
    p["paddr"] = np.arange(n, dtype=np.uint64) * 2 * PAGE_SIZE
    p["offset"] = 64 + p.nbytes + 64
    return _elf_with(p, bytes(PAGE_SIZE))


def elf_note_bomb() -> bytes:
    """2000 PT_NOTE segments each pointing at the same 16 MiB of empty notes (no VMCOREINFO)."""
    notes = 16 << 20
    p = _phdrs(2001)
    p["type"][:-1], p["filesz"][:-1] = 4, notes
    p["type"][-1], p["filesz"][-1], p["memsz"][-1] = 1, PAGE_SIZE, PAGE_SIZE
    p["offset"] = 64 + p.nbytes
    return _elf_with(p, bytes(notes))


def kdump_overlapping_records() -> bytes:
    """A flattened kdump with a million records rewriting one byte, and 16384 dumped pages whose
    data lie 128 KiB apart in logical space no record covers (they read as zeros): reading its RAM
    takes one read per page, so a read must not cost a pass over all the records."""
    n = 16384
    d = bytearray(kdump_image({}, exists=set(range(n)), max_mapnr=n))
    d[3 * PAGE_SIZE : 3 * PAGE_SIZE + n // 8] = b"\xff" * (n // 8)  # the 2nd bitmap: all dumped
    far = 1 << 40
    desc = np.zeros(n, dtype=[("offset", "<u8"), ("size", "<u4"), ("flags", "<u4"), ("pflags", "<u8")])
    desc["offset"], desc["size"] = far + np.arange(n, dtype=np.uint64) * (128 << 10), PAGE_SIZE
    plain = bytes(d) + desc.tobytes()
    rec = np.zeros(1 << 20, dtype=[("off", ">i8"), ("n", ">i8"), ("byte", "u1")])
    rec["off"], rec["n"] = 2048, 1
    tail = struct.pack(">qq", far + (4 << 30), 1) + b"\0" + struct.pack(">qq", -1, -1)
    return flatten(plain, [(0, len(plain))])[:-16] + rec.tobytes() + tail


def raw_not_pages() -> bytes:
    return bytes(PAGE_SIZE + 1)


@pytest.fixture(scope="module")
def shm_dir() -> Iterator[Path]:
    """A private tmpfs folder for sparse files larger than ext4 allows; removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="memvirt-unit-", dir="/dev/shm"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


HOSTILE: dict[str, tuple[Callable[[], bytes], str]] = {
    "kdump-huge-bitmap-flattened": (kdump_huge_bitmap_flattened, "page bitmap is incomplete"),
    "kdump-12k-costs-49m": (kdump_12k_costs_49m, "page bitmap is incomplete"),
    "kdump-huge-max-mapnr": (kdump_huge_max_mapnr, "52-bit physical address space"),
    "kdump-huge-vmcoreinfo": (kdump_huge_vmcoreinfo, "VMCOREINFO note claims"),
    "kdump-huge-bitmap-blocks-plain": (kdump_huge_bitmap_blocks_plain, "truncated: the page bitmaps"),
    "kdump-four-million-runs": (kdump_four_million_runs, "runs of pages"),
    "kdump-record-wraps": (kdump_record_wraps, "corrupt flattened record"),
    "kdump-truncated-flattened": (kdump_truncated_flattened, "truncated"),
    "elf-xnum-huge": (elf_xnum_huge, "program headers"),
    "elf-paddr-huge": (elf_paddr_huge, "52-bit physical address space"),
    "elf-paddr-wraps": (elf_paddr_wraps, "52-bit physical address space"),
    "elf-million-loads": (elf_million_loads, "separate RAM ranges"),
    "raw-not-pages": (raw_not_pages, "whole number of 4 KiB pages"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_dump_is_one_bad_image_line_with_bounded_memory(case: str, tmp_path: Path) -> None:
    build, needle = HOSTILE[case]
    path = tmp_path / f"{case}.dump"
    data = build()
    path.write_bytes(data)
    got = in_child("probe", str(path))
    assert got["outcome"] == "BadImage", got
    assert needle in got["message"] and str(path) in got["message"] and "\n" not in got["message"], got
    assert got["rss_growth"] < RSS_BUDGET + 2 * len(data), got
    assert got["cpu_seconds"] < 10, got


def test_empty_note_segments_cost_bounded_time(tmp_path: Path) -> None:
    """Thousands of PT_NOTEs over the same 16 MiB: the search for VMCOREINFO reads 16 MiB in all."""
    path = tmp_path / "notes.elf"
    path.write_bytes(elf_note_bomb())
    got = in_child("probe", str(path))
    assert got["outcome"] == "ok" and got["cpu_seconds"] < 10, got


def test_overlapping_flattened_records_cost_bounded_time(tmp_path: Path) -> None:
    path = tmp_path / "overlaps.kdump"
    path.write_bytes(kdump_overlapping_records())
    got = in_child("probe", str(path), "auto", True)
    assert got["outcome"] == "ok" and got["cpu_seconds"] < 10, got


def test_flattened_records_read_like_a_replay(tmp_path: Path) -> None:
    """Overlapping records, indexed once as disjoint pieces, read exactly as replaying them in file
    order does (later bytes win, gaps are zeros)."""
    from memvirt.memory.kdump import _FlattenedFile

    rng = np.random.default_rng(5)
    for case in range(200):
        n = int(rng.integers(0, 40))
        logical = bytearray(3000)
        held = np.zeros(3000, dtype=bool)
        parts = [b"makedumpfile".ljust(16, b"\0") + struct.pack(">qq", 1, 1)]
        parts[0] = parts[0].ljust(PAGE_SIZE, b"\0")
        for _ in range(n):
            at, size = int(rng.integers(0, 2500)), int(rng.integers(0, 400))
            data = rng.bytes(size)
            parts.append(struct.pack(">qq", at, size) + data)
            logical[at : at + size] = data
            held[at : at + size] = True
        parts.append(struct.pack(">qq", -1, -1))
        path = tmp_path / f"records-{case}"
        path.write_bytes(b"".join(parts))
        fd = os.open(path, os.O_RDONLY)
        try:
            flat = _FlattenedFile(fd, path.stat().st_size, str(path))
            end = int(np.flatnonzero(held)[-1]) + 1 if held.any() else 0
            assert flat.size == end
            got = bytearray(end)
            flat.read(0, memoryview(got))
            assert got == logical[:end], case
            a, b = sorted(int(x) for x in rng.integers(0, 3000, 2))
            assert flat.covered(a, b) == int(held[a:b].sum()), case
        finally:
            os.close(fd)


def test_raw_image_above_the_physical_address_space(shm_dir: Path) -> None:
    path = shm_dir / "huge.raw"
    with path.open("wb") as f:
        f.truncate(1 << 53)  # sparse: costs nothing on tmpfs
    got = in_child("probe", str(path), "raw")
    assert got["outcome"] == "BadImage" and "52-bit" in got["message"], got
    path.unlink()


def test_valid_images_still_open(tmp_path: Path) -> None:
    """The fuzz bases themselves read back: the bounds do not reject what QEMU-like writers produce."""
    from memvirt.memory.open import open_memory

    for name, (image, _, _) in base_images().items():
        path = tmp_path / name
        path.write_bytes(image)
        with open_memory(str(path)) as mem:
            assert mem.ram_size > 0, name
            _exercise(mem)


def test_fuzzed_dumps_only_succeed_or_fail_cleanly(tmp_path: Path) -> None:
    """3000 seeded mutations of small ELF/kdump/raw images: success (with a RAM map a machine can
    have) or one MemvirtError line, each under the memory ceiling and 5 s."""
    got = in_child("fuzz", str(tmp_path), 20261202, 600)
    assert not got["failures"], got["failures"]
    assert got["rss_growth"] < 2 * RSS_BUDGET, got
    total = sum(got["counts"].values())
    assert total == 3000 and got["counts"].get("ok", 0) > 300 and got["counts"].get("BadImage", 0) > 300, got
