"""A VM's serial console, kept on disk with a size cap (a guest must not fill the host's disk).

QEMU's ``file`` chardev appends without limit, so QEMU serves the console on a unix socket
(``server=on,wait=off``: with no reader it drops output, the guest never blocks) and a tiny
detached reader copies it to ``serial.log``; at :data:`SERIAL_CAP` bytes it moves the log to
``serial.log.1`` and starts a new one, so the console takes at most twice the cap. The reader is
started before QEMU and connects as soon as the socket exists (long before the guest prints), and
exits when QEMU closes the socket. It imports nothing of memvirt (``python -S``: a few MiB).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SERIAL_SOCK = "serial.sock"
SERIAL_CAP = 4 << 20
CONNECT_TIMEOUT = 120.0

_DRAIN = r"""
import os, socket, sys, time
sock_path, log, cap, wait = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
deadline = time.monotonic() + wait
while True:
    try:
        s.connect(sock_path)
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(0)
        time.sleep(0.005)
flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
fd = os.open(log, flags, 0o600)
size = os.fstat(fd).st_size
while True:
    try:
        data = s.recv(1 << 16)
    except OSError:
        break
    if not data:
        break
    if size + len(data) > cap:
        os.close(fd)
        os.replace(log, log + ".1")
        fd = os.open(log, flags | os.O_TRUNC, 0o600)
        size, data = 0, data[-cap:]
    os.write(fd, data)
    size += len(data)
"""


def spawn_serial_drain(sock: Path, log: Path, cap: int = SERIAL_CAP) -> subprocess.Popen[bytes]:
    """Start the reader that copies the console on ``sock`` into ``log`` (capped), detached."""
    return subprocess.Popen(
        [sys.executable, "-S", "-c", _DRAIN, str(sock), str(log), str(cap), str(CONNECT_TIMEOUT)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
