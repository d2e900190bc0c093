"""Where struct layout facts come from: one small protocol, several sources.

Every layout fact memvirt uses (a struct's size, a member's offset, an array's length, an enum
value) is asked of a :class:`Layout`. Implementations: :class:`VmcoreinfoLayout` (only what the
kernel exports in VMCOREINFO), ``BtfLayout`` (``memvirt.introspect.btf``: every type the kernel
carries in BTF) and :class:`TrackedLayout` (the first source that knows, remembering which
answered each fact). A fact no source has is
a :class:`LayoutMissing` error naming it, never a guess.

Facts can also be named with VMCOREINFO's own vocabulary (``SIZE(page)``, ``OFFSET(page.lru)``,
``LENGTH(zone.free_area)``, ``NUMBER(PG_slab)``) through :func:`layout_fact`, whatever the source.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from memvirt.errors import LayoutMissing
from memvirt.introspect.vmcoreinfo import Vmcoreinfo


@runtime_checkable
class Layout(Protocol):
    """Answers layout questions about the guest kernel's types; sizes and offsets in bytes.

    ``path`` is a member path such as ``"lru.next"`` or ``"free_area[2].nr_free"``: anonymous
    structs and unions are looked through, as C does.
    """

    source: str

    def struct_size(self, name: str) -> int: ...

    def member_offset(self, struct: str, path: str) -> int: ...

    def array_length(self, struct: str, path: str) -> int: ...

    def enum_value(self, enum: str, name: str) -> int: ...

    def has_member(self, struct: str, path: str) -> bool: ...


class KeyedLayout:
    """A layout answered by looking facts up under VMCOREINFO-style keys (``SIZE(page)``,
    ``OFFSET(page.lru)``, ``LENGTH(zone.free_area)``); subclasses say how enumerators are keyed."""

    enum_key = "ENUM({enum}.{name})"

    def _get(self, key: str) -> int:
        raise NotImplementedError

    def struct_size(self, name: str) -> int:
        return self._get(f"SIZE({name})")

    def member_offset(self, struct: str, path: str) -> int:
        return self._get(f"OFFSET({struct}.{path})")

    def array_length(self, struct: str, path: str) -> int:
        return self._get(f"LENGTH({struct}.{path})")

    def enum_value(self, enum: str, name: str) -> int:
        return self._get(self.enum_key.format(enum=enum, name=name))


class VmcoreinfoLayout(KeyedLayout):
    """Only what VMCOREINFO carries: ``SIZE()``, ``OFFSET()``, ``LENGTH()`` and ``NUMBER()``.

    ``enum_value`` answers from ``NUMBER(name)`` (VMCOREINFO exports enumerators such as
    ``PG_lru`` or ``NR_FREE_PAGES`` that way, without their enum's name).
    """

    source = "vmcoreinfo"
    enum_key = "NUMBER({name})"

    def __init__(self, info: Vmcoreinfo):
        self.info = info

    def _get(self, key: str) -> int:
        if key not in self.info:
            raise LayoutMissing(
                f"VMCOREINFO lacks {key}: kernel {self.info.entries.get('OSRELEASE', '?')} does not export it"
            )
        return self.info.integer(key, 0 if key.startswith("NUMBER(") else 10)

    def has_member(self, struct: str, path: str) -> bool:
        return f"OFFSET({struct}.{path})" in self.info


class TrackedLayout:
    """Asks sources in order and records which one answered each fact (``provenance``)."""

    def __init__(self, *layouts: Layout):
        self.layouts = layouts
        self.source = "+".join(x.source for x in layouts)
        self.provenance: dict[str, str] = {}
        self.values: dict[str, int] = {}

    def _first(self, fact: str, method: str, *args: str) -> int:
        errors = []
        for layout in self.layouts:
            try:
                fn = getattr(layout, method, None)
                if fn is None:
                    continue
                value = fn(*args)
            except LayoutMissing as e:
                errors.append(str(e))
                continue
            self.provenance[fact] = layout.source
            self.values[fact] = value
            return value
        raise LayoutMissing(f"no layout source knows {fact}: " + "; ".join(errors))

    def struct_size(self, name: str) -> int:
        return self._first(f"SIZE({name})", "struct_size", name)

    def member_offset(self, struct: str, path: str) -> int:
        return self._first(f"OFFSET({struct}.{path})", "member_offset", struct, path)

    def array_length(self, struct: str, path: str) -> int:
        return self._first(f"LENGTH({struct}.{path})", "array_length", struct, path)

    def enum_value(self, enum: str, name: str) -> int:
        return self._first(f"ENUM({enum}.{name})", "enum_value", enum, name)

    def constant(self, name: str) -> int:
        return self._first(f"CONST({name})", "constant", name)

    def has_member(self, struct: str, path: str) -> bool:
        return any(x.has_member(struct, path) for x in self.layouts)

    def summary(self) -> dict[str, int]:
        """How many facts each source supplied."""
        out: dict[str, int] = {}
        for src in self.provenance.values():
            out[src] = out.get(src, 0) + 1
        return out


_FACT = re.compile(r"^(SIZE|OFFSET|LENGTH|NUMBER|ENUM)\(([A-Za-z0-9_]+)(?:\.([A-Za-z0-9_.\[\]]+))?\)$")

# What a page scanner reads: struct page, the buddy allocator's zone/free_area, and the page
# flag and page-type numbers. Which of them exist depends on the kernel (6.12 has no PG_slab
# but PAGE_SLAB_MAPCOUNT_VALUE): ask with ``required=False`` and check what came back.
MM_FACTS = (
    "SIZE(page)",
    "OFFSET(page.flags)",
    "OFFSET(page._refcount)",
    "OFFSET(page._mapcount)",
    "OFFSET(page.private)",
    "OFFSET(page.lru)",
    "OFFSET(page.mapping)",
    "OFFSET(page.compound_head)",
    "SIZE(pglist_data)",
    "OFFSET(pglist_data.node_zones)",
    "OFFSET(pglist_data.nr_zones)",
    "OFFSET(pglist_data.node_start_pfn)",
    "OFFSET(pglist_data.node_spanned_pages)",
    "SIZE(zone)",
    "OFFSET(zone.free_area)",
    "OFFSET(zone.spanned_pages)",
    "OFFSET(zone.vm_stat)",
    "LENGTH(zone.free_area)",
    "SIZE(free_area)",
    "OFFSET(free_area.free_list)",
    "OFFSET(free_area.nr_free)",
    "LENGTH(free_area.free_list)",
    "NUMBER(PG_lru)",
    "NUMBER(PG_private)",
    "NUMBER(PG_swapcache)",
    "NUMBER(PG_swapbacked)",
    "NUMBER(PG_slab)",
    "NUMBER(PG_head_mask)",
    "NUMBER(PAGE_BUDDY_MAPCOUNT_VALUE)",
    "NUMBER(PAGE_SLAB_MAPCOUNT_VALUE)",
    "NUMBER(PAGE_OFFLINE_MAPCOUNT_VALUE)",
    "NUMBER(NR_FREE_PAGES)",
)


def layout_fact(layout: Layout, key: str) -> int:
    """One fact by its VMCOREINFO-style key.

    ``SIZE(s)``, ``OFFSET(s.path)``, ``LENGTH(s.path)``, ``NUMBER(x)`` (an enumerator of any
    enum, or VMCOREINFO's number) and ``ENUM(e.x)`` (enumerator ``x`` of enum ``e``).
    """
    m = _FACT.match(key)
    if m is None or (m[1] in ("OFFSET", "LENGTH", "ENUM")) != (m[3] is not None):
        raise ValueError(f"not a layout fact key: {key!r}")
    kind, name, path = m[1], m[2], m[3]
    if kind == "SIZE":
        return layout.struct_size(name)
    if kind == "OFFSET":
        return layout.member_offset(name, path)
    if kind == "LENGTH":
        return layout.array_length(name, path)
    if kind == "ENUM":
        return layout.enum_value(name, path)
    return layout.enum_value("", name)


def layout_facts(layout: Layout, keys: Iterable[str] = MM_FACTS, required: bool = True) -> dict[str, int]:
    """``{key: value}`` for ``keys``; with ``required=False`` missing facts are left out."""
    out: dict[str, int] = {}
    for key in keys:
        try:
            out[key] = layout_fact(layout, key)
        except LayoutMissing:
            if required:
                raise
    return out
