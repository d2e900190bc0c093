"""The error hierarchy: every failure a user can cause or meet maps to one exit code.

The CLI prints ``memvirt: error: <message>`` and exits with ``exit_code``; nothing else
reaches the user as a traceback.
"""

from __future__ import annotations


class MemvirtError(Exception):
    """An operation failed (exit code 1)."""

    exit_code = 1


class UsageError(MemvirtError):
    """Bad input from the user: a missing file, an unknown VM, a malformed dump (exit code 2)."""

    exit_code = 2


class NotFound(UsageError):
    """A named thing (VM, kernel, file) does not exist."""


class BadImage(UsageError):
    """A memory image or dump is malformed, truncated or of the wrong kind."""


class VMError(MemvirtError):
    """QEMU refused an operation or is gone."""


class GuestError(MemvirtError):
    """The guest did not answer, or a command in it failed."""


class GuestStructureError(BadImage):
    """The guest kernel's own structures (lists, counts, types) are inconsistent or hostile.

    A :class:`BadImage` (exit code 2): guest memory is input memvirt did not write. The message
    always reads ``guest kernel structures do not add up: <what>``.
    """

    PREFIX = "guest kernel structures do not add up: "

    def __init__(self, what: str):
        super().__init__(what if what.startswith(self.PREFIX) else self.PREFIX + what)
