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
from memvirt.introspect.layout import Layout, LayoutMissing, TrackedLayout, VmcoreinfoLayout

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
                raise self._error from e
        return self._layout

    def __getattr__(self, name: str):
        return getattr(self._get(), name)

    def has_member(self, struct: str, path: str) -> bool:
        try:
            return self._get().has_member(struct, path)
        except LayoutMissing:
            return False


def _headers(kv: KernelView) -> LazyLayout:
    def build() -> Layout:
        from memvirt.introspect.headers import HeadersLayout

        if kv.vmcoreinfo.arch != "x86_64":
            # The probe is compiled by the host's gcc for x86-64 (headers/compile.py); an arm64
            # build needs the cross compiler and arm64's asm headers, not done yet.
            raise LayoutMissing(f"the headers probe builds for x86-64 only, {kv.release} is {kv.vmcoreinfo.arch}")
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
