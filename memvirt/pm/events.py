"""The agents' events, read from the machines' serial consoles and timestamped on the host.

pmagent writes ``memvirt-pm: ROLE EVENT k=v ... t=S`` to ``/dev/console``. Both machines' events
get one clock this way (the guests' own clocks differ by up to a second after a restore), so the
downtime is measured from the source's freeze to the moment the restored machine says it runs.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "memvirt-pm: "


@dataclass(frozen=True)
class Event:
    """One agent event: who said it (``source``, ``target``, ``resumed``), what, and when (host
    monotonic seconds)."""

    role: str
    name: str
    fields: dict[str, str] = field(default_factory=dict)
    at: float = 0.0

    def num(self, key: str) -> float:
        return float(self.fields.get(key, 0) or 0)


def parse_line(line: str, at: float) -> Event | None:
    """An event from a console line, or None if the line is something else."""
    start = line.find(PREFIX)
    if start < 0:
        return None
    try:
        words = shlex.split(line[start + len(PREFIX):].strip())
    except ValueError:
        return None
    if len(words) < 2:
        return None
    fields = dict(w.split("=", 1) for w in words[2:] if "=" in w)
    return Event(words[0], words[1], fields, at)


class ConsoleTail:
    """New agent events in a serial log, from the point it was opened."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.partial = b""

    def poll(self) -> list[Event]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        now = time.monotonic()
        found = (parse_line(raw.decode(errors="replace").rstrip("\r"), now) for raw in lines)
        return [e for e in found if e is not None]
