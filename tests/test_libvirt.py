"""libvirt domains as memvirt VMs, with a real libvirtd and TCG domains defined from XML.

What a libvirt user cares about: memvirt's figures for ``libvirt:NAME`` match the guest's own,
reclaim gives memory back for memfd-backed and default (anonymous) RAM, and libvirt still
manages the domain normally afterwards (running, suspend, resume, destroy).

The domains boot memvirt's image by direct kernel boot, with memvirt's command agent on a
virtio-serial channel (a unix socket libvirt binds) and a pvpanic device with
``<on_crash>preserve</on_crash>`` (so ``memsnap --freeze`` pauses the guest at the moment it read its
figures, as ``-action panic=pause`` does for memvirt's own VMs). Their QEMU runs as root through a
per-domain DAC label: the image lives under root's home, which libvirt-qemu cannot enter.
"""

from __future__ import annotations

import grp
import json
import os
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cli import assert_one_line_error, memvirt
from test_introspect import assert_matches_guest

from memvirt.image.build import Image
from memvirt.introspect import Introspector
from memvirt.introspect.groundtruth import FrozenFigures

libvirt = pytest.importorskip("libvirt")

from memvirt.dedup import watchdog  # noqa: E402
from memvirt.dedup.discard import ram_mapping_usage  # noqa: E402
from memvirt.virt.domain import LibvirtVM  # noqa: E402

URI = "qemu:///system"
MIB = 1 << 20
DIRTY = "memtouch --hot 160M --content random --duration 1 >/dev/null"

DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel><initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet memvirt.name={name}</cmdline></os>
  {backing}
  <cpu mode='custom'><model>qemu64</model></cpu>
  <on_reboot>destroy</on_reboot><on_crash>preserve</on_crash>
  <devices>
    <serial type='file'><source path='{dir}/serial.log'/><target port='0'/></serial>
    <channel type='unix'><source mode='bind' path='{dir}/cmd.sock'/>
      <target type='virtio' name='org.memvirt.cmd'/></channel>
    <memballoon model='none'/>
    <panic model='isa'/>
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
</domain>"""
MEMFD = "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>"


def virsh(*args: str, check: bool = True) -> str:
    proc = subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def _answers() -> bool:
    return subprocess.run(["virsh", "-c", URI, "version"], capture_output=True, timeout=30).returncode == 0


@contextmanager
def _kvm_node_as_udev_leaves_it() -> Iterator[None]:
    """``/dev/kvm`` as Debian's udev rule leaves it (root:kvm 0660) for the test's duration.

    Without udev (this host) the node stays root:root 0600. libvirt 9.0's QEMU driver then finds
    at each capability lookup that the probe saw KVM but its QEMU user cannot open the node
    (virQEMUCapsIsValid: "KVM was enabled when probing ..., but it is not available now") and
    probes QEMU again, 4 s a lookup: ``virsh define`` took 32 s. The node is put back after."""
    try:
        st = os.stat("/dev/kvm")
        kvm = grp.getgrnam("kvm").gr_gid
    except (OSError, KeyError):
        yield
        return
    if (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) != (0, 0, 0o600):
        yield
        return
    os.chown("/dev/kvm", 0, kvm)
    os.chmod("/dev/kvm", 0o660)
    try:
        yield
    finally:
        os.chmod("/dev/kvm", 0o600)
        os.chown("/dev/kvm", 0, 0)


@pytest.fixture(scope="module")
def libvirtd() -> Iterator[None]:
    """A running system libvirtd: the host's if it runs, else one started here (with virtlogd,
    which libvirt's QEMU driver logs through) and stopped at the end."""
    if shutil.which("libvirtd") is None or shutil.which("virsh") is None:
        pytest.skip("libvirt is not installed (scripts/bootstrap.sh installs it)")
    with _kvm_node_as_udev_leaves_it():
        yield from _libvirtd()


def _libvirtd() -> Iterator[None]:
    started: list[Path] = []
    if not _answers():
        for daemon, pidfile in (("virtlogd", "/run/virtlogd.pid"), ("libvirtd", "/run/libvirtd.pid")):
            if subprocess.run(["pgrep", "-x", daemon], capture_output=True).returncode != 0:
                subprocess.run([daemon, "-d", "-p", pidfile], check=True, timeout=60)
                started.append(Path(pidfile))
        for _ in range(100):
            if _answers():
                break
            time.sleep(0.2)
        else:
            raise AssertionError("libvirtd did not answer")
    try:
        yield
    finally:
        for pidfile in reversed(started):
            try:
                pid = int(pidfile.read_text().strip())
            except (OSError, ValueError):
                continue
            os.kill(pid, 15)
            for _ in range(100):
                if not Path(f"/proc/{pid}").exists():
                    break
                time.sleep(0.1)


Domains = Callable[..., LibvirtVM]


class _Made:
    """Defines and starts domains; :meth:`close` destroys and undefines each."""

    def __init__(self, image: Image):
        self.image = image
        self.made: list[tuple[str, Path]] = []

    def __call__(self, memfd: bool = True, mib: int = 512, start: bool = True) -> LibvirtVM | str:
        name = f"mvlv-{secrets.token_hex(3)}"
        d = Path(tempfile.mkdtemp(prefix="mvlv-"))
        self.made.append((name, d))
        xml = DOMAIN_XML.format(
            name=name,
            mib=mib,
            kernel=self.image.vmlinuz,
            initrd=self.image.initrd,
            dir=d,
            backing=MEMFD if memfd else "",
        )
        (d / "domain.xml").write_text(xml)
        virsh("define", str(d / "domain.xml"))
        if not start:
            return name
        virsh("start", name)
        vm = LibvirtVM(name, URI)
        vm.channel.wait_ready(180, vm.alive)
        return vm

    def close(self) -> None:
        for name, d in self.made:
            virsh("destroy", name, check=False)
            virsh("undefine", name, check=False)
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def domains(libvirtd: None, image: Image) -> Iterator[Domains]:
    """Define and start domains of this test's own; each is destroyed and undefined at the end."""
    made = _Made(image)
    try:
        yield made  # type: ignore[misc]
    finally:
        made.close()


@pytest.fixture(scope="module")
def shared(libvirtd: None, image: Image) -> Iterator[Domains]:
    """A running domain per RAM kind, shared by this module's tests (a TCG boot costs ~30 s): a
    test that shuts its domain off gets a fresh one the next time it asks."""
    made = _Made(image)
    running: dict[bool, LibvirtVM] = {}

    def get(memfd: bool = True) -> LibvirtVM:
        if memfd not in running or _state(running[memfd].name) != "running":
            made_now = made(memfd=memfd)
            assert isinstance(made_now, LibvirtVM)
            running[memfd] = made_now
        return running[memfd]

    try:
        yield get
    finally:
        made.close()


def _state(name: str) -> str:
    return virsh("domstate", name).strip()


def _rss(vm: LibvirtVM) -> int:
    """What QEMU's guest-RAM mapping holds in host memory now."""
    start, _ = vm.ram_mapping()
    return ram_mapping_usage(vm.config.pid, start)["Rss"]


def test_inspect_matches_the_guest_when_paused(shared: Domains) -> None:
    vm = shared(memfd=True)
    assert vm.config.ram == "shared" and vm.config.ram_path.startswith(f"/proc/{vm.config.pid}/fd/")
    with vm.memory() as mem:
        intro = Introspector(mem)
        with FrozenFigures(vm) as snap:
            assert _state(vm.name) == "crashed"  # libvirt's name for a guest held at its pvpanic
            census = intro.scan()
    assert snap.figures is not None
    assert_matches_guest(census, snap.figures)
    assert census.counts["free"] == snap.figures.pages("MemFree") or census.counts["free"] == sum(
        snap.figures.zone_free.values()
    )
    assert _state(vm.name) == "running"
    proc = memvirt("inspect", f"libvirt:{vm.name}", "--json")
    assert proc.returncode == 0, proc.stderr
    assert _state(vm.name) == "running", "inspect's pause must be undone through libvirt"


def test_wss_and_compress_on_a_domain(shared: Domains) -> None:
    vm = shared(memfd=False)
    vm.exec(DIRTY, timeout=180).check("dirtying memory")
    target = f"libvirt:{vm.name}"
    proc = memvirt("wss", target, "--duration", "3", "--method", "referenced", "--json")
    assert proc.returncode == 0, proc.stderr
    assert '"wss"' in proc.stdout
    proc = memvirt(
        "compress",
        target,
        "--policy",
        "static",
        "--limit",
        "150M",
        "--duration",
        "4",
        "--method",
        "referenced",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    group = vm.memcg()
    assert group is not None, "libvirt gives each domain a memory cgroup"
    assert _state(vm.name) == "running"
    assert vm.exec("echo alive").text.strip() == "alive"
    proc = memvirt("dedup", "analyze", target, "--pause", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["sources"][0]["pages"] == vm.config.memory // 4096, proc.stdout
    assert _state(vm.name) == "running"


def test_a_reclaim_killed_in_a_pause_leaves_the_domain_running(shared: Domains) -> None:
    """Reclaim's watchdog resumes a domain its reclaim paused and died in, through libvirt."""
    vm = shared(memfd=True)
    virsh("suspend", vm.name)
    gone = subprocess.Popen(["true"])
    gone.wait()
    mark = vm.dir / watchdog.MARK
    watchdog.mark_paused(mark, vm, pid=gone.pid)  # what reclaim writes before each pause
    subprocess.run([sys.executable, "-m", "memvirt.dedup.watchdog", str(gone.pid), str(mark)], check=True, timeout=120)
    assert _state(vm.name) == "running"
    assert not (vm.dir / watchdog.MARK).exists()


@pytest.mark.parametrize("memfd", [True, False], ids=["memfd", "anonymous"])
def test_reclaim_returns_free_memory(shared: Domains, memfd: bool) -> None:
    vm = shared(memfd=memfd)
    assert vm.config.ram == ("shared" if memfd else "anonymous")
    vm.exec(DIRTY, timeout=180).check("dirtying free memory")
    before = _rss(vm)
    proc = memvirt("--connect", URI, "reclaim", f"libvirt:{vm.name}", "--json")
    assert proc.returncode == 0, proc.stderr
    after = _rss(vm)
    assert before - after >= 100 * MIB, (before, after, proc.stdout)
    assert vm.exec("memtouch --hot 64M --content random --duration 1 >/dev/null && echo alive").text.strip() == "alive"
    info = virsh("dominfo", vm.name)
    assert "running" in info and "custom-monitor" not in info, info  # suspend/resume only: no taint
    virsh("suspend", vm.name)
    assert _state(vm.name) == "paused"
    virsh("resume", vm.name)
    assert _state(vm.name) == "running"
    virsh("destroy", vm.name)  # the last test of the shared domain of its kind
    assert _state(vm.name) == "shut off"


def test_bad_input_is_one_line(domains: Domains) -> None:
    off = domains(start=False)
    assert_one_line_error(memvirt("inspect", "libvirt:mvlv-no-such"), 2, "no libvirt domain named 'mvlv-no-such'")
    assert_one_line_error(memvirt("reclaim", "libvirt:mvlv-no-such"), 2, "no libvirt domain")
    assert_one_line_error(memvirt("reclaim", f"libvirt:{off}"), 2, "is shut off")
    assert_one_line_error(memvirt("mem", "info", f"libvirt:{off}"), 2, "is shut off")
    refusing = "qemu+tcp://127.0.0.1:1/system"
    assert_one_line_error(memvirt("--connect", refusing, "wss", "libvirt:x"), 1, "cannot connect", "refused")
    # a libvirtd that does not run: its socket is missing
    gone = "qemu:///system?socket=/run/mvlv-no-libvirtd/libvirt-sock"
    assert_one_line_error(memvirt("--connect", gone, "inspect", "libvirt:x"), 1, "cannot connect", "libvirtd running")
