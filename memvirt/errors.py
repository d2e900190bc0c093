"""The error hierarchy: every failure a user can cause or meet maps to one exit code.

The CLI prints ``memvirt: error: <message>`` and exits with ``exit_code``; nothing else
reaches the user as a traceback. Every error memvirt raises on purpose is defined here, so a
caller can catch a whole branch (qemu.qmp's ``error.py`` is the model)::

    MemvirtError                 an operation failed (exit 1)
     +-- UsageError              bad input from the user (exit 2)
     |    +-- NotFound           a named VM, kernel or file does not exist
     |    |    +-- HeadersNotFound     (also a HeadersError)
     |    +-- BadImage           a dump or guest memory is malformed
     |    |    +-- GuestStructureError the guest kernel's structures do not add up
     |    |    +-- UnmappedAddress     the guest's page tables do not map an address
     |    |    +-- LayoutMissing       a layout source lacks a fact
     |    +-- BadSize            a size string that is not a size (also a ValueError)
     |    +-- UnsafePath         a path another local user could have planted
     |    +-- ConfigError        the daemon's config file is invalid
     |    +-- PMRefused          two machines cannot migrate
     +-- VMError                 QEMU failed an operation
     |    +-- QEMURefused        QEMU answered with an error (keeps QEMU's error class)
     |    +-- QEMUGone           QEMU's monitor cannot be reached or went away
     |    +-- QEMUTimeout        QEMU did not answer in time
     +-- GuestError              the guest did not answer, or a command in it failed
     +-- ProtocolError           a migration peer broke the protocol or the link
     |    +-- AuthError          the peer could not prove the shared secret
     |    +-- PeerError          the peer reported a failure of its own
     |    +-- StreamError        a pmagent frame fails its tag, sequence or framing
     +-- PMFailed                a physical-machine migration failed (the source runs on)
     |    +-- ZramError          memvirt's zram swap device could not be set up or removed
     +-- HeadersError            kernel headers could not be fetched or compiled against
     |    +-- ProbeCompileError  gcc rejected the layout probe as a whole
     +-- Unsupported             the kernel lacks what dirty tracking needs (callers fall back)

Modules that raise one also import it, so ``from memvirt.pm.facts import PMRefused`` and the
like keep working.
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


class GuestStructureError(BadImage):
    """The guest kernel's own structures (lists, counts, types) are inconsistent or hostile.

    A :class:`BadImage` (exit code 2): guest memory is input memvirt did not write. The message
    always reads ``guest kernel structures do not add up: <what>``.
    """

    PREFIX = "guest kernel structures do not add up: "

    def __init__(self, what: str):
        super().__init__(what if what.startswith(self.PREFIX) else self.PREFIX + what)


class UnmappedAddress(BadImage):
    """A virtual address the guest kernel's page tables do not map."""


class LayoutMissing(BadImage):
    """A layout fact the chosen source does not provide."""


class BadSize(UsageError, ValueError):
    """A size as typed (``512M``, ``4G``) that is not one: bad input, so also a ``ValueError``
    for argparse, typer and config parsers."""


class UnsafePath(UsageError):
    """A path memvirt would trust is writable by, or owned by, someone else."""


class ConfigError(UsageError):
    """The config file is unreadable or invalid (one line naming the file and the key)."""


class PMRefused(UsageError):
    """The two machines cannot migrate (different kernels, no hibernation support, ...)."""


class VMError(MemvirtError):
    """QEMU refused an operation or is gone."""


class QEMURefused(VMError):
    """QEMU received a command and answered with an error; ``error_class`` is QEMU's own
    (``GenericError``, ``DeviceNotActive``, ...), as in qemu.qmp's ``ExecuteError``."""

    def __init__(self, message: str, error_class: str = ""):
        super().__init__(message)
        self.error_class = error_class


class QEMUGone(VMError):
    """QEMU's monitor cannot be reached, or the connection broke (QEMU exited)."""


class QEMUTimeout(VMError):
    """QEMU did not answer a command in time (it may still be alive, busy or stuck)."""


class GuestError(MemvirtError):
    """The guest did not answer, or a command in it failed."""


class ProtocolError(MemvirtError):
    """The peer broke the protocol: a frame that fails to open, malformed or unexpected frame, lost connection."""


class AuthError(ProtocolError):
    """The peer could not prove it knows the shared secret (or we could not)."""


class PeerError(ProtocolError):
    """The peer reported a failure on its side (an ERROR frame)."""


class StreamError(ProtocolError):
    """A pmagent frame that fails its tag, its sequence or its framing."""


class PMFailed(MemvirtError):
    """The migration started and failed; the source was thawed and runs on."""


class ZramError(PMFailed):
    """memvirt's zram swap device could not be set up or removed."""


class HeadersError(MemvirtError):
    """Kernel headers could not be fetched, unpacked or compiled against."""


class HeadersNotFound(NotFound, HeadersError):
    """No headers exist for the release asked for (unknown to apt, or not a kernel tree)."""


class ProbeCompileError(HeadersError):
    """gcc rejected the probe as a whole: the tree is broken or the compiler does not fit it."""


class Unsupported(MemvirtError):
    """The kernel (or QEMU's privileges) lacks what write tracking needs; callers may fall back."""
