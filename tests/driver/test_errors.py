"""No error reaches a client without a reason (issue 19 item 11): empty details and message-less exceptions."""

from __future__ import annotations

import pytest

from mshv_libvirt.errors import ErrorCode, VirtError, describe


@pytest.mark.parametrize("code", list(ErrorCode))
def test_an_empty_detail_still_says_something(code: ErrorCode) -> None:
    for detail in ("", "  "):
        err = VirtError(code, detail)
        assert err.detail.strip() and err.message.split(": ", 1)[-1].strip()


def test_describe_names_message_less_exceptions() -> None:
    assert describe(AssertionError()) == "AssertionError"
    assert describe(TimeoutError("")) == "TimeoutError"
    assert describe(OSError(2, "No such file or directory")) == "[Errno 2] No such file or directory"
