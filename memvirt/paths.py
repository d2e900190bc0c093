"""Where memvirt keeps state (per-VM directories) and caches (kernels, images)."""

from __future__ import annotations

import os
from pathlib import Path


def state_home() -> Path:
    """Root of per-VM state: ``$MEMVIRT_HOME`` or ``~/.local/state/memvirt``."""
    env = os.environ.get("MEMVIRT_HOME")
    root = Path(env) if env else Path.home() / ".local" / "state" / "memvirt"
    root.mkdir(parents=True, exist_ok=True)
    return root


def cache_home() -> Path:
    """Downloaded kernels and built images: ``$MEMVIRT_CACHE`` or ``~/.cache/memvirt``."""
    env = os.environ.get("MEMVIRT_CACHE")
    root = Path(env) if env else Path.home() / ".cache" / "memvirt"
    root.mkdir(parents=True, exist_ok=True)
    return root


def ram_dir() -> Path:
    """Where shared RAM files live: ``$MEMVIRT_RAM_DIR`` or a memvirt folder on /dev/shm.

    RAM files belong on tmpfs: a disk-backed file would make every guest write a page-cache
    write-back.
    """
    env = os.environ.get("MEMVIRT_RAM_DIR")
    if env:
        root = Path(env)
    elif Path("/dev/shm").is_dir():
        root = Path("/dev/shm") / f"memvirt-{os.getuid()}"
    else:
        root = state_home() / "ram"
    root.mkdir(parents=True, exist_ok=True)
    return root
