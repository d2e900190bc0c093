"""Entry point: sub-command groups, the demo, and the one place errors become exit codes."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Annotated, NoReturn

import typer

from memvirt import __version__
from memvirt.cli import compress, dedup, image, libvirt_cmd, mem, migrate, pm, vm
from memvirt.cli.clone import clone
from memvirt.cli.daemon import attach, daemon, status
from memvirt.cli.demo import demo
from memvirt.cli.dirty import dirty
from memvirt.cli.inspect import inspect
from memvirt.cli.output import err
from memvirt.errors import MemvirtError
from memvirt.procs import Terminated, terminate_like_interrupt, terminated
from memvirt.virt import set_uri  # also registers libvirt:NAME with VM.load

app = typer.Typer(
    help="memvirt: manage the memory of Linux QEMU/KVM guests from the host.\n\n"
    "Exit codes: 0 ok, 1 operation failed, 2 bad usage or input.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(image.app, name="image")
app.add_typer(vm.app, name="vm")
app.add_typer(mem.app, name="mem")
app.command("inspect")(inspect)
app.command("clone")(clone)
app.command("reclaim")(dedup.reclaim)
app.add_typer(dedup.app, name="dedup")
app.add_typer(dedup.ksm_app, name="ksm")
app.command("migrate")(migrate.migrate)
app.command("receive")(migrate.receive)
app.command("wss")(compress.wss)
app.command("dirty")(dirty)
app.command("compress")(compress.compress)
app.add_typer(compress.tier_app, name="tier")
app.add_typer(pm.app, name="pm")
app.add_typer(libvirt_cmd.app, name="libvirt")
app.command("demo")(demo)
app.command("daemon")(daemon)
app.command("attach")(attach)
app.command("status")(status)


def _version(value: bool) -> None:
    if value:
        print(f"memvirt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="Say more on stderr: -v what is done, -vv details.")
    ] = 0,
    connect: Annotated[
        str | None,
        typer.Option("--connect", "-c", help="libvirt URI for libvirt:NAME (default qemu:///system).", metavar="URI"),
    ] = None,
) -> None:
    if connect:
        set_uri(connect)
    if ctx.invoked_subcommand != "daemon":  # memvirtd logs through the root logger, its own way
        _log_to_stderr(verbose)


class _LineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else record.levelname.lower() + ": "
        return f"memvirt: {level}{record.getMessage()}"


def _log_to_stderr(verbose: int) -> None:
    """memvirt's log records on stderr, one line each: warnings always, ``-v`` info, ``-vv`` debug."""
    log = logging.getLogger("memvirt")
    if any(getattr(h, "memvirt_cli", False) for h in log.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.memvirt_cli = True  # type: ignore[attr-defined]
    handler.setFormatter(_LineFormatter())
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    log.propagate = False


def _internal_error(e: BaseException) -> NoReturn:
    """An exception memvirt did not expect: one line (the traceback only with ``MEMVIRT_DEBUG=1``), exit 1."""
    if os.environ.get("MEMVIRT_DEBUG", "") not in ("", "0"):
        traceback.print_exception(e)
    try:
        detail = " ".join(str(e).split())
    except Exception:  # an exception whose message itself fails
        detail = ""
    name = type(e).__name__ + (f": {detail}" if detail else "")
    err.print(
        f"memvirt: error: internal error: {name} (MEMVIRT_DEBUG=1 shows the traceback)", markup=False, highlight=False
    )
    sys.exit(1)


def main() -> None:
    """Run the CLI; errors print one line and exit with their code, never a traceback.

    SIGTERM unwinds like Ctrl-C, so a command stopped by a service manager or ``kill`` restores
    what it borrowed from the host and stops the guests it started (exit 143).
    """
    terminate_like_interrupt()
    try:
        app()
    except SystemExit as e:
        if e.code == 130:  # typer's exit for a KeyboardInterrupt, after every finally ran
            if terminated():
                err.print("memvirt: terminated")
                sys.exit(143)
            err.print("memvirt: interrupted")
        raise
    except MemvirtError as e:
        err.print(f"memvirt: error: {e}", markup=False, highlight=False)
        sys.exit(e.exit_code)
    except Terminated:
        err.print("memvirt: terminated")
        sys.exit(143)
    except KeyboardInterrupt:
        err.print("memvirt: interrupted")
        sys.exit(130)
    except Exception as e:  # the last line of defence: no traceback reaches a user
        _internal_error(e)
