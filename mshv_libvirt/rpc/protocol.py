"""libvirt's RPC framing as a sans-IO core: bytes in, events out; events in, bytes out.

No sockets, no event loop, no threads (h11/h2 shape). The asyncio adapter in ``server.py`` feeds
``receive_data`` and writes what the ``send_*`` methods return. Facts (header layout, keepalive,
stream status codes) are from libvirt 9.0's ``src/rpc/virnetprotocol.x`` and
``src/rpc/virkeepaliveprotocol.x``; the bounds the daemon chooses are in docs/DAEMON.md ("RPC layering").
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Generic, TypeVar

from .xdr import Packer

REMOTE_PROGRAM = 0x20008086
KEEPALIVE_PROGRAM = 0x6B656570
PROTOCOL_VERSION = 1
KEEPALIVE_PROC_PING = 1
KEEPALIVE_PROC_PONG = 2

HEADER = struct.Struct(">IIIiiIi")  # length, prog, vers, proc, type, serial, status
HEADER_SIZE = HEADER.size  # 28 including the length word
# libvirt's own ceiling (VIR_NET_MESSAGE_MAX) is 32 MiB; nothing we accept needs more than a 4 MiB
# string (REMOTE_STRING_MAX) plus framing, so a smaller limit bounds a client's memory cost.
MAX_PACKET = (4 << 20) + 4096
STRING_MAX = 4 << 20  # REMOTE_STRING_MAX
STREAM_CHUNK = 256 * 1024  # at most VIR_NET_MESSAGE_LEGACY_PAYLOAD_MAX per stream packet
# Error messages often quote client input (a name, a whole XML document). libvirt formats them into
# 1024 bytes (VIR_ERROR_MAX_LENGTH); we allow more, but never so much that the reply could exceed
# REMOTE_STRING_MAX (which clients reject) or make an error reply cost more than the call.
ERROR_MESSAGE_MAX = 8192


class MessageType(enum.IntEnum):
    CALL = 0
    REPLY = 1
    MESSAGE = 2
    STREAM = 3
    CALL_WITH_FDS = 4
    REPLY_WITH_FDS = 5
    STREAM_HOLE = 6


class Status(enum.IntEnum):
    OK = 0
    ERROR = 1
    CONTINUE = 2


class ConnState(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"  # the peer sent EOF
    ERROR = "error"  # a protocol error happened; stays here for good


class ProtocolError(Exception):
    pass


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol; the connection must be closed."""


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol does not allow."""


@dataclass(frozen=True)
class Call:
    prog: int
    vers: int
    proc: int
    serial: int
    payload: bytes
    with_fds: bool = False


@dataclass(frozen=True)
class StreamPacket:
    """Stream data (CONTINUE), finish (OK) or abort (ERROR); ``hole``: a STREAM_HOLE packet (sparse
    volume transfers), whose payload is ``virNetStreamHole`` ({hyper length; unsigned flags})."""

    proc: int
    serial: int
    status: Status
    payload: bytes
    hole: bool = False


@dataclass(frozen=True)
class Ping:
    pass


@dataclass(frozen=True)
class Pong:
    pass


@dataclass(frozen=True)
class Ignored:
    """A well-formed packet a server has no use for (a REPLY or event MESSAGE from a client)."""

    prog: int
    proc: int
    type: int


@dataclass(frozen=True)
class ConnectionClosed:
    pass


Event = Call | StreamPacket | Ping | Pong | Ignored | ConnectionClosed


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


@dataclass(frozen=True)
class RemoteError:
    """``remote_error``: what clients turn into a virError."""

    code: int
    domain: int
    message: str
    level: int = 2  # VIR_ERR_ERROR

    def encode(self) -> bytes:
        p = Packer()
        p.int(self.code)
        p.int(self.domain)
        p.opt_string(truncate_message(self.message))
        p.int(self.level)
        p.uint(0)  # dom: NULL
        p.opt_string(None)  # str1..str3
        p.opt_string(None)
        p.opt_string(None)
        p.int(0)  # int1, int2
        p.int(0)
        p.uint(0)  # net: NULL
        return p.getvalue()


def truncate_message(message: str, limit: int = ERROR_MESSAGE_MAX) -> str:
    """``message`` cut to at most ``limit`` UTF-8 bytes (on a character boundary), marked as cut."""
    raw = message.encode(errors="replace")  # a lone surrogate (from a file name, say) becomes "?"
    if len(raw) <= limit:
        return raw.decode()
    return raw[: limit - 3].decode(errors="ignore") + "..."


HOLE_SIZE = 12  # virNetStreamHole: hyper length, unsigned int flags


def check_hole(status: Status, payload: bytes) -> None:
    """A STREAM_HOLE packet carries exactly one virNetStreamHole, as libvirt's virNetMessageDecodeStreamHole
    requires; anything else is a broken peer."""
    if status is not Status.CONTINUE or len(payload) != HOLE_SIZE:
        raise RemoteProtocolError("malformed stream hole packet")


def pack_packet(
    prog: int, proc: int, mtype: MessageType, serial: int, status: Status, payload: bytes, vers: int = PROTOCOL_VERSION
) -> bytes:
    length = HEADER_SIZE + len(payload)
    if length > MAX_PACKET:
        raise LocalProtocolError(f"packet of {length} bytes exceeds the packet limit")
    return HEADER.pack(length, prog, vers, proc, int(mtype), serial, int(status)) + payload


def unknown_procedure(proc: int) -> RemoteError:
    # VIR_ERR_RPC / VIR_FROM_RPC with this text is what the client maps to VIR_ERR_NO_SUPPORT, which
    # virsh, virt-manager and libvirt-python treat as "feature absent" and fall back from.
    return RemoteError(39, 7, f"unknown procedure: {proc}")


E = TypeVar("E")


class PacketReader(Generic[E]):
    """What both ends of a connection share: the state, the input buffer, EOF, and turning parsed
    packets into events (a subclass's ``_parse``), with a parse error ending the connection."""

    def __init__(self, max_packet: int = MAX_PACKET) -> None:
        self.max_packet = max_packet
        self.state = ConnState.OPEN
        self._buf = bytearray()
        self._eof = False

    def next_event(self) -> E | ConnectionClosed | _NeedData:
        if self.state is ConnState.ERROR:
            raise RemoteProtocolError("connection is in the error state")
        if self.state is ConnState.CLOSED:
            return ConnectionClosed()
        try:
            event = self._parse()
        except RemoteProtocolError:
            self.state = ConnState.ERROR
            self._buf.clear()
            raise
        if event is NEED_DATA and self._eof:
            self.state = ConnState.CLOSED
            return ConnectionClosed()
        return event

    def _parse(self) -> E | _NeedData:
        raise NotImplementedError


class ServerConnection(PacketReader[Event]):
    """One client connection, server side."""

    @property
    def buffered(self) -> int:
        """Bytes received and not yet turned into events (a partial packet, mostly)."""
        return len(self._buf)

    # -- input -----------------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Store bytes from the peer; ``b""`` means EOF."""
        if self.state is not ConnState.OPEN:
            return
        if not data:
            self._eof = True
        else:
            self._buf += data

    def _parse(self) -> Event | _NeedData:
        if len(self._buf) < 4:
            return NEED_DATA
        (length,) = struct.unpack_from(">I", self._buf)
        if length < HEADER_SIZE:
            raise RemoteProtocolError(f"packet length {length} is shorter than the header")
        if length > self.max_packet:
            raise RemoteProtocolError(f"packet length {length} exceeds the limit {self.max_packet}")
        if len(self._buf) < length:
            return NEED_DATA
        _, prog, vers, proc, mtype, serial, status = HEADER.unpack_from(self._buf)
        payload = bytes(self._buf[HEADER_SIZE:length])
        del self._buf[:length]
        try:
            mtype = MessageType(mtype)
            status = Status(status)
        except ValueError as err:
            raise RemoteProtocolError(f"invalid packet type {mtype} or status {status}") from err
        if prog == KEEPALIVE_PROGRAM:
            if mtype is not MessageType.MESSAGE or vers != PROTOCOL_VERSION or payload:
                raise RemoteProtocolError("malformed keepalive packet")
            if proc == KEEPALIVE_PROC_PING:
                return Ping()
            if proc == KEEPALIVE_PROC_PONG:
                return Pong()
            raise RemoteProtocolError(f"unknown keepalive procedure {proc}")
        if mtype in (MessageType.CALL, MessageType.CALL_WITH_FDS):
            if status is not Status.OK:
                raise RemoteProtocolError("a call must have status OK")
            return Call(prog, vers, proc, serial, payload, mtype is MessageType.CALL_WITH_FDS)
        if mtype is MessageType.STREAM:
            return StreamPacket(proc, serial, status, payload)
        if mtype is MessageType.STREAM_HOLE:
            check_hole(status, payload)
            return StreamPacket(proc, serial, status, payload, hole=True)
        return Ignored(prog, proc, int(mtype))

    # -- output ----------------------------------------------------------------------------------
    def _packet(self, prog: int, proc: int, mtype: MessageType, serial: int, status: Status, payload: bytes) -> bytes:
        return pack_packet(prog, proc, mtype, serial, status, payload)

    def send_reply(self, call: Call, payload: bytes) -> bytes:
        return self._packet(call.prog, call.proc, MessageType.REPLY, call.serial, Status.OK, payload)

    def send_error(self, call: Call, error: RemoteError) -> bytes:
        return self._packet(call.prog, call.proc, MessageType.REPLY, call.serial, Status.ERROR, error.encode())

    def send_event(self, proc: int, payload: bytes) -> bytes:
        # Clients ignore an event's serial; libvirtd sends 1.
        return self._packet(REMOTE_PROGRAM, proc, MessageType.MESSAGE, 1, Status.OK, payload)

    def send_stream(self, proc: int, serial: int, status: Status, payload: bytes = b"") -> bytes:
        if len(payload) > STREAM_CHUNK:
            raise LocalProtocolError("stream chunk too large")
        return self._packet(REMOTE_PROGRAM, proc, MessageType.STREAM, serial, status, payload)

    def send_stream_error(self, proc: int, serial: int, error: RemoteError) -> bytes:
        return self._packet(REMOTE_PROGRAM, proc, MessageType.STREAM, serial, Status.ERROR, error.encode())

    def send_ping(self) -> bytes:
        return self._packet(KEEPALIVE_PROGRAM, KEEPALIVE_PROC_PING, MessageType.MESSAGE, 0, Status.OK, b"")

    def send_pong(self) -> bytes:
        return self._packet(KEEPALIVE_PROGRAM, KEEPALIVE_PROC_PONG, MessageType.MESSAGE, 0, Status.OK, b"")
