"""Storage and network procedures, relayed unchanged to libvirt's own storage and network drivers.

We do not write a storage or network driver: like libvirt's modular daemons handing secondary
drivers to each other, each client's storage calls go to libvirt's storage driver and its network
calls to libvirt's network driver, on a connection of that client's own (``RemoteClient``), and
the answers come back as they were sent. Only serials change (the upstream connection numbers its
calls itself); events and stream packets pass through.

Which numbers: every libvirt 9.0 call whose errors libvirt reports in the storage (18) or network
(19) error domain (``procnames.py``). That is every ``REMOTE_PROC_STORAGE_POOL_*``/``STORAGE_VOL_*``/
``NETWORK_*`` (network ports included) and the connect-level calls that belong to those drivers:
the legacy ``CONNECT_NUM_OF_*``/``CONNECT_LIST_*`` calls, ``CONNECT_LIST_ALL_*``,
``CONNECT_FIND_STORAGE_POOL_SOURCES``, ``CONNECT_GET_STORAGE_POOL_CAPABILITIES`` and the event
(de)registrations. The event messages passed back are libvirt's storage pool and network events.

Where: ``storage:///system`` / ``network:///system`` on ``/run/libvirt/virtstoraged-sock`` /
``virtnetworkd-sock`` where that socket exists, else libvirtd's ``libvirt-sock``; read-only clients
use the ``-sock-ro`` sockets and open with VIR_CONNECT_RO. ``mshv:///session`` clients reach
``storage:///session`` / ``network:///session`` in ``$XDG_RUNTIME_DIR/libvirt`` (the user's own
daemon, read-only through VIR_CONNECT_RO: session daemons have no read-only socket), never the system
daemon. An upstream connection is opened on a client's first call for that driver and closed with
the client's connection. No daemon there (or it refuses the open): the call fails with libvirt's
VIR_ERR_NO_SUPPORT naming the API, as calls we do not implement do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from mshv_libvirt.driver.manager import user_runtime_dir
from mshv_libvirt.errors import ErrorCode, ErrorDomain, VirtError

from .client import HANDSHAKE_TIMEOUT, WRITE_HIGH, DaemonError, Handlers, RemoteClient, RemoteClosed
from .clientproto import Message, Reply
from .procnames import PROCEDURE_NAMES
from .protocol import (
    REMOTE_PROGRAM,
    Call,
    LocalProtocolError,
    MessageType,
    RemoteError,
    ServerConnection,
    Status,
    StreamPacket,
    pack_packet,
)

log = logging.getLogger(__name__)

SYSTEM_DIR = Path("/run/libvirt")
# STORAGE_VOL_UPLOAD (@writestream) and STORAGE_VOL_DOWNLOAD (@readstream) in remote_protocol.x.
STREAM_PROCS = frozenset({208, 209})
# Streams one client connection may hold open at once (libvirt has no limit; each is an open file
# in libvirt's daemon and an entry here).
MAX_STREAMS = 64
# Stream packets kept for a call libvirtd has not answered yet (its data may come first); more ends the
# upstream connection (the call then fails) rather than grow without bound: 64 x 256 KiB.
MAX_EARLY_PACKETS = 64
# Upstream data waiting for this client beyond this: stop reading upstream until the client reads.
CLIENT_BACKLOG = 256 << 10


@dataclass(frozen=True)
class Driver:
    scheme: str  # the URI scheme libvirt's driver answers to
    daemon: str  # libvirt's modular daemon serving it
    domain: ErrorDomain
    calls: frozenset[int]
    events: frozenset[int]  # event messages passed back


def _driver(scheme: str, daemon: str, domain: ErrorDomain, event_prefix: str) -> Driver:
    calls = frozenset(n for n, (_, _, dom, event) in PROCEDURE_NAMES.items() if dom == domain and not event)
    events = frozenset(
        n for n, (name, _, _, event) in PROCEDURE_NAMES.items() if event and name.startswith(event_prefix)
    )
    return Driver(scheme, daemon, domain, calls, events)


STORAGE = _driver("storage", "virtstoraged", ErrorDomain.STORAGE, "virStoragePoolEvent")
NETWORK = _driver("network", "virtnetworkd", ErrorDomain.NETWORK, "virNetworkEvent")
RELAYED: dict[int, Driver] = {n: d for d in (STORAGE, NETWORK) for n in d.calls}


def socket_path(driver: Driver, session: bool, readonly: bool) -> Path:
    """The modular daemon's socket where it exists, else libvirtd's (whose absence means "not running")."""
    base = user_runtime_dir() / "libvirt" if session else SYSTEM_DIR
    suffix = "-sock-ro" if readonly and not session else "-sock"
    modular = base / f"{driver.daemon}{suffix}"
    return modular if modular.exists() else base / f"libvirt{suffix}"


class _Unavailable(Exception):
    pass


@dataclass
class _Upstream:
    driver: Driver
    what: str
    client: RemoteClient | None = None
    to_client: dict[int, int] = field(default_factory=dict)  # upstream stream serial -> client serial
    # Stream data of calls not answered yet: libvirtd's event loop may send a download's first packets
    # before its worker sends the call's reply (daemonAddClientStream arms the stream first).
    early: dict[int, list[StreamPacket]] = field(default_factory=dict)


class Relay:
    """One client connection's relayed calls: an upstream connection per driver, opened on first use."""

    def __init__(
        self,
        conn: ServerConnection,
        send: Callable[[bytes], object],
        backlog: Callable[[], int],
        drained: Callable[[], Awaitable[None]] | None,
    ) -> None:
        self.conn = conn
        self.send = send  # queue bytes for the client (counted in its output queue)
        self.backlog = backlog
        self.drained = drained
        self._up: dict[str, _Upstream] = {}
        self._connecting: dict[str, asyncio.Task[_Upstream]] = {}
        self._generation = 0  # bumped by close(): a connect that finishes after it is discarded
        self._streams: dict[int, tuple[_Upstream, int, int]] = {}  # client serial -> (upstream, serial, proc)
        self._opening: set[int] = set()  # client serials of stream calls not yet answered upstream
        self._closing = False

    # -- calls ------------------------------------------------------------------------------------
    def forward(self, call: Call, *, session: bool, readonly: bool) -> Coroutine[Any, Any, bytes]:
        """The reply packet for a relayed call, once libvirt's driver answered (or could not)."""
        return self._forward(call, RELAYED[call.proc], session, readonly)

    async def _forward(self, call: Call, driver: Driver, session: bool, readonly: bool) -> bytes:
        up: _Upstream | None = None
        try:
            up = await self._upstream(driver, session, readonly)
            assert up.client is not None
            if call.proc in STREAM_PROCS:
                return await self._open_stream(call, up, up.client)
            reply = await up.client.call(call.proc, call.payload)
        except _Unavailable:
            name = PROCEDURE_NAMES[call.proc][0]
            err = VirtError(ErrorCode.NO_SUPPORT, name, driver.domain)
            return self.conn.send_error(call, RemoteError(err.code, err.domain, err.message))
        except RemoteClosed as err:
            what = up.what if up is not None else driver.scheme
            return self.conn.send_error(call, RemoteError(ErrorCode.SYSTEM_ERROR, ErrorDomain.RPC, f"{what}: {err}"))
        except VirtError as err:
            return self.conn.send_error(call, RemoteError(err.code, err.domain, err.message))
        except Exception as err:  # anything unexpected (a malformed reply, say) still answers the call
            log.exception("relaying %s failed", PROCEDURE_NAMES[call.proc][0])
            what = up.what if up is not None else driver.scheme
            return self.conn.send_error(
                call, RemoteError(ErrorCode.INTERNAL_ERROR, ErrorDomain.RPC, f"internal error: {what}: {err}")
            )
        return self._reply(call, reply)

    def _reply(self, call: Call, reply: Reply) -> bytes:
        return pack_packet(call.prog, call.proc, MessageType.REPLY, call.serial, reply.status, reply.payload, call.vers)

    async def _open_stream(self, call: Call, up: _Upstream, client: RemoteClient) -> bytes:
        # Streams being opened count as open: several calls sent at once must not pass the limit together,
        # nor share a client serial (a later reply would hide the earlier stream, open upstream for good).
        held = len(self._streams) + len(self._opening)
        if held >= MAX_STREAMS or call.serial in self._streams or call.serial in self._opening:
            detail = f"Too many open streams '{held + 1}' for limit '{MAX_STREAMS}'"
            if call.serial in self._streams or call.serial in self._opening:
                detail = f"stream serial {call.serial} is already open"
            return self.conn.send_error(call, RemoteError(ErrorCode.RPC, ErrorDomain.RPC, detail))

        def on_reply(reply: Reply) -> None:
            # Sent from the reader, so the client has the reply before the stream data that follows it,
            # and before whatever came ahead of the reply (kept in up.early until now).
            self._opening.discard(call.serial)
            early = up.early.pop(reply.serial, [])
            if reply.status is Status.OK:
                self._streams[call.serial] = (up, reply.serial, call.proc)
                up.to_client[reply.serial] = call.serial
            self.send(self._reply(call, reply))
            for pkt in early:
                self._stream_from_upstream(up, pkt)

        self._opening.add(call.serial)
        upstream_serial = None
        try:
            upstream_serial, future = client.start_call(call.proc, call.payload, stream=True, on_reply=on_reply)
            up.early[upstream_serial] = []  # before the reader can run: nothing it reads is lost
            await future
        finally:
            self._opening.discard(call.serial)
            if upstream_serial is not None:
                up.early.pop(upstream_serial, None)
        return b""  # already sent

    def _end_stream(self, up: _Upstream, upstream_serial: int) -> tuple[_Upstream, int, int] | None:
        """Forget the client stream that ``up``'s stream ``upstream_serial`` is, and only that one."""
        serial = up.to_client.pop(upstream_serial, None)
        entry = self._streams.get(serial) if serial is not None else None
        if serial is None or entry is None or entry[0] is not up or entry[1] != upstream_serial:
            return None
        return self._streams.pop(serial)

    # -- the upstream connections -----------------------------------------------------------------
    async def _upstream(self, driver: Driver, session: bool, readonly: bool) -> _Upstream:
        up = self._up.get(driver.scheme)
        if up is not None and up.client is not None and up.client.closed is None:
            return up
        task = self._connecting.get(driver.scheme)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._connect(driver, session, readonly))
            self._connecting[driver.scheme] = task
            task.add_done_callback(partial(self._connected, driver.scheme, self._generation))
        try:
            return await asyncio.shield(task)  # a caller that goes away does not cancel the others' connect
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if task.cancelled() and (me is None or not me.cancelling()):
                raise RemoteClosed("the client closed its connection") from None  # close() cancelled it
            raise

    def _connected(self, scheme: str, generation: int, task: asyncio.Task[_Upstream]) -> None:
        if self._connecting.get(scheme) is task:
            del self._connecting[scheme]
        if task.cancelled() or task.exception() is not None:
            return
        up = task.result()
        if generation != self._generation:
            assert up.client is not None
            up.client.close("the client closed its connection")
        else:
            self._up[scheme] = up

    async def _connect(self, driver: Driver, session: bool, readonly: bool) -> _Upstream:
        path = socket_path(driver, session, readonly)
        uri = f"{driver.scheme}:///{'session' if session else 'system'}"
        up = _Upstream(driver, f"{uri} on {path}")
        handlers = Handlers(
            message=partial(self._message, up),
            stream=partial(self._stream_from_upstream, up),
            closed=partial(self._upstream_closed, up),
            pause=self._pause,
        )
        client: RemoteClient | None = None
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                client = await RemoteClient.connect(path, handlers, up.what)
                await client.open(uri, readonly)
        except (OSError, TimeoutError, RemoteClosed, DaemonError, VirtError, LocalProtocolError, ValueError) as err:
            if client is not None:
                client.close()
            log.info("libvirt's %s driver is not available (%s): %s", driver.scheme, up.what, err)
            raise _Unavailable from err
        except BaseException:
            if client is not None:
                client.close()
            raise
        up.client = client
        log.debug("relaying %s calls to %s", driver.scheme, up.what)
        return up

    def _pause(self) -> Awaitable[None] | None:
        if self.drained is None or self.backlog() <= CLIENT_BACKLOG:
            return None
        return self._drain(self.drained)

    @staticmethod
    async def _drain(drained: Callable[[], Awaitable[None]]) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await drained()

    # -- from libvirt's daemon --------------------------------------------------------------------
    def _message(self, up: _Upstream, msg: Message) -> None:
        # Only this driver's events: anything else (CONNECT_EVENT_CONNECTION_CLOSED, say) is about the
        # upstream connection, not the client's.
        if msg.prog == REMOTE_PROGRAM and msg.proc in up.driver.events:
            self.send(
                pack_packet(msg.prog, msg.proc, MessageType.MESSAGE, msg.serial, Status.OK, msg.payload, msg.vers)
            )

    def _stream_from_upstream(self, up: _Upstream, pkt: StreamPacket) -> None:
        serial = up.to_client.get(pkt.serial)
        if serial is None:
            early = up.early.get(pkt.serial)
            if early is not None:
                early.append(pkt)
                if len(early) > MAX_EARLY_PACKETS and up.client is not None:
                    # Bounded: libvirtd sends the reply right behind its first packets.
                    up.client.close(f"more than {MAX_EARLY_PACKETS} stream packets before the call's reply")
            return
        mtype = MessageType.STREAM_HOLE if pkt.hole else MessageType.STREAM
        self.send(pack_packet(REMOTE_PROGRAM, pkt.proc, mtype, serial, pkt.status, pkt.payload))
        if not pkt.hole and pkt.status is not Status.CONTINUE:  # finished or aborted by the daemon
            self._end_stream(up, pkt.serial)

    def _upstream_closed(self, up: _Upstream, reason: str) -> None:
        if self._up.get(up.driver.scheme) is up:
            del self._up[up.driver.scheme]  # the next call reconnects
        if up.client is not None and not self._closing:
            log.info("%s closed: %s", up.what, reason)
        error = RemoteError(ErrorCode.SYSTEM_ERROR, ErrorDomain.RPC, f"{up.what}: {reason}")
        for upstream_serial, serial in list(up.to_client.items()):
            entry = self._end_stream(up, upstream_serial)
            if entry is not None and not self._closing:
                self.send(self.conn.send_stream_error(entry[2], serial, error))
        up.to_client.clear()

    # -- from the client --------------------------------------------------------------------------
    def owns(self, pkt: StreamPacket) -> bool:
        entry = self._streams.get(pkt.serial)
        return entry is not None and entry[2] == pkt.proc

    def stream_packet(self, pkt: StreamPacket) -> Awaitable[None] | None:
        """Pass a client's stream packet on; an awaitable while libvirt's daemon has not read what we sent."""
        up, serial, _ = self._streams[pkt.serial]
        if up.client is None:
            return None
        try:
            up.client.send_stream(serial, pkt.status, pkt.payload, hole=pkt.hole)
        except (RemoteClosed, LocalProtocolError):
            return None  # the stream ended upstream (the client was told) or the packet was malformed
        if up.client.write_backlog() > WRITE_HIGH:
            return up.client.drain()
        return None

    def close(self) -> None:
        """The client's connection ended (or it sent CONNECT_CLOSE): close every upstream connection."""
        self._closing = True
        self._generation += 1
        try:
            for task in list(self._connecting.values()):
                task.cancel()
            for up in list(self._up.values()):
                if up.client is not None:
                    up.client.close("the client closed its connection")
            self._up.clear()
            self._streams.clear()
            self._opening.clear()
        finally:
            self._closing = False
