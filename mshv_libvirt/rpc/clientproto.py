"""libvirt's RPC framing, client side, as a sans-IO core: calls out, replies matched by serial.

The mirror of ``protocol.ServerConnection`` (same header, keepalive and stream facts): no sockets, no
event loop. The asyncio adapter is ``client.py``. A client numbers its calls from 0 (as libvirt's
virNetClient does); a reply must answer an outstanding call, and a stream packet belongs to a call
that opened a stream. Server-to-client event messages and stream packets are passed through as
they came. A packet over the size limit is skipped as it arrives (never buffered whole): the call
it answers fails, and the connection carries on.
"""

from __future__ import annotations

from dataclasses import dataclass

from .protocol import (
    HEADER,
    HEADER_SIZE,
    KEEPALIVE_PROC_PING,
    KEEPALIVE_PROC_PONG,
    KEEPALIVE_PROGRAM,
    MAX_PACKET,
    NEED_DATA,
    PROTOCOL_VERSION,
    REMOTE_PROGRAM,
    ConnectionClosed,
    ConnState,
    Ignored,
    LocalProtocolError,
    MessageType,
    PacketReader,
    Ping,
    Pong,
    RemoteProtocolError,
    Status,
    StreamPacket,
    _NeedData,
    check_hole,
    pack_packet,
)

SERIAL_MASK = 0xFFFFFFFF


@dataclass(frozen=True)
class Reply:
    """The server's answer to one of our calls: ``payload`` is the XDR ret (OK) or remote_error (ERROR)."""

    prog: int
    vers: int
    proc: int
    serial: int
    status: Status
    payload: bytes


@dataclass(frozen=True)
class Message:
    """A server-to-client event message (type MESSAGE), passed through undecoded."""

    prog: int
    vers: int
    proc: int
    serial: int  # meaningless to clients (libvirtd sends 1), kept so a relay passes it on unchanged
    payload: bytes


@dataclass(frozen=True)
class Skipped:
    """A packet longer than the limit, dropped unread; ``call`` is True when it was a reply to ``serial``
    (that call is no longer outstanding and must fail)."""

    proc: int
    serial: int
    length: int
    call: bool


ClientEvent = Reply | Message | StreamPacket | Ping | Pong | Skipped | Ignored | ConnectionClosed


class ClientConnection(PacketReader[ClientEvent]):
    """One connection to a libvirt daemon, client side."""

    def __init__(self, max_packet: int = MAX_PACKET) -> None:
        super().__init__(max_packet)
        self._skip = 0  # bytes still to drop of an oversized packet
        self._next_serial = 0
        self._pending: dict[int, int] = {}  # serial -> proc of calls awaiting their reply
        self._streams: dict[int, int] = {}  # serial -> proc of calls that opened a stream

    @property
    def pending(self) -> list[int]:
        """Serials of the calls that have no reply yet."""
        return list(self._pending)

    @property
    def streams(self) -> list[int]:
        """Serials of the streams that are open (or being opened)."""
        return list(self._streams)

    # -- output ----------------------------------------------------------------------------------
    def send_call(
        self, proc: int, payload: bytes = b"", *, stream: bool = False, prog: int = REMOTE_PROGRAM
    ) -> tuple[int, bytes]:
        """(serial, bytes) of a new call; ``stream``: the call opens a stream on its serial."""
        if self.state is not ConnState.OPEN:
            raise LocalProtocolError("the connection is closed")
        serial = self._next_serial
        while serial in self._pending or serial in self._streams:  # only after 2**32 calls
            serial = (serial + 1) & SERIAL_MASK
        self._next_serial = (serial + 1) & SERIAL_MASK
        data = pack_packet(prog, proc, MessageType.CALL, serial, Status.OK, payload)
        self._pending[serial] = proc
        if stream:
            self._streams[serial] = proc
        return serial, data

    def send_stream(self, serial: int, status: Status, payload: bytes = b"", *, hole: bool = False) -> bytes:
        """A stream packet for the stream opened by call ``serial``: data (CONTINUE), finish (OK) or
        abort (ERROR); ``hole``: a virNetStreamHole. The stream stays open until the server confirms."""
        proc = self._streams.get(serial)
        if proc is None:
            raise LocalProtocolError(f"no open stream has serial {serial}")
        if hole:
            check_hole(status, payload)
        mtype = MessageType.STREAM_HOLE if hole else MessageType.STREAM
        return pack_packet(REMOTE_PROGRAM, proc, mtype, serial, status, payload)

    def forget_stream(self, serial: int) -> None:
        """Drop a stream without telling the server (its call failed, or the stream is abandoned)."""
        self._streams.pop(serial, None)

    def send_ping(self) -> bytes:
        return pack_packet(KEEPALIVE_PROGRAM, KEEPALIVE_PROC_PING, MessageType.MESSAGE, 0, Status.OK, b"")

    def send_pong(self) -> bytes:
        return pack_packet(KEEPALIVE_PROGRAM, KEEPALIVE_PROC_PONG, MessageType.MESSAGE, 0, Status.OK, b"")

    # -- input -----------------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Store bytes from the server; ``b""`` means EOF."""
        if self.state is not ConnState.OPEN:
            return
        if not data:
            self._eof = True
            return
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
        self._buf += data

    def _parse(self) -> ClientEvent | _NeedData:
        if self._skip or len(self._buf) < HEADER_SIZE:
            return NEED_DATA
        length, prog, vers, proc, mtype, serial, status = HEADER.unpack_from(self._buf)
        if length < HEADER_SIZE:
            raise RemoteProtocolError(f"packet length {length} is shorter than the header")
        if length > self.max_packet:
            # Drop it as it streams in: what is buffered now, the rest in receive_data.
            dropped = min(length, len(self._buf))
            del self._buf[:dropped]
            self._skip = length - dropped
            answered = mtype == MessageType.REPLY and self._pending.pop(serial, None) is not None
            if answered:
                self._streams.pop(serial, None)
            return Skipped(proc, serial, length, answered)
        if len(self._buf) < length:
            return NEED_DATA
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
        if mtype is MessageType.REPLY:
            if status is Status.CONTINUE:
                raise RemoteProtocolError("a reply cannot have status CONTINUE")
            if self._pending.get(serial) != proc:
                raise RemoteProtocolError(f"reply to no outstanding call (serial {serial}, procedure {proc})")
            del self._pending[serial]
            if status is Status.ERROR:
                self._streams.pop(serial, None)  # a failed call opened no stream
            return Reply(prog, vers, proc, serial, status, payload)
        if mtype is MessageType.MESSAGE:
            return Message(prog, vers, proc, serial, payload)
        if mtype in (MessageType.STREAM, MessageType.STREAM_HOLE):
            if self._streams.get(serial) != proc:
                return Ignored(prog, proc, int(mtype))  # libvirt's client drops these too
            hole = mtype is MessageType.STREAM_HOLE
            if hole:
                check_hole(status, payload)
            elif status is not Status.CONTINUE:
                del self._streams[serial]  # the server finished or aborted it: nothing follows
            return StreamPacket(proc, serial, status, payload, hole)
        # A CALL (the server may not call us) or a REPLY_WITH_FDS (we never pass fds).
        raise RemoteProtocolError(f"unexpected packet type {mtype.name} from the server")
