"""Synthetic dump files built byte by byte: small ELF cores and kdump-compressed dumps.

Shared by the QEMU-backed format tests and the hostile-input unit tests, so both build the
layout the readers expect the same way.
"""

from __future__ import annotations

import struct

PAGE_SIZE = 4096


def flatten(plain: bytes, pieces: list[tuple[int, int]]) -> bytes:
    """A flattened kdump that writes ``plain[a:b]`` for each ``(a, b)`` in ``pieces``, in that order."""
    head = b"makedumpfile".ljust(16, b"\0") + struct.pack(">qq", 1, 1)
    out = [head.ljust(4096, b"\0")]
    for a, b in pieces:
        out.append(struct.pack(">qq", a, b - a) + plain[a:b])
    out.append(struct.pack(">qq", -1, -1))
    return b"".join(out)


def elf_core(loads: list[tuple[int, int, int]], blob: bytes, notes: bytes = b"", xnum: bool = False) -> bytes:
    """A minimal x86-64 ELF core: PT_NOTE plus ``(paddr, offset_in_blob, filesz)`` PT_LOADs."""
    nph = 1 + len(loads)
    phoff = 64
    shoff = phoff + 56 * nph if xnum else 0
    notes_at = phoff + 56 * nph + (64 if xnum else 0)
    data_at = notes_at + len(notes)
    ehdr = struct.pack(
        "<16sHHIQQQIHHHHHH",
        b"\x7fELF\x02\x01\x01".ljust(16, b"\0"),
        4,
        62,
        1,
        0,
        phoff,
        shoff,
        0,
        64,
        56,
        0xFFFF if xnum else nph,
        64 if xnum else 0,
        1 if xnum else 0,
        0,
    )
    phdrs = struct.pack("<IIQQQQQQ", 4, 0, notes_at, 0, 0, len(notes), len(notes), 0)
    for paddr, off, size in loads:
        file_off = 2**64 - 1 if size == 0 else data_at + off
        phdrs += struct.pack("<IIQQQQQQ", 1, 0, file_off, paddr, paddr, size, size, 0)
    shdr = struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, nph, 0, 0) if xnum else b""
    return ehdr + phdrs + shdr + notes + blob


def elf_note(name: bytes, desc: bytes, kind: int = 0) -> bytes:
    pad = lambda b: b + bytes(-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(name) + 1, len(desc), kind) + pad(name + b"\0") + pad(desc)


VMCOREINFO = b"OSRELEASE=6.1.0\nPAGESIZE=4096\nNUMBER(phys_base)=0x1000000\n"


def kdump_image(
    pages: dict[int, tuple[int, bytes]], exists: set[int], max_mapnr: int, vmcoreinfo: bytes = b""
) -> bytes:
    """A plain (unflattened) header_version 6 kdump; ``pages`` maps pfn -> (flags, stored bytes)."""
    bs = PAGE_SIZE
    bitmap_len = bs
    sub_hdr = 1
    bitmap_blocks = 2
    vmci_at = bs + 104
    header = struct.pack(
        "<8sI390s22sIIIIIIIIII", b"KDUMP   ", 6, b"", b"", 0, bs, sub_hdr, bitmap_blocks, max_mapnr, 0, 0, 0, 0, 1
    )
    sub = struct.pack(
        "<QIIQQQQQQQQQQQ",
        0x1000000,
        1,
        0,
        0,
        0,
        vmci_at if vmcoreinfo else 0,
        len(vmcoreinfo),
        0,
        0,
        0,
        0,
        0,
        0,
        max_mapnr,
    )
    bm1, bm2 = bytearray(bitmap_len), bytearray(bitmap_len)
    for pfn in exists:
        bm1[pfn // 8] |= 1 << (pfn % 8)
    for pfn in pages:
        bm2[pfn // 8] |= 1 << (pfn % 8)
    desc_at = (1 + sub_hdr + bitmap_blocks) * bs
    data_at = desc_at + 24 * len(pages)
    descs, data = b"", b""
    for pfn in sorted(pages):
        flags, stored = pages[pfn]
        descs += struct.pack("<QIIQ", data_at + len(data), len(stored), flags, 0)
        data += stored
    out = header.ljust(bs, b"\0") + (sub + vmcoreinfo).ljust(bs * sub_hdr, b"\0") + bm1 + bm2
    return out + descs + data
