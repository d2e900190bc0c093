"""A second system libvirtd on this host, the destination of libvirt migrations in tests and bench.

libvirt refuses to migrate to a host with its own host UUID, and the privileged daemon uses fixed
paths (/run/libvirt, /var/lib/libvirt, /etc/libvirt, ...). So the second daemon runs in its own
mount and UTS namespaces (``unshare -m -u``), with private copies of those directories, a
libvirtd.conf carrying its own ``host_uuid``, and listens on loopback TCP with ``auth_tcp="none"``.
Its qemu.conf writes QEMU's stdio to a file (no virtlogd is reachable in the namespace) and uses
no cgroups (both daemons would otherwise name their domains' cgroups ``qemu-1-NAME``).

``python tests/libvirtd2.py start|stop DIR`` runs it by hand; :func:`second_libvirtd` is the
context manager the tests and bench use. Hold ``/tmp/memvirt-libvirt.lock`` around either.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PORT = 16519


def host_uri() -> str:
    """The host's own libvirtd as both daemons reach it: ``qemu:///system`` inside the second
    daemon's namespace is that daemon itself, while ``/proc/PID/root`` of the host's libvirtd
    resolves in the host's mount namespace (``/proc/1/root`` is refused here: PID 1 is the VM's
    init). The way back for a peer-to-peer migration from the second daemon."""
    pid = int(Path("/run/libvirtd.pid").read_text().strip())
    return f"qemu+unix:///system?socket=/proc/{pid}/root/run/libvirt/libvirt-sock"


PRIVATE = ("/run/libvirt", "/var/lib/libvirt", "/var/cache/libvirt", "/etc/libvirt")


def uri(port: int = PORT) -> str:
    return f"qemu+tcp://127.0.0.1:{port}/system"


def _answers(port: int) -> bool:
    return subprocess.run(["virsh", "-c", uri(port), "version"], capture_output=True, timeout=30).returncode == 0


def start(root: Path, port: int = PORT) -> int:
    """Start the daemon with its state under ``root``; its pid (of ``unshare``'s child libvirtd)."""
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    binds = []
    for path in PRIVATE:
        mine = root / path.strip("/").replace("/", "_")
        if path == "/etc/libvirt":
            shutil.copytree(path, mine, dirs_exist_ok=True)
            shutil.rmtree(mine / "qemu", ignore_errors=True)  # no domains of the host's daemon
            (mine / "qemu").mkdir()
            shutil.rmtree(mine / "hooks", ignore_errors=True)
            (mine / "libvirtd.conf").write_text(
                f'listen_tls = 0\nlisten_tcp = 1\ntcp_port = "{port}"\nlisten_addr = "127.0.0.1"\n'
                f'auth_tcp = "none"\nhost_uuid = "{uuid.uuid4()}"\nunix_sock_group = "root"\n'
            )
            (mine / "qemu.conf").write_text('stdio_handler = "file"\ncgroup_controllers = [ ]\n')
        mine.mkdir(exist_ok=True)
        binds.append(f"mount --bind {mine} {path}")
    script = (
        "set -e; mount --make-rprivate /; "
        + "; ".join(binds)
        + f"; hostname memvirt-dest; exec libvirtd --listen -p /run/libvirt/libvirtd2.pid 2>{root}/libvirtd.log"
    )
    proc = subprocess.Popen(
        ["unshare", "-m", "-u", "sh", "-c", script], stdin=subprocess.DEVNULL, start_new_session=True
    )
    (root / "pid").write_text(str(proc.pid))
    for _ in range(150):
        if _answers(port):
            return proc.pid
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    stop(root)
    log = (root / "libvirtd.log").read_text() if (root / "libvirtd.log").exists() else ""
    raise RuntimeError(f"the second libvirtd did not answer at {uri(port)}: {log[-500:]}")


def stop(root: Path) -> None:
    """Stop the daemon (its domains first: no QEMU outlives it) and remove its state."""
    try:
        pid = int((root / "pid").read_text())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    for _ in range(150):
        if not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(root, ignore_errors=True)


@contextmanager
def second_libvirtd(port: int = PORT) -> Iterator[str]:
    """The second daemon's URI while the block runs; its domains are destroyed before it stops."""
    root = Path(tempfile.mkdtemp(prefix="mvlv2-"))
    start(root, port)
    try:
        yield uri(port)
    finally:
        names = subprocess.run(["virsh", "-c", uri(port), "list", "--name"], capture_output=True, text=True).stdout
        for name in names.split():
            subprocess.run(["virsh", "-c", uri(port), "destroy", name], capture_output=True)
        stop(root)


if __name__ == "__main__":
    action, where = sys.argv[1], Path(sys.argv[2])
    if action == "start":
        print(start(where))
    else:
        stop(where)
