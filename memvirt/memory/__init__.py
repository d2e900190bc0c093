"""Guest physical memory: one interface over running VMs' RAM and memory dumps."""

from memvirt.memory.open import open_memory
from memvirt.memory.source import PAGE_SIZE, GuestMemory, Region

__all__ = ["PAGE_SIZE", "GuestMemory", "Region", "open_memory"]
