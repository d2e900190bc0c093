"""Auto-converge: slow a guest whose dirty set stops shrinking, so precopy can finish.

When pages are written faster than a round can send them, no number of rounds gets the
remainder under the downtime target. QEMU then throttles the vCPUs (``auto-converge``: 20 %, then
10 % more per round, up to 99 %). memvirt does the same from outside: a thread stops the guest
for that share of every 100 ms and lets it run the rest, through QMP. The guest runs slower for a
few rounds instead of being paused for a second at the switch-over. Should the sender die while
the guest is held, its watchdog (:mod:`memvirt.migrate.watchdog`) resumes it.
"""

from __future__ import annotations

import threading

from memvirt.errors import VMError
from memvirt.qemu.vm import VM

PERIOD = 0.1
INITIAL = 0.2
STEP = 0.1
MAX = 0.99


class Throttle:
    """Duty-cycles a running VM on its own QMP session; :meth:`close` leaves it running."""

    def __init__(self, vm: VM):
        self.vm = vm
        self.share = 0.0
        self._stop = threading.Event()
        self._mon = vm.monitor()
        self._error: VMError | None = None
        self._thread = threading.Thread(target=self._run, name="memvirt-throttle", daemon=True)
        self._thread.start()

    def harder(self) -> float:
        """Raise the stopped share (20 %, then 10 % more each call, at most 99 %); the new share."""
        self.share = INITIAL if self.share == 0 else min(MAX, self.share + STEP)
        return self.share

    @property
    def at_max(self) -> bool:
        return self.share >= MAX

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                share = self.share
                if share <= 0:
                    self._stop.wait(PERIOD)
                    continue
                self._mon.command("stop")
                self._stop.wait(share * PERIOD)
                self._mon.command("cont")
                self._stop.wait((1 - share) * PERIOD)
        except VMError as e:
            self._error = e

    def close(self) -> None:
        """Stop throttling; the guest is left running (its last ``cont`` is sent again)."""
        self._stop.set()
        self._thread.join(5)
        try:
            if self.share > 0 and self._error is None:
                self._mon.command("cont")
        finally:
            self._mon.close()
        if self._error is not None:
            raise VMError(f"throttling {self.vm.name!r} failed: {self._error}")


__all__ = ["Throttle", "PERIOD", "INITIAL", "STEP", "MAX"]
