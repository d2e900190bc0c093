"""The error hierarchy: every class in ``memvirt.errors`` is a MemvirtError with the exit code it
had, the modules that used to define them still export the same classes, and a bad size is a
usage error (and a ValueError), not a malformed image."""

from __future__ import annotations

import inspect

import pytest
from cli import assert_one_line_error, memvirt

from memvirt import errors
from memvirt.units import parse_size

EXIT_CODES = {
    "MemvirtError": 1,
    "UsageError": 2,
    "NotFound": 2,
    "BadImage": 2,
    "BadSize": 2,
    "GuestStructureError": 2,
    "UnmappedAddress": 2,
    "LayoutMissing": 2,
    "UnsafePath": 2,
    "ConfigError": 2,
    "PMRefused": 2,
    "VMError": 1,
    "QEMURefused": 1,
    "QEMUGone": 1,
    "QEMUTimeout": 1,
    "GuestError": 1,
    "ProtocolError": 1,
    "AuthError": 1,
    "PeerError": 1,
    "StreamError": 1,
    "PMFailed": 1,
    "ZramError": 1,
    "HeadersError": 1,
    "HeadersNotFound": 2,
    "ProbeCompileError": 1,
    "Unsupported": 1,
}

OLD_HOMES = {
    "memvirt.paths": ["UnsafePath"],
    "memvirt.pm.stream": ["StreamError"],
    "memvirt.pm.facts": ["PMRefused", "PMFailed"],
    "memvirt.pm.zram": ["ZramError"],
    "memvirt.migrate.protocol": ["ProtocolError", "AuthError", "PeerError"],
    "memvirt.introspect.headers": ["HeadersError", "HeadersNotFound", "ProbeCompileError"],
    "memvirt.introspect.pgtable": ["UnmappedAddress"],
    "memvirt.introspect.layout": ["LayoutMissing"],
    "memvirt.daemon.config": ["ConfigError"],
    "memvirt.qemu.dirty": ["Unsupported"],
}


def classes() -> dict[str, type[BaseException]]:
    return {
        n: c
        for n, c in vars(errors).items()
        if inspect.isclass(c) and issubclass(c, BaseException) and c.__module__ == errors.__name__
    }


def test_every_error_is_a_memvirt_error_with_its_exit_code() -> None:
    found = classes()
    assert set(found) == set(EXIT_CODES)
    for name, cls in found.items():
        assert issubclass(cls, errors.MemvirtError), name
        assert cls.exit_code == EXIT_CODES[name], name  # type: ignore[attr-defined]
        assert name in (errors.__doc__ or ""), f"{name} missing from the tree in the docstring"


def test_old_homes_export_the_same_classes() -> None:
    import importlib

    for module, names in OLD_HOMES.items():
        mod = importlib.import_module(module)
        for n in names:
            assert getattr(mod, n) is getattr(errors, n), (module, n)


def test_qemu_errors_are_vm_errors_and_refused_keeps_the_class() -> None:
    e = errors.QEMURefused("QEMU refused x", "DeviceNotActive")
    assert isinstance(e, errors.VMError) and e.error_class == "DeviceNotActive"
    assert issubclass(errors.QEMUGone, errors.VMError) and issubclass(errors.QEMUTimeout, errors.VMError)
    assert issubclass(errors.StreamError, errors.ProtocolError)


@pytest.mark.parametrize(
    ("text", "size"),
    [("512M", 512 << 20), ("4G", 4 << 30), ("4GiB", 4 << 30), ("1.5k", 1536), ("1048576", 1 << 20), (" 2t ", 2 << 40)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "lots", "12Q", "1.2.3G", "inf", "nanG", "-1G", "0x10"])
def test_a_bad_size_is_a_usage_error_and_a_value_error(text: str) -> None:
    with pytest.raises(errors.BadSize, match=r"not a size: .* \(use e\.g\. 512M, 4G\)") as info:
        parse_size(text)
    assert isinstance(info.value, ValueError) and isinstance(info.value, errors.UsageError)
    assert not isinstance(info.value, errors.BadImage)


def test_a_bad_size_on_the_command_line_is_one_line_with_exit_2() -> None:
    # The error keeps its cause (raise ... from e); the CLI still prints only its message.
    assert_one_line_error(memvirt("vm", "start", "x", "--memory", "12Q", timeout=120), 2, "not a size: '12Q'")
