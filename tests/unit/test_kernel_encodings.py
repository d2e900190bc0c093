"""The 7.x encodings the bootstrap and census decide from the data, over synthetic tables:
place-relative kallsyms offsets (no ``kallsyms_relative_base``) beside the older base-relative
ones, and mask-form ``compound_head`` words beside head pointers."""

from __future__ import annotations

import numpy as np

from memvirt.introspect.census import compound_head_pfns
from memvirt.introspect.kallsyms import kallsyms_sym_addresses
from memvirt.introspect.vmcoreinfo import Vmcoreinfo

TEXT = 0xFFFFFFFF9A000000
OFFSETS = TEXT + 0x1A00000
ADDRS = [TEXT, TEXT + 0x10, TEXT + 0x2000, TEXT + 0x1A00010, TEXT + 0x3000000]


def _reader(blobs: dict[int, bytes]):
    def read_va(va: int, size: int) -> np.ndarray:
        for start, data in blobs.items():
            if start <= va and va + size <= start + len(data):
                return np.frombuffer(data, dtype=np.uint8)[va - start : va - start + size]
        raise AssertionError(f"unexpected read at {va:#x}")

    return read_va


def _info(*symbols: tuple[str, int]) -> Vmcoreinfo:
    text = "OSRELEASE=7.2.13\nPAGESIZE=4096\n" + "".join(f"SYMBOL({n})={v:x}\n" for n, v in symbols)
    return Vmcoreinfo.parse(text.encode())


def test_place_relative_offsets_without_relative_base() -> None:
    rel = [a - (OFFSETS + 4 * i) for i, a in enumerate(ADDRS)]
    blob = np.array(rel, dtype="<i4").tobytes()
    info = _info(("kallsyms_offsets", OFFSETS))
    got = kallsyms_sym_addresses(_reader({OFFSETS: blob}), info, len(ADDRS))
    assert got.tolist() == ADDRS


def test_base_relative_offsets_when_the_base_is_exported() -> None:
    base_va = OFFSETS + 0x100
    blob = np.array([a - TEXT for a in ADDRS], dtype="<u4").tobytes()
    info = _info(("kallsyms_offsets", OFFSETS), ("kallsyms_relative_base", base_va))
    read = _reader({OFFSETS: blob, base_va: TEXT.to_bytes(8, "little")})
    assert kallsyms_sym_addresses(read, info, len(ADDRS)).tolist() == ADDRS


def test_compound_head_pointer_and_mask_forms() -> None:
    vmemmap, sps = 0xFFFFF3F180000000, 64
    tails = np.array([4187, 4193, 4194, 4195, 513, 700], dtype=np.int64)
    words = np.array(
        [
            0xFFFFFFFFFFFFFF81,  # 7.x order 1: head 4186
            0xFFFFFFFFFFFFFF01,  # 7.x order 2: head 4192
            0xFFFFFFFFFFFFFF01,
            0xFFFFFFFFFFFFFF01,
            vmemmap + 512 * sps + 1,  # 6.x pointer to head 512
            vmemmap + 512 * sps + 1,
        ],
        dtype=np.uint64,
    )
    assert compound_head_pfns(words, tails, vmemmap, sps).tolist() == [4186, 4192, 4192, 4192, 512, 512]
