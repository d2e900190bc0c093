"""The support matrix's data path: the suite's recorder and scripts/support_matrix.py."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from support import Recorder, guests_of

from memvirt.qemu.config import VMConfig
from memvirt.qemu.vm import VM

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("support_matrix", ROOT / "scripts" / "support_matrix.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Factory:
    def __init__(self, vms: list[VM]) -> None:
        self.vms = vms


def _vm(name: str, release: str) -> VM:
    return VM(VMConfig(name=name, memory=512 << 20, kernel_release=release))


def test_guests_are_found_in_fixtures_tuples_and_factories() -> None:
    a, b, c = _vm("a", "6.1.0-57-amd64"), _vm("b", "6.1.0-57-amd64"), _vm("c", "7.2.13+deb14-cloud-amd64")
    assert guests_of([a, (b, "x"), _Factory([c]), 3, "s"]) == [a, b, c]


def test_outcomes_merge_by_test_id_and_render(tmp_path: Path) -> None:
    out = tmp_path / "support.json"
    r = Recorder()
    old, new = _vm("a", "6.1.0-57-amd64"), _vm("b", "7.2.13+deb14-cloud-amd64")
    r.record("t::a", "test_introspect", [], [old], "passed")
    r.record("t::b", "test_kernels", ["introspection", "cloning"], [new], "passed")
    r.record("t::c", "test_migrate", [], [old], "passed")
    r.record("t::c", "test_migrate", [], [old], "failed")  # its teardown failed
    r.record("t::d", "test_unknown_module", [], [old], "passed")  # no capability: not recorded
    r.record("t::e", "test_clone", [], [], "passed")  # no guest: not recorded
    r.record("t::f", "test_clone", [], [old], "")  # skipped: not recorded
    assert r.save(out) == out
    again = Recorder()
    again.record("t::a", "test_introspect", [], [old], "passed")  # a second run: still one test
    again.save(out)
    data = json.loads(out.read_text())
    assert sorted(data["tests"]) == ["t::a", "t::b", "t::c"]

    text = _script().table(data)
    lines = text.splitlines()
    assert lines[0] == "| kernel | arch | introspection | live migration | cloning | last run |"
    assert lines[2].startswith("| 6.1.0-57-amd64 | amd64 | ✓ 1 | ✗ 1/1 |  |")
    assert lines[3].startswith("| 7.2.13+deb14-cloud-amd64 | amd64 | ✓ 1 |  | ✓ 1 |")


def test_write_needs_the_markers(tmp_path: Path) -> None:
    mod = _script()
    doc = tmp_path / "support.md"
    doc.write_text(f"# x\n{mod.BEGIN}\nold\n{mod.END}\ntail\n")
    mod.write(doc, "| new |")
    assert doc.read_text() == f"# x\n{mod.BEGIN}\n\n| new |\n\n{mod.END}\ntail\n"
    doc.write_text("no markers\n")
    with pytest.raises(SystemExit, match="lacks the markers"):
        mod.write(doc, "| new |")


def test_script_says_one_line_for_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _script().main([str(tmp_path / "none.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("support_matrix: cannot read") and "\n" not in err
