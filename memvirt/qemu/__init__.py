"""QEMU control: accelerator choice, the QMP monitor, the guest command channel, VM lifecycle."""
