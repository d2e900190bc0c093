"""Where memvirt keeps state (per-VM directories) and caches (kernels, images), and how it creates
the folders and files that hold guest memory or device state: private to their owner.

Guest RAM, templates, saved device state and LAN disks are the guests' secrets (keys, passwords,
whole file systems), and /dev/shm is writable by every local user. So every such folder is made
0700, or, if it already exists, checked to be a real folder (not a symlink) owned by us that no
one else can write to: another user cannot pre-create it to read or swap what memvirt writes
there. One that others can only read (older memvirt made them 0755) is tightened to 0700.
Files are created 0600 with ``O_EXCL | O_NOFOLLOW``: never an existing file, never through a link.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from memvirt.errors import UnsafePath

PRIVATE_FILE = 0o600
READONLY_FILE = 0o400


def private_dir(path: Path | str, exclusive: bool = False) -> Path:
    """Create folder ``path`` 0700 (its parents as usual), or check that the existing one is a real
    folder owned by this user with no group/other access; ``exclusive``: it must not exist yet
    (raises FileExistsError). Refuses (:class:`UnsafePath`) with the path and the problem."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if exclusive:
            raise
    check_private_dir(path)
    return path


def check_private_dir(path: Path | str) -> None:
    """Refuse a folder that is a symlink, not a folder, owned by someone else, or writable by
    others; take group/other read access away from one of ours."""
    try:
        st = os.lstat(path)
    except OSError as e:
        raise UnsafePath(f"cannot use folder {path}: {e.strerror}") from e
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePath(f"refusing folder {path}: it is a symlink (someone else may have planted it)")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"refusing folder {path}: it is not a folder")
    if st.st_uid != os.geteuid():
        raise UnsafePath(f"refusing folder {path}: it belongs to uid {st.st_uid}, not to this user ({os.geteuid()})")
    if st.st_mode & 0o022:
        raise UnsafePath(
            f"refusing folder {path}: its mode {stat.S_IMODE(st.st_mode):04o} lets other users write "
            f"there (guest memory goes there; if nothing in it is foreign, 'chmod 700 {path}')"
        )
    if st.st_mode & 0o077:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise UnsafePath(f"cannot use folder {path}: {e.strerror}") from e
        try:
            if (os.fstat(fd).st_dev, os.fstat(fd).st_ino) != (st.st_dev, st.st_ino):
                raise UnsafePath(f"refusing folder {path}: it was replaced while memvirt checked it")
            os.fchmod(fd, 0o700)
        finally:
            os.close(fd)


def private_file(path: Path | str, size: int | None = None, flags: int = os.O_RDWR) -> int:
    """Create ``path`` 0600 and return its descriptor (``O_CLOEXEC``; the caller closes it), or refuse
    if anything exists there, a symlink included. ``size``: truncate to that many bytes (sparse)."""
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_FILE)
    except FileExistsError as e:
        raise UnsafePath(f"refusing to write {path}: something already exists there") from e
    except OSError as e:
        raise UnsafePath(f"cannot create {path}: {e.strerror}") from e
    try:
        os.fchmod(fd, PRIVATE_FILE)
        if size is not None:
            os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def touch_private(path: Path | str, size: int | None = None) -> Path:
    """:func:`private_file` for a file another program (QEMU) opens by name afterwards."""
    os.close(private_file(path, size))
    return Path(path)


def _own_root(root: Path) -> Path:
    """A top-level state folder: created 0700; an existing one (maybe a symlink the user made) must
    belong to this user and not be writable by others, or they could swap what lies below."""
    if not root.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(root, 0o700)
        except FileExistsError:
            pass
    try:
        st = root.stat()
    except OSError as e:
        raise UnsafePath(f"cannot use state folder {root}: {e.strerror}") from e
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise UnsafePath(
            f"refusing state folder {root}: it must belong to this user and not be writable by others "
            f"(uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})"
        )
    return root


def state_home() -> Path:
    """Root of per-VM state: ``$MEMVIRT_HOME`` or ``~/.local/state/memvirt``."""
    env = os.environ.get("MEMVIRT_HOME")
    root = Path(env) if env else Path.home() / ".local" / "state" / "memvirt"
    return _own_root(root)


def cache_home() -> Path:
    """Downloaded kernels and built images: ``$MEMVIRT_CACHE`` or ``~/.cache/memvirt``."""
    env = os.environ.get("MEMVIRT_CACHE")
    root = Path(env) if env else Path.home() / ".cache" / "memvirt"
    root.mkdir(parents=True, exist_ok=True)
    return root


def ram_dir() -> Path:
    """Where shared RAM files live: ``$MEMVIRT_RAM_DIR`` or a memvirt folder on /dev/shm (private,
    see :func:`private_dir`).

    RAM files belong on tmpfs: a disk-backed file would make every guest write a page-cache
    write-back.
    """
    env = os.environ.get("MEMVIRT_RAM_DIR")
    if env:
        root = Path(env)
    elif Path("/dev/shm").is_dir():
        root = Path("/dev/shm") / f"memvirt-{os.getuid()}"
    else:
        root = state_home() / "ram"
    return private_dir(root)
