"""The asyncio adapter: UNIX sockets in, the sans-IO core and dispatcher in between, bytes out.

No protocol logic lives here: framing is ``protocol.ServerConnection``, procedures are
``dispatch``. This module owns sockets, per-connection tasks and limits that protect other clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mshv_libvirt.driver.manager import DomainManager
from mshv_libvirt.errors import ErrorCode, ErrorDomain, VirtError

from .dispatch import ConsoleStream, Session
from .protocol import (
    NEED_DATA,
    Call,
    ConnectionClosed,
    Ping,
    RemoteProtocolError,
    ServerConnection,
    StreamPacket,
)

log = logging.getLogger(__name__)

MAX_CALLS_IN_FLIGHT = 16  # per connection, like libvirtd's max_client_requests (bounded work per client)
MAX_WRITE_BUFFER = 32 << 20  # a client that stops reading is dropped rather than growing our memory
MAX_CLIENTS = 512
# The read-only socket is world-accessible (0666): its clients may take at most half the slots, so
# they can never lock the owner out of the read-write socket.
MAX_RO_CLIENTS = MAX_CLIENTS // 2
# Partial packets are buffered until complete (up to MAX_PACKET each). A client may always buffer
# SMALL_BUFFER; beyond that all clients share MAX_BUFFERED_TOTAL, and a client that would exceed it
# is dropped, so many clients stalling mid-packet cannot make us grow without bound.
SMALL_BUFFER = 256 << 10
MAX_BUFFERED_TOTAL = 96 << 20


@dataclass(frozen=True)
class Listener:
    path: Path
    readonly: bool
    mode: int
    inherited_fd: int | None = None  # from systemd socket activation


class Daemon:
    def __init__(self, manager: DomainManager, uri: str) -> None:
        self.manager = manager
        self.uri = uri
        self.console_session: dict[int, Session] = {}
        self._servers: list[asyncio.base_events.Server] = []
        self._clients: set[asyncio.Task[None]] = set()
        self.clients = 0
        self.ro_clients = 0
        self.buffered = 0  # bytes above SMALL_BUFFER held in partial packets, over all clients
        self.last_activity = asyncio.get_event_loop().time()

    def check_uri(self, name: str | None) -> None:
        if not name:
            return  # "server chooses": we are the mshv driver
        parts = urlsplit(name)
        if parts.scheme != "mshv" or parts.path not in ("/system", "/session") or parts.netloc:
            raise VirtError(ErrorCode.NO_CONNECT, f"no connection driver available for {name}", ErrorDomain.NONE)

    def kick_console(self, stream: ConsoleStream) -> None:
        session = self.console_session.get(id(stream))
        if session is not None:
            session.end_console(stream)

    # -- listening --------------------------------------------------------------------------------
    async def listen(self, listeners: Iterable[Listener]) -> None:
        for lst in listeners:
            if lst.inherited_fd is not None:
                sock = socket.socket(fileno=lst.inherited_fd)
            else:
                lst.path.parent.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(FileNotFoundError):
                    if stat.S_ISSOCK(lst.path.lstat().st_mode):
                        lst.path.unlink()
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                old = os.umask(0o777 & ~lst.mode)  # no window where the socket has looser permissions
                try:
                    sock.bind(str(lst.path))
                finally:
                    os.umask(old)
                os.chmod(lst.path, lst.mode)
            server = await asyncio.start_unix_server(self._acceptor(lst.readonly), sock=sock, limit=1 << 16)
            self._servers.append(server)
            log.info("listening on %s%s", lst.path, " (read-only)" if lst.readonly else "")

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._clients):
            task.cancel()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()

    def _acceptor(
        self, readonly: bool
    ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, None]]:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._client(reader, writer, readonly)

        return accept

    # -- one client -------------------------------------------------------------------------------
    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, readonly: bool) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._clients) >= MAX_CLIENTS or (readonly and self.ro_clients >= MAX_RO_CLIENTS):
            log.warning("refusing a client: too many connections")
            writer.close()
            return
        self._clients.add(task)
        self.clients += 1
        self.ro_clients += readonly
        conn = ServerConnection()
        charged = 0  # this client's share of self.buffered
        transport = writer.transport

        def send(data: bytes) -> None:
            if not data or transport.is_closing():
                return
            if transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
                log.warning("dropping a client that does not read its replies")
                transport.abort()
                return
            transport.write(data)

        session = Session(self, conn, send, readonly)
        in_flight = asyncio.Semaphore(MAX_CALLS_IN_FLIGHT)
        calls: set[asyncio.Task[None]] = set()

        async def finish_call(pending: Coroutine[Any, Any, bytes]) -> None:
            try:
                send(await pending)
            finally:
                in_flight.release()

        try:
            while True:
                try:
                    data = await reader.read(1 << 16)
                except (ConnectionError, OSError):
                    data = b""
                conn.receive_data(data)
                extra = max(0, conn.buffered - SMALL_BUFFER)
                if extra > charged and self.buffered + extra - charged > MAX_BUFFERED_TOTAL:
                    log.warning("dropping a client: partial packets of all clients exceed the memory limit")
                    transport.abort()
                    break
                self.buffered += extra - charged
                charged = extra
                while True:
                    event = conn.next_event()
                    if event is NEED_DATA or isinstance(event, ConnectionClosed):
                        break
                    if isinstance(event, Ping):
                        send(conn.send_pong())
                    elif isinstance(event, Call):
                        reply = session.dispatch(event)
                        if isinstance(reply, bytes):
                            send(reply)
                            continue
                        try:
                            await in_flight.acquire()
                        except asyncio.CancelledError:
                            reply.close()  # never started: nothing to wait for
                            raise
                        t = asyncio.create_task(finish_call(reply))
                        calls.add(t)
                        t.add_done_callback(calls.discard)
                    elif isinstance(event, StreamPacket):
                        session.stream_packet(event)
                extra = max(0, conn.buffered - SMALL_BUFFER)
                self.buffered += extra - charged
                charged = extra
                if not data or transport.is_closing():
                    break
                await writer.drain()
        except RemoteProtocolError as err:
            log.info("closing a client: %s", err)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.buffered -= charged
            charged = 0
            for t in list(calls):
                if not t.done():
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await asyncio.wait_for(asyncio.shield(t), 60)
            session.close()
            writer.close()
            self._clients.discard(task)
            self.clients -= 1
            self.ro_clients -= readonly
            self.last_activity = asyncio.get_event_loop().time()
