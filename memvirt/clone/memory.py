"""A lazy clone's RAM reader lives in :mod:`memvirt.memory.clonemem`, beside the other readers
(``VM.memory()`` in :mod:`memvirt.qemu` needs it, and qemu/ does not import clone/); this name
stays for the code that imports it from here."""

from memvirt.memory.clonemem import CloneMemory, find_cow_mapping, mapping_usage, process_private

__all__ = ["CloneMemory", "find_cow_mapping", "mapping_usage", "process_private"]
