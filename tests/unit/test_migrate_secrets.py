"""Shared-secret rules: strong secrets only, private files only, gone from the environment once
read; ``--insecure`` on loopback only. No QEMU."""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from cli import assert_one_line_error

from memvirt.errors import UsageError
from memvirt.migrate.protocol import SECRET_ENV, check_insecure, check_secret, load_secret

GOOD = secrets.token_hex(32)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parents[2]
    e = {**(env if env is not None else os.environ), "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-m", "memvirt", *args], capture_output=True, text=True, env=e, timeout=60)


@pytest.mark.parametrize(
    "secret",
    [
        GOOD,
        GOOD.upper(),
        secrets.token_hex(40),
        base64.b64encode(secrets.token_bytes(32)).decode(),
        base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("="),
    ],
)
def test_strong_secrets_are_accepted(secret: str) -> None:
    assert check_secret(secret.encode()) == secret.encode()


@pytest.mark.parametrize(
    "secret",
    [
        "migrate-test-secret-0123456789abcdef",
        "x" * 32,
        GOOD[:62],
        "0" * 64,
        "0123456789abcdef" * 4,
        base64.b64encode(secrets.token_bytes(31)).decode(),
        "é" * 64,
        "correct horse battery staple" * 3,
    ],
)
def test_weak_secrets_are_refused(secret: str) -> None:
    with pytest.raises(UsageError, match="openssl rand -hex 32"):
        check_secret(secret.encode())


def test_secret_file_must_be_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    f = tmp_path / "secret"
    f.write_text(GOOD + "\n")
    f.chmod(0o644)
    with pytest.raises(UsageError, match="open to group or others"):
        load_secret(f, False)
    f.chmod(0o640)
    with pytest.raises(UsageError, match="mode 0640"):
        load_secret(f, False)
    f.chmod(0o600)
    assert load_secret(f, False) == GOOD.encode()
    f.write_text("short\n")
    with pytest.raises(UsageError, match="too weak"):
        load_secret(f, False)
    big = tmp_path / "big"
    big.write_bytes(b"a" * 10000)
    big.chmod(0o600)
    with pytest.raises(UsageError, match="not a secret"):
        load_secret(big, False)


def test_cli_refuses_an_open_secret_file_and_insecure_off_loopback(tmp_path: Path) -> None:
    f = tmp_path / "secret"
    f.write_text(GOOD)
    f.chmod(0o644)
    assert_one_line_error(_cli("receive", "--listen", "127.0.0.1:0", "--secret-file", str(f)), 2, "chmod 600")
    assert_one_line_error(_cli("receive", "--listen", "0.0.0.0:0", "--insecure"), 2, "only allowed on loopback")
    assert_one_line_error(_cli("migrate", "x", "--to", "192.0.2.1:4444", "--insecure"), 2, "only allowed on loopback")
    env = {**os.environ, SECRET_ENV: "hunter2hunter2hunter2"}
    assert_one_line_error(_cli("receive", "--listen", "127.0.0.1:0", env=env), 2, "too weak")


def test_insecure_is_for_loopback_only() -> None:
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"):
        check_insecure(host)
    for host in ("0.0.0.0", "::", "10.0.0.1", "example.org", ""):
        with pytest.raises(UsageError, match="loopback"):
            check_insecure(host)


def test_secret_leaves_the_environment_once_read() -> None:
    """Read from $MEMVIRT_SECRET, the secret is removed from the process's environment, so a
    child it starts (QEMU, a watchdog) does not inherit it."""
    code = (
        "import os, subprocess; from memvirt.migrate.protocol import load_secret; "
        "s = load_secret(None, False); assert 'MEMVIRT_SECRET' not in os.environ; "
        "print(len(s)); print(subprocess.run(['env'], capture_output=True, text=True).stdout)"
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(root), SECRET_ENV: GOOD},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "64"
    assert GOOD not in proc.stdout and SECRET_ENV not in proc.stdout
