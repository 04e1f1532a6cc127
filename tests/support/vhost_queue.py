"""A test-only virtio-blk driver of one split virtqueue laid out in guest RAM (a memfd-backed GuestMemory),
for driving a vhost-user-blk backend from a test: descriptors, available ring and buffers are written
through the memory, the kick is an eventfd write, completion is the call eventfd becoming readable."""

from __future__ import annotations

import contextlib
import os
import select
import struct

from mshv_libvirt.hv import GuestMemory

T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8
S_OK = 0
DESC_F_NEXT, DESC_F_WRITE = 1, 2
SECTOR = 512

DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
HEADER, STATUS, DATA = 0x4000, 0x4800, 0x10000


class BlkQueue:
    """One queue of ``size`` descriptors; one request in flight at a time."""

    def __init__(self, mem: GuestMemory, size: int = 16) -> None:
        self.mem = mem
        self.size = size
        self.avail_idx = 0
        self.used_idx = 0
        self.kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        mem.write(DESC, bytes(16 * size))
        mem.write(AVAIL, bytes(4 + 2 * size + 2))
        mem.write(USED, bytes(4 + 8 * size + 2))

    def close(self) -> None:
        os.close(self.kick)
        os.close(self.call)

    def drain_call(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.call)

    def _desc(self, n: int, gpa: int, length: int, flags: int, nxt: int) -> None:
        self.mem.write(DESC + 16 * n, struct.pack("<QIHH", gpa, length, flags, nxt))

    def request(self, kind: int, sector: int, data: bytes = b"", read_len: int = 0, timeout: float = 10.0) -> bytes:
        """Submit one request, kick, wait for the call eventfd; returns the status byte + what was read."""
        self.mem.write(HEADER, struct.pack("<IIQ", kind, 0, sector))
        self.mem.write(STATUS, b"\xff")
        n = 0
        self._desc(n, HEADER, 16, DESC_F_NEXT, n + 1)
        n += 1
        if data:
            self.mem.write(DATA, data)
            self._desc(n, DATA, len(data), DESC_F_NEXT, n + 1)
            n += 1
        if read_len:
            self.mem.write(DATA, bytes(read_len))
            self._desc(n, DATA, read_len, DESC_F_NEXT | DESC_F_WRITE, n + 1)
            n += 1
        self._desc(n, STATUS, 1, DESC_F_WRITE, 0)
        self.mem.write(AVAIL + 4 + 2 * (self.avail_idx % self.size), struct.pack("<H", 0))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(AVAIL + 2, struct.pack("<H", self.avail_idx))
        self.drain_call()  # libvhost-user signals a call fd once when it is set (lost-interrupt insurance)
        os.eventfd_write(self.kick, 1)
        ready, _, _ = select.select([self.call], [], [], timeout)
        assert ready, f"no completion within {timeout} s (call eventfd silent)"
        os.eventfd_read(self.call)
        (used,) = struct.unpack("<H", self.mem.read(USED + 2, 2))
        assert used == (self.used_idx + 1) & 0xFFFF, f"used index {used} after the call, expected {self.used_idx + 1}"
        self.used_idx = used
        return self.mem.read(STATUS, 1) + (self.mem.read(DATA, read_len) if read_len else b"")
