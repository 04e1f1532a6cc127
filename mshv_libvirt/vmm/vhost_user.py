"""vhost-user: the VMM as frontend of a ``qemu-storage-daemon`` vhost-user-blk export.

The protocol is QEMU's docs/interop/vhost-user.rst: a UNIX stream socket carrying little-endian
messages (u32 request, u32 flags, u32 size, payload) with descriptors as SCM_RIGHTS. Python speaks it
only to set a device up (features, the memory table, each ring's size, addresses, base, kick and call
descriptors, on DRIVER_OK or a rebuild); no message is exchanged per request. The data path is then
the kernel's: the guest's doorbell write signals the kick eventfd through MSHV_IOEVENTFD, the backend
serves the ring from guest RAM it mapped from the memfds, and signals the call eventfd, which is an
irqfd bound to the queue's MSI-X route, so the completion interrupt reaches the guest with no VMM code.

``Backend`` is the supervised process, started before the VMM's sandbox under a small reaper process
(abi/shim.c ``mshv_spawn_helper``) that SIGKILLs it when the VMM's lifeline pipe breaks, which the
kernel does when the VMM dies however it dies: PR_SET_PDEATHSIG from the VMM alone is not delivered
once the VMM is in its Landlock domain (signal scoping covers the parent-death signal too; measured).
Its export listens on a socket the VMM connected to before anything else could, its QMP monitor is on
a socketpair. ``stop()`` asks QMP to quit, and closes the lifeline if that does not end it.
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import os
import select
import shutil
import socket
import struct
import tempfile
import threading
import time
from dataclasses import dataclass

from ..hv import _ffi

log = logging.getLogger(__name__)

# Requests (vhost-user.rst, "Front-end message types").
GET_FEATURES = 1
SET_FEATURES = 2
SET_OWNER = 3
SET_MEM_TABLE = 5
SET_VRING_NUM = 8
SET_VRING_ADDR = 9
SET_VRING_BASE = 10
GET_VRING_BASE = 11
SET_VRING_KICK = 12
SET_VRING_CALL = 13
GET_PROTOCOL_FEATURES = 15
SET_PROTOCOL_FEATURES = 16
GET_QUEUE_NUM = 17
SET_VRING_ENABLE = 18
GET_CONFIG = 24

FLAG_VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
HEADER = struct.Struct("<III")
VRING_NOFD = 1 << 8  # SET_VRING_KICK/CALL: no descriptor (polling, or no notification)

F_PROTOCOL_FEATURES = 1 << 30
PROTOCOL_F_MQ = 1 << 0
PROTOCOL_F_REPLY_ACK = 1 << 3
PROTOCOL_F_CONFIG = 1 << 9
WANTED_PROTOCOL = PROTOCOL_F_MQ | PROTOCOL_F_REPLY_ACK | PROTOCOL_F_CONFIG

MAX_REGIONS = 8  # without CONFIGURE_MEM_SLOTS
MAX_PAYLOAD = 4096
TIMEOUT = 10.0
QMP_TIMEOUT = 5.0  # a query or a resize answers in milliseconds; a stopped backend must not hold the VMM longer


class VhostUserError(OSError):
    """The backend refused a request, answered nonsense or went away."""


@dataclass(frozen=True)
class MemRegion:
    gpa: int
    size: int
    address: int  # where this process maps it: ring addresses are given in these terms
    fd: int
    offset: int = 0


class Frontend:
    """One vhost-user connection. Thread-safe; each call is one request (and its reply, if any)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._sock.settimeout(TIMEOUT)
        self._lock = threading.Lock()
        self.protocol_features = 0
        self.has_protocol = False
        self.regions: tuple[MemRegion, ...] = ()

    def close(self) -> None:
        self._sock.close()

    def hang_up(self, timeout: float) -> None:
        """Close the connection once the backend has closed its side (bounded): our shutdown is its EOF, and
        it closes its socket when its connection coroutine is done with it."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)
            self._sock.settimeout(timeout)
            while self._sock.recv(4096):
                pass
        self.close()

    # -- messages ----------------------------------------------------------------------------------

    def _send(self, request: int, payload: bytes = b"", fds: tuple[int, ...] = (), need_reply: bool = False) -> None:
        flags = FLAG_VERSION | (FLAG_NEED_REPLY if need_reply else 0)
        data = HEADER.pack(request, flags, len(payload)) + payload
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            sent = self._sock.sendmsg([data], ancillary)
        except OSError as err:
            raise VhostUserError(err.errno, f"vhost-user request {request}: {err.strerror}") from err
        if sent != len(data):
            raise VhostUserError(0, f"vhost-user request {request}: short write")

    def _recv_exact(self, n: int, request: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            try:
                chunk = self._sock.recv(n - len(out))
            except OSError as err:
                raise VhostUserError(err.errno or 0, f"vhost-user reply to {request}: {err}") from err
            if not chunk:
                raise VhostUserError(0, f"vhost-user backend closed the connection (reply to request {request})")
            out += chunk
        return bytes(out)

    def _reply(self, request: int) -> bytes:
        got, flags, size = HEADER.unpack(self._recv_exact(HEADER.size, request))
        if got != request or not flags & FLAG_REPLY or size > MAX_PAYLOAD:
            raise VhostUserError(0, f"vhost-user: bad reply to request {request} (request {got}, flags {flags:#x})")
        return self._recv_exact(size, request)

    def _call(self, request: int, payload: bytes = b"") -> bytes:
        with self._lock:
            self._send(request, payload)
            return self._reply(request)

    def _set(self, request: int, payload: bytes = b"", fds: tuple[int, ...] = ()) -> None:
        """A request without a reply of its own; acknowledged where REPLY_ACK was negotiated."""
        ack = bool(self.protocol_features & PROTOCOL_F_REPLY_ACK)
        with self._lock:
            self._send(request, payload, fds, need_reply=ack)
            if ack:
                answer = self._reply(request)
                if len(answer) != 8 or struct.unpack("<Q", answer)[0] != 0:
                    raise VhostUserError(0, f"vhost-user backend refused request {request}")

    def _u64(self, request: int) -> int:
        answer = self._call(request)
        if len(answer) != 8:
            raise VhostUserError(0, f"vhost-user: reply to request {request} is {len(answer)} bytes, not 8")
        return int(struct.unpack("<Q", answer)[0])

    # -- requests ----------------------------------------------------------------------------------

    def get_features(self) -> int:
        return self._u64(GET_FEATURES)

    def set_features(self, features: int) -> None:
        self._set(SET_FEATURES, struct.pack("<Q", features))

    def set_owner(self) -> None:
        self._set(SET_OWNER)

    def negotiate_protocol(self, features: int) -> None:
        """When the backend offers VHOST_USER_F_PROTOCOL_FEATURES: agree on what both sides know."""
        if features & F_PROTOCOL_FEATURES:
            offered = self._u64(GET_PROTOCOL_FEATURES)
            wanted = offered & WANTED_PROTOCOL
            self._set(SET_PROTOCOL_FEATURES, struct.pack("<Q", wanted))
            self.protocol_features = wanted
            self.has_protocol = True

    def get_queue_num(self) -> int:
        return self._u64(GET_QUEUE_NUM) if self.protocol_features & PROTOCOL_F_MQ else 1

    def get_config(self, size: int) -> bytes:
        if not self.protocol_features & PROTOCOL_F_CONFIG:
            raise VhostUserError(0, "vhost-user backend does not offer its device configuration")
        answer = self._call(GET_CONFIG, struct.pack("<III", 0, size, 0) + bytes(size))
        if len(answer) != 12 + size:
            raise VhostUserError(0, f"vhost-user: GET_CONFIG answered {len(answer)} bytes")
        return answer[12:]

    def set_mem_table(self, regions: list[MemRegion]) -> None:
        if not 0 < len(regions) <= MAX_REGIONS:
            raise VhostUserError(0, f"vhost-user: {len(regions)} memory regions (1 to {MAX_REGIONS})")
        payload = struct.pack("<II", len(regions), 0) + b"".join(
            struct.pack("<QQQQ", r.gpa, r.size, r.address, r.offset) for r in regions
        )
        self._set(SET_MEM_TABLE, payload, tuple(r.fd for r in regions))
        self.regions = tuple(regions)

    def address_of(self, gpa: int, length: int) -> int:
        """A guest-physical range as an address of this process (how rings are named to the backend)."""
        for r in self.regions:
            if r.gpa <= gpa and gpa + length <= r.gpa + r.size:
                return r.address + (gpa - r.gpa)
        raise VhostUserError(0, f"vhost-user: ring at {gpa:#x}+{length:#x} is not in guest RAM")

    def set_vring_num(self, index: int, num: int) -> None:
        self._set(SET_VRING_NUM, struct.pack("<II", index, num))

    def set_vring_addr(self, index: int, desc: int, used: int, avail: int) -> None:
        self._set(SET_VRING_ADDR, struct.pack("<IIQQQQ", index, 0, desc, used, avail, 0))

    def set_vring_base(self, index: int, base: int) -> None:
        self._set(SET_VRING_BASE, struct.pack("<II", index, base))

    def get_vring_base(self, index: int) -> int:
        """Stops the ring; answers the next available index the backend would have read."""
        answer = self._call(GET_VRING_BASE, struct.pack("<II", index, 0))
        if len(answer) != 8:
            raise VhostUserError(0, "vhost-user: bad GET_VRING_BASE reply")
        return int(struct.unpack("<II", answer)[1])

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self._vring_fd(SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self._vring_fd(SET_VRING_CALL, index, fd)

    def _vring_fd(self, request: int, index: int, fd: int | None) -> None:
        value = index | (VRING_NOFD if fd is None else 0)
        self._set(request, struct.pack("<Q", value), () if fd is None else (fd,))

    def set_vring_enable(self, index: int, enable: bool) -> None:
        if self.has_protocol:  # rings start disabled once PROTOCOL_FEATURES is negotiated, else enabled
            self._set(SET_VRING_ENABLE, struct.pack("<II", index, int(enable)))


# -- the backend process -----------------------------------------------------------------------------


class BackendError(RuntimeError):
    """The backend could not be started or did not come up."""


class QmpError(BackendError):
    """A QMP command the backend refused; ``desc`` is QEMU's own message."""

    def __init__(self, command: str, desc: str) -> None:
        super().__init__(f"qemu-storage-daemon: {command}: {desc}")
        self.desc = desc


# qemu-storage-daemon's iothread default, stated: how long (ns) the export's iothread polls for a completion
# before it sleeps; adaptive, so an idle disk costs no CPU.
IOTHREAD_POLL_MAX_NS = 32768


def storage_daemon() -> str | None:
    """The installed qemu-storage-daemon (a VMM's PATH may be minimal: Debian's location is tried too)."""
    found = shutil.which("qemu-storage-daemon")
    if found is None and os.access("/usr/bin/qemu-storage-daemon", os.X_OK):
        found = "/usr/bin/qemu-storage-daemon"
    return found


@dataclass(frozen=True)
class BlockImage:
    path: str
    format: str = "raw"  # raw | qcow2
    readonly: bool = False
    direct: bool = False  # cache='none'|'directsync': O_DIRECT
    no_flush: bool = False  # cache='unsafe': the guest's flushes are ignored
    writethrough: bool = False  # cache='writethrough'|'directsync': each write is flushed before it completes
    aio: str | None = None  # native | threads | io_uring (<driver io>); None: native with O_DIRECT, else threads
    queues: int = 1
    fd: int | None = None  # the image opened by whoever started the VMM: the backend opens its /dev/fd/N


class Backend:
    """A ``qemu-storage-daemon`` exporting one image as vhost-user-blk, connected and supervised."""

    def __init__(self, image: BlockImage, *, executable: str | None = None) -> None:
        exe = executable or storage_daemon()
        if exe is None:
            raise BackendError("qemu-storage-daemon is not installed (Debian: qemu-system-common)")
        if image.format not in ("raw", "qcow2"):
            raise BackendError(f"disk format {image.format!r} is not raw or qcow2")
        self.image = image
        self.pid = -1  # qemu-storage-daemon's
        self._reaper = -1  # our child, its parent: SIGKILLs it when the lifeline breaks, exits with its status
        self._pidfd = -1  # the reaper's
        self._lifeline = -1
        self._status: int | None = None
        self._qmp_buf = bytearray()
        self._qmp_lock = threading.Lock()
        self._qmp_id = 0
        tmp = tempfile.mkdtemp(prefix="mshv-vhost-")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        qmp_ours, qmp_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._qmp = qmp_ours
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # A path in a private directory, connected before the backend runs and unlinked at once:
            # nobody but this VMM can become the frontend (an abstract name could be raced).
            path = os.path.join(tmp, "blk.sock")
            listener.bind(path)
            listener.listen(1)
            client.connect(path)
            os.unlink(path)
            argv = self._argv(exe, image, listener.fileno(), qmp_theirs.fileno())
            keep = (listener.fileno(), qmp_theirs.fileno()) + (() if image.fd is None else (image.fd,))
            self.pid, self._lifeline, self._reaper, self._pidfd = _ffi.spawn_helper(argv, keep)
        except BaseException:
            client.close()
            qmp_ours.close()
            raise
        finally:
            listener.close()
            qmp_theirs.close()
            os.rmdir(tmp)
        self.frontend = Frontend(client)
        try:
            self._qmp_greeting()
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def _argv(exe: str, image: BlockImage, listen_fd: int, qmp_fd: int) -> list[str]:
        ro = "on" if image.readonly else "off"
        direct = "on" if image.direct else "off"
        # Commas in a path are doubled, QEMU's escaping in option strings.
        filename = (image.path if image.fd is None else f"/dev/fd/{image.fd}").replace(",", ",,")
        cache = f"cache.direct={direct},cache.no-flush={'on' if image.no_flush else 'off'}"
        aio = image.aio or ("native" if image.direct else "threads")
        file_node = f"driver=file,node-name=file0,filename={filename},read-only={ro},{cache},aio={aio}"
        fmt_node = f"driver={image.format},node-name=disk0,file=file0,read-only={ro},{cache}"
        export = (
            f"type=vhost-user-blk,id=export0,node-name=disk0,addr.type=fd,addr.str={listen_fd},"
            f"writable={'off' if image.readonly else 'on'},num-queues={image.queues},"
            f"writethrough={'on' if image.writethrough else 'off'},iothread=iothread0"
        )
        return [
            exe,
            # The export in its own AioContext and thread: less CPU per request than in qsd's main loop
            # (measured, docs/DESIGN.md).
            "--object",
            f"iothread,id=iothread0,poll-max-ns={IOTHREAD_POLL_MAX_NS}",
            "--blockdev",
            file_node,
            "--blockdev",
            fmt_node,
            "--export",
            export,
            "--chardev",
            f"socket,id=qmp0,fd={qmp_fd}",
            "--monitor",
            "chardev=qmp0,mode=control",  # last: its greeting means every export exists
        ]

    def _qmp_greeting(self) -> None:
        """Wait (bounded) for QMP's greeting, and enter command mode; a daemon that exits instead failed."""
        self._qmp.settimeout(TIMEOUT)
        try:
            line = self._qmp_line()
            if b'"QMP"' not in line:
                raise BackendError(f"qemu-storage-daemon: unexpected QMP greeting {line[:80]!r}")
            self._qmp.sendall(b'{"execute": "qmp_capabilities"}\n')
            answer = self._qmp_line()
            if b'"return"' not in answer:
                raise BackendError(f"qemu-storage-daemon: QMP refused capabilities: {answer[:200]!r}")
        except (OSError, BackendError) as err:
            status = self.wait(TIMEOUT)
            why = self.describe_end() if status is not None else f"did not come up ({err})"
            raise BackendError(
                f"qemu-storage-daemon for {self.image.path} {why}; its messages are in the VM's log"
            ) from err

    def _qmp_line(self) -> bytes:
        """The next line from the monitor; what one read brought beyond it waits for the next call."""
        while b"\n" not in self._qmp_buf:
            chunk = self._qmp.recv(4096)
            if not chunk:
                raise BackendError("qemu-storage-daemon closed its monitor")
            self._qmp_buf += chunk
            if len(self._qmp_buf) > 1 << 16:
                raise BackendError("qemu-storage-daemon: QMP line too long")
        line, _, rest = bytes(self._qmp_buf).partition(b"\n")
        self._qmp_buf = bytearray(rest)
        return line + b"\n"

    def qmp(self, command: str, **arguments: object) -> object:
        """One QMP command's return value. Events are skipped, and so is the late answer to a command
        that timed out before (each command carries an id QMP echoes). Bounded by QMP_TIMEOUT: the
        caller is the VMM's main loop (TimeoutError, an OSError, when the backend does not answer)."""
        with self._qmp_lock:
            self._qmp_id += 1
            msg: dict[str, object] = {"execute": command, "id": self._qmp_id}
            if arguments:
                msg["arguments"] = arguments
            self._qmp.settimeout(QMP_TIMEOUT)
            self._qmp.sendall(json.dumps(msg).encode() + b"\n")
            while True:
                answer = json.loads(self._qmp_line())
                if answer.get("id") != self._qmp_id:
                    continue  # an event, or the answer to a command given up on
                if "return" in answer:
                    return answer["return"]
                if "error" in answer:
                    raise QmpError(command, str(answer["error"].get("desc")))

    # -- supervision -------------------------------------------------------------------------------

    @property
    def pidfd(self) -> int:
        """Readable once the backend has ended (the reaper's pidfd; -1 where pidfd_open is missing)."""
        return self._pidfd

    @property
    def alive(self) -> bool:
        return self.poll() is None

    def poll(self) -> int | None:
        """The exit status once the backend has ended (reaped), else None."""
        if self._status is None and self._reaper > 0:
            try:
                pid, status = os.waitpid(self._reaper, os.WNOHANG)
            except ChildProcessError:
                self._status = -1
            else:
                if pid:
                    code = os.waitstatus_to_exitcode(status)
                    # The reaper exits with the backend's status, 128 + N when signal N killed it.
                    self._status = -(code - 128) if 128 < code < 160 else code
        return self._status

    def describe_end(self) -> str:
        status = self.poll()
        if status is None:
            return "is running"
        return f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"

    def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if self._pidfd >= 0:
                poller = select.poll()
                poller.register(self._pidfd, select.POLLIN)
                poller.poll(max(1, int(left * 1000)))  # readable once the process has ended
            else:
                time.sleep(min(left, 0.01))
        return self._status

    def stop(self, timeout: float = 5.0) -> None:
        """End the backend: QMP quit (it flushes), else the lifeline closed (the reaper SIGKILLs it); reaped
        either way. No signal is sent from here: a sandboxed VMM may not signal outside its domain."""
        # The vhost-user connection goes first, and quit waits until the backend is done with it: qsd 7.2 with
        # its export in an iothread deadlocks in quit if the iothread still has the connection to finish (its
        # main thread waits in vhost_user_server_stop holding the AioContext lock the iothread needs; seen
        # in gdb). Measured (benchmarks/blk_qsd_options.py): quit with a frontend connected never ended in
        # 10 s; with the socket just closed it hung in 3 of 80 stops at load 10-25; waiting for the backend's
        # EOF first, in 0 of 120 at load 7-10. The images are flushed by quit either way.
        self.frontend.hang_up(min(timeout, 2.0))  # a backend that does not answer is killed below anyway
        with contextlib.suppress(OSError, BackendError, ValueError):
            self._qmp.settimeout(1.0)
            self._qmp.sendall(b'{"execute": "quit"}\n')
        if self.wait(timeout) is None:
            log.warning("qemu-storage-daemon %d ignored quit; killing it", self.pid)
            self._close_lifeline()
            if self.wait(timeout) is None:
                log.error("qemu-storage-daemon %d (reaper %d) did not end", self.pid, self._reaper)
        self._close_lifeline()
        self.frontend.close()
        self._qmp.close()
        if self._pidfd >= 0 and self._status is not None:
            os.close(self._pidfd)
            self._pidfd = -1

    def _close_lifeline(self) -> None:
        if self._lifeline >= 0:
            fd, self._lifeline = self._lifeline, -1
            os.close(fd)
