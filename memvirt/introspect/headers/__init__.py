"""Layout facts from the guest kernel's own source headers, for kernels without BTF.

A small C probe that names the types and constants memvirt needs is compiled by the host gcc
against the kernel's headers, with the kernel's own configuration (``autoconf.h`` through
``kconfig.h``) and the front-end flags kbuild uses (the set ``make M=dir V=1`` prints, minus
code generation and warning options, which cannot change a layout). The compiler then does the
layout work; its DWARF (pyelftools) gives struct sizes, member offsets, array lengths and enum
values, and each probed macro's value is read from the object's ``.rodata``.

One probe serves every kernel version: each fact sits on its own lines, and where gcc rejects a
fact (``PG_table`` is a macro in 6.1 and gone in 6.12, ``MAX_PHYSMEM_BITS`` is a run-time value
with 5-level paging) those lines are dropped and the probe recompiled. What was dropped, with
gcc's reason, is kept so that a missing fact's :class:`LayoutMissing` says why.

Debian's headers come in two packages: ``linux-headers-<release>`` (generated headers and
``.config``) and the ``-common`` package with the source headers it includes. Both are fetched
with ``apt-get download`` and unpacked with ``dpkg-deb -x`` into the cache, never installed.
Private headers under ``mm/`` and ``kernel/`` are not shipped: ``struct kmem_cache`` (in
``mm/slab.h`` since v6.8) and the printk ring buffer are only found in a full source tree given
to :meth:`HeadersLayout.from_tree`.
"""

from __future__ import annotations

from memvirt.errors import HeadersError, HeadersNotFound, ProbeCompileError
from memvirt.introspect.headers.base import FORMAT
from memvirt.introspect.headers.compile import ProbeResult, blame_errors, compile_probe, find_compiler, kernel_cflags
from memvirt.introspect.headers.dwarf import parse_probe_object
from memvirt.introspect.headers.layout import HeadersLayout
from memvirt.introspect.headers.probe import (
    CONSTANTS,
    ENUMS,
    STRUCTS,
    TYPEDEFS,
    Unit,
    probe_key,
    probe_units,
    render_probe,
)
from memvirt.introspect.headers.trees import HeaderTree, debian_header_packages, debian_tree, open_tree

__all__ = [
    "CONSTANTS",
    "ENUMS",
    "FORMAT",
    "HeaderTree",
    "HeadersError",
    "HeadersLayout",
    "HeadersNotFound",
    "ProbeCompileError",
    "ProbeResult",
    "STRUCTS",
    "TYPEDEFS",
    "Unit",
    "blame_errors",
    "compile_probe",
    "debian_header_packages",
    "debian_tree",
    "find_compiler",
    "kernel_cflags",
    "open_tree",
    "parse_probe_object",
    "probe_key",
    "probe_units",
    "render_probe",
]
