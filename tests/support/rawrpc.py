"""A bare-socket libvirt RPC client for tests that must send what no real client would."""

from __future__ import annotations

import contextlib
import fcntl
import socket
import struct
import termios
import time
from collections.abc import Iterator
from pathlib import Path

from mshv_libvirt.rpc.protocol import HEADER, REMOTE_PROGRAM
from mshv_libvirt.rpc.xdr import Packer, Unpacker
from tests.support.limits import HEADER_SIZE, STRING_MAX

PROC_OPEN, PROC_LOOKUP_BY_NAME, PROC_LIST_DOMAINS, PROC_LIST_DEFINED = 1, 23, 37, 21
PROC_GET_HOSTNAME, PROC_AUTH_LIST, PROC_DEFINE_XML = 59, 66, 11
CALL, REPLY, MESSAGE, STREAM = 0, 1, 2, 3
OK, ERROR = 0, 1


class ServerClosed(Exception):
    pass


class RawClient:
    """A bare-socket libvirt RPC client that can send anything, well-formed or not."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(str(path))
                break
            except BlockingIOError:  # the listen backlog is full for a moment: the daemon is busy accepting
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self.serial = 0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def unsent(self) -> int:
        """Bytes sent that the daemon has not read yet (SIOCOUTQ; 0 once it read all, or dropped us)."""
        buf = fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        return int(struct.unpack("i", buf)[0])

    def packet(
        self,
        proc: int,
        payload: bytes = b"",
        *,
        prog: int = REMOTE_PROGRAM,
        vers: int = 1,
        mtype: int = CALL,
        status: int = OK,
        serial: int | None = None,
    ) -> tuple[bytes, int]:
        if serial is None:
            serial = self.serial
            self.serial += 1
        return HEADER.pack(HEADER_SIZE + len(payload), prog, vers, proc, mtype, serial, status) + payload, serial

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def call(self, proc: int, payload: bytes = b"", **kw: int) -> int:
        data, serial = self.packet(proc, payload, **kw)
        self.send(data)
        return serial

    def _exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ServerClosed
            buf += chunk
        return bytes(buf)

    def recv(self) -> tuple[tuple[int, ...], bytes]:
        """(header fields, payload) of the next packet; ServerClosed on EOF."""
        try:
            head = self._exact(HEADER_SIZE)
        except ConnectionResetError as err:
            raise ServerClosed from err
        fields = HEADER.unpack(head)
        return fields, self._exact(fields[0] - HEADER_SIZE)

    def reply(self, serial: int) -> tuple[int, bytes]:
        """(status, payload) of the reply to ``serial`` (events in between are skipped)."""
        while True:
            fields, payload = self.recv()
            if fields[4] == REPLY and fields[5] == serial:
                return fields[6], payload

    def roundtrip(self, proc: int, payload: bytes = b"") -> tuple[int, bytes]:
        return self.reply(self.call(proc, payload))

    def handshake(self) -> None:
        status, _ = self.roundtrip(PROC_AUTH_LIST)
        assert status == OK
        p = Packer()
        p.opt_string("mshv:///system")
        p.uint(0)
        status, _ = self.roundtrip(PROC_OPEN, p.getvalue())
        assert status == OK

    def closed_by_server(self, timeout: float = 10.0) -> bool:
        """True when the server closes the connection (reading and dropping anything before EOF)."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(1 << 16):
                pass
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        return True


def error_message(payload: bytes) -> tuple[int, str]:
    u = Unpacker(payload)
    code = u.int()
    u.int()
    return code, u.opt_string(STRING_MAX) or ""


def hostname_ok(c: RawClient) -> bool:
    status, payload = c.roundtrip(PROC_GET_HOSTNAME)
    return status == OK and Unpacker(payload).string(1024) == socket.gethostname()


@contextlib.contextmanager
def raw(path: Path, *, handshake: bool = True) -> Iterator[RawClient]:
    c = RawClient(path)
    try:
        if handshake:
            c.handshake()
        yield c
    finally:
        c.close()
