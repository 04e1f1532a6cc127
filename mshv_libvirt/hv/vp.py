"""``VpFd``: one virtual processor. Made only by ``PartitionFd.create_vp``."""

from __future__ import annotations

import errno
import struct
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from . import _ffi
from .errors import MshvError
from .ioctls import MSHV_GET_VP_STATE, MSHV_RUN_VP, MSHV_SET_VP_STATE
from .messages import HvMessage
from .regs import SEGMENT_REGS, TABLE_REGS, RegisterValue, Segment, TableRegister

if TYPE_CHECKING:
    from .partition import HvcallBuffers

HVCALL_GET_VP_REGISTERS = 0x0050
HVCALL_SET_VP_REGISTERS = 0x0051
# Bounded by in_sz/out_sz <= 4096: 16 + 4n input and 16n output; 16 + 32n input.
_GET_CHUNK = 256
_SET_CHUNK = 127


def _encode_value(name: int, value: RegisterValue) -> bytes:
    if isinstance(value, Segment):
        return struct.pack("<QIHH", value.base, value.limit, value.selector, value.attributes)
    if isinstance(value, TableRegister):
        return struct.pack("<HHHHQ", 0, 0, 0, value.limit, value.base)
    return struct.pack("<QQ", value & 0xFFFFFFFFFFFFFFFF, value >> 64)


def _decode_value(name: int, raw: bytes) -> RegisterValue:
    if name in SEGMENT_REGS:
        base, limit, selector, attributes = struct.unpack_from("<QIHH", raw)
        return Segment(base, limit, selector, attributes)
    if name in TABLE_REGS:
        _, _, _, limit, base = struct.unpack_from("<HHHHQ", raw)
        return TableRegister(base, limit)
    low, high = struct.unpack_from("<QQ", raw)
    return int(low | (high << 64))


class VpFd:
    """Owns one VP descriptor. ``run()`` blocks until the VP posts an intercept."""

    _fd = -1  # so __del__ is safe on an object whose constructor refused

    def __init__(self, fd: int, index: int, _token: object = None) -> None:
        if _token is not _PRIVATE:
            raise TypeError("VpFd is created by PartitionFd.create_vp()")
        self._fd = fd
        self.index = index
        # SAFETY: the 256-byte message buffer is reused by run(); callers get decoded copies.
        self._run_buf = _ffi.new("struct mshv_run_vp *")
        self._bufs: HvcallBuffers | None = None
        self._bufs_lock = threading.Lock()

    @classmethod
    def _from_fd(cls, fd: int, index: int) -> VpFd:
        return cls(fd, index, _PRIVATE)

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("VpFd is closed")
        return self._fd

    def run(self) -> HvMessage:
        """MSHV_RUN_VP; raises InterruptedError when a signal kicked the VP out."""
        _, err = _ffi.ioctl(self.fileno(), MSHV_RUN_VP, self._run_buf)
        if err == errno.EINTR:
            raise InterruptedError(errno.EINTR, "MSHV_RUN_VP interrupted")
        if err:
            raise MshvError(err, "MSHV_RUN_VP")
        return self.last_message()

    @property
    def run_buffer_address(self) -> int:
        """Where the ``struct mshv_run_vp`` RUN_VP fills lives: the VMM's compiled run loop runs into
        it too (it lives as long as this object)."""
        return _ffi.address(self._run_buf)

    def last_message(self) -> HvMessage:
        """The message the last RUN_VP into :attr:`run_buffer_address` left there, decoded."""
        raw = _ffi.buffer(self._run_buf.msg_buf, 256)
        return HvMessage._decode(_ffi.cast_ptr("struct hv_message *", _ffi.address(self._run_buf)), raw)

    def _hvcall(self, code: int, data: bytes, out_size: int, reps: int) -> bytes:
        from .partition import HvcallBuffers, hvcall  # local: partition imports this module

        # The VP thread's own calls reuse this VP's buffers; a second thread meanwhile gets fresh ones.
        if not self._bufs_lock.acquire(blocking=False):
            return hvcall(self.fileno(), code, data, out_size, reps).output
        try:
            if self._bufs is None:
                self._bufs = HvcallBuffers()
            return hvcall(self.fileno(), code, data, out_size, reps, self._bufs).output
        finally:
            self._bufs_lock.release()

    def get_registers(self, names: Sequence[int]) -> list[RegisterValue]:
        values: list[RegisterValue] = []
        for start in range(0, len(names), _GET_CHUNK):
            chunk = list(names[start : start + _GET_CHUNK])
            data = struct.pack("<QIBBH", 0, self.index, 0, 0, 0) + struct.pack(f"<{len(chunk)}I", *chunk)
            out = self._hvcall(HVCALL_GET_VP_REGISTERS, data, 16 * len(chunk), len(chunk))
            values += [_decode_value(n, out[16 * i : 16 * i + 16]) for i, n in enumerate(chunk)]
        return values

    def set_registers(self, values: Mapping[int, RegisterValue]) -> None:
        items = list(values.items())
        for start in range(0, len(items), _SET_CHUNK):
            chunk = items[start : start + _SET_CHUNK]
            data = struct.pack("<QIBBH", 0, self.index, 0, 0, 0)
            for name, value in chunk:
                # hv_register_assoc: name, reserved1 (0), reserved2 (0), 16-byte value.
                data += struct.pack("<IIQ", int(name), 0, 0) + _encode_value(name, value)
            self._hvcall(HVCALL_SET_VP_REGISTERS, data, 0, len(chunk))

    def _state(self, request: int, name: str, kind: int, data: bytes | None, size: int) -> bytes:
        buf_size = max(4096, (size + 4095) // 4096 * 4096)
        # SAFETY: the kernel pins whole pages at buf_ptr, which must be 4 KiB aligned: use our
        # page allocator, never a cffi array. rsvd[3] stays zero (MBZ).
        pages = _ffi.alloc_pages(buf_size)
        try:
            if data is not None:
                _ffi.memmove_to(_ffi.address(pages), data)
            arg = _ffi.new(
                "struct mshv_get_set_vp_state *",
                {"type": kind, "buf_sz": buf_size, "buf_ptr": _ffi.address(pages)},
            )
            _, err = _ffi.ioctl(self.fileno(), request, arg)
            if err:
                raise MshvError(err, name, f"state type {kind}, kernel needs {int(arg.buf_sz)} bytes")
            return _ffi.memmove_from(_ffi.address(pages), min(int(arg.buf_sz), buf_size))
        finally:
            _ffi.free_pages(pages, buf_size)

    def get_state(self, kind: int, size: int = 4096) -> bytes:
        return self._state(MSHV_GET_VP_STATE, "MSHV_GET_VP_STATE", kind, None, size)

    def set_state(self, kind: int, data: bytes) -> None:
        self._state(MSHV_SET_VP_STATE, "MSHV_SET_VP_STATE", kind, data, len(data))

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            _ffi.close(fd)

    def __enter__(self) -> VpFd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


_PRIVATE = object()
