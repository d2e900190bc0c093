"""A minimal ``newc`` cpio writer: the initramfs format the kernel unpacks."""

from __future__ import annotations

import io
import stat

TRAILER = "TRAILER!!!"


class CpioWriter:
    """Writes directories, files and symlinks in ``newc`` format into a byte buffer."""

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        name_b = name.encode() + b"\0"
        fields = [self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name_b), 0]
        self._ino += 1
        self._buf.write(b"070701" + b"".join(b"%08X" % f for f in fields))
        self._buf.write(name_b)
        self._pad()
        self._buf.write(data)
        self._pad()

    def _pad(self) -> None:
        self._buf.write(b"\0" * (-self._buf.tell() % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def finish(self) -> bytes:
        self._entry(TRAILER, 0)
        return self._buf.getvalue()
