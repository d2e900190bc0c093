"""libvirt domains as memvirt VMs (``libvirt:NAME``).

Named ``virt`` so that ``import libvirt`` everywhere means the binding, never this package.
"""
