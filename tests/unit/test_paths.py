"""The private folder/file helpers that guard guest memory from other local users (issue 14, item 2)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from memvirt import paths
from memvirt.paths import UnsafePath, private_dir, private_file, touch_private


@pytest.fixture
def umask0():
    """Even with a permissive umask, what memvirt creates stays private."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_private_dir_is_created_0700(tmp_path: Path, umask0: None) -> None:
    d = private_dir(tmp_path / "a" / "ram")
    assert stat.S_IMODE(os.lstat(d).st_mode) == 0o700
    assert private_dir(d) == d  # an existing private folder is accepted


def test_private_dir_refuses_a_folder_others_can_write(tmp_path: Path) -> None:
    d = tmp_path / "ram"
    d.mkdir()
    for mode in (0o777, 0o1777, 0o720, 0o702):
        os.chmod(d, mode)
        with pytest.raises(UnsafePath, match=rf"ram: its mode {mode:04o} lets other users write"):
            private_dir(d)


def test_private_dir_tightens_a_folder_others_can_read(tmp_path: Path) -> None:
    """Older memvirt made its RAM folder 0755: nobody else could put anything in it, so it is kept."""
    d = tmp_path / "ram"
    d.mkdir()
    for mode in (0o755, 0o710, 0o701):
        os.chmod(d, mode)
        private_dir(d)
        assert stat.S_IMODE(os.lstat(d).st_mode) == 0o700


def test_private_dir_refuses_symlink(tmp_path: Path) -> None:
    real = private_dir(tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(UnsafePath, match="link: it is a symlink"):
        private_dir(link)


def test_private_dir_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(UnsafePath, match="not a folder"):
        private_dir(tmp_path / "f")


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_private_dir_refuses_other_owner(tmp_path: Path) -> None:
    d = tmp_path / "ram"
    d.mkdir(mode=0o700)
    os.chown(d, 65534, 65534)
    with pytest.raises(UnsafePath, match="belongs to uid 65534"):
        private_dir(d)


def test_private_dir_exclusive(tmp_path: Path) -> None:
    private_dir(tmp_path / "vm", exclusive=True)
    with pytest.raises(FileExistsError):
        private_dir(tmp_path / "vm", exclusive=True)


def test_private_file_is_0600_and_sized(tmp_path: Path, umask0: None) -> None:
    p = tmp_path / "x.ram"
    fd = private_file(p, 1 << 20)
    os.close(fd)
    st = os.lstat(p)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == 1 << 20 and st.st_blocks == 0


def test_private_file_never_reuses_or_follows(tmp_path: Path) -> None:
    existing = tmp_path / "planted.ram"
    existing.write_text("x")
    with pytest.raises(UnsafePath, match="already exists"):
        touch_private(existing)
    target = tmp_path / "victim"
    link = tmp_path / "link.ram"
    link.symlink_to(target)
    with pytest.raises(UnsafePath, match="already exists"):
        touch_private(link)
    assert not target.exists()


def test_ram_dir_refuses_a_planted_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    planted = tmp_path / "shm-ram"
    planted.mkdir()
    os.chmod(planted, 0o777)
    monkeypatch.setenv("MEMVIRT_RAM_DIR", str(planted))
    with pytest.raises(UnsafePath, match="shm-ram: its mode 0777"):
        paths.ram_dir()
    os.chmod(planted, 0o700)
    assert paths.ram_dir() == planted


def test_state_home_created_private_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMVIRT_HOME", str(tmp_path / "state"))
    root = paths.state_home()
    assert stat.S_IMODE(root.stat().st_mode) & 0o077 == 0
    os.chmod(root, 0o777)
    with pytest.raises(UnsafePath, match="not be writable by others"):
        paths.state_home()
