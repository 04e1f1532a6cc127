"""The implementation's limits against the ones stated independently in tests/support/limits.py (libvirt's
protocol files, Linux's headers, docs/DAEMON.md): a constant that drifts from its source fails here by name,
before any end-to-end test built on the stated value fails for it."""

from __future__ import annotations

import pytest

from mshv_libvirt import domain
from mshv_libvirt.driver import layout
from mshv_libvirt.rpc import dispatch, protocol, server
from tests.support import limits

CASES: list[tuple[str, object, object, str]] = [
    ("rpc/protocol.py HEADER_SIZE", protocol.HEADER_SIZE, limits.HEADER_SIZE, "virnetprotocol.x"),
    ("rpc/protocol.py STRING_MAX", protocol.STRING_MAX, limits.STRING_MAX, "remote_protocol.x"),
    ("rpc/protocol.py MAX_PACKET", protocol.MAX_PACKET, limits.MAX_PACKET, "docs/DAEMON.md"),
    ("rpc/server.py MAX_CLIENTS", server.MAX_CLIENTS, limits.MAX_CLIENTS, "docs/DAEMON.md"),
    ("rpc/server.py MAX_RO_CLIENTS", server.MAX_RO_CLIENTS, limits.MAX_RO_CLIENTS, "docs/DAEMON.md"),
    ("rpc/dispatch.py STATS_QUERIES", dispatch.STATS_QUERIES, limits.STATS_QUERIES, "docs/DAEMON.md"),
    ("driver/layout.py SUN_PATH_MAX", layout.SUN_PATH_MAX, limits.SUN_PATH_MAX, "linux/un.h"),
    ("driver/layout.py NAME_MAX", layout.NAME_MAX, limits.NAME_MAX, "linux/limits.h"),
    (
        "driver/layout.py MAX_ESCAPED_NAME_BYTES",
        layout.MAX_ESCAPED_NAME_BYTES,
        limits.MAX_ESCAPED_NAME_BYTES,
        "docs/DAEMON.md",
    ),
    ("driver/layout.py MAX_DOMAIN_ID", layout.MAX_DOMAIN_ID, limits.MAX_DOMAIN_ID, "docs/DAEMON.md"),
    ("driver/layout.py CONTROL", layout.CONTROL, limits.CONTROL, "docs/DAEMON.md"),
    ("domain MAX_XML_BYTES", domain.MAX_XML_BYTES, limits.MAX_XML_BYTES, "docs/DAEMON.md"),
    ("domain MAX_ELEMENTS", domain.MAX_ELEMENTS, limits.MAX_ELEMENTS, "docs/DAEMON.md"),
    ("domain MAX_ATTRIBUTES", domain.MAX_ATTRIBUTES, limits.MAX_ATTRIBUTES, "docs/DAEMON.md"),
    ("domain MAX_DEPTH", domain.MAX_DEPTH, limits.MAX_DEPTH, "docs/DAEMON.md"),
    ("domain MAX_TEXT_CHARS", domain.MAX_TEXT_CHARS, limits.MAX_TEXT_CHARS, "docs/DAEMON.md"),
]


@pytest.mark.parametrize(("what", "actual", "stated", "source"), CASES, ids=[c[0] for c in CASES])
def test_the_implementation_keeps_the_stated_limit(what: str, actual: object, stated: object, source: str) -> None:
    assert actual == stated, f"{what} is {actual!r}; {source} says {stated!r}"


def test_the_daemon_packet_bound_is_below_libvirts() -> None:
    assert limits.HEADER_SIZE < limits.STRING_MAX < limits.MAX_PACKET < limits.LIBVIRT_MESSAGE_MAX
    assert limits.MAX_RUN_DIR_BYTES == 92  # docs/DAEMON.md: "a run directory may be 92 bytes long"
