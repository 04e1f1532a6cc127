"""The asyncio adapter of libvirt's RPC client side: one UNIX socket to a libvirt daemon.

Framing and serials are ``clientproto.ClientConnection``; this module owns the socket, a reader
task, keepalive and timeouts. ``RemoteClient.call`` awaits a reply; event messages and stream packets
go to the callbacks given at connect time, in the order they arrived. Liveness is libvirt's keepalive
(``virkeepalive.c``): after ``CONNECT_SUPPORTS_FEATURE(PROGRAM_KEEPALIVE)`` the daemon answers our
PINGs and sends its own, so a daemon that stops answering is given up after
``KEEPALIVE_INTERVAL * (KEEPALIVE_COUNT + 1)`` seconds of silence, whatever a call is doing (a pool
build or a volume wipe may rightly take minutes, so calls have no fixed deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from mshv_libvirt.errors import ErrorCode, ErrorDomain, VirtError

from .clientproto import ClientConnection, Message, Reply, Skipped
from .protocol import (
    NEED_DATA,
    ConnectionClosed,
    Ping,
    RemoteError,
    RemoteProtocolError,
    Status,
    StreamPacket,
)
from .xdr import Packer, Unpacker, XdrError

log = logging.getLogger(__name__)

PROC_CONNECT_OPEN = 1
PROC_CONNECT_CLOSE = 2
PROC_SUPPORTS_FEATURE = 60
PROC_AUTH_LIST = 66
FEATURE_PROGRAM_KEEPALIVE = 10  # VIR_DRV_FEATURE_PROGRAM_KEEPALIVE
AUTH_NONE = 0  # REMOTE_AUTH_NONE
CONNECT_RO = 1  # VIR_CONNECT_RO

# libvirt's client defaults are 5 s and 5; three missed answers are enough on a local socket.
KEEPALIVE_INTERVAL = 5.0
KEEPALIVE_COUNT = 3
# Connecting and the open handshake (AUTH_LIST, keepalive, CONNECT_OPEN) take milliseconds.
HANDSHAKE_TIMEOUT = 10.0
# Our writes waiting for the daemon beyond this make ``drain`` wait (stream uploads).
WRITE_HIGH = 256 << 10
READ_CHUNK = 1 << 16


class RemoteClosed(Exception):
    """The connection ended (EOF, protocol error, keepalive timeout, or closed by us)."""


class DaemonError(Exception):
    """The daemon answered with an error (``error`` is its remote_error, code, domain and message)."""

    def __init__(self, error: RemoteError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass
class _Call:
    future: asyncio.Future[Reply]
    on_reply: Callable[[Reply], None] | None = None


@dataclass
class Handlers:
    """What the reader hands on, synchronously and in arrival order."""

    message: Callable[[Message], None] = lambda _m: None
    stream: Callable[[StreamPacket], None] = lambda _p: None
    # Called once the connection is gone (with the reason), after pending calls have failed.
    closed: Callable[[str], None] = lambda _r: None
    # Before reading more: an awaitable while whoever consumes our output is backlogged.
    pause: Callable[[], Awaitable[None] | None] = lambda: None


class RemoteClient:
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handlers: Handlers, what: str
    ) -> None:
        self.what = what  # for errors and logs: "storage:///system on /run/libvirt/libvirt-sock"
        self.conn = ClientConnection()
        self._reader = reader
        self._writer = writer
        self._handlers = handlers
        self._calls: dict[int, _Call] = {}
        self._closed: str | None = None
        self._finished = False
        loop = asyncio.get_running_loop()
        self._last_rx = loop.time()
        self._paused = False
        writer.transport.set_write_buffer_limits(high=WRITE_HIGH)
        self._tasks = [loop.create_task(self._read_loop()), loop.create_task(self._keepalive())]

    @classmethod
    async def connect(
        cls, path: Path, handlers: Handlers, what: str, timeout: float = HANDSHAKE_TIMEOUT
    ) -> RemoteClient:
        """A connected client (OSError or TimeoutError when nothing answers at ``path``)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, os.fspath(path)), timeout)
            reader, writer = await asyncio.open_unix_connection(sock=sock, limit=READ_CHUNK)
        except BaseException:
            sock.close()
            raise
        return cls(reader, writer, handlers, what)

    @property
    def closed(self) -> str | None:
        """None while open, else why it ended."""
        return self._closed

    # -- calls ------------------------------------------------------------------------------------
    def start_call(
        self, proc: int, payload: bytes = b"", *, stream: bool = False, on_reply: Callable[[Reply], None] | None = None
    ) -> tuple[int, asyncio.Future[Reply]]:
        """Send a call now; its serial and a future of its reply (RemoteClosed if the connection ends
        first). ``on_reply`` runs in the reader, before anything that arrived after the reply."""
        if self._closed is not None:
            raise RemoteClosed(self._closed)
        serial, data = self.conn.send_call(proc, payload, stream=stream)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._calls[serial] = _Call(future, on_reply)
        self._writer.write(data)
        return serial, future

    async def call(self, proc: int, payload: bytes = b"") -> Reply:
        return await self.start_call(proc, payload)[1]

    async def call_ok(self, proc: int, payload: bytes = b"") -> Unpacker:
        """The reply's ret; DaemonError when the daemon refused the call."""
        reply = await self.call(proc, payload)
        if reply.status is Status.OK:
            return Unpacker(reply.payload)
        raise DaemonError(decode_error(reply.payload))

    def send_stream(self, serial: int, status: Status, payload: bytes = b"", *, hole: bool = False) -> None:
        if self._closed is not None:
            raise RemoteClosed(self._closed)
        self._writer.write(self.conn.send_stream(serial, status, payload, hole=hole))

    def write_backlog(self) -> int:
        return self._writer.transport.get_write_buffer_size()

    async def drain(self) -> None:
        """Until our queued writes are below WRITE_HIGH (or the connection is gone)."""
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self._writer.drain()

    # -- the open handshake, as libvirt's remote driver does it ------------------------------------
    async def open(self, name: str, readonly: bool) -> None:
        """AUTH_LIST (root is let past polkit there), keepalive, CONNECT_OPEN. VirtError if refused."""
        u = await self.call_ok(PROC_AUTH_LIST)
        types = [u.int() for _ in range(u.array_len(20))]
        if types and AUTH_NONE not in types:
            raise VirtError(ErrorCode.AUTH_FAILED, f"{self.what} requires authentication {types}", ErrorDomain.RPC)
        p = Packer()
        p.int(FEATURE_PROGRAM_KEEPALIVE)
        if (await self.call_ok(PROC_SUPPORTS_FEATURE, p.getvalue())).int() != 1:
            raise VirtError(ErrorCode.RPC, f"{self.what} does not support keepalive", ErrorDomain.RPC)
        p = Packer()
        p.opt_string(name)
        p.uint(CONNECT_RO if readonly else 0)
        await self.call_ok(PROC_CONNECT_OPEN, p.getvalue())

    # -- reading ----------------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        reason = "End of file while reading data: Input/output error"
        try:
            while True:
                waiting = self._handlers.pause()
                if waiting is not None:
                    self._paused = True
                    try:
                        await waiting
                    finally:
                        self._paused = False
                        self._last_rx = asyncio.get_running_loop().time()
                try:
                    data = await self._reader.read(READ_CHUNK)
                except (ConnectionError, OSError):
                    data = b""
                self._last_rx = asyncio.get_running_loop().time()
                self.conn.receive_data(data)
                while True:
                    event = self.conn.next_event()
                    if event is NEED_DATA:
                        break
                    if isinstance(event, ConnectionClosed):
                        return
                    self._handle(event)
                if not data:
                    return
        except RemoteProtocolError as err:
            reason = f"protocol error: {err}"
        except asyncio.CancelledError:
            reason = self._closed or "connection closed"
            raise
        finally:
            self._finish(reason)

    def _handle(self, event: object) -> None:
        if isinstance(event, Reply):
            pending = self._calls.pop(event.serial)
            if pending.on_reply is not None:
                pending.on_reply(event)
            if not pending.future.done():
                pending.future.set_result(event)
        elif isinstance(event, Message):
            self._handlers.message(event)
        elif isinstance(event, StreamPacket):
            self._handlers.stream(event)
        elif isinstance(event, Ping):
            self._writer.write(self.conn.send_pong())
        elif isinstance(event, Skipped):
            log.warning("%s: dropped a %d-byte packet (procedure %d)", self.what, event.length, event.proc)
            if event.call:
                pending = self._calls.pop(event.serial)
                if not pending.future.done():
                    pending.future.set_exception(
                        VirtError(
                            ErrorCode.RPC,
                            f"reply of {event.length} bytes from {self.what} exceeds the limit {self.conn.max_packet}",
                            ErrorDomain.RPC,
                        )
                    )

    async def _keepalive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(KEEPALIVE_INTERVAL)
            if self._paused:
                continue  # not reading on purpose: silence means nothing
            silent = loop.time() - self._last_rx
            if silent >= KEEPALIVE_INTERVAL * (KEEPALIVE_COUNT + 1):
                log.warning("%s: no answer for %.0f s, closing", self.what, silent)
                self.close("connection closed due to keepalive timeout")
                return
            if silent >= KEEPALIVE_INTERVAL:
                self._writer.write(self.conn.send_ping())

    # -- closing ----------------------------------------------------------------------------------
    def close(self, reason: str = "connection closed") -> None:
        """Close now; pending calls fail with RemoteClosed(reason)."""
        if self._closed is None:
            self._closed = reason
        self._writer.transport.abort()
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self._finish(self._closed)

    def _finish(self, reason: str) -> None:
        if self._closed is None:
            self._closed = reason
        if self._finished:
            return
        self._finished = True
        self._writer.transport.abort()
        calls, self._calls = self._calls, {}
        for pending in calls.values():
            if not pending.future.done():
                pending.future.set_exception(RemoteClosed(self._closed))
        self._handlers.closed(self._closed)


def decode_error(payload: bytes) -> RemoteError:
    """A remote_error payload: the daemon's code, domain and message."""
    try:
        u = Unpacker(payload)
        code, domain = u.int(), u.int()
        message = u.opt_string(1 << 20) or ""
    except XdrError:
        return RemoteError(ErrorCode.RPC, ErrorDomain.RPC, "undecodable error reply")
    return RemoteError(code, domain, message)
