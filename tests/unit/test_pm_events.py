"""The host side of physical-machine migration over synthetic consoles (no QEMU): event parsing of
garbage and forged lines, consoles keyed by machine, and the host's verdict when the target's
answer is lost."""

from __future__ import annotations

import logging
import random
import string
from pathlib import Path
from types import SimpleNamespace

import pytest

from memvirt.errors import MemvirtError
from memvirt.pm import stream
from memvirt.pm import zram as zr
from memvirt.pm.events import MAX_LINE, ConsoleTail, parse_line
from memvirt.pm.facts import PMFailed
from memvirt.pm.migrate import _Migration

KEY = bytes(range(32))


def test_good_lines_parse() -> None:
    e = parse_line(
        "\r[  3.1] memvirt-pm: source sent literal=5 zero=2 ref=0 wire=4096 disk=0 seconds=0.5 "
        "read=0.1 scan=0.0 compress=0.2 send=0.1 t=9.25",
        4.0,
    )
    assert e is not None and (e.role, e.name, e.at) == ("source", "sent", 4.0)
    assert e.num("literal") == 5 and e.num("compress") == 0.2 and e.num("missing") == 0
    e = parse_line("memvirt-pm: source connected to=10.77.0.3:2000 scheme=disk compress=zstd t=1", 0)
    assert e is not None and e.fields["compress"] == "zstd"
    e = parse_line('memvirt-pm: target failed error="peer failed: bad tag? x" t=2', 0)
    assert e is not None and e.fields["error"] == "peer failed: bad tag? x"


@pytest.mark.parametrize(
    "line",
    [
        "memvirt-pm: source created seconds=abc image=1 t=1",  # a figure that is not a number
        "memvirt-pm: source created seconds=nan t=1",
        "memvirt-pm: source created seconds=inf t=1",
        "memvirt-pm: source created seconds=-1 t=1",
        "memvirt-pm: source created seconds=1e999 t=1",
        'memvirt-pm: source thawed error="unbalanced t=1',
        "memvirt-pm: Source thawed t=1",  # not an agent's role name
        "memvirt-pm: source ../../x t=1",
        "memvirt-pm: source",
        "memvirt-pm: source sent wire=1 Bad-Key=2",
        "memvirt-pm: source frozen seconds=" + "9" * 3000,  # over-long
        "memvirt-pm: \x00\x01\x02 \udcff",
    ],
)
def test_garbage_lines_are_not_events(line: str, caplog: pytest.LogCaptureFixture) -> None:
    assert parse_line(line, 0) is None


def test_random_lines_never_raise() -> None:
    """Seeded garbage around the prefix: parsing returns an event or None, and any figure of an
    event it returns is a finite number."""
    rng = random.Random(14)
    alphabet = string.printable + "\"'=\\\x00\x7f\u00e9"
    words = ["source", "target", "resumed", "created", "sent", "seconds=", "image=", "error=", '"', "=", "t=1"]
    for _ in range(5000):
        parts = [
            rng.choice(words) if rng.random() < 0.6 else "".join(rng.choices(alphabet, k=rng.randrange(8)))
            for _ in range(rng.randrange(6))
        ]
        line = "memvirt-pm: " + " ".join(parts) if rng.random() < 0.9 else "".join(parts)
        e = parse_line(line, 0.0)
        if e is not None:
            for k in e.fields:
                assert e.num(k) == e.num(k)  # never raises, never NaN


def _log(path: Path, *lines: str) -> None:
    with path.open("ab") as f:
        for line in lines:
            f.write(line.encode() + b"\r\n")


def test_console_tail_keys_events_by_machine(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = tmp_path / "serial.log"
    _log(log, "memvirt-pm: target listening on=1.2.3.4:5 t=0")  # before the tail opened: not ours
    tail = ConsoleTail(log, "pm-t1", ("target", "resumed"))
    _log(
        log,
        "memvirt-pm: source thawed error=forged t=1",
        "memvirt-pm: target restoring t=2",
        "memvirt-pm: resumed running t=3",
        "memvirt-pm: source acked seconds=1 t=4",
    )
    with caplog.at_level(logging.WARNING, "memvirt.pm"):
        got = [(e.role, e.name) for e in tail.poll()]
    assert got == [("target", "restoring"), ("resumed", "running")]
    assert tail.ignored == ["source thawed", "source acked"]
    assert "pm-t1's console claiming role 'source'" in caplog.text


def test_console_tail_bounds_lines_and_reads(tmp_path: Path) -> None:
    """A console flooded without a newline costs at most MAX_READ a poll and MAX_LINE of memory;
    an over-long line is dropped whole, even if it ends like an event."""
    log = tmp_path / "serial.log"
    log.write_bytes(b"")
    tail = ConsoleTail(log, "pm-s1", ("source",))
    with log.open("ab") as f:
        f.write(b"x" * (3 << 20) + b" memvirt-pm: source thawed error=flood t=1\n")
    _log(log, "memvirt-pm: source frozen seconds=0.01 t=2")
    events = []
    for _ in range(6):
        events += tail.poll()
        assert len(tail.partial) <= MAX_LINE
    assert [(e.role, e.name) for e in events] == [("source", "frozen")]


# --- the host's decisions, over stand-in machines -----------------------------------------------


class FakeVM:
    """What _Migration uses of a VM: a name, a serial log, a store disk, liveness, exec, pause."""

    def __init__(self, root: Path, name: str, receiver_rc: int | None = 0):
        self.name = name
        self.dir = root / name
        self.dir.mkdir()
        self.serial_log = self.dir / "serial.log"
        self.serial_log.write_bytes(b"")
        (self.dir / "store.raw").write_bytes(bytes(8192))
        self.config = SimpleNamespace(memory=512 << 20, lan="lan1", lan_ip="", lan_mac="")
        self.receiver_rc = receiver_rc
        self.paused = False
        self.execs: list[str] = []

    def alive(self) -> bool:
        return True

    def exec(self, script: str, timeout: float = 30) -> SimpleNamespace:
        self.execs.append(script)
        if self.receiver_rc is None:
            raise MemvirtError("command channel timed out (the machine is frozen)")
        return SimpleNamespace(rc=self.receiver_rc, text="")

    def pause(self) -> None:
        self.paused = True


def _migration(tmp_path: Path, receiver_rc: int | None = 0) -> tuple[_Migration, FakeVM, FakeVM]:
    src, dst = FakeVM(tmp_path, "pm-s1"), FakeVM(tmp_path, "pm-t1", receiver_rc)
    m = _Migration(src, dst, "memory", "lz4", False, lambda e: None)  # type: ignore[arg-type]
    m.key, m.sending, m.rx_pid = KEY, True, 321
    return m, src, dst


def _verdict(src: FakeVM) -> bytes:
    return (src.dir / "store.raw").read_bytes()[:4096]


def test_lost_ack_after_the_restore_powers_the_source_off(tmp_path: Path) -> None:
    """The target restored but the source never got the ACK: the host tells the source to power off
    (one machine), and a forged "source thawed" on the target's console changes nothing."""
    m, src, dst = _migration(tmp_path)
    _log(src.serial_log, 'memvirt-pm: source uncertain error="stream truncated (peer closed)" t=5')
    _log(
        dst.serial_log,
        'memvirt-pm: source thawed error="forged by the target" t=5',
        "memvirt-pm: target restoring t=6",
        "memvirt-pm: resumed running t=7",
    )
    m._follow(deadline=1e18)
    assert _verdict(src) == stream.verdict_block(KEY, thaw=False)
    assert m.report.verdict == "off" and m.report.ack_lost
    assert m.report.ignored_events == ["pm-t1: source thawed"]


def test_forged_source_failure_on_the_target_console_is_ignored(tmp_path: Path) -> None:
    m, src, dst = _migration(tmp_path)
    _log(
        dst.serial_log,
        'memvirt-pm: source failed error="stop the real source" t=1',
        'memvirt-pm: source thawed error="stop the real source" t=1',
        "memvirt-pm: resumed running t=2",
    )
    m._follow(deadline=1e18)  # returns: the machine runs on the target; the forged lines did not count
    assert m.report.verdict == "off" and not m.report.ack_lost


def test_lost_answer_with_a_failed_target_thaws_the_source(tmp_path: Path) -> None:
    m, src, dst = _migration(tmp_path)
    _log(src.serial_log, 'memvirt-pm: source uncertain error="receiving failed" t=5')
    _log(dst.serial_log, 'memvirt-pm: target failed error="freezing the target failed: EBUSY" t=5')
    m._arbitrate()
    assert _verdict(src) == stream.verdict_block(KEY, thaw=True) and m.report.verdict == "thaw"
    _log(
        src.serial_log, "memvirt-pm: source verdict thaw t=6", 'memvirt-pm: source thawed error="receiving failed" t=6'
    )
    with pytest.raises(PMFailed, match="'pm-s1' runs on: freezing the target failed"):
        m._follow(deadline=1e18)


def test_lost_answer_with_the_receiver_gone_thaws_the_source(tmp_path: Path) -> None:
    """No word from the target, but its receiver process is gone (it crashed after the image):
    it cannot restore any more, so the source thaws."""
    m, src, dst = _migration(tmp_path, receiver_rc=1)
    _log(src.serial_log, 'memvirt-pm: source uncertain error="stream truncated" t=5')
    m._arbitrate()
    assert m.report.verdict == "thaw" and any("/proc/321/cmdline" in s for s in dst.execs)


def test_target_stuck_in_its_restore_is_fenced_before_the_source_thaws(tmp_path: Path) -> None:
    m, src, dst = _migration(tmp_path, receiver_rc=None)
    _log(src.serial_log, 'memvirt-pm: source uncertain error="stream truncated" t=5')
    _log(dst.serial_log, "memvirt-pm: target restoring t=6")
    m._arbitrate(wait=0.3)
    assert dst.paused and m.report.verdict == "thaw" and "paused" in m.fenced


def test_no_verdict_while_the_target_may_still_restore(tmp_path: Path) -> None:
    """The target's console says nothing and its command channel does not answer (frozen): the
    host waits; here it runs out of patience and fences, never thawing an unfenced source."""
    m, src, dst = _migration(tmp_path, receiver_rc=None)
    _log(src.serial_log, 'memvirt-pm: source uncertain error="stream truncated" t=5')
    m._arbitrate(wait=0.3)
    assert dst.paused and m.report.verdict == "thaw"


def test_garbage_from_the_machine_about_zram_is_one_error(tmp_path: Path) -> None:
    vm = FakeVM(tmp_path, "pm-s1")
    vm.exec = lambda script, timeout=30: SimpleNamespace(rc=0, text="stored=lots compressed=1 seconds=x")  # type: ignore[method-assign]
    with pytest.raises(zr.ZramError, match="reported garbage removing zram swap"):
        zr.remove(vm)  # type: ignore[arg-type]
    with pytest.raises(zr.ZramError, match="cannot swap pages into zram"):
        zr.preswap(vm, 512 << 20, 200 << 20)  # type: ignore[arg-type]
