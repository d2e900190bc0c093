"""What a VM was started with and what happened to it since: the typed form of ``vm.json``.

Each field is typed, as Firecracker's ``vmm_config`` is the "strongly typed equivalent of the
json body", so a reader of ``vm.json`` and a writer of it agree on one spelling. Files written
before the typed fields (everything after ``lan`` was in a free ``extra`` dict, written from nine
modules) still load: :meth:`VMConfig.from_dict` maps the old keys onto the fields. Keys it does
not know (a newer memvirt's) are ignored, so an older memvirt can still stop such a VM.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, cast, get_args

from memvirt.arch import ARCHES, ArchName
from memvirt.paths import PRIVATE_FILE

log = logging.getLogger(__name__)

RamMode = Literal["shared", "anonymous", "cow"]
"""``shared``: RAM in a file (:func:`memvirt.paths.ram_dir`) QEMU maps shared; ``anonymous``:
private QEMU memory; ``cow``: a lazy clone's private mapping of its template's RAM file."""
ALL_RAM_MODES: tuple[RamMode, ...] = get_args(RamMode)
RAM_MODES: tuple[RamMode, ...] = ("shared", "anonymous")
"""The modes a VM can be started with; ``cow`` only comes of ``memvirt clone``."""


@dataclass
class Frozen:
    """A template's freeze: when, its run state before (``running``/``paused``, restored by an
    unfreeze) and its RAM file's mode before it was made read-only."""

    at: float
    was: str
    ram_file_mode: int = PRIVATE_FILE


@dataclass
class Workload:
    """A command ``memvirt vm start --workload`` started in the guest (guest pid, output file)."""

    command: str
    pid: int
    log: str


@dataclass
class Migrated:
    """Where the VM came from: ``by`` is ``migrate`` (memvirt's or QEMU's live migration) or
    ``pm`` (a physical-machine migration); ``at`` is when it committed (0 while incoming)."""

    source: str
    at: float = 0.0
    by: str = "migrate"


@dataclass
class VMConfig:
    """``vm.json``.

    ``role`` is ``template`` while the VM is frozen (``frozen``) to back clones; ``clone_of``
    names the template a clone came from; a lazy clone (``ram="cow"``) maps ``backing``, its
    template's RAM file, copy-on-write and has no RAM file of its own. ``lan`` names the VM LAN
    it is on (:mod:`memvirt.qemu.lan`) at ``lan_ip`` with its NIC's MAC ``lan_mac``; after a
    physical-machine migration the guest's NIC keeps the source's MAC, ``lan_guest_mac``.
    ``memcg`` is the memory cgroup QEMU runs in; ``incoming_by`` the pid of the receiver still
    filling the VM's RAM (0 once it may run). ``arch`` is the guest's architecture, its
    image's (:mod:`memvirt.arch`: QEMU binary, machine, CPU, console, RAM map); vm.json files
    written before it are amd64.
    """

    name: str
    memory: int
    cpus: int = 1
    arch: ArchName = "amd64"
    ram: RamMode = "shared"
    image: str = ""
    kernel_release: str = ""
    accel: str = ""
    append: str = ""
    pid: int = 0
    ram_path: str = ""
    regions: list[dict[str, int]] = field(default_factory=list)
    started: float = 0.0
    role: str = ""
    clone_of: str = ""
    backing: str = ""
    lan: str = ""
    lan_ip: str = ""
    lan_mac: str = ""
    lan_guest_mac: str = ""
    memcg: str = ""
    frozen: Frozen | None = None
    workload: Workload | None = None
    migrated: Migrated | None = None
    incoming_by: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> VMConfig:
        """A config from ``vm.json`` as written by this or an older memvirt; ``ValueError`` (or
        ``TypeError``) if it is not one."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        d = dict(data)
        extra = d.pop("extra", None)
        _upgrade(d, {} if extra is None else extra)
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            log.debug("vm.json of %s: ignoring unknown keys %s", d.get("name"), ", ".join(unknown))
        kw = {k: v for k, v in d.items() if k in known}
        for k, v in kw.items():
            want = _SIMPLE.get(str(known[k].type))
            if want is not None and not isinstance(v, want):
                raise ValueError(f"{k} is {type(v).__name__}, not {known[k].type}")
        if kw.get("ram", "shared") not in ALL_RAM_MODES:
            raise ValueError(f"unknown RAM mode {kw['ram']!r}")
        if kw.get("arch", "amd64") not in ARCHES:
            raise ValueError(f"unknown architecture {kw['arch']!r}")
        for k, sub in (("frozen", Frozen), ("workload", Workload), ("migrated", Migrated)):
            if isinstance(kw.get(k), dict):
                kw[k] = sub(**kw[k])
            elif kw.get(k) is not None:
                raise ValueError(f"{k} is {type(kw[k]).__name__}, not an object")
        return cls(**kw)


# Annotations are strings (``from __future__ import annotations``): the simple ones checked on load.
_SIMPLE: dict[str, type | tuple[type, ...]] = {
    "str": str,
    "int": int,
    "float": (int, float),
    "list[dict[str, int]]": list,
}


def _upgrade(d: dict[str, Any], extra: dict[str, Any]) -> None:
    """Move the keys of the old ``extra`` dict onto the typed fields (``d`` in place)."""
    if not isinstance(extra, dict):
        raise ValueError("extra is not an object")
    for key in ("memcg", "lan_ip", "lan_mac", "lan_guest_mac", "workload", "incoming_by"):
        if key in extra:
            d.setdefault(key, extra[key])
    if isinstance(extra.get("frozen"), dict):
        f = extra["frozen"]
        d.setdefault("frozen", {"at": f.get("at", 0.0), "was": f.get("was", "")})
        if "ram_file_mode" in extra:
            d["frozen"]["ram_file_mode"] = extra["ram_file_mode"]
    if "migrated_from" in extra:
        d.setdefault("migrated", {"source": extra["migrated_from"], "at": extra.get("migrated_at", 0.0)})
    elif isinstance(extra.get("pm_migrated_from"), dict):
        pm = extra["pm_migrated_from"]
        d.setdefault("migrated", {"source": pm.get("name", ""), "at": pm.get("at", 0.0), "by": "pm"})


def ram_mode(text: str) -> RamMode:
    """``text`` as a RAM mode a VM can be started with (``ValueError`` otherwise)."""
    if text not in RAM_MODES:
        raise ValueError(text)
    return cast(RamMode, text)
