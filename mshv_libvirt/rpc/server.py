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

from . import calltrace
from .dispatch import ConsoleStream, Session
from .protocol import (
    MAX_PACKET,
    NEED_DATA,
    Call,
    ConnectionClosed,
    Ping,
    RemoteProtocolError,
    ServerConnection,
    StreamPacket,
)

log = logging.getLogger(__name__)

# libvirtd's max_client_requests (default 5): calls read from a client and not yet completely written back
# to its socket. Past it we stop reading that client, so a client that does not read its replies holds at
# most a few of them.
MAX_CLIENT_REQUESTS = 5
# Output waiting in our buffer for one client (replies, events, console data). Past PAUSE_QUEUED we stop
# reading that client's calls; past MAX_QUEUED (only events and console data can get there: calls are no
# longer read) the client is dropped rather than growing our memory.
PAUSE_QUEUED = 256 << 10
MAX_QUEUED = 2 * MAX_PACKET
# At shutdown, calls still running get this long to finish before they are cancelled.
SHUTDOWN_GRACE = 2.0
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
        self.call_trace = calltrace.from_env()

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
        # drain() then returns only once everything is written to the socket: "completely written".
        transport.set_write_buffer_limits(high=0)
        calls: set[asyncio.Task[None]] = set()
        unflushed = 0  # replies handed to the transport that were not yet completely written
        progress = asyncio.Event()  # a call finished

        def send(data: bytes) -> bool:
            """Queue ``data``; False if the client was dropped for not reading what we queued."""
            if not data or transport.is_closing():
                return False
            if transport.get_write_buffer_size() + len(data) > MAX_QUEUED:
                log.warning("dropping a client that does not read its replies and events")
                transport.abort()
                return False
            transport.write(data)
            return True

        def send_reply(data: bytes) -> None:
            nonlocal unflushed
            if send(data) and transport.get_write_buffer_size():
                unflushed += 1

        session = Session(self, conn, send, readonly, transport.get_write_buffer_size, writer.drain)

        async def finish_call(pending: Coroutine[Any, Any, bytes]) -> None:
            try:
                send_reply(await pending)
            finally:
                progress.set()

        async def wait_for_room() -> None:
            """Until the client has fewer than MAX_CLIENT_REQUESTS outstanding and reads its output."""
            nonlocal unflushed
            while not transport.is_closing():
                queued = transport.get_write_buffer_size()
                if not queued:
                    unflushed = 0  # everything written: every queued reply is complete
                if len(calls) + unflushed < MAX_CLIENT_REQUESTS and queued <= PAUSE_QUEUED:
                    return
                progress.clear()
                waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(progress.wait())]
                if queued:
                    waits.append(asyncio.ensure_future(writer.drain()))
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()
                    for w in waits:
                        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                            await w
            raise ConnectionResetError("client connection closed")

        shutting_down = False
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
                        await wait_for_room()
                        reply = session.dispatch(event)
                        if isinstance(reply, bytes):
                            send_reply(reply)
                        else:
                            t = asyncio.create_task(finish_call(reply))
                            calls.add(t)
                            t.add_done_callback(calls.discard)
                    elif isinstance(event, StreamPacket):
                        waiting = session.stream_packet(event)
                        if waiting is not None:  # a relayed upload waits for libvirt's daemon to read
                            await waiting
                extra = max(0, conn.buffered - SMALL_BUFFER)
                self.buffered += extra - charged
                charged = extra
                if not data or transport.is_closing():
                    break
        except RemoteProtocolError as err:
            log.info("closing a client: %s", err)
        except ConnectionError:
            pass
        except asyncio.CancelledError:
            shutting_down = True
        finally:
            self.buffered -= charged
            charged = 0
            # A client that went away still gets its calls carried out (a define it sent is not half
            # done); at shutdown they get SHUTDOWN_GRACE, then are cancelled.
            pending = [t for t in calls if not t.done()]
            if pending:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait(pending, timeout=SHUTDOWN_GRACE if shutting_down else 60)
                for t in pending:
                    t.cancel()
            session.close()
            writer.close()
            self._clients.discard(task)
            self.clients -= 1
            self.ro_clients -= readonly
            self.last_activity = asyncio.get_event_loop().time()
