"""``memvirt dirty``'s report arithmetic over synthetic intervals (no QEMU)."""

from __future__ import annotations

import numpy as np

from memvirt.cli.dirty import Interval, _report, ranges


def test_ranges_are_the_runs_of_written_frames() -> None:
    mask = np.zeros(20, dtype=bool)
    assert ranges(mask) == []
    mask[[0, 1, 2, 7, 10, 11, 19]] = True
    assert ranges(mask) == [[0, 3], [7, 8], [10, 12], [19, 20]]
    assert ranges(np.ones(5, dtype=bool)) == [[0, 5]]


def test_report_totals_and_rates() -> None:
    rows = [
        Interval(0.5, 0.5, 100, 409600, 200.0, 819200.0, 100, 100, 0.2),
        Interval(1.0, 0.5, 50, 204800, 100.0, 409600.0, 10, 110, 0.1),
    ]
    written = np.zeros(1000, dtype=bool)
    written[:110] = True
    r = _report("vm1", "uffd-wp", "", 0.5, rows, written)
    assert r["seconds"] == 1.0 and r["scanned_pages_total"] == 150
    assert r["mean_pages_per_s"] == 150.0 and r["mean_bytes_per_s"] == 150 * 4096
    assert r["peak_bytes_per_s"] == 819200.0
    assert r["written_pages"] == 110 and r["written_bytes"] == 110 * 4096 and r["written_set"] == [[0, 110]]
    empty = _report("vm1", "fingerprint", "why", 1.0, [], np.zeros(10, dtype=bool))
    assert empty["mean_bytes_per_s"] == 0.0 and empty["peak_bytes_per_s"] == 0.0 and empty["intervals"] == []
