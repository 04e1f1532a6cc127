"""What a libvirt-python client sees of a failed call: (code, domain, message)."""

from __future__ import annotations

from collections.abc import Callable

import libvirt


def error_or_none(call: Callable[[], object]) -> tuple[int, int, str] | None:
    """The call's libvirt error as (code, domain, message), or None when it succeeded."""
    try:
        call()
    except libvirt.libvirtError as err:
        return err.get_error_code(), err.get_error_domain(), err.get_error_message()
    return None


def error_of(call: Callable[[], object]) -> tuple[int, int, str]:
    """The call's libvirt error as (code, domain, message); the call must fail."""
    err = error_or_none(call)
    assert err is not None, "the call succeeded; a libvirt error was expected"
    return err
