from __future__ import annotations

from collections.abc import Iterator

import libvirt
import pytest


@pytest.fixture(scope="module")
def ref() -> Iterator[libvirt.virConnect]:
    """libvirt's own test:///default driver in this process, the oracle (errors are not printed: the
    tests read them from the exceptions)."""
    libvirt.registerErrorHandler(lambda *_: None, None)
    c = libvirt.open("test:///default")
    yield c
    c.close()
