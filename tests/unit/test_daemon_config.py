"""memvirtd's config: defaults, typed values, one-line errors, per-VM overrides by name pattern."""

from __future__ import annotations

from pathlib import Path

import pytest

from memvirt.daemon import config as cfgmod
from memvirt.daemon.config import ConfigError

GOOD = """
interval = 5

[trigger]
mode = "pressure"
psi_some_avg10 = 15.5

[reclaim]
every = 30

[compress]
policy = "measure"
margin = "15%"

[ksm]
enabled = true
ksmd_cpu = "0.5%"

[[vm]]
match = "db-*"
[vm.compress]
policy = "static"
limit = "2G"

[[vm]]
match = "db-main"
[vm.reclaim]
enabled = false

[[vm]]
match = "*-batch"
[vm.reclaim]
every = 600
goal_ms_per_gib = 5
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "memvirtd.toml"
    p.write_text(text)
    return p


def test_defaults_when_the_default_file_is_absent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEMVIRT_HOME", str(tmp_path))
    c = cfgmod.load()
    assert c.path == str(tmp_path / "memvirtd.toml")
    assert c.interval == 10 and c.trigger.mode == "always" and c.reclaim.enabled and c.reclaim.every == 60
    assert c.compress.policy == "measure" and not c.ksm.enabled and c.overrides == ()
    assert c.guest_free_every == 30


def test_a_named_file_that_is_missing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        cfgmod.load(tmp_path / "nope.toml")


def test_values_are_typed(tmp_path: Path) -> None:
    c = cfgmod.load(write(tmp_path, GOOD))
    assert c.interval == 5.0
    assert c.trigger.mode == "pressure" and c.trigger.psi_some_avg10 == 15.5
    assert c.reclaim.every == 30
    assert c.compress.margin == pytest.approx(0.15)
    assert c.ksm.enabled and c.ksm.ksmd_cpu == pytest.approx(0.005)
    assert len(c.overrides) == 3


def test_overrides_first_match_wins_field_by_field(tmp_path: Path) -> None:
    c = cfgmod.load(write(tmp_path, GOOD))
    db = c.for_vm("db-main")
    assert db.compress.policy == "static" and db.compress.limit == 2 << 30
    assert db.compress.margin == pytest.approx(0.15), "fields not overridden come from [compress]"
    assert db.reclaim.enabled, "the first matching [[vm]] wins: db-* has no reclaim override"
    batch = c.for_vm("nightly-batch")
    assert batch.reclaim.every == 600 and batch.reclaim.goal_ms_per_gib == 5 and batch.compress.policy == "measure"
    other = c.for_vm("web1")
    assert other.reclaim == c.reclaim and other.compress == c.compress
    assert c.for_vm("DB-main").compress.policy == "measure", "patterns are case-sensitive"


@pytest.mark.parametrize(
    "text, message",
    [
        ("interval = 0.1", "interval must be between 1 and 3600"),
        ("interval = 'x'", "interval must be a number"),
        ("guest_free_every = 0", "guest_free_every must be between 1 and 3600"),
        ("bogus = 1", "unknown key 'bogus' in the top level"),
        ("[trigger]\nmode = 'sometimes'", "trigger.mode must be one of always, pressure"),
        ("[trigger]\npsi_some_avg10 = 140", "trigger.psi_some_avg10 must be a percentage"),
        ("[reclaim]\nevery = 1", "reclaim.every must be between 5 and 86400"),
        ("[reclaim]\nenabled = 'yes'", "reclaim.enabled must be true or false"),
        ("[reclaim]\nspeed = 3", "unknown key 'speed' in [reclaim]"),
        ("[compress]\npolicy = 'squeeze'", "compress.policy must be one of off, measure, adaptive, static"),
        ("[compress]\npolicy = 'static'", "policy static needs limit"),
        ("[compress]\nmargin = 'ten'", "takes a percentage"),
        ("[compress]\nlimit = 'lots'", "is not a size"),
        ("[compress]\nmethod = 'guess'", "compress.method must be one of"),
        ("[ksm]\nksmd_cpu = '0%'", "ksmd_cpu must be a share of one CPU"),
        ("[ksm]\nmax_pages_to_scan = 1.5", "max_pages_to_scan must be a whole number"),
        ("[[vm]]\nreclaim = {every = 10}", "needs match"),
        ("[[vm]]\nmatch = 'a*'\ncompress = {policy = 'static'}", "[[vm]] #1 compress: policy static needs limit"),
        ("[[vm]]\nmatch = 'a*'\nreclaim = {every = 2}", "[[vm]] #1 reclaim.every must be between"),
        ("[[vm]]\nmatch = 'a*'\nksm = {enabled = true}", "unknown key 'ksm' in [[vm]] #1"),
        ("vm = 3", "'vm' must be an array of tables"),
        ("[reclaim\nevery = 5", "not valid TOML"),
    ],
)
def test_bad_configs_are_one_line_errors_naming_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        cfgmod.load(p)
    assert message in str(e.value)
    assert str(p) in str(e.value)
    assert "\n" not in str(e.value)


def test_binary_and_huge_files_are_refused(tmp_path: Path) -> None:
    p = tmp_path / "bin.toml"
    p.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not valid TOML"):
        cfgmod.load(p)
    p.write_bytes(b"#" * (cfgmod.MAX_FILE + 10))
    with pytest.raises(ConfigError, match="not a config"):
        cfgmod.load(p)


def test_the_example_config_in_the_repo_is_valid() -> None:
    c = cfgmod.load(Path(__file__).parents[2] / "contrib" / "memvirtd.toml")
    assert c.reclaim.enabled


def test_the_unit_file_and_dashboard_match_the_daemon() -> None:
    """The systemd unit is Type=notify, reloads by SIGHUP and lets the watchdogs outlive a kill; the
    Grafana dashboard only queries metrics the daemon exports."""
    import json
    import re

    from prometheus_client import generate_latest

    from memvirt.daemon.metrics import Metrics

    contrib = Path(__file__).parents[2] / "contrib"
    unit = (contrib / "memvirtd.service").read_text()
    for line in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "KillMode=process"):
        assert f"\n{line}\n" in unit
    m = Metrics()
    for g in (
        m.ram,
        m.guest_free,
        m.reclaimed,
        m.resident,
        m.swapped,
        m.working_set,
        m.cap,
        m.refaulted,
        m.pause,
        m.ksm_merging,
    ):
        g.labels(vm="x")
    m.policy_errors.labels(vm="x", policy="reclaim")
    exported = set(re.findall(r"^(memvirt_\w+?)(?:\{| )", generate_latest(m.registry).decode(), re.M))
    dash = json.loads((contrib / "grafana-memvirtd.json").read_text())
    used = {n for p in dash["panels"] for t in p["targets"] for n in re.findall(r"memvirt_\w+", t["expr"])}
    assert used and used <= exported, used - exported
