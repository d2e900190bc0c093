"""The kernel's own symbol table (kallsyms), decoded from guest memory.

VMCOREINFO locates the tables (``SYMBOL(kallsyms_names)`` etc., since v6.0, commit 5fd8fea935a1
"vmcoreinfo: include kallsyms symbols"; ``kallsyms_num_syms`` was left out of it and added back
by a follow-up fix, so an early 6.0 may lack it). Layout, as ``scripts/kallsyms.c`` writes it:

- ``kallsyms_names``: per symbol a length then that many token codes. Since commit 73bbb94466fd
  (v6.1, "kallsyms: support "big" kernel symbols") a length >= 0x80 takes two bytes (ULEB128);
  older kernels never emit such lengths, so one decoder serves both.
- ``kallsyms_token_table`` / ``kallsyms_token_index``: 256 NUL-terminated tokens; the first
  character of a symbol's expansion is its type letter (``T``, ``d``...).
- addresses: ``kallsyms_addresses`` (absolute, before v6.11 without
  CONFIG_KALLSYMS_BASE_RELATIVE), else 32-bit ``kallsyms_offsets`` from
  ``kallsyms_relative_base``. With CONFIG_KALLSYMS_ABSOLUTE_PERCPU (x86-64 SMP until commit
  01157ddc58dc, "kallsyms: Remove KALLSYMS_ABSOLUTE_PERCPU", v6.15)
  non-negative offsets are absolute (per-cpu symbols) and negative ones mean
  ``relative_base - 1 - offset``. Which rule applies is read from the data: a negative offset
  can only come from the absolute-percpu encoding, since the image is smaller than 2 GiB.
  Measured: Debian 6.1 and 6.12 both use offsets with absolute per-cpu symbols (``A`` type,
  e.g. ``__per_cpu_end`` = 0x35000 / 0x39000).
- Place-relative offsets: commit a081b5789255 ("kallsyms: Get rid of kallsyms relative base",
  Ard Biesheuvel, v7.0 merge window; in Debian sid's 7.2.13, measured) drops ``kallsyms_relative_base`` (from
  the tables and from VMCOREINFO) and emits each entry as ``.long _text - . + offset``: the
  address is the entry's own address plus its signed value (``offset_to_ptr()``). Which of the
  three encodings a guest uses is read from VMCOREINFO's keys, never from its version:
  ``kallsyms_addresses``, else ``kallsyms_relative_base``, else place-relative.

The whole table is expanded at once with numpy (one gather over all token codes), not per symbol.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np

from memvirt.errors import BadImage
from memvirt.introspect.vmcoreinfo import Vmcoreinfo

ReadVA = Callable[[int, int], np.ndarray]
# The VMCOREINFO symbols every kernel needs here; addresses come from kallsyms_offsets (plus
# kallsyms_relative_base before 7.x, or place-relative), or (no CONFIG_KALLSYMS_BASE_RELATIVE)
# from kallsyms_addresses.
KALLSYMS_TABLES = ("kallsyms_names", "kallsyms_num_syms", "kallsyms_token_table", "kallsyms_token_index")
_MAX_SYMS = 4_000_000
_MAX_NAMES_BYTES = 64 << 20
# KSYM_NAME_LEN is 512 (128 before v6.1): no expanded name is longer, and all of them together
# stay far below 64 MiB (6.12: ~200k symbols, ~6 MiB), whatever the token table says.
KSYM_NAME_LEN = 512
_MAX_EXPANDED = 64 << 20
_SEP = 256
_EMPTY = 257


class Symbols(Protocol):
    """What the bootstrap needs of a symbol table: :class:`Kallsyms`, or the build cache's stand-ins
    (``buildcache.RecordingSymbols`` records the lookups, ``CachedSymbols`` replays them)."""

    def get(self, name: str, default: int | None = None) -> int | None: ...

    def __contains__(self, name: object) -> bool: ...

    def __getitem__(self, name: str) -> int: ...

    def __len__(self) -> int: ...


class Kallsyms:
    """Core-kernel symbols in kallsyms order (sorted by address).

    ``names[i]`` has type letter ``types[i]`` and address ``addresses[i]``. Lookup by name
    returns the first symbol of that name, as ``kallsyms_lookup_name()`` does. The first few
    lookups scan the name list (C speed, ~1 ms); a dict is built only once lookups get many,
    since a bootstrap needs a handful and the dict costs tens of milliseconds.
    """

    _SCANS_BEFORE_INDEX = 16

    def __init__(self, names: list[str], types: str, addresses: np.ndarray):
        self.names = names
        self.types = types
        self.addresses = addresses
        self._index: dict[str, int] | None = None
        self._scans = 0

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"<Kallsyms: {len(self.names)} symbols>"

    def position(self, name: str) -> int | None:
        """Index of the first symbol called ``name``, or None."""
        if self._index is None:
            self._scans += 1
            if self._scans <= self._SCANS_BEFORE_INDEX:
                try:
                    return self.names.index(name)
                except ValueError:
                    return None
            n = len(self.names)
            self._index = dict(zip(reversed(self.names), range(n - 1, -1, -1), strict=True))
        return self._index.get(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.position(name) is not None

    def __getitem__(self, name: str) -> int:
        i = self.position(name)
        if i is None:
            raise KeyError(f"no kernel symbol {name!r} in kallsyms")
        return int(self.addresses[i])

    def get(self, name: str, default: int | None = None) -> int | None:
        i = self.position(name)
        return default if i is None else int(self.addresses[i])

    def type_of(self, name: str) -> str:
        i = self.position(name)
        if i is None:
            raise KeyError(f"no kernel symbol {name!r} in kallsyms")
        return self.types[i]

    def items(self) -> Iterator[tuple[str, int]]:
        """``(name, address)`` for every symbol, duplicates included."""
        return zip(self.names, self.addresses.tolist(), strict=True)

    def symbolize(self, address: int) -> tuple[str, int] | None:
        """``(name, offset)`` of the symbol at or below ``address``, like ``%pS``."""
        addrs = self.addresses
        i = int(np.searchsorted(addrs, np.uint64(address), side="right")) - 1
        if i < 0:
            return None
        first = int(np.searchsorted(addrs, addrs[i], side="left"))
        return self.names[first], address - int(addrs[i])


def read_kallsyms(read_va: ReadVA, info: Vmcoreinfo) -> Kallsyms:
    """Decode the kernel's kallsyms tables through ``read_va(va, size)``.

    Raises :class:`BadImage` naming the missing VMCOREINFO key, or the inconsistency found.
    """
    num = int(read_va(info.symbol("kallsyms_num_syms"), 4).view("<u4")[0])
    if not 0 < num <= _MAX_SYMS:
        raise BadImage(f"kallsyms_num_syms is {num}: not a kallsyms table")
    tokens = _token_table(read_va, info)
    names_va = info.symbol("kallsyms_names")
    blob = read_va(names_va, _names_extent(info, names_va, num))
    markers = _find_markers(read_va, info, len(blob), num)
    starts, end = kallsyms_name_starts(blob, num, markers)
    names, types = kallsyms_expand_symbols(blob[:end], starts, tokens)
    addresses = kallsyms_sym_addresses(read_va, info, num)
    if len(names) != num:
        raise BadImage("kallsyms_names does not decode to kallsyms_num_syms names: the tables are inconsistent")
    if np.any(addresses[1:] < addresses[:-1]):
        raise BadImage("kallsyms addresses are not sorted: the tables are inconsistent")
    return Kallsyms(names, types, addresses)


def _token_table(read_va: ReadVA, info: Vmcoreinfo) -> list[bytes]:
    index = read_va(info.symbol("kallsyms_token_index"), 512).view("<u2").astype(np.int64)
    span = int(index.max()) + 256
    table = read_va(info.symbol("kallsyms_token_table"), span).tobytes()
    tokens = []
    for start in index.tolist():
        end = table.find(b"\0", start)
        if end < 0:
            raise BadImage("kallsyms_token_table has an unterminated token")
        tokens.append(table[start:end])
    if not all(tokens):
        raise BadImage("kallsyms_token_table has an empty token: not a kallsyms table")
    return tokens


def _names_extent(info: Vmcoreinfo, names_va: int, num: int) -> int:
    """Bytes to read at ``kallsyms_names``: up to the next kallsyms table the linker placed
    after it, else a generous bound (2 length bytes + 127 codes per symbol)."""
    others = [
        info.symbol(n)
        for n in (
            "kallsyms_token_table",
            "kallsyms_token_index",
            "kallsyms_offsets",
            "kallsyms_relative_base",
            "kallsyms_addresses",
            "kallsyms_num_syms",
        )
        if info.has_symbol(n)
    ]
    above = [a - names_va for a in others if a > names_va]
    extent = min(above) if above else num * 129
    return min(extent, _MAX_NAMES_BYTES)


def _find_markers(read_va: ReadVA, info: Vmcoreinfo, names_size: int, num: int) -> np.ndarray | None:
    """``kallsyms_markers`` (u32 offset of every 256th name), which VMCOREINFO does not locate.

    ``scripts/kallsyms.c`` emits it right after the names and, since commit 60443c88f3a8
    (v6.2, backported to Debian's 6.1), before ``kallsyms_seqs_of_names`` (3 bytes per
    symbol) when that directly precedes ``kallsyms_token_table`` (measured: Debian 6.1),
    else right before the token table (6.12). Both ends are tried for each alignment padding;
    a wrong guess fails the checks here or in :func:`_starts_by_blocks`, and a plain scan
    takes over.
    """
    count = (num + 255) // 256
    try:
        table = info.symbol("kallsyms_token_table")
        lo = table - 3 * num - 4 * count - 8
        window = read_va(lo, table - lo).view("<u1")
    except BadImage:
        return None
    for end in [table - p for p in range(0, 8, 4)] + [table - 3 * num - p for p in range(8)]:
        start = end - 4 * count - lo
        if start < 0 or (end - 4 * count) % 4:
            continue
        m = window[start : start + 4 * count].view("<u4").astype(np.int64)
        if m[0] == 0 and np.all(np.diff(m) > 0) and m[-1] < names_size:
            return m
    return None


def kallsyms_name_starts(blob: np.ndarray, num: int, markers: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Offsets of the ``num`` length prefixes in ``kallsyms_names``, and where the table ends.

    Each length says where the next name starts. With ``kallsyms_markers`` the 256-name blocks
    are stepped through in parallel (256 numpy steps); without, a tight loop over the bytes.
    """
    if markers is not None:
        found = _starts_by_blocks(blob, num, markers)
        if found is not None:
            return found
    b = blob.tobytes()
    size = len(b)
    starts: list[int] = []
    append = starts.append
    pos = 0
    try:
        for _ in range(num):
            append(pos)
            n = b[pos]
            pos += n + 1 if n < 0x80 else ((n & 0x7F) | (b[pos + 1] << 7)) + 2
    except IndexError:
        pos = size + 1
    if pos > size:
        raise BadImage("kallsyms_names runs past its table: the tables are inconsistent")
    return np.asarray(starts, dtype=np.int32), pos


def _starts_by_blocks(blob: np.ndarray, num: int, markers: np.ndarray) -> tuple[np.ndarray, int] | None:
    size = len(blob)
    padded = np.zeros(size + 2, dtype=np.int64)
    padded[:size] = blob
    starts = np.empty((len(markers), 256), dtype=np.int64)
    pos = markers.copy()
    for j in range(256):
        starts[:, j] = pos
        n = padded[np.minimum(pos, size)]
        big = padded[np.minimum(pos + 1, size)]
        pos = pos + np.where(n < 0x80, n + 1, ((n & 0x7F) | (big << 7)) + 2)
    if not np.array_equal(pos[:-1], markers[1:]):
        return None
    flat = starts.reshape(-1)[:num]
    last = int(flat[-1])
    if last >= size:
        return None
    n = int(blob[last])
    end = last + (n + 1 if n < 0x80 else ((n & 0x7F) | (int(padded[last + 1]) << 7)) + 2)
    if end > size:
        return None
    return flat.astype(np.int32), end


def kallsyms_expand_symbols(blob: np.ndarray, starts: np.ndarray, tokens: list[bytes]) -> tuple[list[str], str]:
    """Expand every symbol at once, as ``kallsyms_expand_symbol()`` does one: ``(names, types)``.

    Each length prefix becomes a newline token and each symbol's first character (its type
    letter) is diverted to ``types``; one gather over all codes then writes the concatenated
    names, which are split on the newlines.
    """
    codes = blob.astype(np.int32)
    heads = np.where(blob[starts] & 0x80, 2, 1).astype(np.int32)
    codes[starts] = _SEP
    codes[starts[heads == 2] + 1] = _EMPTY
    table = tokens + [b"\n", b""]
    lens = np.array([len(t) for t in table], dtype=np.int32)
    flat = np.frombuffer(b"".join(table), dtype=np.uint8)
    tstart = (np.cumsum(lens) - lens).astype(np.int32)
    first = starts + heads
    if len(first) and int(first[-1]) >= len(codes):
        raise BadImage("kallsyms_names ends with an empty symbol: the tables are inconsistent")
    src = tstart[codes]
    out_len = lens[codes]
    try:
        types = flat[src[first]].tobytes().decode("ascii")
        src[first] += 1
        out_len[first] -= 1
        if np.any(out_len < 0):
            raise BadImage("kallsyms_names has an empty symbol: the tables are inconsistent")
        ends = np.cumsum(out_len, dtype=np.int64)
        total = int(ends[-1]) if len(ends) else 0
        if total > min(len(starts) * (KSYM_NAME_LEN + 1), _MAX_EXPANDED):
            raise BadImage(
                f"kallsyms names expand to {total} bytes for {len(starts)} symbols: the tables are inconsistent"
            )
        src -= (ends - out_len).astype(np.int32)
        gather = np.repeat(src, out_len)
        gather += np.arange(len(gather), dtype=np.int32)
        names = flat[gather][1:].tobytes().decode("ascii").split("\n")
    except UnicodeDecodeError:
        raise BadImage("kallsyms names are not ASCII: the tables are inconsistent") from None
    return names, types


def kallsyms_sym_addresses(read_va: ReadVA, info: Vmcoreinfo, num: int) -> np.ndarray:
    """All symbol addresses, vectorized ``kallsyms_sym_address()`` (see the module docstring)."""
    if info.has_symbol("kallsyms_addresses"):
        return read_va(info.symbol("kallsyms_addresses"), 8 * num).view("<u8").copy()
    offsets_va = info.symbol("kallsyms_offsets")
    raw = read_va(offsets_va, 4 * num)
    offsets = raw.view("<i4").astype(np.int64)
    if not info.has_symbol("kallsyms_relative_base"):
        # Place-relative (7.x): entry i at offsets_va + 4*i holds ``_text - . + offset``.
        return _place_relative(offsets_va, offsets)
    base = np.uint64(int(read_va(info.symbol("kallsyms_relative_base"), 8).view("<u8")[0]))
    if not np.any(offsets < 0):
        return base + raw.view("<u4").astype(np.uint64)
    negative = offsets < 0
    return np.where(negative, base + (-offsets - 1).astype(np.uint64), offsets.astype(np.uint64))


def _place_relative(offsets_va: int, offsets: np.ndarray) -> np.ndarray:
    """``offsets_va + 4*i + offsets[i]`` modulo 2**64: kernel addresses are above 2**63, so the
    signed distance from ``offsets_va`` is summed in int64 and added (wrapping) as uint64."""
    rel = offsets + 4 * np.arange(len(offsets), dtype=np.int64)
    return np.uint64(offsets_va) + rel.astype(np.uint64)
