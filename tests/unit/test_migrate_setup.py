"""SETUP frames from an authenticated peer are checked field by field before anything is made of
them (no QEMU: :func:`check_setup` and :func:`prepare_target` refuse before a VM exists)."""

from __future__ import annotations

import copy
import os

import pytest

from memvirt.memory import rammap
from memvirt.migrate.protocol import ProtocolError
from memvirt.migrate.receiver import check_setup, max_memory, prepare_target

MEM = 512 << 20
GOOD = {
    "name": "vm-1",
    "source": "src",
    "memory": MEM,
    "cpus": 2,
    "image": "/home/x/.cache/memvirt/images/6.1.0-abc",
    "accel": "tcg",
    "append": "loglevel=3 foo=a,b",
    "regions": rammap.to_dict(rammap.pc_ram_map(MEM)),
}


def _with(**changes: object) -> dict:
    s = copy.deepcopy(GOOD)
    for k, v in changes.items():
        if v is KeyError:
            s.pop(k)
        else:
            s[k] = v
    return s


def test_a_good_setup_is_accepted_and_the_image_is_looked_up_here() -> None:
    st = check_setup(GOOD)
    assert st.accel == "tcg" and st.memory == MEM and st.cpus == 2 and st.regions == rammap.pc_ram_map(MEM)
    # the peer's path is not used: only the image's name, in this host's cache
    assert st.image.parent.name == "images" and st.image.name == "6.1.0-abc" and "/home/x" not in str(st.image)
    big = 4 << 30
    if big <= max_memory():
        assert len(check_setup(_with(memory=big, regions=rammap.to_dict(rammap.pc_ram_map(big)))).regions) == 2


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"accel": "tcg,kernel-irqchip=off"}, "accel"),
        ({"accel": "kvm:tcg"}, "accel"),
        ({"accel": ["tcg"]}, "accel"),
        ({"name": "a,b"}, "invalid VM name"),
        ({"name": "../x"}, "invalid VM name"),
        ({"append": "quiet\ninit=/bin/sh"}, "append"),
        ({"append": "x" * 5000}, "append"),
        ({"source": "a\x1b[31m"}, "source"),
        ({"image": "/x/images/.."}, "image"),
        ({"image": "/x/images/a,b"}, "image"),
        ({"memory": 1 << 60}, "memory"),
        ({"memory": -(1 << 20)}, "memory"),
        ({"memory": (512 << 20) + 4096}, "memory"),
        ({"memory": 512.0 * (1 << 20)}, "memory"),
        ({"memory": True}, "memory"),
        ({"cpus": 0}, "cpus"),
        ({"cpus": 100000}, "cpus"),
        ({"cpus": "1"}, "cpus"),
        ({"regions": [{"gpa": 0, "size": MEM, "offset": 0}, {"gpa": 4096, "size": 4096, "offset": MEM}]}, "overlap"),
        (
            {
                "regions": [
                    {"gpa": 0, "size": MEM // 2, "offset": 0},
                    {"gpa": MEM // 2, "size": MEM // 2, "offset": 4096},
                ]
            },
            "overlap in the RAM file",
        ),
        ({"regions": [{"gpa": 1, "size": MEM, "offset": 0}]}, "page-aligned"),
        ({"regions": [{"gpa": 0, "size": MEM, "offset": 1 << 62}]}, "page-aligned"),
        ({"regions": [{"gpa": 0, "size": MEM - 4096, "offset": 0}]}, "add up to"),
        ({"regions": [{"gpa": 1 << 40, "size": MEM, "offset": 0}]}, "RAM map of a machine"),
        ({"regions": [{"gpa": 0, "size": MEM, "offset": 0, "x": 1}]}, "exactly"),
        ({"regions": [{"gpa": 0, "size": MEM, "offset": 0}] * 9}, "1 to 8"),
        ({"regions": {}}, "list"),
        ({"evil": 1}, "unknown field"),
        ({"accel": KeyError}, "missing field"),
    ],
)
def test_bad_setups_are_refused(changes: dict, needle: str) -> None:
    with pytest.raises(ProtocolError, match="refused SETUP") as e:
        check_setup(_with(**changes))
    assert needle in str(e.value)


def test_prepare_target_refuses_before_making_anything(tmp_path) -> None:
    """A refused SETUP leaves no VM folder or RAM file behind."""
    from memvirt.paths import ram_dir
    from memvirt.qemu.vm import vms_root

    before = set(os.listdir(vms_root())), set(os.listdir(ram_dir()))
    with pytest.raises(ProtocolError):
        prepare_target(_with(accel="tcg,kernel-irqchip=off"))
    assert (set(os.listdir(vms_root())), set(os.listdir(ram_dir()))) == before
