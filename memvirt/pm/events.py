"""The agents' events, read from the machines' serial consoles and timestamped on the host.

pmagent writes ``memvirt-pm: ROLE EVENT k=v ... t=S`` to ``/dev/console``. Both machines' events
get one clock this way (the guests' own clocks differ by up to a second after a restore), so the
downtime is measured from the source's freeze to the moment the restored machine says it runs.

A console is written by whatever runs in that machine, so its lines are untrusted: an event counts
only for the roles its console may speak for (the source's console: ``source``; the target's:
``target``, and ``resumed`` once the restored machine runs there), a line claiming another role
is dropped and logged, and a malformed line (bad names, a non-numeric figure, over
:data:`MAX_LINE` bytes) is not an event at all.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "memvirt-pm: "
MAX_LINE = 2048
"""pmagent's lines are under 700 bytes; anything longer is not an event (and is not buffered)."""
MAX_READ = 1 << 20
"""Bytes read from a console per poll, so a guest flooding its console cannot stall the host."""
_NAME = re.compile(r"[a-z][a-z_]{0,31}\Z")
TEXT = {
    "connected": {"to", "scheme", "compress"},
    "accepted": {"scheme", "compress"},
    "listening": {"on"},
    "awaiting": {"on"},
    "acked": {"verdict"},
}
"""Fields that are words, per event (and ``error`` in any); every other field is a figure and must
be a finite non-negative number (``compress`` is the codec in ``connected``, seconds in ``sent``)."""

log = logging.getLogger("memvirt.pm")


@dataclass(frozen=True)
class Event:
    """One agent event: who said it (``source``, ``target``, ``resumed``), what, and when (host
    monotonic seconds)."""

    role: str
    name: str
    fields: dict[str, str] = field(default_factory=dict)
    at: float = 0.0

    def num(self, key: str) -> float:
        """A figure of the event (0 if absent); :func:`parse_line` checked it is a number."""
        try:
            v = float(self.fields.get(key, 0) or 0)
        except ValueError:
            return 0.0
        return v if math.isfinite(v) else 0.0


def _number(v: str) -> bool:
    try:
        x = float(v)
    except ValueError:
        return False
    return math.isfinite(x) and x >= 0


def parse_line(line: str, at: float) -> Event | None:
    """An event from a console line, or None if the line is something else or malformed."""
    start = line.find(PREFIX)
    if start < 0:
        return None
    if len(line) > MAX_LINE:
        log.warning("ignored an over-long console line (%d bytes)", len(line))
        return None
    try:
        words = shlex.split(line[start + len(PREFIX) :].strip())
    except ValueError:
        return None
    if len(words) < 2 or not _NAME.match(words[0]) or not _NAME.match(words[1]):
        return None
    fields: dict[str, str] = {}
    for w in words[2:]:
        k, sep, v = w.partition("=")
        if not sep:
            continue
        if not _NAME.match(k) or (k != "error" and k not in TEXT.get(words[1], ()) and not _number(v)):
            log.warning("ignored a malformed event line: %.120r", line[start:])
            return None
        fields[k] = v
    return Event(words[0], words[1], fields, at)


class ConsoleTail:
    """New agent events in one machine's serial log, from the point it was opened.

    ``roles``: the roles that machine's agent may speak for; events claiming another role are
    counted in :attr:`ignored` and logged, never returned.
    """

    def __init__(self, path: Path, machine: str = "", roles: tuple[str, ...] | None = None):
        self.path = path
        self.machine = machine or path.parent.name
        self.roles = roles
        st = path.stat() if path.exists() else None
        self.offset, self.inode = (st.st_size, st.st_ino) if st else (0, 0)
        self.partial = b""
        self.skipping = False
        self.ignored: list[str] = []

    def poll(self) -> list[Event]:
        try:
            with self.path.open("rb") as f:
                inode = os.fstat(f.fileno()).st_ino
                if inode != self.inode:  # a new log: the console's reader rotated it (memvirt.qemu.serial)
                    self.offset, self.inode = 0, inode
                f.seek(self.offset)
                data = f.read(MAX_READ)
        except FileNotFoundError:
            return []
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        if self.skipping and lines:
            lines.pop(0)  # the end of an over-long line
            self.skipping = False
        if len(self.partial) > MAX_LINE:
            self.partial, self.skipping = b"", True
        now = time.monotonic()
        events = []
        for raw in lines:
            if len(raw) > MAX_LINE:
                continue
            e = parse_line(raw.decode(errors="replace").rstrip("\r"), now)
            if e is None:
                continue
            if self.roles is not None and e.role not in self.roles:
                if len(self.ignored) < 20:
                    self.ignored.append(f"{e.role} {e.name}")
                log.warning(
                    "ignored an event from %s's console claiming role %r: %s %s", self.machine, e.role, e.role, e.name
                )
                continue
            events.append(e)
        return events
