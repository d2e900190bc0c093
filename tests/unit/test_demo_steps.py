"""The demo's step runner: a failed or skipped step never hides the others (no QEMU needed)."""

from __future__ import annotations

import pytest

from memvirt.cli.demo import Skip, Steps
from memvirt.errors import MemvirtError, UsageError


def _raise(e: BaseException) -> None:
    raise e


def test_every_step_is_kept_whatever_happens_to_the_others() -> None:
    steps = Steps(show=False)
    assert steps.run("boot", "", lambda: {"ok": 1}) == {"ok": 1}
    assert steps.run("compression", "", lambda: _raise(Skip("this host kernel has no zram"))) is None
    assert steps.run("clone", "", lambda: _raise(MemvirtError("QEMU refused"))) is None
    assert steps.run("after-clone", "", lambda: 1, needs="clone") is None
    assert steps.run("bug", "", lambda: 1 // 0) is None
    assert steps.run("migration", "", lambda: 2, needs="boot") == 2
    by = {r["step"]: r for r in steps.done}
    assert [r["step"] for r in steps.done] == ["boot", "compression", "clone", "after-clone", "bug", "migration"]
    assert by["compression"] == {**by["compression"], "status": "skipped", "reason": "this host kernel has no zram"}
    assert by["clone"]["status"] == "failed" and by["clone"]["reason"] == "QEMU refused"
    assert by["after-clone"]["status"] == "skipped" and "clone" in by["after-clone"]["reason"]
    assert by["bug"]["status"] == "failed" and by["bug"]["reason"].startswith("internal error: ZeroDivisionError")
    assert [r["step"] for r in steps.failed()] == ["clone", "bug"]


def test_bad_input_ends_the_demo_and_an_interrupt_is_recorded() -> None:
    steps = Steps(show=False)
    with pytest.raises(UsageError):
        steps.run("image", "", lambda: _raise(UsageError("no kernel series '9.9'")), bad_input_ends=True)
    assert steps.run("other", "", lambda: _raise(UsageError("bad"))) is None
    with pytest.raises(KeyboardInterrupt):
        steps.run("reclaim", "", lambda: _raise(KeyboardInterrupt()))
    assert steps.done[-1]["status"] == "failed" and steps.done[-1]["reason"] == "interrupted"


@pytest.mark.parametrize("name", ["memvirt-demo", "demo.2"])
def test_the_daemon_step_acts_on_the_demo_vm_only(name: str) -> None:
    """The demo's memvirtd config is valid; it reclaims and measures the demo VM and changes
    nothing of any other VM of the host (nor KSM's host-wide settings)."""
    import tomllib

    from memvirt.cli.daemon import demo_config
    from memvirt.daemon.config import parse

    cfg = parse(tomllib.loads(demo_config(name)), "demo")
    mine = cfg.for_vm(name)
    assert mine.reclaim.enabled and mine.reclaim.every == 5 and mine.compress.policy == "measure"
    for other in ("prod-db", f"{name}-clone", "x"):
        theirs = cfg.for_vm(other)
        assert not theirs.reclaim.enabled and theirs.compress.policy == "off"
    assert not cfg.ksm.enabled
