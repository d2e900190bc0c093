"""``tier down`` refuses before swapping off more than the host can take back (issue 14, item 9).
Only the check runs here: nothing is swapped off."""

from __future__ import annotations

import pytest

from memvirt.compress import tiers
from memvirt.compress.tiers import Tiers
from memvirt.errors import MemvirtError


def test_refuses_more_than_available() -> None:
    t = Tiers(disk_file="/nonexistent/swap")
    with pytest.raises(MemvirtError, match=r"tier down would bring \d+ MiB .* back into RAM"):
        tiers._check_room(t, {"/nonexistent/swap": {"size": 1 << 50, "used": 1 << 50, "priority": 1}})


def test_allows_what_fits() -> None:
    t = Tiers(disk_file="/nonexistent/swap")
    tiers._check_room(t, {"/nonexistent/swap": {"size": 1 << 30, "used": 1 << 20, "priority": 1}})
    tiers._check_room(t, {})  # not swapped on: nothing comes back
