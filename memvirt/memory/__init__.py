"""Guest physical memory: one interface over running VMs' RAM and memory dumps.

:func:`memvirt.qemu.vm.vm_memory` opens a memvirt VM's memory with these readers, and
:func:`memvirt.targets.open_memory` opens whatever a user names; both live above this package,
which imports nothing of memvirt's but its base modules (errors, paths, units).
"""

from memvirt.memory.source import PAGE_SIZE, GuestMemory, Region

__all__ = ["PAGE_SIZE", "GuestMemory", "Region"]
