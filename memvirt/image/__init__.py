"""Guest images: a Debian (or user) kernel plus a busybox initramfs with memvirt's guest init."""
