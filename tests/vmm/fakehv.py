"""Raw ``struct hv_message`` buffers for tests without a hypervisor, parsed by the real
``HvMessage.from_bytes`` so the VMM sees exactly what ``VpFd.run()`` would hand it.

Offsets from docs/ABI.md §7 (payload at byte 16; intercept header first).
"""

from __future__ import annotations

import struct

from mshv_libvirt.hv import HvMessage, Reg

GPRS = [Reg.RAX, Reg.RCX, Reg.RDX, Reg.RBX, Reg.RSP, Reg.RBP, Reg.RSI, Reg.RDI,
        Reg.R8, Reg.R9, Reg.R10, Reg.R11, Reg.R12, Reg.R13, Reg.R14, Reg.R15]  # fmt: skip

HVMSG_UNMAPPED_GPA = 0x80000000
HVMSG_UNRECOVERABLE_EXCEPTION = 0x80000021
HVMSG_X64_IO_PORT_INTERCEPT = 0x80010000
HVMSG_X64_HALT = 0x80010007
CODE64 = struct.pack("<QIHH", 0, 0xFFFFFFFF, 0x10, 0xA09B)


def _message(mtype: int, payload: bytes) -> HvMessage:
    raw = struct.pack("<IBBHQ", mtype, len(payload), 0, 0, 0) + payload
    return HvMessage.from_bytes(raw.ljust(256, b"\0"))


def _header(*, rip: int, rflags: int = 0x2, length: int = 0, access: int = 0) -> bytes:
    return struct.pack("<IBBH", 0, length & 0xF, access, 0) + CODE64 + struct.pack("<QQ", rip, rflags)


def io_message(
    port: int, size: int, is_write: bool, *, rax: int = 0, rip: int, length: int, string: bool = False
) -> HvMessage:
    info = size | (0x8 if string else 0)
    body = struct.pack("<HBBIQ", port, info, 0, 0, rax) + bytes(16) + bytes(32) + bytes(24)
    return _message(HVMSG_X64_IO_PORT_INTERCEPT, _header(rip=rip, length=length, access=int(is_write)) + body)


def mmio_message(gpa: int, code: bytes, *, rip: int, is_write: bool = False) -> HvMessage:
    body = struct.pack("<IBBBBQQ", 6, len(code), 0x2, 0, 0, 0, gpa) + code.ljust(16, b"\0")[:16]
    return _message(HVMSG_UNMAPPED_GPA, _header(rip=rip, access=int(is_write)) + body)


def halt_message(*, rflags: int) -> HvMessage:
    return _message(HVMSG_X64_HALT, _header(rip=0x1234, rflags=rflags, length=1, access=2))


def triple_fault_message(*, rip: int) -> HvMessage:
    return _message(HVMSG_UNRECOVERABLE_EXCEPTION, _header(rip=rip, access=2))
