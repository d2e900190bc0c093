"""memvirtd: one host service running memvirt's memory policies over every VM, continuously.

Modules, one per concern: :mod:`.config` (the TOML file), :mod:`.discovery` (where VMs come
from), :mod:`.policies` (per-VM workers and the host-wide KSM pacer, reusing the one-shot
commands' engines), :mod:`.metrics` (Prometheus), :mod:`.control` (the status socket),
:mod:`.notify` (systemd's sd_notify) and :mod:`.service` (the loop, signals, adoption).
"""
