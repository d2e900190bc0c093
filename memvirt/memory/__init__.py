"""Guest physical memory: one interface over running VMs' RAM and memory dumps.

:func:`memvirt.memory.open.open_memory` opens what a user names; it sits above the readers here,
the VM registry (``qemu/``) and the guest kernel's word on its RAM map (``introspect/``), so it
is imported from its module, not re-exported here (that kept ``qemu/`` from importing this package).
"""

from memvirt.memory.source import PAGE_SIZE, GuestMemory, Region

__all__ = ["PAGE_SIZE", "GuestMemory", "Region"]
