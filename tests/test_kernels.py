"""The newest Debian kernels (sid's Linux 7.2) on real guests: exact census, reclaim, clone.

7.x changed what memvirt reads (see docs/introspection.md): kallsyms offsets became
place-relative, tail pages hold a mask instead of their head's address, and per-cpu pointers
are kernel-image addresses. The bootstrap decides each from the guest's memory; these tests
show it on both amd64 flavours. CI runs the cloud flavour (``test_newest_kernel[cloud]``);
the rest of the kernel matrix is marked ``kernels`` (``pytest -m kernels``).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from cli import memvirt
from test_introspect import _start_toucher, assert_matches_guest

from memvirt.dedup.reclaim import Reclaimer
from memvirt.image.build import default_image
from memvirt.introspect import CHOICES, Introspector
from memvirt.introspect.groundtruth import FrozenFigures
from memvirt.qemu.vm import VM, vm_memory

pytestmark = pytest.mark.guest
SERIES = "7.2"
COUNTER = "/tmp/memtouch.count"


@pytest.mark.timeout(1200)
@pytest.mark.support("introspection", "reclaim & KSM", "cloning")
@pytest.mark.parametrize("flavour", ["cloud", pytest.param("amd64", marks=pytest.mark.kernels)])
def test_newest_kernel(vm_factory, flavour):
    """Census exact against the paused guest's figures with every layout source; a reclaim keeps
    datacheck's data; a clone of the guest runs."""
    img = default_image(SERIES, flavour)
    vm = vm_factory(f"k72-{flavour}", img, memory=512 << 20)
    vm.exec_background("datacheck write --size 32M --seed 72 --state /tmp/dc.state", "/tmp/dc.log")
    _start_toucher(vm, "memtouch --hot 16M --cold 48M --content mix")
    with vm_memory(vm) as mem:
        # Every layout source (the headers of this exact build come from sid) gives the same pages.
        intros = {choice: Introspector(mem, layouts=choice, cache=False) for choice in CHOICES}
        with FrozenFigures(vm) as snap:
            results = {choice: intro.scan() for choice, intro in intros.items()}
    census = results["auto"]
    for choice, other in results.items():
        assert np.array_equal(other.classes, census.classes), f"--layouts {choice} disagrees with auto"
    assert census.release == vm.config.kernel_release and census.release.startswith(SERIES)
    assert census.counts["free"] == snap.figures.pages("MemFree")
    assert_matches_guest(census, snap.figures)

    vm.exec("memtouch --hot 96M --content random --duration 1 >/dev/null", timeout=120).check("dirtying free memory")
    with Reclaimer(vm) as rec:
        rep = rec.run()
    assert rep.reclaimed_bytes >= 32 << 20, rep
    assert vm.status() == "running"
    assert vm.exec("datacheck verify --state /tmp/dc.state --timeout 60").rc == 0

    vm.exec("killall memtouch 2>/dev/null; true")
    vm.exec_background(f"memtouch --hot 4M --cold 8M --counter-file {COUNTER}", "/tmp/memtouch.log")
    for _ in range(100):
        if vm.exec(f"test -s {COUNTER}").rc == 0:
            break
        time.sleep(0.2)
    proc = memvirt("clone", vm.name, "--count", "1", "--prefix", f"k72c-{flavour}", "--json")
    assert proc.returncode == 0, proc.stderr
    clones = [VM.load(c["name"]) for c in json.loads(proc.stdout)["clones"]]
    try:
        clone = clones[0]
        first = int(clone.exec(f"cat {COUNTER}").check("counter").text)
        time.sleep(1)
        assert int(clone.exec(f"cat {COUNTER}").check("counter").text) > first
        assert clone.exec("uname -r").text.strip() == census.release
    finally:
        for c in clones:
            c.stop(force=True)
