"""What the suite ran, by guest kernel and capability: the data behind docs/support.md's matrix.

Every guest test that passes or fails records, for each guest it was given (a VM fixture, a
tuple of them, or the VMs ``vm_factory`` started), the guest's kernel release and architecture
and the capability the test exercises: its ``@pytest.mark.support("...")`` names, else its
module's (``CAPABILITY``). Records go to ``$MEMVIRT_SUPPORT_FILE`` (default
``$MEMVIRT_TEST_LOGS/support.json``) keyed by test id, so runs with other markers (``-m
kernels``) add to one file instead of counting a test twice. ``scripts/support_matrix.py``
renders it into the docs. Only outcomes are kept; a skipped test records nothing.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CAPABILITY = {
    "test_introspect": "introspection",
    "test_introspect_bootstrap": "introspection",
    "test_layout_headers": "introspection",
    "test_foreign_guests": "introspection",
    "test_arm64": "introspection",
    "test_dump_formats": "introspection",
    "test_dedup": "reclaim & KSM",
    "test_directed": "reclaim & KSM",
    "test_dirty": "dirty tracking",
    "test_migrate": "live migration",
    "test_compress": "compression",
    "test_clone": "cloning",
    "test_pm": "pm migration",
    "test_daemon": "daemon",
    "test_libvirt": "libvirt",
    "test_libvirt_migrate": "libvirt",
    "test_demo": "demo",
    "test_foundation": "boot & exec",
    "test_guest_programs": "boot & exec",
}
"""A module's capability, for tests that do not name theirs with ``@pytest.mark.support``."""


def support_file() -> Path:
    if path := os.environ.get("MEMVIRT_SUPPORT_FILE"):
        return Path(path)
    return Path(os.environ.get("MEMVIRT_TEST_LOGS", "/tmp/memvirt-test-logs")) / "support.json"


def guests_of(values: Iterable[Any], depth: int = 2) -> list[Any]:
    """The VMs among a test's fixture values: VMs, containers of them, and factories (``.vms``)."""
    from memvirt.qemu.vm import VM

    found: list[Any] = []
    for v in values:
        if isinstance(v, VM):
            found.append(v)
        elif depth and isinstance(v, (tuple, list)):
            found += guests_of(v, depth - 1)
        elif depth and isinstance(getattr(v, "vms", None), list):
            found += guests_of(v.vms, depth - 1)
    return found


def kernel_of(vm: Any) -> tuple[str, str] | None:
    """(release, arch) of a guest, or None when its config does not say (an attached QEMU)."""
    cfg = getattr(vm, "config", None)
    release = getattr(cfg, "kernel_release", "") or ""
    if not release:
        return None
    return release, str(getattr(cfg, "arch", "") or "amd64")


class Recorder:
    """Collects one session's outcomes and merges them into the support file at its end."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}

    def record(self, nodeid: str, module: str, marks: list[str], guests: list[Any], outcome: str) -> None:
        if not outcome:
            return
        caps = marks or ([CAPABILITY[module]] if module in CAPABILITY else [])
        kernels = sorted({k for vm in guests if (k := kernel_of(vm))})
        if not caps or not kernels:
            return
        prev = self.rows.get(nodeid)
        if prev and prev["outcome"] == "failed":
            outcome = "failed"  # a failed teardown after a passed call still fails the test
        self.rows[nodeid] = {
            "outcome": outcome,
            "capabilities": caps,
            "kernels": [list(k) for k in kernels],
            "when": time.strftime("%Y-%m-%d"),
        }

    def save(self, path: Path | None = None) -> Path | None:
        if not self.rows:
            return None
        path = path or support_file()
        try:
            old = json.loads(path.read_text()).get("tests", {})
        except (OSError, ValueError, AttributeError):
            old = {}
        old.update(self.rows)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"tests": old}, indent=1, sort_keys=True))
        tmp.replace(path)
        return path
