"""REMOTE_PROGRAM procedures: decode arguments, call the driver, encode the reply.

One ``Session`` per client connection holds what libvirt keeps per connection: whether it is open
and read-only, its event callbacks and its console streams. Procedures not in ``PROCEDURES`` get
libvirt's "unknown procedure" error, which clients treat as "not supported" and fall back from.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mshv_libvirt.domain import MAX_VCPUS, DomainConfig, parse_domain_xml
from mshv_libvirt.driver.manager import Domain, DomainEvent, DomainManager, set_memory, set_text, set_vcpus
from mshv_libvirt.errors import ErrorCode, ErrorDomain, VirtError, invalid_operation
from mshv_libvirt.lifecycle import State

from . import host
from .protocol import (
    PROTOCOL_VERSION,
    REMOTE_PROGRAM,
    STREAM_CHUNK,
    STRING_MAX,
    Call,
    LocalProtocolError,
    RemoteError,
    ServerConnection,
    Status,
    StreamPacket,
)
from .xdr import Packer, Unpacker, XdrError

if TYPE_CHECKING:
    from .server import Daemon

log = logging.getLogger(__name__)

DOMAIN_LIST_MAX = 16384
UUID_LEN = 16

# VIR_DRV_FEATURE_* we answer 1 for: keepalive, callback-style events, close callback.
FEATURES = {10: 1, 14: 1, 15: 1}

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

PROC_OPEN_CONSOLE = 201


def _bad_flags(flags: int, allowed: int, func: str) -> None:
    if flags & ~allowed:
        raise VirtError(ErrorCode.INVALID_ARG, f"unsupported flags (0x{flags & ~allowed:x}) in function {func}")


def _denied(proc: int) -> VirtError:
    return VirtError(ErrorCode.OPERATION_DENIED, f"read only access prevents procedure {proc}", ErrorDomain.NONE)


def pack_domain(p: Packer, dom: Domain) -> None:
    p.string(dom.name)
    p.opaque_fixed(dom.uuid.bytes, UUID_LEN)
    p.int(dom.id if dom.active else -1)


def unpack_domain(u: Unpacker) -> tuple[str, bytes, int]:
    name = u.string(STRING_MAX)
    raw = u.opaque_fixed(UUID_LEN)
    return name, raw, u.int()


@dataclass
class ConsoleStream:
    serial: int
    dom: Domain
    fd: int
    finished: bool = False


Handler = Callable[["Session", Unpacker], bytes | Awaitable[bytes]]


@dataclass(frozen=True)
class Procedure:
    handler: Handler
    readonly: bool  # allowed on the read-only socket
    is_async: bool  # may wait (for a VMM, the disk): run as a task; others answer inline


PROCEDURES: dict[int, Procedure] = {}


def proc(number: int, *, readonly: bool = False) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        PROCEDURES[number] = Procedure(fn, readonly, inspect.iscoroutinefunction(fn))
        return fn

    return register


class Session:
    def __init__(self, daemon: Daemon, conn: ServerConnection, send: Callable[[bytes], None], readonly: bool) -> None:
        self.daemon = daemon
        self.manager: DomainManager = daemon.manager
        self.conn = conn
        self.send = send
        self.readonly = readonly
        self.opened = False
        self._callbacks: dict[int, tuple[int, bytes | None]] = {}  # callbackID -> (eventID, uuid filter)
        self._next_callback = 0
        self._consoles: dict[int, ConsoleStream] = {}
        self._subscribed = False

    # -- calls ------------------------------------------------------------------------------------
    def dispatch_inline(self, call: Call) -> bytes | None:
        """The reply to a call that can be answered without waiting, or None: then ``dispatch`` it as a task.

        Most calls (lookups, state, XML, lists) never wait; answering them in the read loop saves a task
        and an event-loop iteration per call.
        """
        entry = PROCEDURES.get(call.proc)
        if entry is not None and entry.is_async:
            return None
        return self._run(call, entry, None)

    async def dispatch(self, call: Call) -> bytes:
        """The reply packet for one call (never raises for client mistakes)."""
        entry = PROCEDURES.get(call.proc)
        payload: bytes | None = None
        if entry is not None and entry.is_async:
            try:
                checked = self._check(call, entry)
                if checked is not None:
                    result = entry.handler(self, checked)
                    assert not isinstance(result, bytes)
                    payload = await result
            except Exception as err:
                return self._error_reply(call, err)
        return self._run(call, entry, payload)

    def _check(self, call: Call, entry: Procedure) -> Unpacker | None:
        if not self.opened and call.proc not in (1, 60, 66):
            raise VirtError(ErrorCode.INTERNAL_ERROR, "connection not open", ErrorDomain.RPC)
        if self.readonly and not entry.readonly:
            raise _denied(call.proc)
        return Unpacker(call.payload)

    def _run(self, call: Call, entry: Procedure | None, payload: bytes | None) -> bytes:
        if call.prog != REMOTE_PROGRAM or call.vers != PROTOCOL_VERSION:
            return self.conn.send_error(
                call, RemoteError(39, 7, f"cannot find program {call.prog} version {call.vers}")
            )
        if call.with_fds or entry is None:
            return self.conn.send_error(call, RemoteError(39, 7, f"unknown procedure: {call.proc}"))
        if payload is None:
            try:
                u = self._check(call, entry)
                assert u is not None
                if call.proc == PROC_OPEN_CONSOLE:
                    return self._open_console_call(call, u)
                result = entry.handler(self, u)
                assert isinstance(result, bytes)
                payload = result
            except Exception as err:
                return self._error_reply(call, err)
        try:
            return self.conn.send_reply(call, payload)
        except LocalProtocolError as err:  # e.g. a reply larger than a packet: the client gets an error
            return self.conn.send_error(call, RemoteError(ErrorCode.INTERNAL_ERROR, 0, f"internal error: {err}"))

    def _error_reply(self, call: Call, err: Exception) -> bytes:
        if isinstance(err, XdrError):
            error = RemoteError(ErrorCode.RPC, ErrorDomain.RPC, f"Unable to decode message payload: {err}")
        elif isinstance(err, VirtError):
            error = RemoteError(err.code, err.domain, err.message)
        else:  # a bug: report it and keep serving
            log.error("procedure %d failed", call.proc, exc_info=err)
            error = RemoteError(ErrorCode.INTERNAL_ERROR, 0, f"internal error: {err}")
        return self.conn.send_error(call, error)

    def _open_console_call(self, call: Call, u: Unpacker) -> bytes:
        dom = self.lookup(u)
        dev_name = u.opt_string(STRING_MAX)
        flags = u.uint()
        u.done()
        _bad_flags(flags, 1 | 2, "virDomainOpenConsole")  # FORCE, SAFE (our stream is always safe)
        if dev_name not in (None, "serial0", "console0"):
            raise VirtError(ErrorCode.INTERNAL_ERROR, f"cannot find character device {dev_name}")
        stream = self.open_console(call.serial, dom, force=bool(flags & 1))
        # The reply must reach the client before any stream data: send it, then start relaying.
        self.send(self.conn.send_reply(call, b""))
        asyncio.get_running_loop().add_reader(stream.fd, self._console_readable, stream)
        return b""

    def lookup(self, u: Unpacker) -> Domain:
        name, raw, _ = unpack_domain(u)
        return self.manager.resolve(name, raw)

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

    # -- console streams --------------------------------------------------------------------------
    def stream_packet(self, pkt: StreamPacket) -> None:
        stream = self._consoles.get(pkt.serial)
        if stream is None or pkt.proc != PROC_OPEN_CONSOLE:
            return  # late packets for a stream we already closed
        if pkt.status is Status.CONTINUE:
            if pkt.payload:
                with contextlib.suppress(OSError):
                    os.write(stream.fd, pkt.payload)
            return
        # Finish (OK) or abort (ERROR): both are confirmed with an empty STREAM/OK.
        self._close_console(stream)
        self.send(self.conn.send_stream(PROC_OPEN_CONSOLE, pkt.serial, Status.OK))

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
            return
        self.end_console(stream)

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
        for stream in list(self._consoles.values()):
            self._close_console(stream)
        if self._subscribed:
            self.manager.unsubscribe(self.on_domain_event)
            self._subscribed = False


# ---- connection ------------------------------------------------------------------------------------------


@proc(66, readonly=True)
def auth_list(s: Session, u: Unpacker) -> bytes:
    u.done()
    p = Packer()
    p.uint(1)
    p.int(0)  # REMOTE_AUTH_NONE: access is controlled by the socket's permissions
    return p.getvalue()


@proc(60, readonly=True)
def supports_feature(s: Session, u: Unpacker) -> bytes:
    feature = u.int()
    u.done()
    p = Packer()
    p.int(FEATURES.get(feature, 0))
    return p.getvalue()


@proc(1, readonly=True)
def connect_open(s: Session, u: Unpacker) -> bytes:
    name = u.opt_string(STRING_MAX)
    flags = u.uint()
    u.done()
    # Only VIR_CONNECT_RO (1) matters here; clients also pass flags meant for their own side (a
    # session open sends 0x4), which libvirtd ignores too.
    s.daemon.check_uri(name)
    if flags & 1:
        s.readonly = True
    s.opened = True
    if not s._subscribed:
        s.manager.subscribe(s.on_domain_event)
        s._subscribed = True
    return b""


@proc(2, readonly=True)
def connect_close(s: Session, u: Unpacker) -> bytes:
    u.done()
    s.close()
    s.opened = False
    return b""


@proc(360, readonly=True)
def register_close_callback(s: Session, u: Unpacker) -> bytes:
    u.done()
    return b""


@proc(361, readonly=True)
def unregister_close_callback(s: Session, u: Unpacker) -> bytes:
    u.done()
    return b""


def _string(value: str) -> bytes:
    p = Packer()
    p.string(value)
    return p.getvalue()


def _int(value: int) -> bytes:
    p = Packer()
    p.int(value)
    return p.getvalue()


def _uhyper(value: int) -> bytes:
    p = Packer()
    p.uhyper(value)
    return p.getvalue()


@proc(3, readonly=True)
def get_type(s: Session, u: Unpacker) -> bytes:
    u.done()
    return _string("MSHV")


@proc(4, readonly=True)
def get_version(s: Session, u: Unpacker) -> bytes:
    u.done()
    return _uhyper(host.hypervisor_version())


@proc(157, readonly=True)
def get_lib_version(s: Session, u: Unpacker) -> bytes:
    u.done()
    # The libvirt API level we implement (the wire protocol of libvirt 9.0.0); clients gate
    # features on this number, not on our package version.
    return _uhyper(9_000_000)


@proc(59, readonly=True)
def get_hostname(s: Session, u: Unpacker) -> bytes:
    u.done()
    return _string(socket.gethostname())


@proc(110, readonly=True)
def get_uri(s: Session, u: Unpacker) -> bytes:
    u.done()
    return _string(s.daemon.uri)


@proc(5, readonly=True)
def get_max_vcpus(s: Session, u: Unpacker) -> bytes:
    u.opt_string(STRING_MAX)
    u.done()
    return _int(MAX_VCPUS)


@proc(6, readonly=True)
def node_get_info(s: Session, u: Unpacker) -> bytes:
    u.done()
    info = host.node_info()
    p = Packer()
    model = info.model.encode()[:31].ljust(32, b"\0")
    for ch in model:  # char model[32]: rpcgen sends each char as a 4-byte int
        p.int(ch)
    p.uhyper(info.memory_kib)
    for v in (info.cpus, info.mhz, info.nodes, info.sockets, info.cores, info.threads):
        p.int(v)
    return p.getvalue()


@proc(7, readonly=True)
def get_capabilities(s: Session, u: Unpacker) -> bytes:
    u.done()
    return _string(host.capabilities_xml())


@proc(342, readonly=True)
def get_domain_capabilities(s: Session, u: Unpacker) -> bytes:
    emulator = u.opt_string(STRING_MAX)
    arch = u.opt_string(STRING_MAX)
    machine = u.opt_string(STRING_MAX)
    virttype = u.opt_string(STRING_MAX)
    flags = u.uint()
    u.done()
    _bad_flags(flags, 0, "virConnectGetDomainCapabilities")
    return _string(host.domain_capabilities_xml(emulator, arch, machine, virttype))


@proc(122, readonly=True)
def node_get_security_model(s: Session, u: Unpacker) -> bytes:
    u.done()
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


@proc(273, readonly=True)
def list_all_domains(s: Session, u: Unpacker) -> bytes:
    need_results = u.int()
    flags = u.uint()
    u.done()
    _bad_flags(flags, LIST_ALL_FLAGS, "virConnectListAllDomains")
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


@proc(51, readonly=True)
def num_of_domains(s: Session, u: Unpacker) -> bytes:
    u.done()
    return _int(sum(1 for d in s.manager.domains() if d.active))


@proc(37, readonly=True)
def list_domains(s: Session, u: Unpacker) -> bytes:
    maxids = u.int()
    u.done()
    if not 0 <= maxids <= DOMAIN_LIST_MAX:
        raise VirtError(ErrorCode.RPC, "maxids > REMOTE_DOMAIN_LIST_MAX", ErrorDomain.RPC)
    ids = [d.id for d in s.manager.domains() if d.active][:maxids]
    p = Packer()
    p.uint(len(ids))
    for i in ids:
        p.int(i)
    return p.getvalue()


@proc(25, readonly=True)
def num_of_defined(s: Session, u: Unpacker) -> bytes:
    u.done()
    return _int(sum(1 for d in s.manager.domains() if not d.active))


@proc(21, readonly=True)
def list_defined(s: Session, u: Unpacker) -> bytes:
    maxnames = u.int()
    u.done()
    if not 0 <= maxnames <= DOMAIN_LIST_MAX:
        raise VirtError(ErrorCode.RPC, "maxnames > REMOTE_DOMAIN_LIST_MAX", ErrorDomain.RPC)
    names = [d.name for d in s.manager.domains() if not d.active][:maxnames]
    p = Packer()
    p.uint(len(names))
    for n in names:
        p.string(n)
    return p.getvalue()


def _dom_reply(dom: Domain) -> bytes:
    p = Packer()
    pack_domain(p, dom)
    return p.getvalue()


@proc(22, readonly=True)
def lookup_by_id(s: Session, u: Unpacker) -> bytes:
    dom_id = u.int()
    u.done()
    return _dom_reply(s.manager.by_id(dom_id))


@proc(23, readonly=True)
def lookup_by_name(s: Session, u: Unpacker) -> bytes:
    name = u.string(STRING_MAX)
    u.done()
    return _dom_reply(s.manager.by_name(name))


@proc(24, readonly=True)
def lookup_by_uuid(s: Session, u: Unpacker) -> bytes:
    raw = u.opaque_fixed(UUID_LEN)
    u.done()
    return _dom_reply(s.manager.by_uuid(raw))


# ---- domain queries --------------------------------------------------------------------------------------


@proc(212, readonly=True)
def get_state(s: Session, u: Unpacker) -> bytes:
    dom = s.lookup(u)
    flags = u.uint()
    u.done()
    _bad_flags(flags, 0, "virDomainGetState")
    p = Packer()
    p.int(int(dom.status.state))
    p.int(int(dom.status.reason))
    return p.getvalue()


@proc(16, readonly=True)
def get_info(s: Session, u: Unpacker) -> bytes:
    dom = s.lookup(u)
    u.done()
    state, max_kib, kib, vcpus, cpu = s.manager.info(dom)
    p = Packer()
    p.uint(state)  # unsigned char, 4 bytes on the wire
    p.uhyper(max_kib)
    p.uhyper(kib)
    p.uint(vcpus)  # unsigned short, 4 bytes on the wire
    p.uhyper(cpu)
    return p.getvalue()


@proc(17, readonly=True)
def get_max_memory(s: Session, u: Unpacker) -> bytes:
    dom = s.lookup(u)
    u.done()
    return _uhyper(dom.config.memory_kib)


@proc(14, readonly=True)
def get_xml_desc(s: Session, u: Unpacker) -> bytes:
    dom = s.lookup(u)
    flags = u.uint()
    u.done()
    # SECURE 1, INACTIVE 2, UPDATE_CPU 4, MIGRATABLE 8: nothing secret and no CPU model to expand.
    _bad_flags(flags, 1 | 2 | 4 | 8, "virDomainGetXMLDesc")
    return _string(s.manager.xml(dom, inactive=bool(flags & 2)))


@proc(19, readonly=True)
def get_os_type(s: Session, u: Unpacker) -> bytes:
    dom = s.lookup(u)
    u.done()
    return _string(dom.config.os_type)


@proc(150, readonly=True)
def is_active(s: Session, u: Unpacker) -> bytes:
    dom = s.lookup(u)
    u.done()
    return _int(1 if dom.active else 0)


@proc(151, readonly=True)
def is_persistent(s: Session, u: Unpacker) -> bytes:
    dom = s.lookup(u)
    u.done()
    return _int(1 if dom.persistent is not None else 0)


@proc(152, readonly=True)
def is_updated(s: Session, u: Unpacker) -> bytes:
    dom = s.lookup(u)
    u.done()
    updated = dom.active and dom.persistent is not None and dom.live is not None and dom.live != dom.persistent
    return _int(1 if updated else 0)


@proc(15, readonly=True)
def get_autostart(s: Session, u: Unpacker) -> bytes:
    dom = s.lookup(u)
    u.done()
    return _int(1 if s.manager.autostart(dom) else 0)


@proc(29)
async def set_autostart(s: Session, u: Unpacker) -> bytes:
    dom = s.lookup(u)
    on = u.int()
    u.done()
    await s.manager.set_autostart(dom, bool(on))
    return b""


METADATA_KINDS = {0: "description", 1: "title"}  # VIR_DOMAIN_METADATA_ELEMENT (2) is not supported
AFFECT_LIVE, AFFECT_CONFIG = 1, 2


def _metadata_kind(kind: int) -> str:
    if kind == 2:
        raise VirtError(ErrorCode.ARGUMENT_UNSUPPORTED, "custom metadata elements are not supported by the mshv driver")
    if kind not in METADATA_KINDS:
        raise VirtError(ErrorCode.INVALID_ARG, f"unknown metadata type '{kind}'")
    return METADATA_KINDS[kind]


def _affect(s: Session, dom: Domain, flags: int) -> tuple[bool, bool]:
    """(live, config) for VIR_DOMAIN_AFFECT_*: CURRENT (0) is live for a running domain, else config."""
    if not flags & (AFFECT_LIVE | AFFECT_CONFIG):
        return (True, False) if dom.active else (False, True)
    return bool(flags & AFFECT_LIVE), bool(flags & AFFECT_CONFIG)


def _config_to_read(s: Session, dom: Domain, flags: int) -> DomainConfig:
    """The live or the persistent config a getter with VIR_DOMAIN_AFFECT_* flags reads."""
    if flags & AFFECT_LIVE and flags & AFFECT_CONFIG:
        raise VirtError(ErrorCode.INVALID_ARG, "flags 'live' and 'config' are mutually exclusive")
    live, _ = _affect(s, dom, flags)
    if live and not dom.active:
        raise invalid_operation("domain is not running")
    return dom.live if live and dom.live is not None else (dom.persistent or dom.config)


@proc(264)
async def set_metadata(s: Session, u: Unpacker) -> bytes:
    dom = s.lookup(u)
    kind = _metadata_kind(u.int())
    value = u.opt_string(STRING_MAX)
    key = u.opt_string(STRING_MAX)
    uri = u.opt_string(STRING_MAX)
    flags = u.uint()
    u.done()
    _bad_flags(flags, AFFECT_LIVE | AFFECT_CONFIG, "virDomainSetMetadata")
    if key is not None or uri is not None:
        raise VirtError(ErrorCode.INVALID_ARG, "key and uri are only used with VIR_DOMAIN_METADATA_ELEMENT")
    live, config = _affect(s, dom, flags)
    await s.manager.edit_config(dom, set_text(kind, value), live=live, config=config)
    return b""


@proc(265, readonly=True)
def get_metadata(s: Session, u: Unpacker) -> bytes:
    dom = s.lookup(u)
    kind = _metadata_kind(u.int())
    uri = u.opt_string(STRING_MAX)
    flags = u.uint()
    u.done()
    _bad_flags(flags, AFFECT_LIVE | AFFECT_CONFIG, "virDomainGetMetadata")
    if uri is not None:
        raise VirtError(ErrorCode.INVALID_ARG, "uri is only used with VIR_DOMAIN_METADATA_ELEMENT")
    cfg = _config_to_read(s, dom, flags)
    value = cfg.title if kind == "title" else cfg.description
    if not value:
        raise VirtError(ErrorCode.NO_DOMAIN_METADATA, "Requested metadata element is not present")
    return _string(value)


VCPU_MAXIMUM = 4  # also VIR_DOMAIN_MEM_MAXIMUM
VCPU_GUEST = 8


def _no_hotplug(what: str) -> VirtError:
    return VirtError(
        ErrorCode.OPERATION_UNSUPPORTED,
        f"changing the {what} of a running domain is not supported by the mshv driver; use --config",
    )


@proc(200, readonly=True)
def get_vcpus_flags(s: Session, u: Unpacker) -> bytes:
    dom = s.lookup(u)
    flags = u.uint()
    u.done()
    _bad_flags(flags, AFFECT_LIVE | AFFECT_CONFIG | VCPU_MAXIMUM | VCPU_GUEST, "virDomainGetVcpusFlags")
    if flags & VCPU_GUEST:
        raise VirtError(ErrorCode.ARGUMENT_UNSUPPORTED, "the mshv driver has no guest agent")
    return _int(_config_to_read(s, dom, flags).vcpus)  # no vCPU hotplug: current always equals maximum


@proc(199)
async def set_vcpus_flags(s: Session, u: Unpacker) -> bytes:
    dom = s.lookup(u)
    nvcpus = u.uint()
    flags = u.uint()
    u.done()
    _bad_flags(flags, AFFECT_LIVE | AFFECT_CONFIG | VCPU_MAXIMUM, "virDomainSetVcpusFlags")
    live, config = _affect(s, dom, flags)
    if live:
        raise _no_hotplug("vCPU count")
    # Without hotplug the current count always equals the maximum, so both forms set the one <vcpu> count.
    await s.manager.edit_config(dom, set_vcpus(nvcpus), False, config)
    return b""


@proc(204)
async def set_memory_flags(s: Session, u: Unpacker) -> bytes:
    dom = s.lookup(u)
    kib = u.uhyper()
    flags = u.uint()
    u.done()
    _bad_flags(flags, AFFECT_LIVE | AFFECT_CONFIG | VCPU_MAXIMUM, "virDomainSetMemoryFlags")
    live, config = _affect(s, dom, flags)
    if live:
        raise _no_hotplug("memory size")  # no balloon device
    await s.manager.edit_config(dom, set_memory(kib, maximum=bool(flags & VCPU_MAXIMUM)), False, config)
    return b""


@proc(183, readonly=True)
def has_managed_save(s: Session, u: Unpacker) -> bytes:
    s.lookup(u)
    flags = u.uint()
    u.done()
    _bad_flags(flags, 0, "virDomainHasManagedSaveImage")
    return _int(0)


@proc(187, readonly=True)
def snapshot_num(s: Session, u: Unpacker) -> bytes:
    s.lookup(u)
    u.uint()
    u.done()
    return _int(0)


@proc(274, readonly=True)
def list_all_snapshots(s: Session, u: Unpacker) -> bytes:
    s.lookup(u)
    u.int()
    u.uint()
    u.done()
    p = Packer()
    p.uint(0)
    p.int(0)
    return p.getvalue()


# ---- domain stats (virsh domstats, virt-manager's graphs) -----------------------------------------------

STATS_STATE, STATS_CPU_TOTAL, STATS_BALLOON, STATS_VCPU = 1, 2, 4, 8
STATS_SUPPORTED = STATS_STATE | STATS_CPU_TOTAL | STATS_BALLOON | STATS_VCPU
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
TP_INT, TP_UINT, TP_ULLONG = 1, 2, 4


def _pack_param(p: Packer, field: str, kind: int, value: int) -> None:
    p.string(field)
    p.int(kind)
    if kind == TP_ULLONG:
        p.uhyper(value)
    elif kind == TP_UINT:
        p.uint(value)
    else:
        p.int(value)


def _domain_stats(s: Session, dom: Domain, stats: int) -> list[tuple[str, int, int]]:
    out: list[tuple[str, int, int]] = []
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
        out += [("vcpu.current", TP_UINT, cfg.vcpus), ("vcpu.maximum", TP_UINT, cfg.vcpus)]
    return out


@proc(344, readonly=True)
def get_all_domain_stats(s: Session, u: Unpacker) -> bytes:
    count = u.array_len(DOMAIN_LIST_MAX)
    wanted = [unpack_domain(u) for _ in range(count)]
    stats = u.uint()
    flags = u.uint()
    u.done()
    _bad_flags(flags, STATS_FLAGS, "virConnectGetAllDomainStats")
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
    p = Packer()
    p.uint(len(doms))
    for dom in doms:
        pack_domain(p, dom)
        params = _domain_stats(s, dom, stats)
        p.uint(len(params))
        for field, kind, value in params:
            _pack_param(p, field, kind, value)
    return p.getvalue()


# ---- define / start / stop -------------------------------------------------------------------------------


@proc(11)
async def define_xml(s: Session, u: Unpacker) -> bytes:
    xml = u.string(STRING_MAX)
    u.done()
    return _dom_reply(await s.manager.define(xml))


@proc(350)
async def define_xml_flags(s: Session, u: Unpacker) -> bytes:
    xml = u.string(STRING_MAX)
    flags = u.uint()
    u.done()
    _bad_flags(flags, 1, "virDomainDefineXMLFlags")  # VIR_DOMAIN_DEFINE_VALIDATE
    if flags & 1:
        await asyncio.to_thread(parse_domain_xml, xml, check_libvirt_schema=True)
    return _dom_reply(await s.manager.define(xml))


@proc(10)
async def create_xml(s: Session, u: Unpacker) -> bytes:
    xml = u.string(STRING_MAX)
    flags = u.uint()
    u.done()
    _bad_flags(flags, 1 | 16, "virDomainCreateXML")  # START_PAUSED, START_VALIDATE
    if flags & 16:
        await asyncio.to_thread(parse_domain_xml, xml, check_libvirt_schema=True)
    return _dom_reply(await s.manager.create_transient(xml, paused=bool(flags & 1)))


@proc(9)
async def create(s: Session, u: Unpacker) -> bytes:
    dom = s.lookup(u)
    u.done()
    await s.manager.start(dom, paused=False)
    return b""


@proc(196)
async def create_with_flags(s: Session, u: Unpacker) -> bytes:
    dom = s.lookup(u)
    flags = u.uint()
    u.done()
    _bad_flags(flags, 1, "virDomainCreateWithFlags")  # VIR_DOMAIN_START_PAUSED
    await s.manager.start(dom, paused=bool(flags & 1))
    return _dom_reply(dom)


@proc(12)
async def destroy(s: Session, u: Unpacker) -> bytes:
    dom = s.lookup(u)
    u.done()
    await s.manager.destroy(dom)
    return b""


@proc(234)
async def destroy_flags(s: Session, u: Unpacker) -> bytes:
    dom = s.lookup(u)
    flags = u.uint()
    u.done()
    _bad_flags(flags, 1, "virDomainDestroyFlags")  # GRACEFUL: our destroy already asks the VMM first
    await s.manager.destroy(dom)
    return b""


@proc(33)
async def shutdown(s: Session, u: Unpacker) -> bytes:
    dom = s.lookup(u)
    u.done()
    await s.manager.shutdown(dom)
    return b""


@proc(258)
async def shutdown_flags(s: Session, u: Unpacker) -> bytes:
    dom = s.lookup(u)
    flags = u.uint()
    u.done()
    _bad_flags(flags, 1, "virDomainShutdownFlags")  # ACPI_POWER_BTN is the only mode we have
    await s.manager.shutdown(dom)
    return b""


@proc(27)
async def reboot(s: Session, u: Unpacker) -> bytes:
    dom = s.lookup(u)
    flags = u.uint()
    u.done()
    _bad_flags(flags, 1, "virDomainReboot")  # ACPI_POWER_BTN
    await s.manager.reboot(dom)
    return b""


@proc(245)
async def reset(s: Session, u: Unpacker) -> bytes:
    dom = s.lookup(u)
    flags = u.uint()
    u.done()
    _bad_flags(flags, 0, "virDomainReset")
    await s.manager.reset(dom)
    return b""


@proc(34)
async def suspend(s: Session, u: Unpacker) -> bytes:
    dom = s.lookup(u)
    u.done()
    await s.manager.suspend(dom)
    return b""


@proc(28)
async def resume(s: Session, u: Unpacker) -> bytes:
    dom = s.lookup(u)
    u.done()
    await s.manager.resume(dom)
    return b""


@proc(35)
async def undefine(s: Session, u: Unpacker) -> bytes:
    dom = s.lookup(u)
    u.done()
    await s.manager.undefine(dom)
    return b""


@proc(231)
async def undefine_flags(s: Session, u: Unpacker) -> bytes:
    dom = s.lookup(u)
    flags = u.uint()
    u.done()
    # MANAGED_SAVE 1, SNAPSHOTS_METADATA 2, NVRAM 4, KEEP_NVRAM 8, CHECKPOINTS_METADATA 16, TPM 32, KEEP_TPM 64:
    # we keep none of those things, so each asks for nothing.
    _bad_flags(flags, 127, "virDomainUndefineFlags")
    await s.manager.undefine(dom)
    return b""


# ---- events and console ----------------------------------------------------------------------------------


@proc(316, readonly=True)
def event_register_any(s: Session, u: Unpacker) -> bytes:
    event_id = u.int()
    present = u.uint()
    filt: bytes | None = None
    if present == 1:
        _, filt, _ = unpack_domain(u)
    elif present != 0:
        raise XdrError("invalid optional marker")
    u.done()
    if event_id not in EVENT_MSG_PROC:
        raise VirtError(ErrorCode.INVALID_ARG, f"unsupported event ID {event_id}")
    cb_id = s._next_callback
    s._next_callback += 1
    s._callbacks[cb_id] = (event_id, filt)
    return _int(cb_id)


@proc(317, readonly=True)
def event_deregister_any(s: Session, u: Unpacker) -> bytes:
    cb_id = u.int()
    u.done()
    if s._callbacks.pop(cb_id, None) is None:
        raise VirtError(ErrorCode.INVALID_ARG, f"event callback {cb_id} not registered")
    return b""


# Registered through Server (it needs the call serial); listed so read-only checks see it.
def _open_console_placeholder(s: Session, u: Unpacker) -> bytes:
    raise AssertionError("open_console is dispatched by Session._open_console_call (it needs the call serial)")


# Listed so the read-only check and "unknown procedure" see it; Session._run answers it.
PROCEDURES[PROC_OPEN_CONSOLE] = Procedure(_open_console_placeholder, readonly=False, is_async=False)
