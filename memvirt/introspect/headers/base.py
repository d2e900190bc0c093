"""What every part of the header layout shares: the cache format and the name patterns."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass

# Bump when the JSON written by :func:`parse_probe_object` changes shape.
FORMAT = 1
_MAX_ROUNDS = 10
_RELEASE = re.compile(r"^[0-9][A-Za-z0-9.+~_-]*$")
_PATH_PART = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)$")
_TAG_PREFIX = re.compile(r"^(struct|union|enum)\s+")


def _front_end_flags() -> list[str]:
    """The part of kbuild's C flags (6.1 and 6.12 ``make V=1``) that the front end and the
    type layout can see, with ``-g``, ``-w`` (only errors are wanted) and no code generation
    options (retpolines, ``-pg``, stack protector, alignment of code).

    ``-O2`` as kbuild has it, not ``-O0``: 6.12's ``WARN_ON()`` in always-inline helpers passes
    a parameter to an ``asm`` "i" constraint, which only constant propagation makes legal.
    """
    return [
        "-D__KERNEL__",
        '-DKBUILD_MODFILE="memvirt/probe"',
        '-DKBUILD_BASENAME="probe"',
        '-DKBUILD_MODNAME="probe"',
        "-D__KBUILD_MODNAME=kmod_probe",
        "-fshort-wchar",
        "-fno-common",
        "-fno-PIE",
        "-fno-strict-aliasing",
        "-m64",
        "-mno-sse",
        "-mno-mmx",
        "-mno-sse2",
        "-mno-3dnow",
        "-mno-avx",
        "-mno-80387",
        "-mno-fp-ret-in-387",
        "-mno-red-zone",
        "-mcmodel=kernel",
        "-fno-asynchronous-unwind-tables",
        "-w",
        "-g",
        "-O2",
        "-c",
    ]
