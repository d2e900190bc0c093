"""Reading the compiled probe: struct sizes, member offsets, array lengths and enums from DWARF,
macro values from .rodata."""

from __future__ import annotations

import struct as cstruct
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from elftools.dwarf.die import DIE
    from elftools.elf.elffile import ELFFile
from memvirt.introspect.headers.probe import _VAR_CONST, _VAR_STRUCT, _VAR_TYPEDEF


def parse_probe_object(path: Path) -> dict[str, Any]:
    """Types, enums and constants of a compiled probe, as JSON-ready data.

    ``types`` is a list; members and typedefs refer to other entries by index. Only what a
    recorded type holds by value is followed (pointers are kept as their C spelling), so the
    table stays small although gcc emits most of the kernel's types for a pointer to
    ``task_struct``.
    """
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        elf = ELFFile(f)
        constants = _constant_symbols(elf)
        cu = next(elf.get_dwarf_info().iter_CUs())
        reader = _TypeReader()
        enums: dict[str, dict[str, int]] = {}
        for die in cu.get_top_DIE().iter_children():
            if die.tag == "DW_TAG_enumeration_type":
                values = _enumerators(die)
                name = _name(die)
                if name and values:
                    enums.setdefault(name, values)
                for k, v in values.items():
                    constants.setdefault(k, v)
            elif die.tag == "DW_TAG_variable":
                name = _name(die) or ""
                target = _attr_die(die, "DW_AT_type")
                if target is None:
                    continue
                if name.startswith((_VAR_STRUCT, _VAR_TYPEDEF)) and target.tag == "DW_TAG_pointer_type":
                    pointee = _attr_die(target, "DW_AT_type")
                    if pointee is not None:
                        reader.root(pointee)
    return {
        "types": reader.types,
        "names": reader.names,
        "declared": sorted(reader.declared),
        "enums": enums,
        "constants": constants,
    }


def _name(die: DIE) -> str | None:
    a = die.attributes.get("DW_AT_name")
    return a.value.decode("utf-8", "replace") if a is not None else None


def _attr_die(die: DIE, attr: str) -> DIE | None:
    return die.get_DIE_from_attribute(attr) if attr in die.attributes else None


def _int_attr(die: DIE, attr: str, default: int = 0) -> int:
    a = die.attributes.get(attr)
    return int(a.value) if a is not None and isinstance(a.value, int) else default


def _constant_symbols(elf: ELFFile) -> dict[str, int]:
    """Each ``MEMVIRT_CONST(name)``: a ``{u64 value; int negative}`` in ``.rodata``."""
    from elftools.elf.sections import SymbolTableSection

    out: dict[str, int] = {}
    symtab = elf.get_section_by_name(".symtab")
    if not isinstance(symtab, SymbolTableSection):
        return out
    data: dict[int, bytes] = {}
    for sym in symtab.iter_symbols():
        if not sym.name.startswith(_VAR_CONST) or not isinstance(sym["st_shndx"], int):
            continue
        shndx = sym["st_shndx"]
        if shndx not in data:
            data[shndx] = elf.get_section(shndx).data()
        value, negative = cstruct.unpack_from("<Qi", data[shndx], sym["st_value"])
        out[sym.name[len(_VAR_CONST) :]] = value - (1 << 64) if negative else value
    return out


def _enumerators(die: DIE) -> dict[str, int]:
    """``{name: value}``; gcc writes non-negative values as unsigned data forms, so those are
    sign-extended only when the enum's underlying type is signed and the top bit is set."""
    base = _attr_die(die, "DW_AT_type")
    signed = base is not None and _int_attr(base, "DW_AT_encoding") in (0x05, 0x06)
    out: dict[str, int] = {}
    for child in die.iter_children():
        if child.tag != "DW_TAG_enumerator":
            continue
        a = child.attributes["DW_AT_const_value"]
        v = int(a.value)
        width = {"DW_FORM_data1": 8, "DW_FORM_data2": 16, "DW_FORM_data4": 32, "DW_FORM_data8": 64}.get(a.form)
        if signed and width and v >> (width - 1):
            v -= 1 << width
        out[_name(child) or ""] = v
    return out


class _TypeReader:
    """Turns DWARF types into the compact table :class:`HeadersLayout` reads."""

    def __init__(self) -> None:
        self.types: list[dict[str, Any]] = []
        self.names: dict[str, int] = {}
        self.declared: list[str] = []
        self._index: dict[int, int] = {}

    def root(self, die: DIE) -> None:
        idx = self.read(die)
        t = self.types[idx]
        if t["k"] == "typedef":
            self.names.setdefault(t["name"], idx)
        elif "decl" in t:
            self.declared.append(f"{t['k']} {t['name']}")

    def read(self, die: DIE | None) -> int:
        """Index of ``die``'s entry (qualifiers are looked through), reading it if new."""
        while die is not None and die.tag in (
            "DW_TAG_const_type",
            "DW_TAG_volatile_type",
            "DW_TAG_restrict_type",
            "DW_TAG_atomic_type",
        ):
            die = _attr_die(die, "DW_AT_type")
        key = -1 if die is None else die.offset
        if key in self._index:
            return self._index[key]
        idx = len(self.types)
        self._index[key] = idx
        self.types.append({"k": "void"})
        if die is not None:
            self.types[idx] = self._entry(die)
        return idx

    def _entry(self, die: DIE) -> dict[str, Any]:
        tag = die.tag
        if tag in ("DW_TAG_structure_type", "DW_TAG_union_type"):
            kind = "struct" if tag == "DW_TAG_structure_type" else "union"
            name = _name(die) or ""
            if "DW_AT_declaration" in die.attributes:
                return {"k": kind, "name": name, "decl": 1}
            entry: dict[str, Any] = {"k": kind, "name": name, "size": _int_attr(die, "DW_AT_byte_size"), "m": []}
            if name:
                self.names.setdefault(f"{kind} {name}", self._index[die.offset])
            entry["m"] = [self._member(m) for m in die.iter_children() if m.tag == "DW_TAG_member"]
            return entry
        if tag == "DW_TAG_typedef":
            return {"k": "typedef", "name": _name(die) or "", "t": self.read(_attr_die(die, "DW_AT_type"))}
        if tag == "DW_TAG_array_type":
            dims = [self._count(s) for s in die.iter_children() if s.tag == "DW_TAG_subrange_type"] or [0]
            elem = self.read(_attr_die(die, "DW_AT_type"))
            for n in reversed(dims[1:]):
                self.types.append({"k": "array", "t": elem, "n": n})
                elem = len(self.types) - 1
            return {"k": "array", "t": elem, "n": dims[0]}
        if tag == "DW_TAG_base_type":
            return {"k": "base", "name": _name(die) or "", "size": _int_attr(die, "DW_AT_byte_size")}
        if tag == "DW_TAG_enumeration_type":
            return {"k": "enum", "name": _name(die) or "", "size": _int_attr(die, "DW_AT_byte_size", 4)}
        if tag == "DW_TAG_pointer_type":
            return {"k": "ptr", "name": _spell(_attr_die(die, "DW_AT_type")) + " *"}
        return {"k": "func", "name": _spell(die)}

    def _member(self, die: DIE) -> list[Any]:
        """``[name, bit offset, type, bit size]``; bitfields in either DWARF encoding."""
        byte = _int_attr(die, "DW_AT_data_member_location")
        bits = _int_attr(die, "DW_AT_bit_size")
        if "DW_AT_data_bit_offset" in die.attributes:
            bit = _int_attr(die, "DW_AT_data_bit_offset")
        elif bits and "DW_AT_bit_offset" in die.attributes:
            storage = _int_attr(die, "DW_AT_byte_size") * 8
            bit = byte * 8 + storage - _int_attr(die, "DW_AT_bit_offset") - bits
        else:
            bit = byte * 8
        return [_name(die) or "", bit, self.read(_attr_die(die, "DW_AT_type")), bits]

    @staticmethod
    def _count(sub: DIE) -> int:
        if "DW_AT_count" in sub.attributes:
            return _int_attr(sub, "DW_AT_count")
        if "DW_AT_upper_bound" in sub.attributes and isinstance(sub.attributes["DW_AT_upper_bound"].value, int):
            return _int_attr(sub, "DW_AT_upper_bound") + 1
        return 0


def _spell(die: DIE | None, depth: int = 0) -> str:
    """A C spelling of a type, without reading its members (for pointer targets)."""
    if die is None:
        return "void"
    if depth > 16:
        return "..."
    tag = str(die.tag)
    name = _name(die)
    inner = _attr_die(die, "DW_AT_type")
    if tag in ("DW_TAG_structure_type", "DW_TAG_union_type", "DW_TAG_enumeration_type"):
        return f"{tag[7:-5].replace('structure', 'struct').replace('enumeration', 'enum')} {name or '(anon)'}"
    if tag in ("DW_TAG_base_type", "DW_TAG_typedef"):
        return name or "?"
    if tag == "DW_TAG_pointer_type":
        return _spell(inner, depth + 1) + " *"
    if tag in ("DW_TAG_const_type", "DW_TAG_volatile_type", "DW_TAG_restrict_type", "DW_TAG_atomic_type"):
        return f"{tag[7:-5]} {_spell(inner, depth + 1)}"
    if tag == "DW_TAG_array_type":
        return _spell(inner, depth + 1) + "[]"
    if tag == "DW_TAG_subroutine_type":
        return f"{_spell(inner, depth + 1)} (*)(...)"
    return tag[7:]
