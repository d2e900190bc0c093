"""The layout built from one kernel's headers, and its cache."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memvirt.errors import HeadersNotFound, ProbeCompileError
from memvirt.introspect.layout import LayoutMissing
from memvirt.paths import cache_home

if TYPE_CHECKING:
    pass
from memvirt.introspect.headers.base import _PATH_PART, _RELEASE, _TAG_PREFIX, FORMAT
from memvirt.introspect.headers.compile import compile_probe
from memvirt.introspect.headers.dwarf import parse_probe_object
from memvirt.introspect.headers.probe import probe_key
from memvirt.introspect.headers.trees import HeaderTree, _locked, debian_tree, open_tree


@dataclass(frozen=True)
class _Member:
    type: int
    bit_offset: int
    bit_size: int


class HeadersLayout:
    """The :class:`~memvirt.introspect.layout.Layout` protocol answered from kernel headers.

    Build one with :meth:`for_release` (a Debian kernel) or :meth:`from_tree` (a prepared tree);
    both cache the parsed probe as JSON, so only the first call per kernel compiles anything.
    """

    source = "headers"

    def __init__(self, data: dict[str, Any], release: str, origin: str):
        self.release = release
        self.origin = origin
        self.meta: dict[str, Any] = data.get("meta", {})
        self._types: list[dict[str, Any]] = data["types"]
        self._names: dict[str, int] = data["names"]
        self._enums: dict[str, dict[str, int]] = data["enums"]
        self._constants: dict[str, int] = data["constants"]
        self._dropped: dict[str, str] = data.get("dropped", {})
        self._declared = frozenset(data.get("declared", ()))

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def for_release(cls, release: str, refresh: bool = False) -> HeadersLayout:
        """Layout of Debian kernel ``release`` (``6.1.0-56-amd64``, ``6.12.117+deb12-cloud-amd64``)."""
        release = release.removeprefix("linux-image-").removeprefix("linux-headers-")
        if not _RELEASE.match(release):
            raise HeadersNotFound(f"{release!r} is not a kernel release like 6.1.0-56-amd64")
        path = cache_home() / "layouts" / f"headers-{release}.json"
        key = probe_key()
        origin = f"linux-headers-{release}"
        if not refresh and (data := _load(path, key)) is not None:
            return cls(data, release, origin)
        t0 = time.perf_counter()
        tree = debian_tree(release)
        fetched = time.perf_counter() - t0
        with _locked(path.with_name(f".{path.name}.lock")):
            if refresh or (data := _load(path, key)) is None:
                data = _build(tree, key, {"fetch": fetched})
                _store(path, data)
        return cls(data, release, origin)

    @classmethod
    def from_tree(cls, path: str | Path, refresh: bool = False) -> HeadersLayout:
        """Layout from a user's prepared kernel tree (``/lib/modules/$(uname -r)/build``, a
        ``make modules_prepare``'d source tree, or its ``O=`` build directory)."""
        tree = open_tree(path)
        stamp = (tree.objtree / "include" / "generated" / "autoconf.h").stat()
        key = hashlib.sha256(f"{probe_key()} {tree.objtree} {stamp.st_mtime_ns} {stamp.st_size}".encode()).hexdigest()[
            :16
        ]
        where = hashlib.sha256(str(tree.objtree).encode()).hexdigest()[:8]
        cached = cache_home() / "layouts" / f"headers-{tree.release}-{where}.json"
        origin = str(tree.objtree)
        if not refresh and (data := _load(cached, key)) is not None:
            return cls(data, tree.release, origin)
        data = _build(tree, key, {})
        _store(cached, data)
        return cls(data, tree.release, origin)

    # -- the Layout protocol ---------------------------------------------------------------------

    def struct_size(self, name: str) -> int:
        return self._sizeof(self._struct(name))

    def member_offset(self, struct: str, path: str) -> int:
        m = self._member(struct, path)
        if m.bit_size or m.bit_offset % 8:
            raise LayoutMissing(
                f"{self._where}: {struct}.{path} is a bitfield at bit {m.bit_offset}: it has no byte offset"
            )
        return m.bit_offset // 8

    def array_length(self, struct: str, path: str) -> int:
        """Elements of the array member at ``path``; 0 for a flexible array member."""
        t = self._types[self._resolve(self._member(struct, path).type)]
        if t["k"] != "array":
            raise LayoutMissing(f"{self._where}: {struct}.{path} is not an array")
        return int(t["n"])

    def enum_value(self, enum: str, name: str) -> int:
        """Enumerator ``name`` of ``enum``; with an empty ``enum``, any probed constant."""
        if not enum:
            return self.constant(name)
        bare = _TAG_PREFIX.sub("", enum)
        values = self._enums.get(bare)
        if values is None:
            raise LayoutMissing(f"{self._where} have no enum {bare!r}{self._why(f'enum {bare}')}")
        if name not in values:
            raise LayoutMissing(f"{self._where}: enum {bare} has no enumerator {name!r}")
        return values[name]

    def has_member(self, struct: str, path: str) -> bool:
        try:
            self._member(struct, path)
        except LayoutMissing:
            return False
        return True

    # -- beyond the protocol ---------------------------------------------------------------------

    def constant(self, name: str) -> int:
        """A probed macro (``PG_table``, ``NR_PCP_LISTS``) or any enumerator (``PG_lru``, ``NR_FREE_PAGES``)."""
        if name in self._constants:
            return self._constants[name]
        raise LayoutMissing(f"{self._where} do not define {name!r}{self._why(name)}")

    def constants(self) -> dict[str, int]:
        """Every constant known: probed macros and the enumerators of all enums gcc emitted."""
        return dict(self._constants)

    def enumerators(self, enum: str) -> dict[str, int]:
        bare = _TAG_PREFIX.sub("", enum)
        if bare not in self._enums:
            raise LayoutMissing(f"{self._where} have no enum {bare!r}{self._why(f'enum {bare}')}")
        return dict(self._enums[bare])

    def member_bit_offset(self, struct: str, path: str) -> int:
        return self._member(struct, path).bit_offset

    def member_bit_size(self, struct: str, path: str) -> int:
        """Width of a bitfield member; 0 for an ordinary member."""
        return self._member(struct, path).bit_size

    def member_size(self, struct: str, path: str) -> int:
        return self._sizeof(self._member(struct, path).type)

    def member_type(self, struct: str, path: str) -> str:
        """The C spelling of the member's type (``struct list_head``, ``struct page *``)."""
        return self._spell(self._member(struct, path).type)

    def members(self, struct: str) -> list[str]:
        """Names of the members of ``struct``, those of anonymous structs and unions included."""
        out: list[str] = []

        def walk(idx: int) -> None:
            for name, _bit, mtype, _bits in self._types[idx].get("m", ()):
                if name:
                    out.append(name)
                elif self._types[self._resolve(mtype)]["k"] in ("struct", "union"):
                    walk(self._resolve(mtype))

        walk(self._struct(struct))
        return out

    def structs(self) -> list[str]:
        """Names of every complete struct, union and typedef recorded."""
        return sorted(self._names)

    @property
    def dropped(self) -> dict[str, str]:
        """Probe facts gcc rejected for this kernel, with its first error for each."""
        return dict(self._dropped)

    # -- internals -------------------------------------------------------------------------------

    @property
    def _where(self) -> str:
        return f"kernel headers of {self.release}"

    def _why(self, fact: str) -> str:
        reason = self._dropped.get(fact)
        return f" (gcc: {reason})" if reason else ""

    def _struct(self, name: str) -> int:
        bare = _TAG_PREFIX.sub("", name.strip())
        for key in (f"struct {bare}", f"union {bare}", bare):
            if key in self._names:
                return self._resolve(self._names[key])
        if f"struct {bare}" in self._declared or f"union {bare}" in self._declared:
            raise LayoutMissing(
                f"{self._where} declare {bare!r} but do not define it: its definition is in a .c "
                "file or a private header (mm/, kernel/) that header packages do not ship"
            )
        raise LayoutMissing(
            f"{self._where} have no struct, union or typedef {bare!r}{self._why(f'struct {bare}')}"
            f"{self._why(f'typedef {bare}')}"
        )

    def _resolve(self, idx: int) -> int:
        for _ in range(64):
            t = self._types[idx]
            if t["k"] != "typedef":
                return idx
            idx = t["t"]
        raise LayoutMissing(f"{self._where}: typedef cycle at {self._types[idx].get('name')!r}")

    def _sizeof(self, idx: int) -> int:
        t = self._types[self._resolve(idx)]
        k = t["k"]
        if k == "array":
            return int(t["n"]) * self._sizeof(t["t"])
        if k == "ptr":
            return 8
        if "decl" in t or "size" not in t:
            raise LayoutMissing(f"{self._where}: {self._spell(idx)} has no size here (declared, not defined)")
        return int(t["size"])

    def _find(self, idx: int, name: str) -> _Member | None:
        """Member ``name`` of an aggregate, looking through anonymous structs and unions."""
        for mname, bit, mtype, bits in self._types[idx].get("m", ()):
            if mname == name:
                return _Member(mtype, bit, bits)
            if not mname and self._types[self._resolve(mtype)]["k"] in ("struct", "union"):
                inner = self._find(self._resolve(mtype), name)
                if inner is not None:
                    return _Member(inner.type, bit + inner.bit_offset, inner.bit_size)
        return None

    def _member(self, struct: str, path: str) -> _Member:
        """The member at ``path`` (``"lru.next"``, ``"free_area[2].nr_free"``) of ``struct``."""
        idx = self._struct(struct)
        t = self._types[idx]
        if "decl" in t:
            raise LayoutMissing(f"{self._where} only declare {struct!r}")
        found = _Member(idx, 0, 0)
        for part in path.split("."):
            m = _PATH_PART.match(part)
            if m is None:
                raise ValueError(f"bad member path {path!r}")
            cur = self._resolve(found.type)
            inner = self._find(cur, m[1]) if self._types[cur]["k"] in ("struct", "union") else None
            if inner is None:
                raise LayoutMissing(f"{self._where}: {struct} has no member {path!r}")
            bit, mtype = found.bit_offset + inner.bit_offset, inner.type
            for index in re.findall(r"\[(\d+)\]", m[2]):
                arr = self._types[self._resolve(mtype)]
                if arr["k"] != "array":
                    raise LayoutMissing(f"{self._where}: {struct}.{path} is not an array at [{index}]")
                if int(index) >= arr["n"]:
                    raise LayoutMissing(f"{self._where}: {struct}.{path}: index {index} beyond {arr['n']} elements")
                bit += 8 * int(index) * self._sizeof(arr["t"])
                mtype = arr["t"]
            found = _Member(mtype, bit, inner.bit_size)
        return found

    def _spell(self, idx: int) -> str:
        t = self._types[idx]
        k = t["k"]
        if k in ("struct", "union", "enum"):
            return f"{k} {t['name'] or '(anon)'}"
        if k == "array":
            return f"{self._spell(t['t'])}[{t['n']}]"
        return t.get("name", k)


def _build(tree: HeaderTree, key: str, timings: dict[str, float]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="memvirt-probe-") as tmp:
        t0 = time.perf_counter()
        result = compile_probe(tree, Path(tmp))
        t1 = time.perf_counter()
        data = parse_probe_object(result.obj)
        t2 = time.perf_counter()
    if "struct page" not in data["names"]:
        reason = result.dropped.get("struct page") or result.dropped.get("header <linux/mm_types.h>") or "not emitted"
        raise ProbeCompileError(f"the layout probe found no struct page in {tree.describe}: {reason}")
    data["dropped"] = result.dropped
    data["meta"] = {
        "key": key,
        "format": FORMAT,
        "release": tree.release,
        "objtree": str(tree.objtree),
        "srctree": str(tree.srctree),
        "compiler": result.compiler,
        "rounds": result.rounds,
        "timings": {**timings, "compile": t1 - t0, "parse": t2 - t1},
    }
    return data


def _load(path: Path, key: str) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("meta", {}).get("key") != key:
        return None
    return data


def _store(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, separators=(",", ":")))
    os.replace(tmp, path)
