"""A minimal 64-bit guest for the KVM-backed emulator tests.

Guest physical layout (2 MiB of RAM at GPA 0, identity-mapped 0-1 GiB and 3-4 GiB with 2 MiB
pages, so MMIO addresses like 0x10000000 and the LAPIC at 0xFEE00000 are reachable):

    0x00500  GDT: null, 64-bit code (0x08), data (0x10)
    0x01000  PML4, 0x2000 PDPT, 0x3000 PD for 0-1 GiB, 0x4000 PD for 3-4 GiB
    0x05000  IDT (256 x 16 bytes)
    0x08000  stack top of VP 0 (VP n: 0x8000 - n * 0x800)
    0x10000  code
    0x20000  data

Instructions are hand-assembled by the small helpers below (each returns bytes). Messages are
decoded here at the offsets of docs/ABI.md §7 and registers named as in §8.2 (tests/abi/facts.py),
not through the compiled module's declarations.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from mshv_libvirt._mshv import ffi

from tests.abi import facts as F

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

REG = F.REG
CODE64 = Seg(0, 0xFFFFFFFF, 0x08, F.ATTR_CODE64)
DATA64 = Seg(0, 0xFFFFFFFF, 0x10, F.ATTR_DATA)

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


# ---- messages (docs/ABI.md §7; offsets relative to the payload, which starts at byte 16) -------


def _seg(raw: bytes, off: int) -> Seg:
    return Seg(*struct.unpack_from("<QIHH", raw, off))


@dataclass(frozen=True)
class Header:
    """§7.3: the 40-byte intercept header."""

    vp_index: int
    instruction_length_cr8: int
    intercept_access_type: int
    execution_state: int
    cs_segment: Seg
    rip: int
    rflags: int

    @classmethod
    def parse(cls, p: bytes) -> Header:
        vp, ilen_cr8, access, state = struct.unpack_from("<IBBH", p, 0)
        rip, rflags = struct.unpack_from("<QQ", p, 24)
        return cls(vp, ilen_cr8, access, state, _seg(p, 8), rip, rflags)


@dataclass(frozen=True)
class IoPort:
    """§7.4 X64_IO_PORT_INTERCEPT."""

    header: Header
    port_number: int
    access_info: int
    instruction_byte_count: int
    rax: int
    instruction_bytes: bytes
    ds_segment: Seg
    es_segment: Seg
    rcx: int
    rsi: int
    rdi: int

    @classmethod
    def parse(cls, p: bytes) -> IoPort:
        port, info, count = struct.unpack_from("<HBB", p, 40)
        (rax,) = struct.unpack_from("<Q", p, 48)
        rcx, rsi, rdi = struct.unpack_from("<3Q", p, 104)
        return cls(Header.parse(p), port, info, count, rax, p[56:72], _seg(p, 72), _seg(p, 88), rcx, rsi, rdi)


@dataclass(frozen=True)
class Memory:
    """§7.4 UNMAPPED_GPA / GPA_INTERCEPT."""

    header: Header
    cache_type: int
    instruction_byte_count: int
    memory_access_info: int
    guest_virtual_address: int
    guest_physical_address: int
    instruction_bytes: bytes

    @classmethod
    def parse(cls, p: bytes) -> Memory:
        cache, count, info = struct.unpack_from("<IBB", p, 40)
        gva, gpa = struct.unpack_from("<QQ", p, 48)
        return cls(Header.parse(p), cache, count, info, gva, gpa, p[64:80])


@dataclass(frozen=True)
class ApicEoi:
    """§7.4 X64_APIC_EOI (no intercept header)."""

    vp_index: int
    interrupt_vector: int


class Msg:
    """A 256-byte hv_message as RUN_VP returned it."""

    def __init__(self, raw: bytes) -> None:
        assert len(raw) == F.HV_MESSAGE_SIZE
        self.raw = raw
        self.type, self.payload_size = struct.unpack_from("<IB", raw, 0)
        self.payload = raw[F.PAYLOAD :]

    @property
    def header(self) -> Header:
        return Header.parse(self.payload)

    @property
    def io(self) -> IoPort:
        return IoPort.parse(self.payload)

    @property
    def mem(self) -> Memory:
        return Memory.parse(self.payload)

    @property
    def eoi(self) -> ApicEoi:
        return ApicEoi(*struct.unpack_from("<II", self.payload, 0))

    @property
    def length(self) -> int:
        return self.header.instruction_length_cr8 & 0xF


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
            REG["cr0"]: 0x80050033,
            REG["cr3"]: 0x1000,
            REG["cr4"]: 0x20,
            REG["efer"]: 0x500,
            REG["cs"]: CODE64,
            REG["ds"]: DATA64,
            REG["es"]: DATA64,
            REG["ss"]: DATA64,
            REG["fs"]: DATA64,
            REG["gs"]: DATA64,
            REG["gdtr"]: Table(0x500, 23),
            REG["idtr"]: Table(IDT, 0xFFF),
            REG["rflags"]: 2,
            REG["rsp"]: 0x8000 - 0x800 * index,
            REG["rip"]: rip,
        }
        regs.update({REG[k]: v for k, v in extra.items()})
        h = set_regs(self.vps[index], index, regs)
        assert (h.rc, h.status) == (0, 0), (h.rc, h.status)

    def run(self, index: int = 0) -> Msg:
        arg = ffi.new("char[]", F.RUN_VP_BUF_SZ)
        r = ioctl(self.vps[index], F.MSHV_RUN_VP, arg)
        if r < 0:
            raise RunError(-r)
        return Msg(bytes(ffi.buffer(arg, F.RUN_VP_BUF_SZ)))

    def regs(self, index: int, *names: int) -> list[int]:
        return get_regs(self.vps[index], index, list(names))

    def set(self, index: int = 0, **regs: int) -> None:
        h = set_regs(self.vps[index], index, {REG[k]: v for k, v in regs.items()})
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
