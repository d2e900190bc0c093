"""Migrate a libvirt domain with libvirt, after discarding the guest's free pages, so QEMU sends them as zero pages.

A wrapper, not a libvirt ``qemu`` hook: the hook runs with libvirt's locks held and must not call
back into libvirt, while reclaim pauses the guest through libvirt (suspend/resume) and keeps
going while the copy runs. The move itself is libvirt's (``virDomainMigrateToURI3``, peer to
peer): memvirt only makes it smaller, and reads libvirt's job statistics for the report.

Pages discarded during the copy are safe: each is re-verified free while the guest is paused and
discarded before it resumes. A page QEMU has not sent yet then reads as zeros (a zero page on the
wire); one already sent keeps its old bytes on the destination, which the guest holds free and
rewrites before use, and that write marks it dirty as any other.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import libvirt

from memvirt.errors import UsageError, VMError
from memvirt.virt.domain import LibvirtVM, _message, connect

DURING_INTERVAL = 1.0
"""Seconds between reclaim passes while libvirt copies: each pass pauses the guest briefly."""


@dataclass
class MigrationReport:
    domain: str
    dest: str
    reclaimed_before: int = 0
    reclaimed_during: int = 0
    passes_during: int = 0
    reclaim_ms: int = 0
    """Wall time of the reclaim before libvirt starts (the guest runs, paused in short batches)."""
    wall_ms: int = 0
    """Wall time of the whole command: reclaim, libvirt's job and the statistics."""
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        """What QEMU put on the wire (libvirt's ``data_processed``)."""
        return int(self.stats.get("data_processed", self.stats.get("memory_processed", 0)))

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "dest": self.dest,
            "reclaimed_before": self.reclaimed_before,
            "reclaimed_during": self.reclaimed_during,
            "passes_during": self.passes_during,
            "bytes": self.bytes,
            "reclaim_ms": self.reclaim_ms,
            "wall_ms": self.wall_ms,
            "total_ms": int(self.stats.get("time_elapsed", 0)),
            "downtime_ms": int(self.stats.get("downtime", 0)),
            "zero_pages": int(self.stats.get("memory_constant", 0)),
            "normal_pages": int(self.stats.get("memory_normal", 0)),
            "iterations": int(self.stats.get("memory_iteration", 0)),
            "job_stats": self.stats,
        }


def default_migrate_uri(dest: str) -> str | None:
    """``tcp://HOST`` of the destination libvirt URI: without it, QEMU connects to the host name
    the destination libvirtd reports, which a second daemon on this host does not resolve to."""
    host = urlparse(dest).hostname
    return f"tcp://{host}" if host else None


def migrate(
    vm: LibvirtVM,
    dest: str,
    *,
    live: bool = True,
    reclaimer: Callable[[LibvirtVM], Any] | None = None,
    during: bool = True,
    migrate_uri: str | None = None,
    dest_xml: str | None = None,
) -> MigrationReport:
    """Reclaim, migrate ``vm`` to libvirt at ``dest`` peer to peer, and return libvirt's job stats.

    On failure libvirt leaves the domain running at the source; the error is one line."""
    began = time.monotonic()
    vm.require_alive()
    if vm.status() != "running":
        raise UsageError(f"libvirt domain {vm.name!r} is {vm.status()}: migrate moves a running domain")
    connect(dest).close()  # a destination that refuses: one line, before any pause
    report = MigrationReport(domain=vm.name, dest=dest)
    rec = None
    if reclaimer is not None:  # dedup's Reclaimer, passed in: dedup already imports virt (its watchdog)
        rec = reclaimer(vm)
        t = time.monotonic()
        report.reclaimed_before = rec.run().reclaimed_bytes
        report.reclaim_ms = round((time.monotonic() - t) * 1000)
    params: dict[str, Any] = {}
    if migrate_uri := migrate_uri or default_migrate_uri(dest):
        params[libvirt.VIR_MIGRATE_PARAM_URI] = migrate_uri
    if dest_xml:
        params[libvirt.VIR_MIGRATE_PARAM_DEST_XML] = dest_xml
    flags = libvirt.VIR_MIGRATE_PEER2PEER | (libvirt.VIR_MIGRATE_LIVE if live else 0)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            vm.dom.migrateToURI3(dest, params, flags)
        except libvirt.libvirtError as e:
            failure.append(e)

    job = threading.Thread(target=run, name=f"migrate-{vm.name}", daemon=True)
    try:
        job.start()
        while job.is_alive():
            job.join(DURING_INTERVAL)
            if rec is not None and during and job.is_alive() and _copying(vm):
                try:
                    report.reclaimed_during += rec.run().reclaimed_bytes
                    report.passes_during += 1
                except VMError:
                    break  # the domain left this host between two checks: the copy is done
        job.join()
    finally:
        if rec is not None:
            rec.close()
    if failure:
        e = failure[0]
        raise VMError(f"libvirt could not migrate {vm.name!r} to {dest}: {_message(e)}")
    report.stats = _completed_stats(vm, dest)
    report.wall_ms = round((time.monotonic() - began) * 1000)
    return report


def _copying(vm: LibvirtVM) -> bool:
    """True while the migration job copies RAM and the guest runs (not in the final stop-and-copy)."""
    try:
        info = vm.dom.jobStats()
        state, _ = vm.dom.state()
    except libvirt.libvirtError:
        return False
    return info.get("type") == libvirt.VIR_DOMAIN_JOB_UNBOUNDED and state == libvirt.VIR_DOMAIN_RUNNING


def _completed_stats(vm: LibvirtVM, dest: str) -> dict[str, Any]:
    """libvirt's statistics of the completed job: the source's, else the destination's."""
    try:
        stats = vm.dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        if stats.get("data_processed") or stats.get("memory_processed"):
            return dict(stats)
    except libvirt.libvirtError:
        pass
    conn = connect(dest)
    try:
        return dict(conn.lookupByName(vm.name).jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED))
    except libvirt.libvirtError as e:
        raise VMError(f"migrated {vm.name!r}, but libvirt at {dest} has no job statistics: {_message(e)}") from e
    finally:
        conn.close()


def wait_gone(vm: LibvirtVM, timeout: float = 30.0) -> None:
    """Until the source QEMU of a migrated domain has exited."""
    deadline = time.monotonic() + timeout
    while vm.alive() and time.monotonic() < deadline:
        time.sleep(0.2)
