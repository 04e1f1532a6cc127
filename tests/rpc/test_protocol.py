"""The sans-IO core against byte sequences captured from real virsh/libvirtd (tests/support/captured.py says
from which versions and where their layout is defined)."""

from __future__ import annotations

import ast
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mshv_libvirt.rpc.protocol as protocol_module
from mshv_libvirt.rpc.protocol import (
    NEED_DATA,
    Call,
    ConnectionClosed,
    ConnState,
    Ignored,
    Ping,
    RemoteError,
    RemoteProtocolError,
    ServerConnection,
    Status,
    StreamPacket,
    unknown_procedure,
)
from mshv_libvirt.rpc.xdr import Packer, Unpacker, XdrError
from tests.support.captured import CONNECT_OPEN, PING, PONG
from tests.support.limits import MAX_PACKET


def events(conn: ServerConnection) -> list[object]:
    out: list[object] = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA or isinstance(ev, ConnectionClosed):
            out.append(ev)
            return out
        out.append(ev)


def test_captured_connect_open_decodes() -> None:
    conn = ServerConnection()
    conn.receive_data(CONNECT_OPEN)
    ev = conn.next_event()
    assert isinstance(ev, Call)
    assert (ev.prog, ev.vers, ev.proc, ev.serial) == (0x20008086, 1, 1, 2)
    u = Unpacker(ev.payload)
    assert u.opt_string(1000) == "mshv:///system"
    assert u.uint() == 0
    u.done()
    assert conn.next_event() is NEED_DATA


def test_byte_at_a_time_and_batched_input() -> None:
    conn = ServerConnection()
    got: list[object] = []
    for b in CONNECT_OPEN + PING:
        conn.receive_data(bytes([b]))
        ev = conn.next_event()
        if ev is not NEED_DATA:
            got.append(ev)
    assert isinstance(got[0], Call) and isinstance(got[1], Ping)
    conn2 = ServerConnection()
    conn2.receive_data(CONNECT_OPEN * 3 + PING)
    evs = events(conn2)
    assert [type(e) for e in evs] == [Call, Call, Call, Ping, type(NEED_DATA)]


def test_keepalive_pong_bytes() -> None:
    assert ServerConnection().send_pong() == PONG


def test_unknown_procedure_error_matches_libvirtd_bytes() -> None:
    # The 100-byte REPLY/ERROR libvirtd sends for "unknown procedure: 426", serial 14.
    call = Call(0x20008086, 1, 426, 14, b"")
    pkt = ServerConnection().send_error(call, unknown_procedure(426))
    assert len(pkt) == 100
    assert pkt[:28] == struct.pack(">IIIiiIi", 100, 0x20008086, 1, 426, 1, 14, 1)
    u = Unpacker(pkt[28:])
    assert (u.int(), u.int()) == (39, 7)
    assert u.opt_string(100) == "unknown procedure: 426"
    assert u.int() == 2
    for _ in range(5):  # dom, str1..3 NULL; then int1, int2 ... all zero
        assert u.uint() == 0
    assert u.int() == 0 and u.uint() == 0
    u.done()


def test_stream_packets_and_events() -> None:
    conn = ServerConnection()
    data = conn.send_stream(201, 8, Status.CONTINUE, b"hi")
    assert struct.unpack(">IIIiiIi", data[:28]) == (30, 0x20008086, 1, 201, 3, 8, 2)
    # A client's stream packet comes back as a StreamPacket.
    conn.receive_data(data)
    ev = conn.next_event()
    assert ev == StreamPacket(201, 8, Status.CONTINUE, b"hi")
    ev_pkt = conn.send_event(318, b"\0\0\0\0")
    assert struct.unpack(">IIIiiIi", ev_pkt[:28])[4] == 2  # MESSAGE


@pytest.mark.parametrize(
    "header",
    [
        struct.pack(">I", 27) + b"\0" * 24,  # shorter than a header
        struct.pack(">I", MAX_PACKET + 1),  # over the limit: refused before buffering it
        struct.pack(">IIIiiIi", 28, 0x20008086, 1, 1, 9, 0, 0),  # no such type
        struct.pack(">IIIiiIi", 28, 0x20008086, 1, 1, 0, 0, 7),  # no such status
        struct.pack(">IIIiiIi", 28, 0x20008086, 1, 1, 0, 0, 1),  # a call with status ERROR
        struct.pack(">IIIiiIi", 32, 0x6B656570, 1, 1, 2, 0, 0) + b"abcd",  # keepalive with payload
        struct.pack(">IIIiiIi", 28, 0x6B656570, 1, 9, 2, 0, 0),  # unknown keepalive proc
    ],
)
def test_malformed_headers_put_the_connection_in_error_for_good(header: bytes) -> None:
    conn = ServerConnection()
    conn.receive_data(header)
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    assert conn.state is ConnState.ERROR
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_replies_from_a_client_are_ignored_not_fatal() -> None:
    conn = ServerConnection()
    conn.receive_data(struct.pack(">IIIiiIi", 28, 0x20008086, 1, 5, 1, 0, 0))
    assert conn.next_event() == Ignored(0x20008086, 5, 1)


def test_eof_closes() -> None:
    conn = ServerConnection()
    conn.receive_data(CONNECT_OPEN[:10])
    conn.receive_data(b"")
    assert isinstance(conn.next_event(), ConnectionClosed)
    assert conn.state is ConnState.CLOSED


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_never_raise_anything_but_protocol_errors(data: bytes) -> None:
    conn = ServerConnection()
    conn.receive_data(data)
    try:
        events(conn)
    except RemoteProtocolError:
        assert conn.state is ConnState.ERROR


def test_core_does_no_io() -> None:
    tree = ast.parse(Path(protocol_module.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"asyncio", "socket", "os", "selectors", "threading"}


# ---- XDR ----


def test_xdr_round_trip_and_padding() -> None:
    p = Packer()
    p.int(-1)
    p.uint(7)
    p.hyper(-2)
    p.uhyper(1 << 63)
    p.bool(True)
    p.double(1.5)
    p.string("abcde")
    p.opt_string(None)
    p.opaque_fixed(b"\x01" * 16, 16)
    data = p.getvalue()
    assert len(data) == 4 + 4 + 8 + 8 + 4 + 8 + (4 + 8) + 4 + 16
    u = Unpacker(data)
    assert (u.int(), u.uint(), u.hyper(), u.uhyper(), u.bool(), u.double()) == (-1, 7, -2, 1 << 63, True, 1.5)
    assert u.string(10) == "abcde" and u.opt_string(10) is None and u.opaque_fixed(16) == b"\x01" * 16
    u.done()


@pytest.mark.parametrize(
    ("data", "op"),
    [
        (b"\0\0\0\x05abc", lambda u: u.string(100)),  # truncated
        (b"\0\0\0\x10" + b"a" * 16, lambda u: u.string(8)),  # over the caller's limit
        (b"\0\0\0\x02", lambda u: u.opt_string(8)),  # invalid optional marker
        (b"\0\0\0\x02", lambda u: u.bool()),  # invalid bool
        (b"\0\0\0\x02\xff\xfe\0\0", lambda u: u.string(8)),  # not UTF-8
        (b"\xff\xff\xff\xff", lambda u: u.array_len(16384)),
    ],
)
def test_xdr_rejects_bad_input(data: bytes, op: object) -> None:
    with pytest.raises(XdrError):
        op(Unpacker(data))  # type: ignore[operator]


def test_remote_error_with_unicode_message() -> None:
    enc = RemoteError(1, 2, "é").encode()
    u = Unpacker(enc)
    assert (u.int(), u.int(), u.opt_string(10)) == (1, 2, "é")
