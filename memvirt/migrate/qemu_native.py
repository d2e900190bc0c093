"""QEMU's own precopy migration between two local QEMUs, the baseline memvirt is measured against.

The target is started like memvirt's (same machine, fresh RAM file, ``-incoming defer``) but with
``x-ignore-shared`` off, so the RAM travels in QEMU's stream over loopback TCP. QEMU gets
``max-bandwidth`` 4 GiB/s (its 7.2 default, 32 MiB/s, would only make it slower) and a 300 ms
``downtime-limit``; a migration that does not complete in ``timeout`` seconds is cancelled.

Every variant's capabilities are set on both QEMUs, on or off, before ``migrate-incoming``: a
guest that arrived by one variant keeps the capabilities its incoming side was given, and a hop
from it with another variant must not inherit them. A source left with ``multifd`` (or
``xbzrle``) on and a target without made the next hop fail at once, and the bench's target, left
waiting for multifd channels that never came, stopped answering QMP ("Negotiation failed").

This is a local baseline, not a secure transport: the target QEMU listens on a loopback TCP port
with no authentication and no encryption (QEMU's ``tcp:`` transport), so while it runs any local
process can connect to it and feed or read guest state. Use it only on a host whose local users
are trusted; memvirt's own migration authenticates and encrypts every frame.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from memvirt.migrate.receiver import start_target
from memvirt.qemu.vm import VM

CAPS = {"plain": [], "xbzrle": ["xbzrle"], "multifd": ["multifd"]}
VARIANT_CAPS = ("xbzrle", "multifd")


def qemu_migrate(
    src: VM, dst: str, variant: str = "plain", timeout: float = 180.0, max_bandwidth: int = 4 << 30
) -> dict[str, Any]:
    """Migrate ``src`` to a new local VM ``dst`` with QEMU's precopy; the source is stopped on success.
    ``max_bandwidth`` is QEMU's parameter of that name (bytes per second).

    Returns bytes (``ram.transferred``), total_s, downtime_ms, rounds (``dirty-sync-count``),
    converged."""
    caps = CAPS[variant]
    c = src.config
    target = start_target(
        {
            "name": dst,
            "source": src.name,
            "memory": c.memory,
            "cpus": c.cpus,
            "image": c.image,
            "accel": c.accel,
            "append": c.append,
            "regions": c.regions,
        },
        lambda m: None,
        ignore_shared=False,
    )
    port = 48000 + secrets.randbelow(1000)
    states = {"x_ignore_shared": False} | {k: k in caps for k in VARIANT_CAPS}
    try:
        with target.monitor() as tm, src.monitor() as sm:
            for m in (tm, sm):
                m.set_capabilities(**states)
                if "multifd" in caps:
                    m.command("migrate-set-parameters", **{"multifd-channels": 2})
            tm.command("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
            sm.command("migrate-set-parameters", **{"max-bandwidth": max_bandwidth, "downtime-limit": 300})
            t0 = time.perf_counter()
            sm.command("migrate", uri=f"tcp:127.0.0.1:{port}")
            while (st := sm.command("query-migrate"))["status"] not in ("completed", "failed", "cancelled"):
                if time.perf_counter() - t0 > timeout:
                    sm.command("migrate_cancel")
                    time.sleep(1)
                    st = sm.command("query-migrate")
                    break
                time.sleep(0.05)
        ram = st.get("ram", {})
        if st["status"] != "completed":
            target.discard()
            return {
                "bytes": ram.get("transferred", 0),
                "total_s": time.perf_counter() - t0,
                "downtime_ms": None,
                "rounds": ram.get("dirty-sync-count"),
                "converged": False,
                "detail": st["status"],
            }
        target.config.incoming_by = 0
        target.save()
        with target.monitor() as tm:
            if tm.status() == "paused":
                tm.command("cont")
        src.stop()
        return {
            "bytes": ram["transferred"],
            "total_s": st["total-time"] / 1000,
            "downtime_ms": st.get("downtime"),
            "rounds": ram.get("dirty-sync-count"),
            "converged": True,
            "detail": "",
        }
    except BaseException:
        if target.alive() and target.status() != "running":
            target.discard()
        raise
