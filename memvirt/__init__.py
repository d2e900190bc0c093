"""memvirt: manage the memory of Linux QEMU/KVM guests from the host."""

__version__ = "0.1.0"
