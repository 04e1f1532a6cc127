"""REMOTE_PROGRAM procedures: the per-connection session and the one procedure table.

One ``Session`` per client connection holds what libvirt keeps per connection: whether it is open
and read-only, its event callbacks and its console streams. ``PROCEDURES`` (at the end) lists every
implemented procedure as one row (see ``table.py``); a libvirt 9.0 procedure that is not listed gets
libvirt's "this function is not supported by the connection driver: <API>", and a number libvirt
9.0 does not define gets "unknown procedure: N".
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from lxml import etree

from mshv_libvirt.domain import MAX_VCPUS, DomainConfig, metadata
from mshv_libvirt.domain.xml import (
    disk_insert_index,
    disk_target,
    disk_volume,
    find_disk,
    find_net,
    find_rng,
    net_link_update,
    parse_device_xml,
)
from mshv_libvirt.driver.manager import (
    Domain,
    DomainEvent,
    DomainManager,
    add_device,
    insert_disk,
    remove_device,
    set_link_state,
    set_memory,
    set_text,
    set_vcpus,
    without_volume_paths,
)
from mshv_libvirt.driver.vmm_client import VmmError
from mshv_libvirt.errors import ErrorCode, ErrorDomain, VirtError, invalid_operation
from mshv_libvirt.lifecycle import State
from mshv_libvirt.vmm.devices import keymap

from . import host, monitor
from .protocol import (
    PROTOCOL_VERSION,
    REMOTE_PROGRAM,
    STREAM_CHUNK,
    Call,
    LocalProtocolError,
    RemoteError,
    ServerConnection,
    Status,
    StreamPacket,
    unknown_procedure,
)
from .relay import RELAYED, Relay
from .table import (
    CALL,
    DOM,
    INT,
    OPT_STR,
    STR,
    UHYPER,
    UINT,
    UUID,
    UUID_LEN,
    Arg,
    Flags,
    Procedure,
    api_name,
    error_domain,
    proc,
    readonly_denied,
    ret_bool,
    ret_int,
    ret_raw,
    ret_str,
    ret_uhyper,
    table,
    unpack_domain,
)
from .xdr import Packer, Unpacker, XdrError

if TYPE_CHECKING:
    from .server import Daemon

log = logging.getLogger(__name__)

DOMAIN_LIST_MAX = 16384

# VIR_DRV_FEATURE_* we answer 1 for: keepalive, callback-style events, close callback, and
# NETWORK_UPDATE_HAS_CORRECT_ORDER (16), which libvirt says every driver must report: without it the
# client swaps virNetworkUpdate's command and section, and the relayed NETWORK_UPDATE would reach
# libvirt's network driver (which expects the correct order) swapped.
FEATURES = {10: 1, 14: 1, 15: 1, 16: 1}

# virConnectListAllDomainsFlags
LIST_ACTIVE, LIST_INACTIVE, LIST_PERSISTENT, LIST_TRANSIENT = 1, 2, 4, 8
LIST_RUNNING, LIST_PAUSED, LIST_SHUTOFF, LIST_OTHER = 16, 32, 64, 128
LIST_MANAGEDSAVE, LIST_NO_MANAGEDSAVE, LIST_AUTOSTART, LIST_NO_AUTOSTART = 256, 512, 1024, 2048
LIST_SNAPSHOT, LIST_NO_SNAPSHOT = 4096, 8192
LIST_HAS_CHECKPOINT, LIST_NO_CHECKPOINT = 1 << 14, 1 << 15
LIST_ALL_FLAGS = (1 << 16) - 1

EVENT_ID_LIFECYCLE = 0
EVENT_ID_REBOOT = 1
EVENT_MSG_PROC = {EVENT_ID_LIFECYCLE: 318, EVENT_ID_REBOOT: 319}
# libvirt 9.0's VIR_DOMAIN_EVENT_ID_LAST: every ID below it can be registered (as in libvirtd); the
# driver delivers lifecycle and reboot events, the others never happen here.
EVENT_ID_LAST = 27
# Our own limit (libvirt has none): every callback costs a message per event, so one connection
# registering 200 000 of them stalled every client at each domain event.
MAX_CALLBACKS = 64

PROC_OPEN_CONSOLE = 201
# Calls a client may make before CONNECT_OPEN: the open itself, feature probes, the auth list.
_BEFORE_OPEN = (1, 60, 66)


def pack_domain(p: Packer, dom: Domain) -> None:
    p.string(dom.name)
    p.opaque_fixed(dom.uuid.bytes, UUID_LEN)
    p.int(dom.id if dom.active else -1)


def ret_dom(dom: Any) -> bytes:
    p = Packer()
    pack_domain(p, dom)
    return p.getvalue()


def _denied(name: str, domain: ErrorDomain) -> VirtError:
    return VirtError(ErrorCode.OPERATION_DENIED, f"read only access prevents {name}", domain)


def _not_supported(name: str, domain: ErrorDomain) -> VirtError:
    return VirtError(ErrorCode.NO_SUPPORT, name, domain)


@dataclass
class ConsoleStream:
    serial: int
    dom: Domain
    fd: int
    finished: bool = False


# Console output waiting for a client beyond this: stop reading the pty until the client has read it
# (the guest's console then waits, as on a real slow serial line, instead of the daemon buffering).
CONSOLE_BACKLOG = 256 << 10


class Session:
    def __init__(
        self,
        daemon: Daemon,
        conn: ServerConnection,
        send: Callable[[bytes], object],
        readonly: bool,
        backlog: Callable[[], int] = lambda: 0,
        drained: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.daemon = daemon
        self.backlog = backlog  # bytes queued for this client and not yet written to its socket
        self.drained = drained  # waits until that queue is empty
        self.manager: DomainManager = daemon.manager
        self.conn = conn
        self.send = send
        self.readonly = readonly
        self.opened = False
        self._callbacks: dict[int, tuple[int, bytes | None]] = {}  # callbackID -> (eventID, uuid filter)
        self._next_callback = 0
        self._consoles: dict[int, ConsoleStream] = {}
        self._resumes: set[asyncio.Task[None]] = set()  # consoles waiting for the client to read
        self._subscribed = False
        self.open_name: str | None = None  # the URI the client opened
        # Storage and network calls go to libvirt's own drivers (relay.py), not to the table.
        self.relay = Relay(conn, send, backlog, drained)
        # Test-only call trace (calltrace.py): None until the first call after CONNECT_OPEN tells
        # whether this is libvirt's client library; calls made before that wait in _early.
        self._real_client: bool | None = None
        self._early: list[int] = []

    # -- calls ------------------------------------------------------------------------------------
    def dispatch(self, call: Call) -> bytes | Coroutine[Any, Any, bytes]:
        """The reply packet for one call, or an awaitable of it for a call that must wait.

        Most calls (lookups, state, XML, lists) never wait and are answered at once; a handler that
        returns an awaitable (it waits for a VMM or the disk) is finished by the caller, as a task.
        Never raises for client mistakes: they become error replies.
        """
        if call.prog != REMOTE_PROGRAM or call.vers != PROTOCOL_VERSION:
            return self.conn.send_error(
                call, RemoteError(39, 7, f"cannot find program {call.prog} version {call.vers}")
            )
        if call.proc in RELAYED and not call.with_fds:
            return self._relay(call)
        entry = PROCEDURES.get(call.proc)
        try:
            if entry is None or call.with_fds:
                raise self._unimplemented(call)
            self._check_access(call.proc, entry.name, entry.readonly_denied, entry.error_domain)
            result = self._call(call, entry)
        except Exception as err:
            return self._error_reply(call, err)
        if inspect.isawaitable(result):
            return self._finish(call, entry, result)
        return self._reply(call, entry, result)

    def _relay(self, call: Call) -> bytes | Coroutine[Any, Any, bytes]:
        name = api_name(call.proc)
        assert name is not None
        try:
            self._check_access(call.proc, name, readonly_denied(call.proc), error_domain(call.proc))
        except VirtError as err:
            return self._error_reply(call, err)
        if self.daemon.call_trace is not None:
            self._trace(call.proc)
        session = urlsplit(self.open_name or self.daemon.uri).path == "/session"
        return self.relay.forward(call, session=session, readonly=self.readonly)

    def _unimplemented(self, call: Call) -> Exception:
        name = api_name(call.proc)
        if name is None or call.with_fds:
            return _UnknownProcedure(call.proc)
        domain = error_domain(call.proc)
        self._check_access(call.proc, name, readonly_denied(call.proc), domain)
        return _not_supported(name, domain)

    def _check_access(self, number: int, name: str, denied: bool, domain: ErrorDomain) -> None:
        if not self.opened and number not in _BEFORE_OPEN:
            raise VirtError(ErrorCode.INTERNAL_ERROR, "connection not open", ErrorDomain.RPC)
        if self.readonly and denied:
            raise _denied(name, domain)

    def _call(self, call: Call, entry: Procedure) -> Any:
        u = Unpacker(call.payload)
        raw = [call if arg is CALL else arg.decode(u) for arg in entry.args]
        u.done()
        values: list[Any] = list(raw)
        for i in entry.finish_order:
            values[i] = entry.args[i].finish(self, raw[i], entry)
        if self.daemon.call_trace is not None:
            self._trace(entry.number)
        return entry.handler(self, *values)

    def _trace(self, number: int) -> None:
        assert self.daemon.call_trace is not None
        if self._real_client is None and self.opened and number != 1:
            # libvirt's client asks for the URI (a client without one) or probes features right after
            # CONNECT_OPEN; virsh probes keepalive (60) before it, too.
            self._real_client = number in (60, 110) or 60 in self._early
            if self._real_client:
                self.daemon.call_trace.record(self._early)
            self._early.clear()
        if self._real_client is None:
            self._early.append(number)
        elif self._real_client:
            self.daemon.call_trace.record([number])

    async def _finish(self, call: Call, entry: Procedure, pending: Awaitable[Any]) -> bytes:
        try:
            result = await pending
        except Exception as err:
            return self._error_reply(call, err)
        return self._reply(call, entry, result)

    def _reply(self, call: Call, entry: Procedure, result: Any) -> bytes:
        if result is _REPLIED:
            return b""
        try:
            return self.conn.send_reply(call, entry.ret(result))
        except LocalProtocolError as err:  # e.g. a reply larger than a packet: the client gets an error
            return self.conn.send_error(call, RemoteError(ErrorCode.INTERNAL_ERROR, 0, f"internal error: {err}"))

    def _error_reply(self, call: Call, err: Exception) -> bytes:
        if isinstance(err, _UnknownProcedure):
            error = unknown_procedure(err.number)
        elif isinstance(err, XdrError):
            error = RemoteError(ErrorCode.RPC, ErrorDomain.RPC, f"Unable to decode message payload: {err}")
        elif isinstance(err, VirtError):
            error = RemoteError(err.code, err.domain, err.message)
        else:  # a bug: report it and keep serving
            log.error("procedure %d failed", call.proc, exc_info=err)
            error = RemoteError(ErrorCode.INTERNAL_ERROR, 0, f"internal error: {type(err).__name__}: {err}")
        return self.conn.send_error(call, error)

    # -- events -----------------------------------------------------------------------------------
    def on_domain_event(self, ev: DomainEvent) -> None:
        for cb_id, (event_id, filt) in list(self._callbacks.items()):
            if filt is not None and filt != ev.uuid:
                continue
            if event_id == EVENT_ID_LIFECYCLE and ev.kind == "lifecycle":
                p = Packer()
                p.int(cb_id)
                self._pack_event_dom(p, ev)
                p.int(ev.event)
                p.int(ev.detail)
            elif event_id == EVENT_ID_REBOOT and ev.kind == "reboot":
                p = Packer()
                p.int(cb_id)
                self._pack_event_dom(p, ev)
            else:
                continue
            self.send(self.conn.send_event(EVENT_MSG_PROC[event_id], p.getvalue()))

    @staticmethod
    def _pack_event_dom(p: Packer, ev: DomainEvent) -> None:
        p.string(ev.name)
        p.opaque_fixed(ev.uuid, UUID_LEN)
        p.int(ev.id)

    def register_callback(self, event_id: int, filt: bytes | None) -> int:
        if not 0 <= event_id < EVENT_ID_LAST:
            raise VirtError(ErrorCode.INTERNAL_ERROR, f"unsupported event ID {event_id}", ErrorDomain.RPC)
        if len(self._callbacks) >= MAX_CALLBACKS:
            raise VirtError(
                ErrorCode.RPC,
                f"Too many domain event callbacks '{len(self._callbacks) + 1}' for limit '{MAX_CALLBACKS}'",
                ErrorDomain.RPC,
            )
        cb_id = self._next_callback
        self._next_callback += 1
        self._callbacks[cb_id] = (event_id, filt)
        return cb_id

    def deregister_callback(self, cb_id: int) -> None:
        if self._callbacks.pop(cb_id, None) is None:
            raise VirtError(ErrorCode.INVALID_ARG, f"event callback {cb_id} not registered")

    # -- console streams --------------------------------------------------------------------------
    def stream_packet(self, pkt: StreamPacket) -> Awaitable[None] | None:
        """Handle a client's stream packet; an awaitable means: read nothing more from it until done."""
        if self.relay.owns(pkt):
            return self.relay.stream_packet(pkt)
        stream = self._consoles.get(pkt.serial)
        if stream is None or pkt.proc != PROC_OPEN_CONSOLE or pkt.hole:
            return None  # late packets for a stream we already closed
        if pkt.status is Status.CONTINUE:
            if pkt.payload:
                with contextlib.suppress(OSError):
                    os.write(stream.fd, pkt.payload)
            return None
        # Finish (OK) or abort (ERROR): both are confirmed with an empty STREAM/OK.
        self._close_console(stream)
        self.send(self.conn.send_stream(PROC_OPEN_CONSOLE, pkt.serial, Status.OK))
        return None

    def open_console(self, serial: int, dom: Domain, force: bool) -> ConsoleStream:
        pty = self.manager.console_pty(dom)
        owner = dom.console_owner
        if isinstance(owner, ConsoleStream) and not owner.finished:
            if not force:
                raise VirtError(ErrorCode.OPERATION_FAILED, "Active console session exists for this domain")
            self.daemon.kick_console(owner)
        try:
            fd = os.open(pty, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as err:
            raise VirtError(ErrorCode.OPERATION_FAILED, f"cannot open console {pty}: {err}") from err
        stream = ConsoleStream(serial, dom, fd)
        dom.console_owner = stream
        self._consoles[serial] = stream
        self.daemon.console_session[id(stream)] = self
        return stream

    def _console_readable(self, stream: ConsoleStream) -> None:
        try:
            data = os.read(stream.fd, STREAM_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.send(self.conn.send_stream(PROC_OPEN_CONSOLE, stream.serial, Status.CONTINUE, data))
            if self.backlog() > CONSOLE_BACKLOG and self.drained is not None:
                loop = asyncio.get_running_loop()
                loop.remove_reader(stream.fd)
                task = loop.create_task(self._resume_console(stream, self.drained()))
                self._resumes.add(task)
                task.add_done_callback(self._resumes.discard)
            return
        self.end_console(stream)

    async def _resume_console(self, stream: ConsoleStream, drained: Awaitable[None]) -> None:
        with contextlib.suppress(ConnectionError):
            await drained
        if not stream.finished:
            asyncio.get_running_loop().add_reader(stream.fd, self._console_readable, stream)

    def end_console(self, stream: ConsoleStream) -> None:
        """The guest side ended (VM stopped, or another client took over): an empty CONTINUE is EOF."""
        if stream.finished:
            return
        self._stop_reading(stream)
        self.send(self.conn.send_stream(PROC_OPEN_CONSOLE, stream.serial, Status.CONTINUE, b""))

    def _stop_reading(self, stream: ConsoleStream) -> None:
        if stream.finished:
            return
        stream.finished = True
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(stream.fd)
        with contextlib.suppress(OSError):
            os.close(stream.fd)
        if stream.dom.console_owner is stream:
            stream.dom.console_owner = None
        self.daemon.console_session.pop(id(stream), None)

    def _close_console(self, stream: ConsoleStream) -> None:
        self._stop_reading(stream)
        self._consoles.pop(stream.serial, None)

    def console_domain_stopped(self, dom: Domain) -> None:
        for stream in list(self._consoles.values()):
            if stream.dom is dom:
                self.end_console(stream)

    def close(self) -> None:
        self.relay.close()
        # The connection is ending: what it started with VIR_DOMAIN_START_AUTODESTROY goes with it.
        self.manager.release_autodestroy(self)
        for task in list(self._resumes):
            task.cancel()
        for stream in list(self._consoles.values()):
            self._close_console(stream)
        if self._subscribed:
            self.manager.unsubscribe(self.on_domain_event)
            self._subscribed = False


class _UnknownProcedure(Exception):
    def __init__(self, number: int) -> None:
        super().__init__(f"unknown procedure: {number}")
        self.number = number


# A handler that sent its reply itself (before stream data) returns this.
_REPLIED = object()


# ---- connection ------------------------------------------------------------------------------------------


def auth_list(s: Session) -> bytes:
    p = Packer()
    p.uint(1)
    p.int(0)  # REMOTE_AUTH_NONE: access is controlled by the socket's permissions
    return p.getvalue()


def connect_open(s: Session, name: str | None, flags: int) -> None:
    # Only VIR_CONNECT_RO (1) matters here; clients also pass flags meant for their own side (a
    # session open sends 0x4), which libvirtd ignores too.
    s.daemon.check_uri(name)
    if flags & 1:
        s.readonly = True
    s.opened = True
    s.open_name = name
    if not s._subscribed:
        s.manager.subscribe(s.on_domain_event)
        s._subscribed = True


def connect_close(s: Session) -> None:
    s.close()
    s.opened = False


def node_get_info(s: Session) -> bytes:
    info = host.node_info()
    p = Packer()
    model = info.model.encode()[:31].ljust(32, b"\0")
    for ch in model:  # char model[32]: rpcgen sends each char as a 4-byte int
        p.int(ch)
    p.uhyper(info.memory_kib)
    for v in (info.cpus, info.mhz, info.nodes, info.sockets, info.cores, info.threads):
        p.int(v)
    return p.getvalue()


def node_get_security_model(s: Session) -> bytes:
    p = Packer()
    p.uint(0)  # model<>: empty (no security driver), virsh then skips the label call
    p.uint(0)  # doi<>
    return p.getvalue()


# ---- listing and lookup ----------------------------------------------------------------------------------


_STATE_FILTER = {State.RUNNING: LIST_RUNNING, State.PAUSED: LIST_PAUSED, State.SHUTOFF: LIST_SHUTOFF}


def _matches(s: Session, dom: Domain, flags: int) -> bool:
    """virConnectListAllDomains filtering; each group of flags only filters when one of its flags is set."""
    if flags & (LIST_ACTIVE | LIST_INACTIVE) and not flags & (LIST_ACTIVE if dom.active else LIST_INACTIVE):
        return False
    persistent = dom.persistent is not None
    if flags & (LIST_PERSISTENT | LIST_TRANSIENT) and not flags & (LIST_PERSISTENT if persistent else LIST_TRANSIENT):
        return False
    if flags & (LIST_RUNNING | LIST_PAUSED | LIST_SHUTOFF | LIST_OTHER) and not flags & _STATE_FILTER.get(
        dom.status.state, LIST_OTHER
    ):
        return False
    # Autostart is a filesystem check: only made when asked for.
    autostart_filter = flags & (LIST_AUTOSTART | LIST_NO_AUTOSTART)
    if autostart_filter and not flags & (LIST_AUTOSTART if s.manager.autostart(dom) else LIST_NO_AUTOSTART):
        return False
    # No managed save, snapshots or checkpoints exist: the "has" filters select nothing.
    return not (flags & (LIST_MANAGEDSAVE | LIST_SNAPSHOT | LIST_HAS_CHECKPOINT))


def list_all_domains(s: Session, need_results: int, flags: int) -> bytes:
    doms = [d for d in s.manager.domains() if _matches(s, d, flags)]
    p = Packer()
    if need_results:
        p.uint(len(doms))
        for d in doms:
            pack_domain(p, d)
    else:
        p.uint(0)
    p.uint(len(doms))
    return p.getvalue()


def _bounded(count: int, what: str) -> int:
    if not 0 <= count <= DOMAIN_LIST_MAX:
        raise VirtError(ErrorCode.RPC, f"{what} > REMOTE_DOMAIN_LIST_MAX", ErrorDomain.RPC)
    return count


def list_domains(s: Session, maxids: int) -> bytes:
    ids = [d.id for d in s.manager.domains() if d.active][: _bounded(maxids, "maxids")]
    p = Packer()
    p.uint(len(ids))
    for i in ids:
        p.int(i)
    return p.getvalue()


def list_defined(s: Session, maxnames: int) -> bytes:
    names = [d.name for d in s.manager.domains() if not d.active][: _bounded(maxnames, "maxnames")]
    p = Packer()
    p.uint(len(names))
    for n in names:
        p.string(n)
    return p.getvalue()


# ---- domain queries --------------------------------------------------------------------------------------


def get_state(s: Session, dom: Domain, flags: int) -> bytes:
    p = Packer()
    p.int(int(dom.status.state))
    p.int(int(dom.status.reason))
    return p.getvalue()


def get_info(s: Session, dom: Domain) -> bytes:
    state, max_kib, kib, vcpus, cpu = s.manager.info(dom)
    p = Packer()
    p.uint(state)  # unsigned char, 4 bytes on the wire
    p.uhyper(max_kib)
    p.uhyper(kib)
    p.uint(vcpus)  # unsigned short, 4 bytes on the wire
    p.uhyper(cpu)
    return p.getvalue()


XML_SECURE, XML_INACTIVE, XML_UPDATE_CPU, XML_MIGRATABLE = 1, 2, 4, 8


def get_xml_desc(s: Session, dom: Domain, flags: int) -> str:
    # libvirt's public API refuses SECURE and MIGRATABLE on read-only connections (they may show secrets).
    if s.readonly and flags & (XML_SECURE | XML_MIGRATABLE):
        raise VirtError(ErrorCode.OPERATION_DENIED, "virDomainGetXMLDesc with secure flag", ErrorDomain.DOMAIN)
    # Nothing secret and no CPU model to expand: the other flags change nothing.
    return s.manager.xml(dom, inactive=bool(flags & XML_INACTIVE))


def is_updated(s: Session, dom: Domain) -> bool:
    # what a start resolved (a volume's path) is no change of the configuration
    return (
        dom.active
        and dom.persistent is not None
        and dom.live is not None
        and without_volume_paths(dom.live) != dom.persistent
    )


AFFECT_LIVE, AFFECT_CONFIG = 1, 2


def _affect(dom: Domain, flags: int) -> tuple[bool, bool]:
    """(live, config) for VIR_DOMAIN_AFFECT_*: CURRENT (0) is live for a running domain, else config."""
    if not flags & (AFFECT_LIVE | AFFECT_CONFIG):
        return (True, False) if dom.active else (False, True)
    return bool(flags & AFFECT_LIVE), bool(flags & AFFECT_CONFIG)


def _config_to_read(dom: Domain, flags: int) -> DomainConfig:
    """The live or the persistent config a getter with VIR_DOMAIN_AFFECT_* flags reads."""
    if flags & AFFECT_LIVE and flags & AFFECT_CONFIG:
        raise VirtError(ErrorCode.INVALID_ARG, "flags 'live' and 'config' are mutually exclusive")
    live, _ = _affect(dom, flags)
    if live and not dom.active:
        raise invalid_operation("domain is not running")
    return dom.live if live and dom.live is not None else (dom.persistent or dom.config)


VCPU_MAXIMUM = 4  # also VIR_DOMAIN_MEM_MAXIMUM
VCPU_GUEST = 8


def _no_hotplug(what: str) -> VirtError:
    return VirtError(
        ErrorCode.OPERATION_UNSUPPORTED,
        f"changing the {what} of a running domain is not supported by the mshv driver; use --config",
    )


def get_vcpus_flags(s: Session, dom: Domain, flags: int) -> int:
    if flags & VCPU_GUEST and s.readonly:  # libvirt's public API: the guest agent needs a read-write connection
        raise _denied("virDomainGetVcpusFlags", ErrorDomain.DOMAIN)
    if flags & VCPU_GUEST:
        raise VirtError(ErrorCode.ARGUMENT_UNSUPPORTED, "the mshv driver has no guest agent")
    cfg = _config_to_read(dom, flags)
    return cfg.vcpus if flags & VCPU_MAXIMUM else cfg.current_vcpus


async def set_vcpus_flags(s: Session, dom: Domain, nvcpus: int, flags: int) -> None:
    live, config = _affect(dom, flags)
    if live:
        raise _no_hotplug("vCPU count")
    # libvirt's semantics: the current count (at most the maximum), or with MAXIMUM the maximum itself.
    await s.manager.edit_config(dom, set_vcpus(nvcpus, maximum=bool(flags & VCPU_MAXIMUM)), False, config)


async def set_memory_flags(s: Session, dom: Domain, kib: int, flags: int) -> None:
    live, config = _affect(dom, flags)
    if live:
        raise _no_hotplug("memory size")  # no balloon device
    await s.manager.edit_config(dom, set_memory(kib, maximum=bool(flags & VCPU_MAXIMUM)), False, config)


def _device_change(dom: Domain, flags: int, xml: str, verb: str) -> tuple[bool, etree._Element]:
    """attach/detach-device: which configs, and the device (no hotplug: a live change is refused)."""
    live, config = _affect(dom, flags)
    if live and not dom.active:
        raise invalid_operation("domain is not running")
    device = parse_device_xml(xml)
    if live:
        raise VirtError(
            ErrorCode.OPERATION_UNSUPPORTED,
            f"{verb} of device <{device.tag}> to a running domain is not supported by the mshv driver "
            "(no hotplug); use --config",
        )
    return config, device


async def attach_device_flags(s: Session, dom: Domain, xml: str, flags: int) -> None:
    config, device = await asyncio.to_thread(_device_change, dom, flags, xml, "live attach")
    if device.tag == "disk":
        index = disk_insert_index(dom.persistent or dom.config, disk_target(device))
        volume = disk_volume(device)
        if volume is not None and s.manager.translate_volume is not None:
            await s.manager.translate_volume(*volume)  # qemuDomainAttachDeviceConfig resolves it: libvirt's errors
        await s.manager.edit_config(dom, insert_disk(device, index), False, config)
    else:
        await s.manager.edit_config(dom, add_device(device), False, config)


async def detach_device_flags(s: Session, dom: Domain, xml: str, flags: int) -> None:
    config, device = await asyncio.to_thread(_device_change, dom, flags, xml, "live detach")
    cfg = dom.persistent or dom.config
    if device.tag == "disk":
        index = find_disk(cfg, device)
    elif device.tag == "interface":
        index = find_net(cfg, device)
    else:
        index = find_rng(cfg, device)
    await s.manager.edit_config(dom, remove_device(str(device.tag), index), False, config)


async def update_device_flags(s: Session, dom: Domain, xml: str, flags: int) -> None:
    """virsh domif-setlink (and update-device of an <interface>): the link state, live and/or in the
    persistent config; nothing else of a device changes."""
    live, config = _affect(dom, flags)
    if live and not dom.active:
        raise invalid_operation("domain is not running")
    device = await asyncio.to_thread(parse_device_xml, xml)
    if device.tag != "interface":
        raise VirtError(
            ErrorCode.OPERATION_UNSUPPORTED, f"update of device <{device.tag}> is not supported by the mshv driver"
        )
    edits = []
    for wanted, cfg in ((live, dom.live), (config, dom.persistent)):
        if wanted and cfg is not None:
            edits.append(net_link_update(cfg, device))
    if live and config and len(edits) == 2 and edits[0][0] != edits[1][0]:
        # the same interface sits at another index in the two configs: change each on its own
        await s.manager.edit_config(dom, set_link_state(*edits[0]), True, False, apply_live=s.manager.apply_links)
        await s.manager.edit_config(dom, set_link_state(*edits[1]), False, True)
        return
    if not edits:
        raise invalid_operation("cannot change persistent config of a transient domain")
    await s.manager.edit_config(dom, set_link_state(*edits[0]), live, config, apply_live=s.manager.apply_links)


def list_all_snapshots(s: Session, dom: Domain, need_results: int, flags: int) -> bytes:
    p = Packer()
    p.uint(0)
    p.int(0)
    return p.getvalue()


# ---- domain stats (virsh domstats, virt-manager's graphs) -----------------------------------------------

STATS_STATE, STATS_CPU_TOTAL, STATS_BALLOON, STATS_VCPU, STATS_INTERFACE, STATS_BLOCK = 1, 2, 4, 8, 16, 32
STATS_SUPPORTED = STATS_STATE | STATS_CPU_TOTAL | STATS_BALLOON | STATS_VCPU | STATS_INTERFACE | STATS_BLOCK
STATS_ENFORCE = 1 << 31
STATS_FLAG_FILTERS = (
    LIST_ACTIVE
    | LIST_INACTIVE
    | LIST_PERSISTENT
    | LIST_TRANSIENT
    | LIST_RUNNING
    | LIST_PAUSED
    | LIST_SHUTOFF
    | LIST_OTHER
)
STATS_FLAGS = STATS_FLAG_FILTERS | (1 << 29) | (1 << 30) | STATS_ENFORCE  # NOWAIT, BACKING: nothing to wait for
TP_INT, TP_UINT, TP_ULLONG, TP_STRING = 1, 2, 4, 7


@functools.lru_cache(maxsize=4096)
def _param_head(field: str, kind: int) -> bytes:
    """A typed parameter's name and type, encoded once: a stats reply repeats the same few names for every
    domain, and encoding them was most of its cost (bounded: names beyond the cache are encoded again)."""
    p = Packer()
    p.string(field)
    p.int(kind)
    return p.getvalue()


def _pack_param(p: Packer, field: str, kind: int, value: int | str) -> None:
    p.encoded(_param_head(field, kind))
    if isinstance(value, str):
        p.string(value)
    elif kind == TP_ULLONG:
        p.uhyper(value)
    elif kind == TP_UINT:
        p.uint(value)
    else:
        p.int(value)


# libvirt's field -> the VMM's counter (None: the data path counts no errors)
_NET_STATS: tuple[tuple[str, str | None], ...] = tuple(
    (f"{d}.{field}", f"{d}_{key}" if key else None)
    for d in ("rx", "tx")
    for field, key in (("bytes", "bytes"), ("pkts", "packets"), ("errs", None), ("drop", "drops"))
)


async def _interface_stats(dom: Domain) -> list[tuple[str, int, int | str]]:
    """qemuDomainGetStatsInterface's fields for a running domain: net.count, then per interface its tap and the
    counters of its virtio-net data path as the guest sees them (libvirt's swapped tap view)."""
    handle, cfg = dom.vmm, dom.live
    if not dom.active or handle is None or cfg is None:
        return []
    if not cfg.nets:
        return [("net.count", TP_UINT, 0)]  # nothing to ask its VMM for
    try:
        status = await handle.request("status")
    except VmmError:
        return []  # it is ending: a domain's stats are left out rather than failing the whole list
    devices = {d.get("mac"): d for d in status.get("virtio", []) if d.get("device_id") == 1}
    out: list[tuple[str, int, int | str]] = [("net.count", TP_UINT, len(cfg.nets))]
    for i, (net, running) in enumerate(zip(cfg.nets, dom.nets, strict=False)):
        entry = devices.get(net.mac, {})
        out.append((f"net.{i}.name", TP_STRING, running.ifname))
        for field, key in _NET_STATS:
            out.append((f"net.{i}.{field}", TP_ULLONG, int(entry.get(key, 0)) if key is not None else 0))
    return out


async def _domain_stats(s: Session, dom: Domain, *, stats: int) -> list[tuple[str, int, int | str]]:
    out: list[tuple[str, int, int | str]] = []
    if stats & STATS_STATE:
        out += [("state.state", TP_INT, int(dom.status.state)), ("state.reason", TP_INT, int(dom.status.reason))]
    if stats & STATS_CPU_TOTAL and dom.active:
        user, system = s.manager.cpu_times(dom)
        out += [
            ("cpu.time", TP_ULLONG, user + system),
            ("cpu.user", TP_ULLONG, user),
            ("cpu.system", TP_ULLONG, system),
        ]
    cfg = dom.config
    if stats & STATS_BALLOON:
        out += [("balloon.current", TP_ULLONG, cfg.current_memory_kib), ("balloon.maximum", TP_ULLONG, cfg.memory_kib)]
    if stats & STATS_VCPU:
        out += [("vcpu.current", TP_UINT, cfg.current_vcpus), ("vcpu.maximum", TP_UINT, cfg.vcpus)]
    # libvirt's order of the groups (qemuDomainGetStatsWorkers): ..., vcpu, interface, block
    if stats & STATS_INTERFACE:
        out += await _interface_stats(dom)
    if stats & STATS_BLOCK:
        out += await monitor.domain_block_stats(dom)
    return out


# Domains whose stats one getAllDomainStats call gathers at once. Each running domain's figures may need its
# VMM (a process of its own) to answer, so they are asked in parallel rather than one VMM after another; the
# bound keeps one call from holding a task and a pending request per domain, whatever their number: a client
# (at most server.MAX_CLIENT_REQUESTS calls at once) has at most that many times this many VMM queries out.
STATS_QUERIES = 8


async def _bounded_map(
    work: Callable[[Domain], Awaitable[list[tuple[str, int, int | str]]]], doms: list[Domain], limit: int
) -> list[list[tuple[str, int, int | str]]]:
    """``work`` of each domain, in their order, by at most ``limit`` tasks (each takes the next domain)."""
    out: list[list[tuple[str, int, int | str]]] = [[] for _ in doms]
    todo = iter(range(len(doms)))

    async def worker() -> None:
        for i in todo:  # one iterator shared by the workers: each index is taken once
            out[i] = await work(doms[i])

    workers = [asyncio.ensure_future(worker()) for _ in range(min(limit, len(doms)))]
    try:
        await asyncio.gather(*workers)
    finally:
        for w in workers:
            w.cancel()
    return out


class _DomainList(Arg):
    """remote_nonnull_domain<REMOTE_DOMAIN_LIST_MAX>, kept unresolved (the handler decides when)."""

    def decode(self, u: Unpacker) -> Any:
        return [unpack_domain(u) for _ in range(u.array_len(DOMAIN_LIST_MAX))]


async def get_all_domain_stats(s: Session, wanted: list[tuple[str, bytes, int]], stats: int, flags: int) -> bytes:
    if wanted and flags & STATS_FLAG_FILTERS:
        raise VirtError(ErrorCode.INVALID_ARG, "filtering is not supported by virDomainListGetStats")
    if flags & STATS_ENFORCE and stats & ~STATS_SUPPORTED:
        raise VirtError(
            ErrorCode.OPERATION_UNSUPPORTED,
            f"Stats types bits 0x{stats & ~STATS_SUPPORTED:x} are not supported by this daemon",
        )
    # Without ENFORCE_STATS, groups we do not have are left out (libvirt's rule); 0 asks for all we have.
    stats = stats & STATS_SUPPORTED or STATS_SUPPORTED
    if wanted:
        doms = [s.manager.resolve(name, raw) for name, raw, _ in wanted]
    else:
        doms = [d for d in s.manager.domains() if _matches(s, d, flags & STATS_FLAG_FILTERS)]
    records = await _bounded_map(functools.partial(_domain_stats, s, stats=stats), doms, STATS_QUERIES)
    p = Packer()
    p.uint(len(doms))
    for dom, params in zip(doms, records, strict=True):
        pack_domain(p, dom)
        p.uint(len(params))
        for field, kind, value in params:
            _pack_param(p, field, kind, value)
    return p.getvalue()


# ---- define / start --------------------------------------------------------------------------------------

DEFINE_VALIDATE = 1
START_PAUSED, START_AUTODESTROY, START_VALIDATE = 1, 2, 16


async def define_xml_flags(s: Session, xml: str, flags: int) -> Domain:
    # VALIDATE: libvirt's schema before its parser, so the errors are the ones libvirt gives then.
    return await s.manager.define(xml, validate=bool(flags & DEFINE_VALIDATE))


async def create_xml(s: Session, xml: str, flags: int) -> Domain:
    owner = s if flags & START_AUTODESTROY else None
    return await s.manager.create_transient(
        xml, paused=bool(flags & START_PAUSED), validate=bool(flags & START_VALIDATE), autodestroy=owner
    )


async def create_with_flags(s: Session, dom: Domain, flags: int) -> Domain:
    owner = s if flags & START_AUTODESTROY else None
    await s.manager.start(dom, paused=bool(flags & START_PAUSED), autodestroy=owner)
    return dom


# ---- events and console ----------------------------------------------------------------------------------


class _OptDomain(Arg):
    """remote_domain (optional): the event filter's uuid, or None."""

    def decode(self, u: Unpacker) -> Any:
        present = u.uint()
        if present == 1:
            return unpack_domain(u)[1]
        if present != 0:
            raise XdrError("invalid optional marker")
        return None


def open_console(s: Session, call: Call, dom: Domain, dev_name: str | None, flags: int) -> object:
    if dev_name not in (None, "serial0", "console0"):
        raise VirtError(ErrorCode.INTERNAL_ERROR, f"cannot find character device {dev_name}")
    stream = s.open_console(call.serial, dom, force=bool(flags & 1))
    # The reply must reach the client before any stream data: send it, then start relaying.
    s.send(s.conn.send_reply(call, b""))
    asyncio.get_running_loop().add_reader(stream.fd, s._console_readable, stream)
    return _REPLIED


# ---- metadata elements, NMI, keys, rename (issue 12 item 5) ---------------------------------------------
# Argument checks in the order libvirt's public API makes them (libvirt-domain.c), which libvirtd runs
# again on the server side before the driver's own checks.

METADATA_DESCRIPTION, METADATA_TITLE, METADATA_ELEMENT = 0, 1, 2


def _must_be_null(name: str, value: object, api: str) -> None:
    if value is not None:
        raise VirtError(ErrorCode.INVALID_ARG, f"{name} in {api} must be NULL")


def _must_not_be_null(name: str, value: object, api: str) -> None:
    if value is None:
        raise VirtError(ErrorCode.INVALID_ARG, f"{name} in {api} must not be NULL")


def _unknown_metadata(kind: int) -> VirtError:
    return VirtError(ErrorCode.INVALID_ARG, f"unknown metadata type '{kind}'")


async def set_metadata(
    s: Session, dom: Domain, kind: int, value: str | None, key: str | None, uri: str | None, flags: int
) -> None:
    api = "virDomainSetMetadata"
    if kind in (METADATA_TITLE, METADATA_DESCRIPTION):
        if kind == METADATA_TITLE and value is not None and "\n" in value:
            raise VirtError(ErrorCode.INVALID_ARG, "metadata title can't contain newlines")
        _must_be_null("uri", uri, api)
        _must_be_null("key", key, api)
        edit = set_text("title" if kind == METADATA_TITLE else "description", value)
    elif kind == METADATA_ELEMENT:
        _must_not_be_null("uri", uri, api)
        if value is not None:
            _must_not_be_null("key", key, api)
        assert uri is not None
        edit = functools.partial(metadata.set_element, metadata=value, key=key, uri=uri)
    else:
        raise _unknown_metadata(kind)
    live, config = _affect(dom, flags)
    await s.manager.edit_config(dom, edit, live=live, config=config)


def get_metadata(s: Session, dom: Domain, kind: int, uri: str | None, flags: int) -> str:
    api = "virDomainGetMetadata"
    if flags & AFFECT_LIVE and flags & AFFECT_CONFIG:
        raise VirtError(
            ErrorCode.INVALID_ARG,
            "Flags 'VIR_DOMAIN_AFFECT_LIVE' and 'VIR_DOMAIN_AFFECT_CONFIG' are mutually exclusive",
        )
    if kind in (METADATA_TITLE, METADATA_DESCRIPTION):
        _must_be_null("uri", uri, api)
    elif kind == METADATA_ELEMENT:
        _must_not_be_null("uri", uri, api)
    else:
        raise _unknown_metadata(kind)
    cfg = _config_to_read(dom, flags)
    if kind == METADATA_ELEMENT:
        assert uri is not None
        value = metadata.get_element(etree.fromstring(cfg.xml.encode()), uri)
    else:
        value = cfg.title if kind == METADATA_TITLE else cfg.description
    if not value:
        raise VirtError(ErrorCode.NO_DOMAIN_METADATA, "Requested metadata element is not present")
    return value


class _UintList(Arg):
    """unsigned int<N>: a bounded array (more than N is an XDR error, as in libvirtd's decoder)."""

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum

    def decode(self, u: Unpacker) -> Any:
        return [u.uint() for _ in range(u.array_len(self.maximum))]


SEND_KEY_MAX = 16  # REMOTE_DOMAIN_SEND_KEY_MAX = VIR_DOMAIN_SEND_KEY_MAX_KEYS


async def send_key(s: Session, dom: Domain, codeset: int, holdtime: int, keycodes: list[int], flags: int) -> None:
    if not keycodes:
        raise VirtError(ErrorCode.INVALID_ARG, "nkeycodes in virDomainSendKey must be greater than zero")
    if codeset >= len(keymap.CODESET_NAMES):
        raise VirtError(ErrorCode.INVALID_ARG, f"Unsupported codeset '{codeset}'")
    name = keymap.CODESET_NAMES[codeset]
    if codeset not in keymap.SUPPORTED_CODESETS:
        supported = ", ".join(keymap.CODESET_NAMES[c] for c in keymap.SUPPORTED_CODESETS)
        raise VirtError(
            ErrorCode.ARGUMENT_UNSUPPORTED,
            f"the mshv driver cannot translate keycodes of the {name} codeset; use one of {supported}",
        )
    qnums: list[int] = []
    for code in keycodes:
        qnum = keymap.to_qnum(codeset, code)
        if qnum is None:  # libvirt's QEMU driver: every key becomes a qnum first
            raise VirtError(
                ErrorCode.INTERNAL_ERROR, f"cannot translate keycode {code} of {name} codeset to qnum keycode"
            )
        qnums.append(qnum)
    await s.manager.send_key(dom, qnums, holdtime)


async def rename(s: Session, dom: Domain, new_name: str | None, flags: int) -> int:
    if new_name is None:
        raise VirtError(ErrorCode.INVALID_ARG, "new_name in virDomainRename must not be NULL")
    if not new_name:
        raise VirtError(ErrorCode.INVALID_ARG, "string new_name in virDomainRename must not be empty")
    await s.manager.rename(dom, new_name)
    return 0  # remote_domain_rename_ret.retcode


# ---- the table -------------------------------------------------------------------------------------------
# One row per implemented procedure: number, handler, argument types, return type. The API name in
# errors and the read-only policy are libvirt's for that number (procnames.py).

# Flag sets accepted (anything else gets libvirt's "unsupported flags" error):
_FLAGS_XML = XML_SECURE | XML_INACTIVE | XML_UPDATE_CPU | XML_MIGRATABLE  # nothing secret, no CPU to expand
_FLAGS_AFFECT = AFFECT_LIVE | AFFECT_CONFIG
_FLAGS_FORCE_SAFE = 1 | 2  # console: FORCE, SAFE (our stream is always safe)
_FLAGS_GRACEFUL = 1  # destroy: our destroy already asks the VMM first
_FLAGS_ACPI = 1  # shutdown/reboot: ACPI_POWER_BTN is the only mode we have
# undefine: MANAGED_SAVE 1, SNAPSHOTS_METADATA 2, NVRAM 4, KEEP_NVRAM 8, CHECKPOINTS_METADATA 16, TPM 32,
# KEEP_TPM 64: we keep none of those things, so each asks for nothing.
_FLAGS_UNDEFINE = 127


PROCEDURES: dict[int, Procedure] = table(
    # connection
    proc(66, auth_list, ret=ret_raw),
    proc(60, lambda s, feature: FEATURES.get(feature, 0), INT, ret=ret_int),
    proc(1, connect_open, OPT_STR, UINT),
    proc(2, connect_close),
    proc(360, lambda s: None),  # close callbacks: the client's own business
    proc(361, lambda s: None),
    proc(3, lambda s: "MSHV", ret=ret_str),
    proc(4, lambda s: host.hypervisor_version(), ret=ret_uhyper),
    # The libvirt API level we implement (the wire protocol of libvirt 9.0.0); clients gate features on it.
    proc(157, lambda s: 9_000_000, ret=ret_uhyper),
    proc(59, lambda s: socket.gethostname(), ret=ret_str),
    proc(110, lambda s: s.daemon.uri, ret=ret_str),
    proc(5, lambda s, _type: MAX_VCPUS, OPT_STR, ret=ret_int),
    proc(6, node_get_info, ret=ret_raw),
    proc(7, lambda s: host.capabilities_xml(), ret=ret_str),
    proc(342, lambda s, *args: host.domain_capabilities_xml(*args[:4]), *(OPT_STR,) * 4, Flags(0), ret=ret_str),
    proc(122, node_get_security_model, ret=ret_raw),
    # listing and lookup
    proc(273, list_all_domains, INT, Flags(LIST_ALL_FLAGS), ret=ret_raw),
    proc(51, lambda s: sum(1 for d in s.manager.domains() if d.active), ret=ret_int),
    proc(37, list_domains, INT, ret=ret_raw),
    proc(25, lambda s: sum(1 for d in s.manager.domains() if not d.active), ret=ret_int),
    proc(21, list_defined, INT, ret=ret_raw),
    proc(22, lambda s, dom_id: s.manager.by_id(dom_id), INT, ret=ret_dom),
    proc(23, lambda s, name: s.manager.by_name(name), STR, ret=ret_dom),
    proc(24, lambda s, raw: s.manager.by_uuid(raw), UUID, ret=ret_dom),
    # domain queries
    proc(212, get_state, DOM, Flags(0), ret=ret_raw),
    proc(16, get_info, DOM, ret=ret_raw),
    proc(17, lambda s, dom: dom.config.memory_kib, DOM, ret=ret_uhyper),
    proc(14, get_xml_desc, DOM, Flags(_FLAGS_XML), ret=ret_str),
    proc(19, lambda s, dom: dom.config.os_type, DOM, ret=ret_str),
    proc(150, lambda s, dom: dom.active, DOM, ret=ret_bool),
    proc(151, lambda s, dom: dom.persistent is not None, DOM, ret=ret_bool),
    proc(202, is_updated, DOM, ret=ret_bool),
    proc(15, lambda s, dom: s.manager.autostart(dom), DOM, ret=ret_bool),
    proc(29, lambda s, dom, on: s.manager.set_autostart(dom, bool(on)), DOM, INT),
    proc(264, set_metadata, DOM, INT, OPT_STR, OPT_STR, OPT_STR, Flags(_FLAGS_AFFECT)),
    proc(265, get_metadata, DOM, INT, OPT_STR, Flags(_FLAGS_AFFECT), ret=ret_str),
    proc(200, get_vcpus_flags, DOM, Flags(_FLAGS_AFFECT | VCPU_MAXIMUM | VCPU_GUEST), ret=ret_int),
    proc(199, set_vcpus_flags, DOM, UINT, Flags(_FLAGS_AFFECT | VCPU_MAXIMUM)),
    proc(204, set_memory_flags, DOM, UHYPER, Flags(_FLAGS_AFFECT | VCPU_MAXIMUM)),
    # devices: no hotplug; --config edits the persistent XML (<rng> only so far)
    proc(8, lambda s, dom, xml: attach_device_flags(s, dom, xml, AFFECT_LIVE), DOM, STR),
    proc(160, attach_device_flags, DOM, STR, Flags(_FLAGS_AFFECT)),
    proc(13, lambda s, dom, xml: detach_device_flags(s, dom, xml, AFFECT_LIVE), DOM, STR),
    proc(161, detach_device_flags, DOM, STR, Flags(_FLAGS_AFFECT)),
    proc(174, update_device_flags, DOM, STR, Flags(_FLAGS_AFFECT)),
    proc(183, lambda s, dom, flags: False, DOM, Flags(0), ret=ret_bool),  # no managed save exists
    proc(187, lambda s, dom, flags: 0, DOM, UINT, ret=ret_int),  # no snapshots exist
    proc(274, list_all_snapshots, DOM, INT, UINT, ret=ret_raw),
    proc(344, get_all_domain_stats, _DomainList(), UINT, Flags(STATS_FLAGS), ret=ret_raw),
    # define / start / stop
    proc(11, lambda s, xml: s.manager.define(xml), STR, ret=ret_dom),
    proc(350, define_xml_flags, STR, Flags(DEFINE_VALIDATE), ret=ret_dom),
    proc(10, create_xml, STR, Flags(START_PAUSED | START_AUTODESTROY | START_VALIDATE), ret=ret_dom),
    proc(9, lambda s, dom: s.manager.start(dom, paused=False), DOM),
    proc(196, create_with_flags, DOM, Flags(START_PAUSED | START_AUTODESTROY), ret=ret_dom),
    proc(12, lambda s, dom: s.manager.destroy(dom), DOM),
    proc(234, lambda s, dom, flags: s.manager.destroy(dom), DOM, Flags(_FLAGS_GRACEFUL)),
    proc(33, lambda s, dom: s.manager.shutdown(dom), DOM),
    proc(258, lambda s, dom, flags: s.manager.shutdown(dom), DOM, Flags(_FLAGS_ACPI)),
    proc(27, lambda s, dom, flags: s.manager.reboot(dom), DOM, Flags(_FLAGS_ACPI)),
    proc(245, lambda s, dom, flags: s.manager.reset(dom), DOM, Flags(0)),
    proc(34, lambda s, dom: s.manager.suspend(dom), DOM),
    proc(28, lambda s, dom: s.manager.resume(dom), DOM),
    proc(35, lambda s, dom: s.manager.undefine(dom), DOM),
    proc(231, lambda s, dom, flags: s.manager.undefine(dom), DOM, Flags(_FLAGS_UNDEFINE)),
    # events and console
    proc(316, lambda s, event_id, filt: s.register_callback(event_id, filt), INT, _OptDomain(), ret=ret_int),
    proc(317, lambda s, cb_id: s.deregister_callback(cb_id), INT),
    proc(PROC_OPEN_CONSOLE, open_console, CALL, DOM, OPT_STR, Flags(_FLAGS_FORCE_SAFE)),
    # NMI, keys, rename (metadata get/set are above, 264/265)
    proc(210, lambda s, dom, flags: s.manager.inject_nmi(dom), DOM, Flags(0)),
    proc(226, send_key, DOM, UINT, UINT, _UintList(SEND_KEY_MAX), Flags(0)),
    proc(358, rename, DOM, OPT_STR, Flags(0), ret=ret_int),
    # monitoring and host procedures, pinning, and the statistics every driver answers
    *monitor.PROCEDURES,
)
