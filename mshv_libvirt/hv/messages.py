"""Intercept messages (``struct hv_message``) as checked, typed values.

``VpFd.run()`` returns an :class:`HvMessage`. The payload is decoded once, according to
``message_type``; the ``as_*`` accessors raise :class:`MessageTypeError` instead of
reinterpreting a payload of another type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import _ffi
from .errors import MessageTypeError
from .regs import Segment

HVMSG_UNMAPPED_GPA = 0x80000000
HVMSG_GPA_INTERCEPT = 0x80000001
HVMSG_UNRECOVERABLE_EXCEPTION = 0x80000021
HVMSG_X64_IO_PORT_INTERCEPT = 0x80010000
HVMSG_X64_MSR_INTERCEPT = 0x80010001
HVMSG_X64_CPUID_INTERCEPT = 0x80010002
HVMSG_X64_EXCEPTION_INTERCEPT = 0x80010003
HVMSG_X64_APIC_EOI = 0x80010004
HVMSG_X64_HALT = 0x80010007

KINDS = {
    HVMSG_X64_IO_PORT_INTERCEPT: "io_port",
    HVMSG_UNMAPPED_GPA: "memory",
    HVMSG_GPA_INTERCEPT: "memory",
    HVMSG_X64_HALT: "halt",
    HVMSG_UNRECOVERABLE_EXCEPTION: "unrecoverable_exception",
    HVMSG_X64_APIC_EOI: "apic_eoi",
    HVMSG_X64_MSR_INTERCEPT: "msr",
    HVMSG_X64_CPUID_INTERCEPT: "cpuid",
    HVMSG_X64_EXCEPTION_INTERCEPT: "exception",
}


@dataclass(frozen=True)
class InterceptHeader:
    """``hv_x64_intercept_message_header``: where the VP stopped."""

    rip: int
    rflags: int
    instruction_length: int
    vp_index: int = 0
    access_type: int = 0  # 0 read, 1 write, 2 execute
    execution_state: int = 0
    cs: Segment | None = None
    cr8: int = 0


_Header = InterceptHeader  # short alias used by test message builders


@dataclass(frozen=True)
class IoPort:
    """HVMSG_X64_IO_PORT_INTERCEPT: complete with RIP = rip + instruction_length (and RAX for IN)."""

    port: int
    access_size: int
    is_write: bool
    rax: int
    instruction_length: int
    rip: int
    string_op: bool = False
    rep_prefix: bool = False
    instruction_bytes: bytes = b""


@dataclass(frozen=True)
class MemAccess:
    """HVMSG_UNMAPPED_GPA / HVMSG_GPA_INTERCEPT: the VMM emulates the instruction."""

    gpa: int
    instruction_bytes: bytes
    is_write: bool
    rip: int
    instruction_length: int
    gva: int = 0
    gpa_valid: bool = True


@dataclass(frozen=True)
class ApicEoi:
    vp_index: int
    interrupt_vector: int


@dataclass(frozen=True)
class Msr:
    msr: int
    is_write: bool
    rax: int
    rdx: int
    rip: int
    instruction_length: int


@dataclass(frozen=True)
class HvMessage:
    message_type: int
    kind: str
    _header: InterceptHeader | None = None
    _io: IoPort | None = None
    _mem: MemAccess | None = None
    _eoi: ApicEoi | None = None
    _msr: Msr | None = None
    raw: bytes = b""

    def _want(self, value: Any, what: str) -> Any:
        if value is None:
            raise MessageTypeError(f"message {self.message_type:#010x} ({self.kind}) is not {what}")
        return value

    def header(self) -> InterceptHeader:
        h: InterceptHeader = self._want(self._header, "an x86 intercept")
        return h

    def as_io_port(self) -> IoPort:
        v: IoPort = self._want(self._io, "an IO-port intercept")
        return v

    def as_memory(self) -> MemAccess:
        v: MemAccess = self._want(self._mem, "a memory intercept")
        return v

    def as_apic_eoi(self) -> ApicEoi:
        v: ApicEoi = self._want(self._eoi, "an APIC EOI")
        return v

    def as_msr(self) -> Msr:
        v: Msr = self._want(self._msr, "an MSR intercept")
        return v

    @classmethod
    def from_bytes(cls, raw: bytes) -> HvMessage:
        if len(raw) != 256:
            raise ValueError(f"an hv_message is 256 bytes, got {len(raw)}")
        buf = _ffi.new("struct hv_message *")
        _ffi.memmove_to(_ffi.address(buf), raw)
        return cls._decode(buf, raw)

    @classmethod
    def _decode(cls, msg: Any, raw: bytes) -> HvMessage:
        mtype = int(msg.header.message_type)
        kind = KINDS.get(mtype, "other")
        payload = _ffi.address(msg.payload)
        if kind == "apic_eoi":
            e = _ffi.cast_ptr("struct hv_x64_apic_eoi_message *", payload)
            return cls(mtype, kind, None, _eoi=ApicEoi(int(e.vp_index), int(e.interrupt_vector)), raw=raw)
        if kind == "other":
            return cls(mtype, kind, raw=raw)
        h = _ffi.cast_ptr("struct hv_x64_intercept_message_header *", payload)
        cs = h.cs_segment
        header = InterceptHeader(
            rip=int(h.rip),
            rflags=int(h.rflags),
            instruction_length=int(h.instruction_length_cr8) & 0xF,
            vp_index=int(h.vp_index),
            access_type=int(h.intercept_access_type),
            execution_state=int(h.execution_state),
            cs=Segment(int(cs.base), int(cs.limit), int(cs.selector), int(cs.attributes)),
            cr8=int(h.instruction_length_cr8) >> 4,
        )
        if kind == "io_port":
            io = _ffi.cast_ptr("struct hv_x64_io_port_intercept_message *", payload)
            info = int(io.access_info)
            count = int(io.instruction_byte_count)
            return cls(
                mtype,
                kind,
                header,
                _io=IoPort(
                    port=int(io.port_number),
                    access_size=info & 0x7,
                    is_write=header.access_type == 1,
                    rax=int(io.rax),
                    instruction_length=header.instruction_length,
                    rip=header.rip,
                    string_op=bool(info & 0x8),
                    rep_prefix=bool(info & 0x10),
                    instruction_bytes=_ffi.buffer(io.instruction_bytes, min(count, 16)),
                ),
                raw=raw,
            )
        if kind == "memory":
            m = _ffi.cast_ptr("struct hv_x64_memory_intercept_message *", payload)
            count = int(m.instruction_byte_count)
            return cls(
                mtype,
                kind,
                header,
                _mem=MemAccess(
                    gpa=int(m.guest_physical_address),
                    instruction_bytes=_ffi.buffer(m.instruction_bytes, min(count, 16)),
                    is_write=header.access_type == 1,
                    rip=header.rip,
                    instruction_length=header.instruction_length,
                    gva=int(m.guest_virtual_address),
                    gpa_valid=bool(int(m.memory_access_info) & 0x2),
                ),
                raw=raw,
            )
        if kind == "msr":
            r = _ffi.cast_ptr("struct hv_x64_msr_intercept_message *", payload)
            return cls(
                mtype,
                kind,
                header,
                _msr=Msr(
                    int(r.msr_number),
                    header.access_type == 1,
                    int(r.rax),
                    int(r.rdx),
                    header.rip,
                    header.instruction_length,
                ),
                raw=raw,
            )
        return cls(mtype, kind, header, raw=raw)
