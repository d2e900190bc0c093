"""The ``memvirt`` command line: a thin layer over the library."""
