"""The kernel's BTF type information (``/sys/kernel/btf/vmlinux``), read from guest memory.

With CONFIG_DEBUG_INFO_BTF the image carries its types in ``.BTF`` between ``__start_BTF``
and ``__stop_BTF`` (``include/uapi/linux/btf.h`` for the format). The blob is taken at the
kallsyms address of ``__start_BTF``: other copies of it lie around in RAM (left by the boot
decompressor; measured near the top of a 512 MiB guest's RAM), and only the symbol says which
one the running kernel uses.

Records have variable length (12 bytes plus a kind-specific tail), so where each type starts
is found by computing "next record" for every 4-byte word at once with numpy and then
following that chain; per-type fields are then plain arrays. Names are looked up by searching
the string section for the name (BTF strings are deduplicated), not by decoding all of them.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from memvirt.errors import BadImage, GuestStructureError
from memvirt.introspect.layout import LayoutMissing

BTF_MAGIC = 0xEB9F
_HEADER = struct.Struct("<HBBIIIII")

# enum btf_kind (include/uapi/linux/btf.h); ENUM64 since v6.0 (commit 6089fb325cf7).
KIND_NAMES = (
    "UNKN",
    "INT",
    "PTR",
    "ARRAY",
    "STRUCT",
    "UNION",
    "ENUM",
    "FWD",
    "TYPEDEF",
    "VOLATILE",
    "CONST",
    "RESTRICT",
    "FUNC",
    "FUNC_PROTO",
    "VAR",
    "DATASEC",
    "FLOAT",
    "DECL_TAG",
    "TYPE_TAG",
    "ENUM64",
)
(
    UNKN,
    INT,
    PTR,
    ARRAY,
    STRUCT,
    UNION,
    ENUM,
    FWD,
    TYPEDEF,
    VOLATILE,
    CONST,
    RESTRICT,
    FUNC,
    FUNC_PROTO,
    VAR,
    DATASEC,
    FLOAT,
    DECL_TAG,
    TYPE_TAG,
    ENUM64,
) = range(20)
# Words after the 3-word struct btf_type: fixed part, and per vlen entry.
_TAIL_FIXED = np.array([0, 1, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0] + [0] * 12, dtype=np.int64)
_TAIL_PER_VLEN = np.array([0, 0, 0, 0, 3, 3, 2, 0, 0, 0, 0, 0, 0, 2, 0, 3, 0, 0, 0, 3] + [0] * 12, dtype=np.int64)
# Kinds whose third word is a type id (the others use it as a size, or not at all).
_REFERS = {PTR, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FUNC_PROTO, VAR, DECL_TAG, TYPE_TAG}
_QUALIFIERS = {TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG}
_SIZED = {INT, STRUCT, UNION, ENUM, DATASEC, FLOAT, ENUM64}
_PATH_PART = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)$")
_STRUCT_PREFIX = re.compile(r"^(struct|union|enum)\s+")
MAX_BTF = 64 << 20
"""A kernel's BTF is ~6 MiB (6.12); a bigger blob is refused before it is read."""
MAX_DEPTH = 32
"""Nesting of types (anonymous members, arrays of arrays, pointers) followed; C code never nests
this deep, and the guest writes the type graph, which may have cycles."""
MAX_MEMBERS_VISITED = 1 << 16
"""Members one lookup through anonymous structs may look at (their fan-out multiplies)."""
MAX_NAME_COPIES = 16


@dataclass(frozen=True)
class Member:
    """A struct/union member: ``bit_offset`` from the start of the outermost struct asked about."""

    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int


class Btf:
    """A parsed BTF blob: type ids index the per-type arrays (id 0 is ``void``)."""

    def __init__(self, blob: bytes, source: str = "BTF"):
        self.source = source
        if len(blob) < _HEADER.size:
            raise BadImage(f"BTF header invalid in {source}: only {len(blob)} bytes")
        magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = _HEADER.unpack_from(blob)
        if magic != BTF_MAGIC or version != 1:
            raise BadImage(f"BTF header invalid in {source}: magic {magic:#x} version {version}")
        data_len = len(blob) - hdr_len
        if (
            hdr_len < _HEADER.size
            or type_off % 4
            or type_len % 4
            or type_len == 0
            or str_len == 0
            or type_off + type_len > data_len
            or str_off + str_len > data_len
        ):
            raise BadImage(
                f"BTF header invalid in {source}: hdr_len {hdr_len}, types {type_off}+{type_len}, "
                f"strings {str_off}+{str_len}, {data_len} data bytes"
            )
        self.size = hdr_len + max(type_off + type_len, str_off + str_len)
        types = blob[hdr_len + type_off : hdr_len + type_off + type_len]
        self.strings = blob[hdr_len + str_off : hdr_len + str_off + str_len]
        if self.strings[:1] != b"\0" or self.strings[-1:] != b"\0":
            raise BadImage(f"BTF header invalid in {source}: the string section is not NUL-delimited")
        self.words = np.frombuffer(types, dtype="<u4")
        starts = self._record_starts()
        w = self.words
        # Type id 0 is void: prepend a row for it so that arrays index by type id.
        self.pos = np.concatenate(([-1], starts))
        self.name_off = np.concatenate(([0], w[starts])).astype(np.int64)
        info = np.concatenate(([0], w[starts + 1])).astype(np.int64)
        self.size_type = np.concatenate(([0], w[starts + 2])).astype(np.int64)
        self.kind = ((info >> 24) & 0x1F).astype(np.int8)
        self.vlen = info & 0xFFFF
        self.kind_flag = ((info >> 31) & 1).astype(bool)
        self._check()
        self._by_name: dict[tuple[str, frozenset[int]], list[int]] = {}
        self._enum_table: tuple[np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        """Number of type ids, ``void`` included."""
        return len(self.kind)

    def _record_starts(self) -> np.ndarray:
        """Word offset of every type record: "where would the next record start" is computed
        for every word at once, then followed from word 0 (~110k steps for 6.12's 112k types)."""
        w = self.words.astype(np.int64)
        n = len(w)
        if n < 3:
            raise BadImage(f"BTF header invalid in {self.source}: type section too short")
        info = np.empty(n, dtype=np.int64)
        info[:-1] = w[1:]
        info[-1] = 0
        kind = (info >> 24) & 0x1F
        nxt = np.arange(n, dtype=np.int64) + 3 + _TAIL_FIXED[kind] + _TAIL_PER_VLEN[kind] * (info & 0xFFFF)
        step = memoryview(nxt)
        starts: list[int] = []
        append = starts.append
        p = 0
        while p < n:
            append(p)
            p = step[p]
        if p != n:
            raise BadImage(f"BTF type section of {self.source} is inconsistent: records overrun it")
        return np.asarray(starts, dtype=np.int64)

    def _check(self) -> None:
        """Reject a corrupt blob up front: unknown kinds, names or type ids out of range."""
        n = len(self.kind)
        kinds = self.kind[1:]
        if np.any((kinds < INT) | (kinds > ENUM64)):
            bad = int(kinds[(kinds < INT) | (kinds > ENUM64)][0])
            raise BadImage(f"BTF type section of {self.source} is inconsistent: unknown kind {bad}")
        if np.any(self.name_off >= len(self.strings)):
            raise BadImage(f"BTF type section of {self.source} is inconsistent: a name lies outside the strings")
        refers = np.isin(self.kind, list(_REFERS))
        if np.any(self.size_type[refers] >= n):
            raise BadImage(f"BTF type section of {self.source} is inconsistent: a type id is out of range")

    # -- names -------------------------------------------------------------------------------

    def name(self, tid: int) -> str:
        off = int(self.name_off[tid])
        return self._string(off)

    def _string(self, off: int) -> str:
        if not 0 <= off < len(self.strings):
            raise BadImage(f"BTF of {self.source} is inconsistent: string offset {off} out of range")
        end = self.strings.find(b"\0", off)
        return self.strings[off:end].decode("utf-8", "replace")

    def _string_offsets(self, name: str) -> list[int]:
        """Where ``name`` is in the string section: once in a deduplicated blob (pahole's are);
        a blob repeating it more than a few times is refused, since each hit costs a pass
        over every type."""
        needle = b"\0" + name.encode() + b"\0"
        out = []
        i = self.strings.find(needle)
        while i >= 0:
            out.append(i + 1)
            if len(out) > MAX_NAME_COPIES:
                raise GuestStructureError(
                    f"BTF of {self.source} repeats the string {name!r} more than {MAX_NAME_COPIES} times"
                )
            i = self.strings.find(needle, i + 1)
        return out

    def find(self, name: str, kinds: frozenset[int] | set[int]) -> list[int]:
        """Type ids named ``name`` of one of ``kinds``, in id order."""
        key = (name, frozenset(kinds))
        hit = self._by_name.get(key)
        if hit is None:
            ids: list[int] = []
            for off in self._string_offsets(name):
                ids.extend(np.flatnonzero(self.name_off == off).tolist())
            hit = sorted(t for t in ids if int(self.kind[t]) in kinds)
            self._by_name[key] = hit
        return hit

    def struct_id(self, name: str) -> int:
        """The complete struct or union called ``name`` (``"struct page"`` also accepted), else a
        typedef of that name resolved to one."""
        bare = _STRUCT_PREFIX.sub("", name)
        for tid in self.find(bare, {STRUCT, UNION}):
            return tid
        for tid in self.find(bare, {TYPEDEF}):
            return self.resolve(tid)
        raise LayoutMissing(f"BTF has no struct, union or typedef named {bare!r}")

    # -- types -------------------------------------------------------------------------------

    def resolve(self, tid: int) -> int:
        """Skip typedefs and qualifiers (const, volatile, restrict, type tags)."""
        for _ in range(64):
            if int(self.kind[tid]) not in _QUALIFIERS:
                return tid
            tid = int(self.size_type[tid])
        raise GuestStructureError(f"BTF of {self.source} has a typedef cycle")

    def sizeof(self, tid: int) -> int:
        """``sizeof`` of a type; :class:`LayoutMissing` for void, functions and forward declarations."""
        t = self.resolve(tid)
        k = int(self.kind[t])
        if k in _SIZED:
            return int(self.size_type[t])
        if k == PTR:
            return 8
        if k == ARRAY:
            count = 1
            for _ in range(MAX_DEPTH):
                elem, _index, nelems = self.array_info(t)
                count *= nelems
                t = self.resolve(elem)
                if int(self.kind[t]) != ARRAY:
                    return count * self.sizeof(t)
            raise GuestStructureError(f"BTF of {self.source} nests arrays deeper than {MAX_DEPTH} (a cycle?)")
        raise LayoutMissing(f"BTF type {self.type_name(tid)!r} has no size ({KIND_NAMES[k]})")

    def array_info(self, tid: int) -> tuple[int, int, int]:
        """``(element type, index type, nelems)`` of an ARRAY type."""
        p = int(self.pos[tid]) + 3
        elem, index, nelems = (int(x) for x in self.words[p : p + 3])
        self._check_ids(np.array([elem, index]))
        return elem, index, nelems

    def _check_ids(self, ids: np.ndarray) -> None:
        if len(ids) and int(ids.max()) >= len(self.kind):
            raise BadImage(f"BTF of {self.source} is inconsistent: type id {int(ids.max())} out of range")

    def members(self, tid: int) -> list[Member]:
        """Direct members of a struct or union, with bit offsets relative to it."""
        t = self.resolve(tid)
        if int(self.kind[t]) not in (STRUCT, UNION):
            raise LayoutMissing(f"BTF type {self.type_name(tid)!r} is not a struct or union")
        p = int(self.pos[t]) + 3
        rec = self.words[p : p + 3 * int(self.vlen[t])].reshape(-1, 3).astype(np.int64)
        self._check_ids(rec[:, 1])
        flag = bool(self.kind_flag[t])
        out = []
        for name_off, mtype, off in rec.tolist():
            if flag:
                out.append(Member(self._string(name_off), mtype, off & 0xFFFFFF, off >> 24))
            else:
                out.append(Member(self._string(name_off), mtype, off, 0))
        return out

    def find_member(self, tid: int, name: str) -> Member | None:
        """Member ``name`` of a struct/union, looking through anonymous members as C does.

        The guest writes the types: an anonymous member of its own struct's type (a cycle) or a
        wide, deep tree of them is a :class:`GuestStructureError`, not a RecursionError."""
        return self._find_member(tid, name, (), [MAX_MEMBERS_VISITED])

    def _find_member(self, tid: int, name: str, path: tuple[int, ...], budget: list[int]) -> Member | None:
        t = self.resolve(tid)
        if t in path or len(path) >= MAX_DEPTH:
            raise GuestStructureError(
                f"BTF of {self.source}: anonymous members of type {t} nest "
                f"{'in a cycle' if t in path else f'deeper than {MAX_DEPTH}'}"
            )
        members = self.members(t)
        budget[0] -= len(members)
        if budget[0] < 0:
            raise GuestStructureError(
                f"BTF of {self.source}: looking up {name!r} visits more than {MAX_MEMBERS_VISITED} anonymous members"
            )
        for m in members:
            if m.name == name:
                return m
            if not m.name and int(self.kind[self.resolve(m.type_id)]) in (STRUCT, UNION):
                inner = self._find_member(m.type_id, name, (*path, t), budget)
                if inner is not None:
                    return Member(inner.name, inner.type_id, m.bit_offset + inner.bit_offset, inner.bitfield_size)
        return None

    def member(self, struct: str, path: str) -> Member:
        """The member at ``path`` (``"lru.next"``, ``"free_area[2].nr_free"``) of ``struct``."""
        tid = self.struct_id(struct)
        bit = 0
        found: Member | None = None
        for part in path.split("."):
            m = _PATH_PART.match(part)
            if m is None:
                raise ValueError(f"bad member path {path!r}")
            if found is not None:
                tid = found.type_id
            member = self.find_member(tid, m[1]) if int(self.kind[self.resolve(tid)]) in (STRUCT, UNION) else None
            if member is None:
                raise LayoutMissing(f"BTF struct {struct!r} has no member {path!r}")
            bit += member.bit_offset
            mtype = member.type_id
            for index in re.findall(r"\[(\d+)\]", m[2]):
                arr = self.resolve(mtype)
                if int(self.kind[arr]) != ARRAY:
                    raise LayoutMissing(f"BTF member {struct}.{path} is not an array at [{index}]")
                elem, _i, nelems = self.array_info(arr)
                if int(index) >= nelems:
                    raise LayoutMissing(f"BTF member {struct}.{path}: index {index} beyond {nelems} elements")
                bit += 8 * int(index) * self.sizeof(elem)
                mtype = elem
            found = Member(member.name, mtype, bit, member.bitfield_size)
        assert found is not None
        return found

    def enumerators(self, enum: str) -> dict[str, int]:
        """``{name: value}`` of ``enum`` (signed when BTF marks it so: kind_flag, since v6.0)."""
        ids = self.find(enum, {ENUM, ENUM64})
        if not ids:
            raise LayoutMissing(f"BTF has no enum named {enum!r}")
        return self._enum_values(ids[0])

    def _enum_values(self, tid: int) -> dict[str, int]:
        p = int(self.pos[tid]) + 3
        vlen = int(self.vlen[tid])
        signed = bool(self.kind_flag[tid])
        out: dict[str, int] = {}
        if int(self.kind[tid]) == ENUM:
            rec = self.words[p : p + 2 * vlen].reshape(-1, 2)
            vals = rec[:, 1].view("<i4") if signed else rec[:, 1]
            for name_off, v in zip(rec[:, 0].tolist(), vals.tolist(), strict=True):
                out[self._string(name_off)] = v
        else:
            rec = self.words[p : p + 3 * vlen].reshape(-1, 3).astype(np.uint64)
            vals = rec[:, 1] | (rec[:, 2] << np.uint64(32))
            vals_list = vals.view("<i8").tolist() if signed else vals.tolist()
            for name_off, v in zip(rec[:, 0].tolist(), vals_list, strict=True):
                out[self._string(int(name_off))] = v
        return out

    def enumerator(self, name: str) -> int:
        """Value of enumerator ``name`` in whichever enum defines it (the first, by type id)."""
        name_offs, owners = self._enumerator_table()
        for off in self._string_offsets(name):
            hit = np.flatnonzero(name_offs == off)
            if len(hit):
                return self._enum_values(int(owners[hit[0]]))[name]
        raise LayoutMissing(f"BTF has no enumerator named {name!r}")

    def _enumerator_table(self) -> tuple[np.ndarray, np.ndarray]:
        """Name offset and owning enum of every enumerator, gathered in one vectorized pass."""
        if self._enum_table is None:
            parts_off, parts_own = [], []
            for kind, width in ((ENUM, 2), (ENUM64, 3)):
                ids = np.flatnonzero(self.kind == kind)
                counts = self.vlen[ids]
                first = self.pos[ids] + 3
                base = np.repeat(first - width * (np.cumsum(counts) - counts), counts)
                idx = base + width * np.arange(int(counts.sum()))
                parts_off.append(self.words[idx].astype(np.int64))
                parts_own.append(np.repeat(ids, counts))
            self._enum_table = (np.concatenate(parts_off), np.concatenate(parts_own))
        return self._enum_table

    def type_name(self, tid: int, depth: int = 0) -> str:
        """A C spelling of a type: ``struct list_head *``, ``unsigned long``, ``struct free_area[11]``."""
        if depth > MAX_DEPTH:
            raise GuestStructureError(f"BTF of {self.source}: a type refers to itself or nests deeper than {MAX_DEPTH}")
        k = int(self.kind[tid])
        if tid == 0:
            return "void"
        if k in (STRUCT, UNION, ENUM, ENUM64, FWD):
            tag = {STRUCT: "struct", UNION: "union", FWD: "union" if self.kind_flag[tid] else "struct"}.get(k, "enum")
            return f"{tag} {self.name(tid) or '(anon)'}"
        if k in (INT, FLOAT, TYPEDEF, FUNC, VAR, DATASEC):
            return self.name(tid)
        if k == PTR:
            return self.type_name(int(self.size_type[tid]), depth + 1) + " *"
        if k == ARRAY:
            elem, _i, nelems = self.array_info(tid)
            return f"{self.type_name(elem, depth + 1)}[{nelems}]"
        if k in (CONST, VOLATILE, RESTRICT):
            return f"{KIND_NAMES[k].lower()} {self.type_name(int(self.size_type[tid]), depth + 1)}"
        if k == TYPE_TAG:
            return self.type_name(int(self.size_type[tid]), depth + 1)
        if k == FUNC_PROTO:
            return f"{self.type_name(int(self.size_type[tid]), depth + 1)} (*)(...)"
        return KIND_NAMES[k].lower()


def read_btf(read_va: Callable[[int, int], np.ndarray], start_va: int, stop_va: int | None, source: str = "BTF") -> Btf:
    """Parse the BTF blob at ``start_va`` (``__start_BTF``), bounded by ``stop_va`` (``__stop_BTF``)."""
    head = read_va(start_va, _HEADER.size).tobytes()
    magic, version, _f, hdr_len, type_off, type_len, str_off, str_len = _HEADER.unpack(head)
    if magic != BTF_MAGIC or version != 1:
        raise BadImage(f"BTF header invalid in {source}: magic {magic:#06x} version {version}")
    size = hdr_len + max(type_off + type_len, str_off + str_len)
    if stop_va is not None and size != stop_va - start_va:
        raise BadImage(f"BTF header invalid in {source}: it claims {size} bytes, __stop_BTF says {stop_va - start_va}")
    if size > MAX_BTF:
        raise BadImage(f"BTF header invalid in {source}: {size} bytes")
    return Btf(read_va(start_va, size).tobytes(), source)


class BtfLayout:
    """The :class:`~memvirt.introspect.layout.Layout` protocol answered from BTF."""

    source = "btf"

    def __init__(self, btf: Btf):
        self.btf = btf

    def struct_size(self, name: str) -> int:
        return self.btf.sizeof(self.btf.struct_id(name))

    def member_offset(self, struct: str, path: str) -> int:
        m = self.btf.member(struct, path)
        if m.bitfield_size or m.bit_offset % 8:
            raise LayoutMissing(
                f"BTF member {struct}.{path} is a bitfield at bit {m.bit_offset}: it has no byte offset"
            )
        return m.bit_offset // 8

    def member_bit_offset(self, struct: str, path: str) -> int:
        return self.btf.member(struct, path).bit_offset

    def member_type(self, struct: str, path: str) -> str:
        """The C spelling of the member's type (``struct list_head``)."""
        return self.btf.type_name(self.btf.member(struct, path).type_id)

    def array_length(self, struct: str, path: str) -> int:
        t = self.btf.resolve(self.btf.member(struct, path).type_id)
        if int(self.btf.kind[t]) != ARRAY:
            raise LayoutMissing(f"BTF member {struct}.{path} is not an array")
        return self.btf.array_info(t)[2]

    def enum_value(self, enum: str, name: str) -> int:
        """Enumerator ``name`` of ``enum``; with an empty ``enum``, of whichever enum has it."""
        if not enum:
            return self.btf.enumerator(name)
        values = self.btf.enumerators(enum)
        if name not in values:
            raise LayoutMissing(f"BTF enum {enum!r} has no enumerator {name!r}")
        return values[name]

    def enumerators(self, enum: str) -> dict[str, int]:
        return self.btf.enumerators(enum)

    def has_member(self, struct: str, path: str) -> bool:
        try:
            self.btf.member(struct, path)
        except LayoutMissing:
            return False
        return True
