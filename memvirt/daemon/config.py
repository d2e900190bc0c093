"""The daemon's one config file (TOML): typed sections, validated with one-line errors.

Everything has a default, so an absent file means "measure every VM, reclaim free pages every
minute, no caps, KSM untouched". Per-VM overrides (``[[vm]]`` tables with ``match``, an
fnmatch pattern) replace fields of ``[reclaim]`` and ``[compress]`` for the VMs whose name
matches; the first matching table wins, field by field after the global sections.
"""

from __future__ import annotations

import fnmatch
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from memvirt.errors import ConfigError, UsageError
from memvirt.paths import state_home
from memvirt.units import parse_size

TRIGGERS = ("always", "pressure")
COMPRESS_POLICIES = ("off", "measure", "adaptive", "static")
METHODS = ("auto", "damon", "referenced")
MAX_FILE = 1 << 20
"""A config larger than this is not a config (bounded read)."""


@dataclass(frozen=True)
class Trigger:
    """When VM policies act: ``always``, or only while the host is under memory pressure."""

    mode: str = "always"
    psi_some_avg10: float = 10.0
    """Percent of the last 10 s some task stalled on memory (/proc/pressure/memory) above which
    the host counts as under pressure."""
    mem_available_below: float = 20.0
    """Where the kernel has no PSI: MemAvailable below this percent of MemTotal."""


@dataclass(frozen=True)
class Reclaim:
    enabled: bool = True
    every: float = 60.0
    goal_ms_per_gib: float = 20.0


@dataclass(frozen=True)
class Compress:
    policy: str = "measure"
    margin: float = 0.10
    limit: int = 0
    interval: float = 5.0
    method: str = "referenced"


@dataclass(frozen=True)
class Ksm:
    enabled: bool = False
    ksmd_cpu: float = 0.01
    """Share of one CPU ksmd may use (the pacer's budget)."""
    max_pages_to_scan: int = 100
    sleep_millisecs: int = 20
    use_zero_pages: bool = True


@dataclass(frozen=True)
class VMPolicy:
    """What applies to one VM after overrides."""

    reclaim: Reclaim
    compress: Compress


@dataclass(frozen=True)
class Override:
    match: str
    reclaim: dict[str, Any] = field(default_factory=dict)
    compress: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    interval: float = 10.0
    """Seconds between rounds: discovery, trigger, KSM pacing, metrics."""
    trigger: Trigger = Trigger()
    reclaim: Reclaim = Reclaim()
    compress: Compress = Compress()
    ksm: Ksm = Ksm()
    overrides: tuple[Override, ...] = ()
    path: str = ""
    guest_free_every: float = 30.0
    """Seconds between a VM's guest-free censuses (the gauge): a live census of a 1 GiB guest
    costs ~15 ms of CPU, the daemon's largest steady cost per idle VM."""

    def for_vm(self, name: str) -> VMPolicy:
        """The policy for VM ``name``: the global sections with the first matching override's fields."""
        for o in self.overrides:
            if fnmatch.fnmatchcase(name, o.match):
                return VMPolicy(replace(self.reclaim, **o.reclaim), replace(self.compress, **o.compress))
        return VMPolicy(self.reclaim, self.compress)


def default_path() -> Path:
    return state_home() / "memvirtd.toml"


def load(path: Path | None = None) -> Config:
    """Read and validate the config; an absent default file gives the defaults, an absent named one is an error."""
    explicit = path is not None
    path = Path(path) if path is not None else default_path()
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE + 1)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{path}: no such config file") from None
        return Config(path=str(path))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it: {e.strerror}") from e
    if len(raw) > MAX_FILE:
        raise ConfigError(f"{path}: larger than {MAX_FILE >> 10} KiB, not a config")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    return parse(data, str(path))


def parse(data: dict[str, Any], where: str = "config") -> Config:
    """A :class:`Config` from parsed TOML, every value checked."""
    _known(
        data, {"interval", "guest_free_every", "trigger", "reclaim", "compress", "ksm", "vm"}, where, "the top level"
    )
    interval = _number(data.get("interval", 10.0), f"{where}: interval", 1.0, 3600.0)
    free_every = _number(data.get("guest_free_every", 30.0), f"{where}: guest_free_every", 1.0, 3600.0)
    trigger = _section(Trigger, data.get("trigger", {}), where, "trigger")
    reclaim = _section(Reclaim, data.get("reclaim", {}), where, "reclaim")
    compress = _section(Compress, data.get("compress", {}), where, "compress")
    ksm = _section(Ksm, data.get("ksm", {}), where, "ksm")
    overrides = []
    vms = data.get("vm", [])
    if not isinstance(vms, list):
        raise ConfigError(f"{where}: 'vm' must be an array of tables ([[vm]])")
    for i, o in enumerate(vms):
        label = f"[[vm]] #{i + 1}"
        if not isinstance(o, dict):
            raise ConfigError(f"{where}: {label} must be a table")
        _known(o, {"match", "reclaim", "compress"}, where, label)
        match = o.get("match")
        if not isinstance(match, str) or not match:
            raise ConfigError(f'{where}: {label} needs match = "PATTERN" (an fnmatch pattern of VM names)')
        r = _fields(Reclaim, o.get("reclaim", {}), where, f"{label} reclaim")
        c = _fields(Compress, o.get("compress", {}), where, f"{label} compress")
        ov = Override(match, r, c)
        # Check the merged result now, so a bad override is refused at load, not when a VM appears.
        _validate_compress(replace(compress, **c), where, f"{label} compress")
        _validate_reclaim(replace(reclaim, **r), where, f"{label} reclaim")
        overrides.append(ov)
    return Config(interval, trigger, reclaim, compress, ksm, tuple(overrides), where, free_every)


def _known(d: dict[str, Any], keys: set[str], where: str, label: str) -> None:
    for k in d:
        if k not in keys:
            raise ConfigError(f"{where}: unknown key {k!r} in {label} (known: {', '.join(sorted(keys))})")


def _number(v: Any, label: str, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ConfigError(f"{label} must be a number, not {v!r}")
    if not lo <= v <= hi:
        raise ConfigError(f"{label} must be between {lo:g} and {hi:g}, not {v!r}")
    return float(v)


def _percent(v: Any, label: str) -> float:
    """``"10%"`` or ``0.10`` -> 0.10."""
    if isinstance(v, str):
        try:
            return float(v.strip().removesuffix("%")) / 100 if v.strip().endswith("%") else float(v)
        except ValueError:
            raise ConfigError(f'{label} takes a percentage like "10%" or 0.10, not {v!r}') from None
    return _number(v, label, 0.0, 1e9)


def _fields(cls: type, d: Any, where: str, label: str) -> dict[str, Any]:
    """Typed values of the keys given (no defaults filled in)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: [{label}] must be a table")
    names = {f.name: f for f in fields(cls)}
    _known(d, set(names), where, f"[{label}]")
    out: dict[str, Any] = {}
    for k, v in d.items():
        lab = f"{where}: {label}.{k}"
        default = getattr(cls(), k)
        if k == "margin" or k == "ksmd_cpu":
            out[k] = _percent(v, lab)
        elif k == "limit":
            if isinstance(v, int) and not isinstance(v, bool):
                out[k] = v
            elif isinstance(v, str):
                try:
                    out[k] = parse_size(v)
                except UsageError:
                    raise ConfigError(f"{lab} is not a size: {v!r} (use e.g. 512M, 4G)") from None
            else:
                raise ConfigError(f'{lab} must be a size such as "512M", not {v!r}')
        elif isinstance(default, bool):
            if not isinstance(v, bool):
                raise ConfigError(f"{lab} must be true or false, not {v!r}")
            out[k] = v
        elif isinstance(default, str):
            if not isinstance(v, str):
                raise ConfigError(f"{lab} must be a string, not {v!r}")
            out[k] = v
        elif isinstance(default, int):
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"{lab} must be a whole number, not {v!r}")
            out[k] = v
        else:
            out[k] = _number(v, lab, 0.0, 1e9)
    return out


def _section(cls: type, d: Any, where: str, name: str) -> Any:
    obj = cls(**_fields(cls, d, where, name))
    checks: dict[type, Callable[..., None]] = {
        Trigger: _validate_trigger,
        Reclaim: _validate_reclaim,
        Compress: _validate_compress,
        Ksm: _validate_ksm,
    }
    checks[cls](obj, where, name)
    return obj


def _validate_trigger(t: Trigger, where: str, label: str) -> None:
    if t.mode not in TRIGGERS:
        raise ConfigError(f"{where}: {label}.mode must be one of {', '.join(TRIGGERS)}, not {t.mode!r}")
    for k in ("psi_some_avg10", "mem_available_below"):
        if not 0 <= getattr(t, k) <= 100:
            raise ConfigError(f"{where}: {label}.{k} must be a percentage between 0 and 100")


def _validate_reclaim(r: Reclaim, where: str, label: str) -> None:
    if not 5 <= r.every <= 86400:
        raise ConfigError(f"{where}: {label}.every must be between 5 and 86400 seconds, not {r.every:g}")
    if not 1 <= r.goal_ms_per_gib <= 1000:
        raise ConfigError(f"{where}: {label}.goal_ms_per_gib must be between 1 and 1000, not {r.goal_ms_per_gib:g}")


def _validate_compress(c: Compress, where: str, label: str) -> None:
    if c.policy not in COMPRESS_POLICIES:
        raise ConfigError(f"{where}: {label}.policy must be one of {', '.join(COMPRESS_POLICIES)}, not {c.policy!r}")
    if c.method not in METHODS:
        raise ConfigError(f"{where}: {label}.method must be one of {', '.join(METHODS)}, not {c.method!r}")
    if not 0 <= c.margin <= 10:
        raise ConfigError(f"{where}: {label}.margin must be between 0% and 1000%")
    if not 0.5 <= c.interval <= 3600:
        raise ConfigError(f"{where}: {label}.interval must be between 0.5 and 3600 seconds, not {c.interval:g}")
    if c.policy == "static" and c.limit < (64 << 20):
        raise ConfigError(f"{where}: {label}: policy static needs limit = SIZE of at least 64M")


def _validate_ksm(k: Ksm, where: str, label: str) -> None:
    if not 0 < k.ksmd_cpu <= 1:
        raise ConfigError(f"{where}: {label}.ksmd_cpu must be a share of one CPU above 0 and at most 100%")
    if not 10 <= k.max_pages_to_scan <= 100000:
        raise ConfigError(f"{where}: {label}.max_pages_to_scan must be between 10 and 100000")
    if not 1 <= k.sleep_millisecs <= 10000:
        raise ConfigError(f"{where}: {label}.sleep_millisecs must be between 1 and 10000")
