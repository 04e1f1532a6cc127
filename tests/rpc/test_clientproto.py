"""The client side's sans-IO core (rpc/clientproto.py) against libvirt's framing, byte for byte."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mshv_libvirt.rpc.clientproto import ClientConnection, Message, Reply, Skipped
from mshv_libvirt.rpc.protocol import (
    HEADER,
    NEED_DATA,
    REMOTE_PROGRAM,
    ConnectionClosed,
    ConnState,
    Ignored,
    LocalProtocolError,
    MessageType,
    Ping,
    RemoteProtocolError,
    ServerConnection,
    Status,
    StreamPacket,
)
from mshv_libvirt.rpc.xdr import Packer
from tests.support.captured import CONNECT_OPEN, PING, PONG
from tests.support.limits import MAX_PACKET

UPLOAD = 208  # REMOTE_PROC_STORAGE_VOL_UPLOAD
HOLE = struct.pack(">qI", 1 << 20, 0)  # virNetStreamHole{length, flags}


def packet(proc: int, mtype: MessageType, serial: int, status: Status = Status.OK, payload: bytes = b"") -> bytes:
    return HEADER.pack(28 + len(payload), REMOTE_PROGRAM, 1, proc, int(mtype), serial, int(status)) + payload


def drain(conn: ClientConnection) -> list[object]:
    out: list[object] = []
    while (ev := conn.next_event()) is not NEED_DATA:
        out.append(ev)
        if isinstance(ev, ConnectionClosed):
            break
    return out


def test_calls_are_numbered_from_zero_and_framed_as_virsh_frames_them() -> None:
    conn = ClientConnection()
    # virsh's third call is its CONNECT_OPEN, serial 2: our bytes for it are the captured ones.
    conn.send_call(66)
    conn.send_call(60, b"\0\0\0\x0a")
    p = Packer()
    p.opt_string("mshv:///system")
    p.uint(0)
    serial, data = conn.send_call(1, p.getvalue())
    assert (serial, data) == (2, CONNECT_OPEN)
    # ... and the server side reads them back as the same call.
    server = ServerConnection()
    server.receive_data(data)
    call = server.next_event()
    assert getattr(call, "serial", None) == 2 and getattr(call, "proc", None) == 1
    assert sorted(conn.pending) == [0, 1, 2]


def test_replies_are_matched_by_serial_in_any_order_and_byte_at_a_time() -> None:
    conn = ClientConnection()
    a, _ = conn.send_call(3)
    b, _ = conn.send_call(4)
    wire = packet(4, MessageType.REPLY, b, payload=b"\0\0\0\x07") + packet(3, MessageType.REPLY, a, Status.ERROR)
    got: list[object] = []
    for byte in wire:
        conn.receive_data(bytes([byte]))
        got += drain(conn)
    assert got == [
        Reply(REMOTE_PROGRAM, 1, 4, b, Status.OK, b"\0\0\0\x07"),
        Reply(REMOTE_PROGRAM, 1, 3, a, Status.ERROR, b""),
    ]
    assert conn.pending == []


@pytest.mark.parametrize(
    "wire",
    [
        packet(3, MessageType.REPLY, 7),  # no call has serial 7
        packet(4, MessageType.REPLY, 0),  # serial 0 was procedure 3
        packet(3, MessageType.REPLY, 0, Status.CONTINUE),
        packet(3, MessageType.CALL, 0),  # the server may not call us
        HEADER.pack(20, REMOTE_PROGRAM, 1, 3, 1, 0, 0),  # shorter than a header
        PING[:16] + b"\0\0\0\x00" + PING[20:],  # keepalive as a call
    ],
)
def test_a_broken_server_puts_the_connection_in_error(wire: bytes) -> None:
    conn = ClientConnection()
    conn.send_call(3)
    conn.receive_data(wire)
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    assert conn.state is ConnState.ERROR
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_keepalive_events_and_eof() -> None:
    conn = ClientConnection()
    assert conn.send_pong() == PONG and conn.send_ping() == PING
    conn.receive_data(PING + packet(313, MessageType.MESSAGE, 1, payload=b"ev"))
    conn.receive_data(b"")
    assert drain(conn) == [Ping(), Message(REMOTE_PROGRAM, 1, 313, 1, b"ev"), ConnectionClosed()]
    with pytest.raises(LocalProtocolError):
        ClientConnection().send_call(3, bytes(MAX_PACKET))


def test_an_oversized_reply_is_skipped_as_it_arrives_and_fails_only_its_call() -> None:
    conn = ClientConnection(max_packet=1024)
    big, _ = conn.send_call(3)
    small, _ = conn.send_call(4)
    wire = packet(3, MessageType.REPLY, big, payload=b"x" * 4096) + packet(4, MessageType.REPLY, small)
    conn.receive_data(wire[:100])
    assert drain(conn) == [Skipped(3, big, 28 + 4096, True)]
    conn.receive_data(wire[100:])
    assert drain(conn) == [Reply(REMOTE_PROGRAM, 1, 4, small, Status.OK, b"")]
    assert conn.pending == []


def test_stream_packets_belong_to_their_call_until_the_server_ends_the_stream() -> None:
    conn = ClientConnection()
    serial, _ = conn.send_call(UPLOAD, stream=True)
    assert conn.send_stream(serial, Status.CONTINUE, b"data")[16:28] == struct.pack(">III", 3, serial, 2)
    assert conn.send_stream(serial, Status.CONTINUE, HOLE, hole=True)[16:20] == struct.pack(">I", 6)
    with pytest.raises(RemoteProtocolError):
        conn.send_stream(serial, Status.CONTINUE, b"short", hole=True)
    conn.receive_data(
        packet(UPLOAD, MessageType.REPLY, serial)
        + packet(UPLOAD, MessageType.STREAM, serial, Status.CONTINUE, b"abc")
        + packet(UPLOAD, MessageType.STREAM_HOLE, serial, Status.CONTINUE, HOLE)
        + packet(UPLOAD, MessageType.STREAM, serial + 1, Status.CONTINUE, b"not ours")
        + packet(UPLOAD, MessageType.STREAM, serial, Status.OK)
        + packet(UPLOAD, MessageType.STREAM, serial, Status.CONTINUE, b"late")
    )
    assert drain(conn) == [
        Reply(REMOTE_PROGRAM, 1, UPLOAD, serial, Status.OK, b""),
        StreamPacket(UPLOAD, serial, Status.CONTINUE, b"abc"),
        StreamPacket(UPLOAD, serial, Status.CONTINUE, HOLE, hole=True),
        Ignored(REMOTE_PROGRAM, UPLOAD, int(MessageType.STREAM)),
        StreamPacket(UPLOAD, serial, Status.OK, b""),
        Ignored(REMOTE_PROGRAM, UPLOAD, int(MessageType.STREAM)),
    ]
    assert conn.streams == []
    with pytest.raises(LocalProtocolError):
        conn.send_stream(serial, Status.OK)


def test_a_failed_stream_call_opens_no_stream_and_serials_skip_open_streams() -> None:
    conn = ClientConnection()
    serial, _ = conn.send_call(UPLOAD, stream=True)
    conn.receive_data(packet(UPLOAD, MessageType.REPLY, serial, Status.ERROR))
    assert drain(conn) == [Reply(REMOTE_PROGRAM, 1, UPLOAD, serial, Status.ERROR, b"")]
    assert conn.streams == []
    # A malformed hole from the server is a protocol error.
    s2, _ = conn.send_call(UPLOAD, stream=True)
    conn.receive_data(packet(UPLOAD, MessageType.REPLY, s2))
    conn.receive_data(packet(UPLOAD, MessageType.STREAM_HOLE, s2, Status.CONTINUE, b"bad"))
    assert isinstance(conn.next_event(), Reply)
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_the_server_side_accepts_stream_holes_from_clients() -> None:
    server = ServerConnection()
    server.receive_data(packet(UPLOAD, MessageType.STREAM_HOLE, 5, Status.CONTINUE, HOLE))
    assert server.next_event() == StreamPacket(UPLOAD, 5, Status.CONTINUE, HOLE, hole=True)
    server.receive_data(packet(UPLOAD, MessageType.STREAM_HOLE, 5, Status.OK, HOLE))
    with pytest.raises(RemoteProtocolError):
        server.next_event()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_never_raise_anything_but_protocol_errors(data: bytes) -> None:
    conn = ClientConnection(max_packet=256)
    for proc in (3, UPLOAD):
        conn.send_call(proc, stream=proc == UPLOAD)
    conn.receive_data(data)
    conn.receive_data(b"")
    try:
        drain(conn)
    except RemoteProtocolError:
        assert conn.state is ConnState.ERROR
