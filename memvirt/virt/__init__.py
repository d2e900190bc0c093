"""libvirt domains as memvirt VMs (``libvirt:NAME``).

Named ``virt`` so that ``import libvirt`` everywhere means the binding, never this package.
"""

from __future__ import annotations

from memvirt.qemu import vm as _vm


def set_uri(uri: str | None) -> None:
    """The connection every ``libvirt:NAME`` uses from now on (``memvirt --connect URI``)."""
    from memvirt.virt.domain import set_uri as _set

    _set(uri)


def _load(spec: str) -> _vm.VM:
    from memvirt.virt.domain import load  # the binding is imported only when a domain is named

    return load(spec)


_vm.LOADERS["libvirt"] = _load
