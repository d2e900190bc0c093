"""RAM maps of RAM files and raw images nobody described (issue 19), without QEMU.

QEMU 7.2's split rules at their edges, its memory tree parsed, and the choice among candidate
maps made by a synthetic guest kernel (the bootstrap tests' image, whose node is told to end
where each case needs) inside sparse files of the sizes where the maps differ.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli import assert_one_line_error, memvirt
from test_introspect_bootstrap import NOTE_PA, PHYS_BASE, build_synthetic, note, vmcoreinfo_text

from memvirt.errors import BadImage, UsageError
from memvirt.memory.rammap import (
    ram_map,
    ramfile_candidates,
    raw_candidates,
    regions_from_mtree,
)
from memvirt.memory.source import Region
from memvirt.targets import open_memory

MiB = 1 << 20
GiB = 1 << 30
PGDAT_PA = 0xA02000  # where the synthetic image's node_data[0] points
START_OFF, SPAN_OFF = 0x300, 0x308


def _spans(ram_map_: tuple[Region, ...]) -> list[tuple[int, int]]:
    return [(r.gpa, r.size) for r in ram_map_]


@pytest.mark.parametrize(
    ("machine", "ram", "want"),
    [
        ("pc", 0xE0000000 - MiB, [(0, 0xE0000000 - MiB)]),
        ("pc", 0xE0000000, [(0, 3 * GiB), (4 * GiB, 512 * MiB)]),
        ("pc", 4 * GiB, [(0, 3 * GiB), (4 * GiB, GiB)]),
        ("q35", 0xB0000000 - MiB, [(0, 0xB0000000 - MiB)]),
        ("q35", 0xB0000000, [(0, 2 * GiB), (4 * GiB, 0x30000000)]),
        ("q35", 3 * GiB, [(0, 2 * GiB), (4 * GiB, GiB)]),
        ("pc-i440fx-7.2", 2 * GiB, [(0, 2 * GiB)]),
        ("pc-q35-7.2", 3 * GiB, [(0, 2 * GiB), (4 * GiB, GiB)]),
    ],
)
def test_qemu_split_rules(machine: str, ram: int, want: list[tuple[int, int]]) -> None:
    got = ram_map(machine, ram)
    assert _spans(got) == want
    assert [r.offset for r in got] == [0, want[0][1]][: len(want)]  # back to back in the backend


def test_max_ram_below_4g_lowers_the_split() -> None:
    assert _spans(ram_map("pc", 4 * GiB, 2 * GiB)) == [(0, 2 * GiB), (4 * GiB, 2 * GiB)]
    assert _spans(ram_map("q35", 2 * GiB, GiB)) == [(0, GiB), (4 * GiB, GiB)]


def test_candidates_only_where_maps_differ() -> None:
    assert [c.name for c in ramfile_candidates(2 * GiB)] == ["flat=pc/q35"]
    assert [c.name for c in ramfile_candidates(3 * GiB)] == ["flat=pc", "q35"]
    assert [c.name for c in ramfile_candidates(4 * GiB)] == ["flat", "pc", "q35"]
    assert [c.name for c in ramfile_candidates(4 * GiB, "q35")] == ["q35"]
    assert [c.name for c in raw_candidates(5 * GiB)] == ["flat", "pc", "q35"]
    assert all(r.gpa == r.offset for c in raw_candidates(5 * GiB) for r in c.regions)
    assert [c.name for c in raw_candidates(4 * GiB + 256 * MiB)] == ["flat"]  # too little for a split


MTREE = """address-space: memory
  0000000000000000-ffffffffffffffff (prio 0, i/o): system
    0000000000000000-000000007fffffff (prio 0, ram): alias ram-below-4g @ram0 0000000000000000-000000007fffffff
    0000000100000000-000000013fffffff (prio 0, ram): alias ram-above-4g @ram0 0000000080000000-00000000bfffffff
    00000000000a0000-00000000000bffff (prio 1, i/o): alias smram-region @pci 00000000000a0000-00000000000bffff

address-space: cpu-memory-0
  0000000000000000-ffffffffffffffff (prio 0, i/o): system
    0000000000000000-000000007fffffff (prio 0, ram): alias ram-below-4g @ram0 0000000000000000-000000007fffffff
    0000000100000000-000000013fffffff (prio 0, ram): alias ram-above-4g @ram0 0000000080000000-00000000bfffffff
"""


def test_mtree_gives_the_map() -> None:
    assert regions_from_mtree(MTREE) == (Region(0, 2 * GiB, 0), Region(4 * GiB, GiB, 2 * GiB))
    assert regions_from_mtree("address-space: memory\n") == ()


def _guest_file(path: Path, size: int, node_end: int) -> Path:
    """A sparse file of ``size`` bytes: the synthetic kernel at offset 0, its node ending at
    guest-physical ``node_end``."""
    s = build_synthetic()
    lines = vmcoreinfo_text(s.sym, PHYS_BASE).decode().splitlines()
    lines += [f"OFFSET(pglist_data.node_start_pfn)={START_OFF}", f"OFFSET(pglist_data.node_spanned_pages)={SPAN_OFF}"]
    data = note(("\n".join(lines) + "\n").encode())
    s.put(NOTE_PA, data + bytes(4096 - len(data)))
    s.put(PGDAT_PA + START_OFF, struct.pack("<QQ", 0, node_end >> 12))
    with path.open("wb") as f:
        f.write(bytes(s.mem))
        f.truncate(size)
    return path


@pytest.mark.parametrize(
    ("size", "node_end", "want"),
    [
        (3 * GiB, 3 * GiB - 128 * 1024, [(0, 3 * GiB)]),  # pc below its split (SeaBIOS keeps the top 128 KiB)
        (3 * GiB, 5 * GiB, [(0, 2 * GiB), (4 * GiB, GiB)]),  # q35 above its split
        (4 * GiB, 5 * GiB, [(0, 3 * GiB), (4 * GiB, GiB)]),  # pc above its split
        (4 * GiB, 6 * GiB, [(0, 2 * GiB), (4 * GiB, 2 * GiB)]),  # q35
        (4 * GiB, 4 * GiB, [(0, 4 * GiB)]),  # neither: RAM up to 4 GiB (some other machine)
    ],
)
def test_the_kernel_picks_the_map(tmp_path: Path, size: int, node_end: int, want: list[tuple[int, int]]) -> None:
    path = _guest_file(tmp_path / "x.ram", size, node_end)
    with open_memory(str(path)) as mem:
        assert _spans(mem.regions) == want
        assert mem.layout and "checked against the guest kernel" in mem.layout


def test_forced_machine_must_agree(tmp_path: Path) -> None:
    path = _guest_file(tmp_path / "x.ram", 3 * GiB, 5 * GiB)
    with open_memory(str(path), machine="q35") as mem:
        assert _spans(mem.regions) == [(0, 2 * GiB), (4 * GiB, GiB)]
    with pytest.raises(BadImage, match=r"no RAM map fits.*pc.*--machine"):
        open_memory(str(path), machine="pc")
    with pytest.raises(UsageError, match="--machine must be one of pc, q35"):
        open_memory(str(path), machine="virt")


def test_nothing_fits_is_one_line(tmp_path: Path) -> None:
    path = _guest_file(tmp_path / "x.ram", 3 * GiB, 7 * GiB)
    proc = memvirt("mem", "info", str(path))
    assert_one_line_error(proc, 2, "no RAM map fits", "flat", "q35", "--machine pc|q35", "--ram-size", "--qmp")


def test_raw_image_ambiguity_names_the_flags(tmp_path: Path) -> None:
    """A raw image keeps the hole in the file: every candidate ends at the file's end, and the
    synthetic kernel has no e820 table to tell them apart."""
    path = _guest_file(tmp_path / "x.raw", 5 * GiB, 5 * GiB)
    with pytest.raises(BadImage, match=r"more than one RAM map.*--machine"):
        open_memory(str(path))
    with open_memory(str(path), machine="pc") as mem:
        assert _spans(mem.regions) == [(0, 3 * GiB), (4 * GiB, GiB)] and mem.kind == "raw image"


def test_small_files_need_no_kernel(tmp_path: Path) -> None:
    """Below every split there is one map: random bytes open as before."""
    path = tmp_path / "blob.raw"
    path.write_bytes(bytes(range(256)) * 64)
    with open_memory(str(path)) as mem:
        assert _spans(mem.regions) == [(0, 16384)]


@pytest.mark.parametrize(
    ("args", "want"),
    [
        (["-m", "3G"], [(0, 3 * GiB)]),  # no -machine: QEMU's x86 default, pc
        (["-machine", "q35,accel=tcg", "-m", "3072"], [(0, 2 * GiB), (4 * GiB, GiB)]),
        (["-M", "pc-q35-7.2", "-machine", "max-ram-below-4g=1G", "-m", "size=2G"], [(0, GiB), (4 * GiB, GiB)]),
        (["-machine", "type=pc-i440fx-7.2", "-m", "4G"], [(0, 3 * GiB), (4 * GiB, GiB)]),
    ],
)
def test_a_process_map_comes_from_its_command_line(args: list[str], want: list[tuple[int, int]]) -> None:
    """``pid:N`` takes QEMU's machine and RAM size from /proc/PID/cmdline (a stand-in process
    carrying QEMU's options here)."""
    from memvirt.memory.procmem import guess_ram_size, qemu_ram_layout

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *args])
    try:
        while b"time.sleep" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes():
            time.sleep(0.01)  # until the child has exec'd
        assert _spans(qemu_ram_layout(proc.pid, guess_ram_size(proc.pid)).regions) == want
    finally:
        proc.kill()
        proc.wait()
