"""Choosing where layout facts come from, and remembering which source gave each one.

``--layouts`` names the primary source. VMCOREINFO is a deliberately small export, so with
``vmcoreinfo`` the facts it lacks (``struct per_cpu_pages``, ``PG_reserved`` ...) come from the
kernel's own headers, the dissertation's "use the guest kernel source when it exists". BTF
describes every type but no macros, so ``btf`` takes macros (``PG_table`` before 6.12) from the
headers when it needs them. ``headers`` uses the headers alone. ``auto`` asks VMCOREINFO, then
BTF, then the headers (downloaded only when the first two lack a fact).
"""

from __future__ import annotations

from collections.abc import Callable

from memvirt.introspect.kernel import KernelView
from memvirt.introspect.layout import Layout, LayoutMissing, VmcoreinfoLayout

CHOICES: tuple[str, ...] = ("auto", "vmcoreinfo", "btf", "headers")


class LazyLayout:
    """A layout built on first use, so ``auto`` downloads headers only if a fact needs them."""

    def __init__(self, source: str, build: Callable[[], Layout]):
        self.source = source
        self._build = build
        self._layout: Layout | None = None
        self._error: LayoutMissing | None = None

    def _get(self) -> Layout:
        if self._error is not None:
            raise self._error
        if self._layout is None:
            try:
                self._layout = self._build()
            except LayoutMissing as e:
                self._error = e
                raise
            except Exception as e:
                self._error = LayoutMissing(f"kernel headers unavailable: {e}")
                raise self._error from None
        return self._layout

    def __getattr__(self, name: str):
        return getattr(self._get(), name)

    def has_member(self, struct: str, path: str) -> bool:
        try:
            return self._get().has_member(struct, path)
        except LayoutMissing:
            return False


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


def _headers(kv: KernelView) -> LazyLayout:
    def build() -> Layout:
        from memvirt.introspect.headers import HeadersLayout

        return HeadersLayout.for_release(kv.release)

    return LazyLayout("headers", build)


def _btf(kv: KernelView) -> Layout:
    from memvirt.introspect.btf import BtfLayout

    if kv.btf is None:
        raise LayoutMissing(f"kernel {kv.release} carries no usable BTF: {kv.notes.get('btf', 'not found')}")
    return BtfLayout(kv.btf)


def choose_layout(kv: KernelView, choice: str = "auto") -> TrackedLayout:
    """The layout for ``--layouts choice`` (see the module docstring)."""
    if choice == "vmcoreinfo":
        return TrackedLayout(VmcoreinfoLayout(kv.vmcoreinfo), _headers(kv))
    if choice == "btf":
        return TrackedLayout(_btf(kv), _headers(kv))
    if choice == "headers":
        return TrackedLayout(_headers(kv))
    if choice == "auto":
        chain: list[Layout] = [VmcoreinfoLayout(kv.vmcoreinfo)]
        if kv.btf is not None:
            chain.append(_btf(kv))
        chain.append(_headers(kv))
        return TrackedLayout(*chain)
    raise ValueError(f"unknown layout source {choice!r}: choose one of {', '.join(CHOICES)}")
