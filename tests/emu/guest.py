"""A minimal 64-bit guest for the KVM-backed emulator tests.

Guest physical layout (2 MiB of RAM at GPA 0, identity-mapped 0-1 GiB and 3-4 GiB with 2 MiB
pages, so MMIO addresses like 0x10000000 and the LAPIC at 0xFEE00000 are reachable):

    0x00500  GDT: null, 64-bit code (0x08), data (0x10)
    0x01000  PML4, 0x2000 PDPT, 0x3000 PD for 0-1 GiB, 0x4000 PD for 3-4 GiB
    0x05000  IDT (256 x 16 bytes)
    0x08000  stack top of VP 0 (VP n: 0x8000 - n * 0x800)
    0x10000  code
    0x20000  data

Instructions are hand-assembled by the small helpers below (each returns bytes).
"""

from __future__ import annotations

import struct
from typing import Any

from mshv_libvirt._mshv import ffi, lib

from .emutil import (
    Mem,
    Seg,
    Table,
    close,
    create_partition,
    create_vp,
    get_regs,
    initialize,
    ioctl,
    open_dev,
    set_memory,
    set_regs,
)

RAM = 2 << 20
CODE = 0x10000
DATA = 0x20000
IDT = 0x5000
MMIO = 0x10000000

R = lib
CODE64 = Seg(0, 0xFFFFFFFF, 0x08, 0xA09B)
DATA64 = Seg(0, 0xFFFFFFFF, 0x10, 0xC093)

# ---- a few instruction encodings -------------------------------------------------------------


def mov_ebx(imm: int) -> bytes:
    return b"\xbb" + struct.pack("<I", imm)


def mov_eax(imm: int) -> bytes:
    return b"\xb8" + struct.pack("<I", imm)


def mov_dx(port: int) -> bytes:
    return b"\x66\xba" + struct.pack("<H", port)


def mov_al(imm: int) -> bytes:
    return b"\xb0" + bytes([imm])


OUT_DX_AL = b"\xee"
OUT_DX_AX = b"\x66\xef"
OUT_DX_EAX = b"\xef"
IN_AL_DX = b"\xec"
IN_EAX_DX = b"\xed"
HLT = b"\xf4"
CLI = b"\xfa"
STI = b"\xfb"
JMP_SELF = b"\xeb\xfe"
UD2 = b"\x0f\x0b"
IRETQ = b"\x48\xcf"


def out_imm(port: int) -> bytes:
    return b"\xe6" + bytes([port])


def idt_gate(handler: int) -> bytes:
    return struct.pack("<HHBBHIi", handler & 0xFFFF, 0x08, 0, 0x8E, (handler >> 16) & 0xFFFF, handler >> 32, 0)


# ---- messages --------------------------------------------------------------------------------


class Msg:
    """A decoded hv_message (via the ABI structs the emulator writes)."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._buf = ffi.new("char[]", raw)
        self.m = ffi.cast("struct hv_message *", self._buf)
        self.type = int(self.m.header.message_type)
        self.payload_size = int(self.m.header.payload_size)

    def as_(self, ctype: str) -> Any:
        return ffi.cast(ctype + " *", self.m.payload)

    @property
    def header(self) -> Any:
        return self.as_("struct hv_x64_intercept_message_header")

    @property
    def io(self) -> Any:
        return self.as_("struct hv_x64_io_port_intercept_message")

    @property
    def mem(self) -> Any:
        return self.as_("struct hv_x64_memory_intercept_message")

    @property
    def length(self) -> int:
        return int(self.header.instruction_length_cr8) & 0xF

    def bytes_(self, field: Any, count: int) -> bytes:
        return bytes(ffi.buffer(field, count))


class RunError(Exception):
    def __init__(self, err: int) -> None:
        super().__init__(err)
        self.errno = err


class Guest:
    def __init__(self, nvps: int = 1, flags: int = 0x7) -> None:
        self.dev = open_dev()
        self.pt = create_partition(self.dev, flags)
        assert self.pt >= 0 and initialize(self.pt) == 0
        self.ram = Mem(RAM)
        assert set_memory(self.pt, RAM, 0, self.ram.addr) == 0
        self.vps = [create_vp(self.pt, i) for i in range(nvps)]
        assert all(v >= 0 for v in self.vps)
        self._tables()

    def _tables(self) -> None:
        w = self.ram.write
        w(0x500, struct.pack("<3Q", 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF))
        w(0x1000, struct.pack("<Q", 0x2003))
        w(0x2000, struct.pack("<4Q", 0x3003, 0, 0, 0x4003))
        w(0x3000, b"".join(struct.pack("<Q", (i << 21) | 0x83) for i in range(512)))
        w(0x4000, b"".join(struct.pack("<Q", (3 << 30) + (i << 21) | 0x83) for i in range(512)))

    def load(self, gpa: int, code: bytes) -> int:
        self.ram.write(gpa, code)
        return gpa

    def set_gate(self, vector: int, handler: int) -> None:
        self.ram.write(IDT + 16 * vector, idt_gate(handler))

    def long_mode(self, index: int = 0, rip: int = CODE, **extra: Any) -> None:
        regs: dict[int, Any] = {
            R.HV_X64_REGISTER_CR0: 0x80050033,
            R.HV_X64_REGISTER_CR3: 0x1000,
            R.HV_X64_REGISTER_CR4: 0x20,
            R.HV_X64_REGISTER_EFER: 0x500,
            R.HV_X64_REGISTER_CS: CODE64,
            R.HV_X64_REGISTER_DS: DATA64,
            R.HV_X64_REGISTER_ES: DATA64,
            R.HV_X64_REGISTER_SS: DATA64,
            R.HV_X64_REGISTER_FS: DATA64,
            R.HV_X64_REGISTER_GS: DATA64,
            R.HV_X64_REGISTER_GDTR: Table(0x500, 23),
            R.HV_X64_REGISTER_IDTR: Table(IDT, 0xFFF),
            R.HV_X64_REGISTER_RFLAGS: 2,
            R.HV_X64_REGISTER_RSP: 0x8000 - 0x800 * index,
            R.HV_X64_REGISTER_RIP: rip,
        }
        regs.update({getattr(R, "HV_X64_REGISTER_" + k.upper()): v for k, v in extra.items()})
        h = set_regs(self.vps[index], index, regs)
        assert (h.rc, h.status) == (0, 0), (h.rc, h.status)

    def run(self, index: int = 0) -> Msg:
        arg = ffi.new("struct mshv_run_vp *")
        r = ioctl(self.vps[index], lib.MSHV_RUN_VP, arg)
        if r < 0:
            raise RunError(-r)
        return Msg(bytes(ffi.buffer(arg, 256)))

    def regs(self, index: int, *names: int) -> list[int]:
        return get_regs(self.vps[index], index, list(names))

    def set(self, index: int = 0, **regs: int) -> None:
        h = set_regs(self.vps[index], index, {getattr(R, "HV_X64_REGISTER_" + k.upper()): v for k, v in regs.items()})
        assert (h.rc, h.status) == (0, 0)

    def complete(self, msg: Msg, index: int = 0, **regs: int) -> None:
        """Finish an intercepted instruction the way a VMM does: RIP past it (+ registers)."""
        self.set(index, rip=int(msg.header.rip) + msg.length, **regs)

    def close(self) -> None:
        for v in self.vps:
            close(v)
        close(self.pt)
        close(self.dev)
        self.ram.close()
