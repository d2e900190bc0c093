"""Data symbols of kernels whose kallsyms holds code only, from their export table and read-only data.

kallsyms lists data symbols (``node_data``, ``__per_cpu_offset``, ``__start_BTF``) only with
CONFIG_KALLSYMS_ALL. Debian's amd64 kernels have it; Debian's arm64 kernels do not (6.1:
``# CONFIG_KALLSYMS_ALL is not set``, 50k text symbols instead of ~200k), and their VMCOREINFO
names few data symbols (arm64 exports no ``node_data``, which x86's
``arch_crash_save_vmcoreinfo`` adds). Two facts the kernel keeps in memory for itself fill in:

- **The export table.** What modules may link against (``EXPORT_SYMBOL``: ``node_data`` in
  drivers/base/arch_numa.c, ``__per_cpu_offset`` in mm/percpu.c, ``nr_cpu_ids`` in kernel/smp.c,
  ``__cpu_online_mask`` in kernel/cpu.c, ``contig_page_data`` in mm/memblock.c) is in
  ``__ksymtab``/``__ksymtab_gpl``: with CONFIG_HAVE_ARCH_PREL32_RELOCATIONS (arm64, x86-64;
  commit 7290d5809571, v4.19) an entry is ``{int value_offset; int name_offset; ...}``, each
  place-relative (``offset_to_ptr()``: the field's own address plus its value), the name a
  NUL-terminated string in ``__ksymtab_strings``. So: find ``\\0NAME\\0``, find the one 32-bit
  word that points at it from where it stands, and the word before it points at the symbol.
  Entries since v5.4 also carry a namespace offset after the name; that field is never read.
- **BTF** (``.BTF``) starts with its header (magic 0xeb9f, version 1, ``hdr_len`` 24); the
  first header in the image's read-only data that parses and fits there is the kernel's (module
  BTF lives in module memory, never inside the image).

Both live in the image's read-only data, between ``_etext`` and ``__init_begin`` on arm64
(arch/arm64/kernel/vmlinux.lds.S: ``RO_DATA`` follows the text, then init), both code-range
symbols kallsyms keeps; only that range is searched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from memvirt.errors import BadImage
from memvirt.introspect.kallsyms import Symbols

ReadVA = Callable[[int, int], np.ndarray]
DATA_SYMBOLS = ("node_data", "contig_page_data", "__per_cpu_offset", "nr_cpu_ids", "__cpu_online_mask")
"""The data symbols the census needs (:mod:`memvirt.introspect.mmzone`); each is exported."""
MAX_RODATA = 64 << 20
"""Read-only data bigger than this (Debian arm64 6.1: 9.6 MiB) is not searched."""
BTF_HEADER = b"\x9f\xeb\x01\x00\x18\x00\x00\x00"
"""magic 0xeb9f, version 1, flags 0, hdr_len 24 (include/uapi/linux/btf.h ``struct btf_header``)."""


def rodata_range(symbols: Callable[[str], int | None]) -> tuple[int, int] | None:
    """``[_etext, __init_begin)`` when both are known and the span is plausible, else None."""
    lo, hi = symbols("_etext"), symbols("__init_begin")
    if lo is None or hi is None or not 0 < hi - lo <= MAX_RODATA:
        return None
    return lo, hi


def exported(data: np.ndarray, base_va: int, names: Iterable[str]) -> dict[str, int]:
    """Addresses of the exported ``names`` found in ``data`` (bytes at ``base_va``), by their
    place-relative ``__ksymtab`` entries; a name with no entry, or with entries that disagree,
    is left out."""
    raw = data.tobytes()
    skip = (-base_va) % 4
    words = np.frombuffer(raw[skip : skip + (len(raw) - skip) // 4 * 4], dtype="<i4").astype(np.int64)
    # Place-relative targets of every word, relative to the first word (kernel addresses do not
    # fit an int64; their distances do).
    origin = base_va + skip
    targets = 4 * np.arange(len(words), dtype=np.int64) + words
    out: dict[str, int] = {}
    for name in names:
        needle = b"\0" + name.encode() + b"\0"
        hits, at = [], raw.find(needle)
        while at >= 0:
            hits.append(base_va + at + 1 - origin)
            at = raw.find(needle, at + 1)
        if not hits:
            continue
        found = np.flatnonzero(np.isin(targets, np.array(hits, dtype=np.int64)))
        values = {(origin + 4 * (i - 1) + int(words[i - 1])) % (1 << 64) for i in found.tolist() if i > 0}
        if len(values) == 1:
            out[name] = values.pop()
    return out


def find_btf(data: np.ndarray, base_va: int) -> list[int]:
    """Addresses in ``data`` (bytes at ``base_va``) where a BTF header starts, in order."""
    raw = data.tobytes()
    out, at = [], raw.find(BTF_HEADER)
    while at >= 0:
        out.append(base_va + at)
        at = raw.find(BTF_HEADER, at + 1)
    return out


class MergedSymbols:
    """kallsyms plus data symbols found elsewhere (the :class:`~memvirt.introspect.kallsyms.Symbols`
    protocol); kallsyms wins where both have a name."""

    def __init__(self, kallsyms: Symbols, extra: dict[str, int]):
        self._k = kallsyms
        self.extra = extra

    def get(self, name: str, default: int | None = None) -> int | None:
        got = self._k.get(name)
        return got if got is not None else self.extra.get(name, default)

    def __contains__(self, name: object) -> bool:
        return name in self._k or name in self.extra

    def __getitem__(self, name: str) -> int:
        got = self.get(name)
        if got is None:
            raise KeyError(name)
        return got

    def __len__(self) -> int:
        return len(self._k) + len(self.extra)


def check_found(extra: dict[str, int], in_image: Callable[[int], bool]) -> None:
    """Exported data symbols are image addresses: a hit elsewhere is a forged table."""
    bad = [n for n, va in extra.items() if not in_image(va)]
    if bad:
        raise BadImage(f"__ksymtab puts {bad[0]} at {extra[bad[0]]:#x}, outside the kernel image")
