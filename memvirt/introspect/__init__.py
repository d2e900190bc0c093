"""Introspection: the guest kernel's view of every page, read from raw guest memory.

>>> from memvirt.introspect import Introspector
>>> with vm.memory() as mem:
...     intro = Introspector(mem)          # bootstrap: VMCOREINFO, page tables, kallsyms, BTF
...     census = intro.scan()              # per-page classes (numpy) and counts
"""

from __future__ import annotations

import time

from memvirt.introspect.census import CLASSES, CODE, Census, PageScanner
from memvirt.introspect.kernel import KernelView
from memvirt.introspect.sources import CHOICES, choose_layout
from memvirt.memory.source import GuestMemory

__all__ = ["CHOICES", "CLASSES", "CODE", "Census", "Introspector"]


class Introspector:
    """Bootstraps once from a memory source, then classifies every page on each :meth:`scan`."""

    def __init__(self, mem: GuestMemory, layouts: str = "auto", hint_gpa: int | None = None):
        t0 = time.perf_counter()
        self.kernel = KernelView.open(mem, hint_gpa=hint_gpa)
        self.layout = choose_layout(self.kernel, layouts)
        self.scanner = PageScanner(self.kernel, self.layout)
        self.bootstrap_seconds = time.perf_counter() - t0

    @property
    def release(self) -> str:
        return self.kernel.release

    def scan(self, live: bool = False, content: bool = False) -> Census:
        """Classify every page frame. ``live`` for a running guest (racy: problems become
        warnings); ``content`` also finds all-zero pages (reads all of RAM)."""
        if live:
            self.kernel.flush()
        census = self.scanner.scan(live=live, content=content)
        census.timings["bootstrap"] = self.bootstrap_seconds
        return census
