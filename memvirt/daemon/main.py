"""The ``memvirtd`` console script: ``memvirt daemon`` without the CLI stack.

Going through the typer/rich CLI costs the resident service ~11 MiB it never uses (issue #17's
goal is <= 100 MiB for 10 VMs), so the service parses its five options with argparse and
imports only the daemon; ``memvirt daemon`` stays the same command for people at a shell.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from memvirt.errors import MemvirtError

DEFAULT_METRICS = "127.0.0.1:9735"


def run(config: Path | None, metrics: str, socket: Path | None, check: bool, verbose: bool) -> None:
    """What ``memvirt daemon`` and ``memvirtd`` both do with their options."""
    from memvirt.daemon import config as config_mod
    from memvirt.daemon.metrics import parse_addr

    host, port = parse_addr(metrics)
    if check:
        from dataclasses import asdict

        print(json.dumps(asdict(config_mod.load(config)), indent=2))
        return
    from memvirt.daemon.service import Daemon

    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if verbose else logging.INFO,
        format="memvirtd: %(levelname)s: %(message)s",
    )
    for noisy in ("qemu", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    Daemon(config, (host, port), socket).run()


def main(argv: list[str] | None = None) -> None:
    """Errors are one line (``memvirt: error: ...``) and their exit code, as the CLI's."""
    ap = argparse.ArgumentParser(prog="memvirtd", description="memvirt's host service (see 'memvirt daemon --help').")
    ap.add_argument("--config", type=Path, help="config file (default: $MEMVIRT_HOME/memvirtd.toml)")
    ap.add_argument("--metrics", default=DEFAULT_METRICS, help="ADDR:PORT of the Prometheus endpoint")
    ap.add_argument("--socket", type=Path, help="control socket (default: $MEMVIRT_HOME/memvirtd/control.sock)")
    ap.add_argument("--check", action="store_true", help="validate the config, print it as applied, and exit")
    ap.add_argument("--verbose", "-v", action="store_true", help="log debug details")
    a = ap.parse_args(argv)
    try:
        run(a.config, a.metrics, a.socket, a.check, a.verbose)
    except MemvirtError as e:
        print(f"memvirt: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
