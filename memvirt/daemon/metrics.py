"""Prometheus metrics (``prometheus-client``), served on a local address (loopback by default).

Per VM (label ``vm``): RAM, guest-free (introspected), reclaimed, resident, swapped, working
set, cap, refaults, pause-time histogram, KSM merging. Per host: MemAvailable, zram totals,
KSM saving, ksmd CPU, and the daemon's own CPU and RSS. A dropped VM's series are removed.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from memvirt.errors import UsageError

PAUSE_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def parse_addr(text: str) -> tuple[str, int]:
    """``127.0.0.1:9187`` or ``[::1]:9187`` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--metrics takes ADDR:PORT such as 127.0.0.1:9187, not {text!r}")
    return host, int(port)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        vm = ["vm"]
        self.ram = Gauge("memvirt_vm_ram_bytes", "Guest RAM size", vm, registry=r)
        self.guest_free = Gauge(
            "memvirt_vm_guest_free_bytes", "Memory the guest kernel holds free (introspected)", vm, registry=r
        )
        self.reclaimed = Counter(
            "memvirt_vm_reclaimed_bytes", "Host memory given back by free-page reclaim", vm, registry=r
        )
        self.resident = Gauge("memvirt_vm_resident_bytes", "Host memory the guest's RAM holds", vm, registry=r)
        self.swapped = Gauge("memvirt_vm_swapped_bytes", "Guest RAM in host swap (zram first)", vm, registry=r)
        self.working_set = Gauge("memvirt_vm_working_set_bytes", "Working-set estimate", vm, registry=r)
        self.cap = Gauge("memvirt_vm_cap_bytes", "Memory cap the compression policy set (0: none)", vm, registry=r)
        self.refaulted = Counter("memvirt_vm_refaulted_bytes", "Guest memory faulted back from swap", vm, registry=r)
        self.pause = Histogram(
            "memvirt_vm_pause_seconds", "Guest pauses made by reclaim", vm, buckets=PAUSE_BUCKETS, registry=r
        )
        self.ksm_merging = Gauge("memvirt_vm_ksm_merging_bytes", "Guest RAM merged by KSM", vm, registry=r)
        self.policy_errors = Counter(
            "memvirt_vm_policy_errors", "Failed policy steps (retried later)", ["vm", "policy"], registry=r
        )
        self.mem_available = Gauge("memvirt_host_mem_available_bytes", "Host MemAvailable", registry=r)
        self.zram_orig = Gauge("memvirt_host_zram_original_bytes", "Data held by all zram devices", registry=r)
        self.zram_compr = Gauge("memvirt_host_zram_compressed_bytes", "That data compressed", registry=r)
        self.zram_used = Gauge("memvirt_host_zram_used_bytes", "Host memory the zram devices use", registry=r)
        self.ksm_saving = Gauge("memvirt_host_ksm_saving_bytes", "Memory KSM saves now", registry=r)
        self.ksmd_cpu = Gauge("memvirt_host_ksmd_cpu_seconds", "CPU ksmd used since boot", registry=r)
        self.daemon_cpu = Gauge("memvirt_daemon_cpu_seconds", "CPU the daemon (and its helpers) used", registry=r)
        self.daemon_rss = Gauge("memvirt_daemon_resident_bytes", "The daemon's resident memory", registry=r)
        self.vms = Gauge("memvirt_daemon_vms", "VMs the daemon manages", registry=r)
        self.server: Any = None

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint in a thread; the port it listens on (0 picks a free one)."""
        try:
            self.server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise UsageError(f"--metrics {host}:{port}: cannot listen there: {e.strerror}") from e
        return int(self.server.server_port)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def drop_vm(self, name: str) -> None:
        for m in (
            self.ram,
            self.guest_free,
            self.reclaimed,
            self.resident,
            self.swapped,
            self.working_set,
            self.cap,
            self.refaulted,
            self.pause,
            self.ksm_merging,
        ):
            try:
                m.remove(name)
            except KeyError:
                pass
        for policy in ("compress", "reclaim", "metrics"):
            try:
                self.policy_errors.remove(name, policy)
            except KeyError:
                pass
