"""Introspection: the guest kernel's view of every page, read from raw guest memory.

>>> from memvirt.introspect import Introspector
>>> from memvirt.qemu.vm import vm_memory
>>> with vm_memory(vm) as mem:
...     intro = Introspector(mem)          # bootstrap: VMCOREINFO, page tables, kallsyms, BTF
...     census = intro.scan()              # per-page classes (numpy) and counts
"""

from __future__ import annotations

import time
from typing import Any

from memvirt.introspect import buildcache
from memvirt.introspect.census import CLASSES, CODE, Census, PageScanner
from memvirt.introspect.kernel import KernelView
from memvirt.introspect.layout import LayoutMissing
from memvirt.introspect.sources import CHOICES, TrackedLayout, choose_layout
from memvirt.memory.source import GuestMemory

__all__ = ["CHOICES", "CLASSES", "CODE", "Census", "Introspector"]


class Introspector:
    """Bootstraps once from a memory source, then classifies every page on each :meth:`scan`.

    With ``cache`` (the default) a kernel build already seen bootstraps from the build-id cache
    (:mod:`memvirt.introspect.buildcache`) without decoding kallsyms or BTF; ``shelf`` is where
    that cache is (anything with its ``load`` and ``store``: the folder by default, a
    :class:`~memvirt.introspect.buildcache.Shelf` to share bootstraps within one process).
    """

    def __init__(
        self,
        mem: GuestMemory,
        layouts: str = "auto",
        hint_gpa: int | None = None,
        cache: bool = True,
        shelf: Any = buildcache,
        any_page_size: bool = False,
    ):
        t0 = time.perf_counter()
        self.layouts = layouts
        self.cached = False
        self._shelf = shelf
        self._to_store: buildcache.RecordingSymbols | None = None
        if cache:
            hit: dict[str, Any] = {}

            def from_cache(info, read_va):
                found = shelf.load(info, layouts, read_va)
                if found is not None:
                    hit["layout"] = found[1]
                    return found[0]
                return None

            self.kernel = KernelView.open(mem, hint_gpa=hint_gpa, cached_symbols=from_cache)
            if "layout" in hit:
                try:
                    self.layout = TrackedLayout(hit["layout"])
                    self.scanner = PageScanner(self.kernel, self.layout, any_page_size)
                    self.cached = True
                except LayoutMissing:
                    self.kernel = KernelView.open(mem, hint_gpa=hint_gpa)
        else:
            self.kernel = KernelView.open(mem, hint_gpa=hint_gpa)
        if not self.cached:
            if cache and self.kernel.symbols is not None:
                self._to_store = buildcache.RecordingSymbols(self.kernel.symbols)
                self.kernel.symbols = self._to_store
            self.layout = choose_layout(self.kernel, layouts)
            self.scanner = PageScanner(self.kernel, self.layout, any_page_size)
        self.bootstrap_seconds = time.perf_counter() - t0

    @property
    def release(self) -> str:
        return self.kernel.release

    def layout_sources(self) -> dict[str, int]:
        """How many layout facts each source gave (``cache`` means: as a previous census found)."""
        if self.cached:
            counts: dict[str, int] = {}
            cached = self.layout.layouts[0]
            assert isinstance(cached, buildcache.CachedLayout)
            for src in cached.sources.values():
                counts[src] = counts.get(src, 0) + 1
            return {f"{k} (cached)": v for k, v in counts.items()}
        return self.layout.summary()

    def scan(self, live: bool = False, content: bool = False) -> Census:
        """Classify every page frame. ``live`` for a running guest (racy: problems become
        warnings); ``content`` also finds all-zero pages (reads all of RAM)."""
        if live:
            self.kernel.flush()
        census = self.scanner.scan(live=live, content=content)
        census.timings["bootstrap"] = self.bootstrap_seconds
        if self._to_store is not None:
            self._shelf.store(
                self.kernel.vmcoreinfo,
                self.layouts,
                self.kernel.read_va,
                self._to_store,
                dict(self.layout.values),
                dict(self.layout.provenance),
            )
            self._to_store = None
        return census
