"""Compiling the probe with the host gcc and the kernel's own front-end flags; gcc's errors blamed
on the facts that caused them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from memvirt.errors import HeadersError, ProbeCompileError

if TYPE_CHECKING:
    pass
from memvirt.introspect.headers.base import _MAX_ROUNDS, _front_end_flags
from memvirt.introspect.headers.probe import probe_units, render_probe
from memvirt.introspect.headers.trees import HeaderTree, _first_line


def kernel_cflags(tree: HeaderTree) -> list[str]:
    """gcc flags for compiling against ``tree``: kbuild's include order and forced includes,
    its ``-std`` and char signedness (``-funsigned-char`` since v6.2), then the front-end set."""
    s, o = tree.srctree, tree.objtree
    incs = [
        s / "arch/x86/include",
        o / "arch/x86/include/generated",
        s / "include",
        o / "include",
        s / "arch/x86/include/uapi",
        o / "arch/x86/include/generated/uapi",
        s / "include/uapi",
        o / "include/generated/uapi",
    ]
    flags = ["-nostdinc", *(f"-I{p}" for p in incs), f"-idirafter{s}"]
    for h in ("compiler-version.h", "kconfig.h", "compiler_types.h"):
        if (s / "include" / "linux" / h).is_file():
            flags += ["-include", str(s / "include" / "linux" / h)]
    top = s / "Makefile"
    text = top.read_text(errors="replace") if top.is_file() else ""
    std = re.search(r"-std=(gnu\w+)", text)
    flags.append(f"-std={std[1] if std else 'gnu11'}")
    if re.search(r"^KBUILD_CFLAGS\s*\+=.*-funsigned-char", text, re.M):
        flags.append("-funsigned-char")
    # Since commit c4781dc3d1cf ("Kbuild: enable -fms-extensions", v6.19) kbuild adds
    # CONFIG_CC_MS_EXTENSIONS (``-fms-extensions``) to its C dialect and
    # headers embed structs by tag (7.x ``struct filename { struct __filename_head; ... }``):
    # without it gcc drops the member and the header's own static_assert on the size fails.
    # Taken from the build's .config, so older kernels compile as before.
    if ms := _config(tree).get("CONFIG_CC_MS_EXTENSIONS"):
        flags += [f for f in ms.split() if re.fullmatch(r"-f[\w-]+", f)]
    return flags + _front_end_flags()


def _config(tree: HeaderTree) -> dict[str, str]:
    cfg: dict[str, str] = {}
    path = tree.objtree / ".config"
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            k, sep, v = line.partition("=")
            if sep and k.startswith("CONFIG_"):
                cfg[k] = v.strip('"')
    return cfg


def find_compiler(tree: HeaderTree) -> str:
    """The gcc the kernel was built with if the host has it (``gcc-12`` for Debian 12 kernels),
    else any gcc: struct layout is the x86-64 ABI's, not the compiler version's."""
    cfg = _config(tree)
    if any(
        (k.startswith("CONFIG_RANDSTRUCT") and not k.endswith("_NONE") or k == "CONFIG_GCC_PLUGIN_RANDSTRUCT")
        and v == "y"
        for k, v in cfg.items()
    ):
        raise HeadersError(
            f"{tree.release} is built with CONFIG_RANDSTRUCT: its struct layouts come from a gcc plugin's seed, "
            "not the headers"
        )
    major = int(cfg.get("CONFIG_GCC_VERSION", "0") or 0) // 10000
    names = [f"x86_64-linux-gnu-gcc-{major}", f"gcc-{major}"] if major else []
    for name in [*names, "x86_64-linux-gnu-gcc", "gcc"]:
        if path := shutil.which(name):
            return path
    raise HeadersError(f"no gcc found to compile the layout probe for {tree.release}: install gcc")


@dataclass
class ProbeResult:
    """An object file of the probe, and the facts gcc refused (``{fact: first error line}``)."""

    obj: Path
    dropped: dict[str, str]
    rounds: int
    compiler: str


def compile_probe(tree: HeaderTree, workdir: Path) -> ProbeResult:
    """Compile the probe against ``tree``, dropping the units gcc rejects, until it compiles."""
    cc = find_compiler(tree)
    flags = kernel_cflags(tree)
    units = probe_units()
    choice = {i: 0 for i in range(len(units))}
    dropped: dict[str, str] = {}
    src = workdir / "memvirt_probe.c"
    obj = workdir / "memvirt_probe.o"
    first_error = ""
    for rounds in range(1, _MAX_ROUNDS + 1):
        text, owner = render_probe(choice)
        src.write_text(text)
        proc = subprocess.run(
            [cc, *flags, "-o", obj.name, src.name],
            capture_output=True,
            text=True,
            cwd=workdir,
            env={**os.environ, "LC_ALL": "C"},
        )
        if proc.returncode == 0:
            return ProbeResult(obj, dropped, rounds, cc)
        blamed, first = blame_errors(proc.stderr, src.name, owner)
        first_error = first_error or first
        if not blamed:
            raise ProbeCompileError(
                f"gcc cannot compile the layout probe against {tree.describe}: {first or _first_line(proc.stderr)}"
            )
        for i, reason in blamed.items():
            if choice[i] + 1 < len(units[i].alternatives):
                choice[i] += 1
            else:
                del choice[i]
                dropped[units[i].fact] = reason
    raise ProbeCompileError(
        f"gcc still rejects the layout probe for {tree.describe} after {_MAX_ROUNDS} rounds: {first_error}"
    )


_DIAG = re.compile(
    r"^(?P<file>[^:\s][^:]*):(?P<line>\d+):(?:\d+:)? (?P<kind>fatal error|error|warning|note): (?P<msg>.*)$"
)
_INCLUDED = re.compile(r"^(?:In file included|\s+) from (?P<file>[^:]+):(?P<line>\d+)[:,]$")


def blame_errors(stderr: str, probe_name: str, owner: list[int]) -> tuple[dict[int, str], str]:
    """Which probe units gcc's errors point at: ``({unit: message}, first error line)``.

    An error in the probe blames its line; an error in a header blames the probe line that the
    message's "in expansion of macro" notes name, else the probe line the header was included
    from. Errors that cannot be tied to a unit blame nothing (the caller gives up).
    """
    blamed: dict[int, str] = {}
    first = ""
    include_root: int | None = None
    pending: tuple[str, int | None, list[int]] | None = None

    def settle() -> None:
        if pending is None:
            return
        msg, root, lines = pending
        for ln in lines or ([root] if root is not None else []):
            if 0 < ln <= len(owner) and owner[ln - 1] >= 0:
                blamed.setdefault(owner[ln - 1], msg)

    for raw in stderr.splitlines():
        if raw.startswith("In file included from"):
            include_root = None
        if m := _INCLUDED.match(raw):
            if Path(m["file"]).name == probe_name:
                include_root = int(m["line"])
            continue
        if raw.startswith(("In file included from", " ")):
            continue
        if raw.startswith(f"{probe_name}:") and not _DIAG.match(raw):
            include_root = None
            continue
        m = _DIAG.match(raw)
        if m is None:
            continue
        in_probe = Path(m["file"]).name == probe_name
        if m["kind"] in ("error", "fatal error"):
            settle()
            first = first or raw.strip()
            msg = f"{m['msg']}" if in_probe else f"{m['msg']} ({m['file'].rsplit('/include/', 1)[-1]})"
            pending = (msg, None if in_probe else include_root, [int(m["line"])] if in_probe else [])
            if in_probe:
                include_root = None
        elif m["kind"] == "note" and pending is not None and in_probe:
            pending[2].append(int(m["line"]))
    settle()
    return blamed, first
