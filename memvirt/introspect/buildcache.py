"""What one kernel build needs, remembered by its build id, so a new process skips the decoding.

A bootstrap decodes kallsyms (~100k symbols) and BTF (~100k types) to learn a few dozen facts.
Those facts are fixed for a kernel build: symbol addresses move only by the boot's KASLR offset
(which VMCOREINFO gives), and layouts not at all. After a first census the symbols and layout
facts it used are written to ``cache_home()/introspect/<build-id>.json``; later bootstraps of
the same build load them instead. A fact the cache lacks makes the caller bootstrap in full.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from memvirt.introspect.layout import KeyedLayout, LayoutMissing
from memvirt.introspect.vmcoreinfo import Vmcoreinfo
from memvirt.paths import cache_home

VERSION = 1
BOOT_SYMBOLS = ("page_offset_base", "vmemmap_base", "__start_BTF", "__stop_BTF", "_stext", "init_top_pgt")
"""Symbols the bootstrap itself looks up, before anything could record them."""


def _path(build_id: str) -> Path:
    return cache_home() / "introspect" / f"{build_id}.json"


class RecordingSymbols:
    """Wraps kallsyms and remembers every name asked for (present or not)."""

    def __init__(self, symbols: Any):
        self._symbols = symbols
        self.asked: set[str] = set(BOOT_SYMBOLS)

    def get(self, name: str, default: int | None = None) -> int | None:
        self.asked.add(name)
        return self._symbols.get(name, default)

    def __contains__(self, name: object) -> bool:
        self.asked.add(str(name))
        return name in self._symbols

    def __getitem__(self, name: str) -> int:
        self.asked.add(name)
        return self._symbols[name]

    def __len__(self) -> int:
        return len(self._symbols)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._symbols, name)


class CachedSymbols:
    """Symbol addresses of a build, relocated by this boot's KASLR offset; absent names stay absent."""

    def __init__(self, relative: dict[str, int | None], kaslr: int):
        self._addr = {k: None if v is None else v + kaslr for k, v in relative.items()}

    def get(self, name: str, default: int | None = None) -> int | None:
        v = self._addr.get(name)
        return default if v is None else v

    def __contains__(self, name: object) -> bool:
        return self._addr.get(str(name)) is not None

    def __getitem__(self, name: str) -> int:
        v = self._addr.get(name)
        if v is None:
            raise KeyError(name)
        return v

    def __len__(self) -> int:
        return len(self._addr)


class CachedLayout(KeyedLayout):
    """Layout facts remembered from a previous census of the same build and ``--layouts`` choice."""

    source = "cache"

    def __init__(self, facts: dict[str, int], sources: dict[str, str]):
        self.facts = facts
        self.sources = sources

    def _get(self, key: str) -> int:
        if key not in self.facts:
            raise LayoutMissing(f"the build-id cache lacks {key}")
        return self.facts[key]

    def constant(self, name: str) -> int:
        return self._get(f"CONST({name})")

    def has_member(self, struct: str, path: str) -> bool:
        return f"OFFSET({struct}.{path})" in self.facts


def load(info: Vmcoreinfo, choice: str) -> tuple[CachedSymbols, CachedLayout] | None:
    """The cached symbols and layout for this build and layout choice, if a census stored them."""
    if not info.build_id:
        return None
    try:
        entry = json.loads(_path(info.build_id).read_text())
    except (FileNotFoundError, ValueError):
        return None
    if entry.get("version") != VERSION or entry.get("release") != info.osrelease or choice not in entry["layouts"]:
        return None
    layout = entry["layouts"][choice]
    return CachedSymbols(entry["symbols"], info.kerneloffset), CachedLayout(layout["facts"], layout["sources"])


def store(info: Vmcoreinfo, choice: str, symbols: RecordingSymbols, values: dict[str, int],
          sources: dict[str, str]) -> None:
    """Remember what a census of this build used (symbols relative to the boot's KASLR offset)."""
    if not info.build_id:
        return
    path = _path(info.build_id)
    try:
        entry = json.loads(path.read_text())
        if entry.get("version") != VERSION:
            raise ValueError
    except (FileNotFoundError, ValueError):
        entry = {"version": VERSION, "release": info.osrelease, "symbols": {}, "layouts": {}}
    kaslr = info.kerneloffset
    for name in sorted(symbols.asked):
        addr = symbols._symbols.get(name)
        if addr is None and info.has_symbol(name):
            addr = info.symbol(name)
        entry["symbols"][name] = None if addr is None else addr - kaslr
    entry["layouts"][choice] = {"facts": values, "sources": sources}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(entry, indent=1, sort_keys=True))
    tmp.replace(path)
