"""Decoder for the MOV forms guests use on MMIO registers, so an unmapped-GPA intercept can be completed.

The hypervisor reports the faulting GPA and the instruction bytes; it does not say which register is
involved or how wide the access is. Linux touches the IOAPIC through ``readl``/``writel`` (``8B``/``89``),
and byte/word variants or immediates appear elsewhere, so we decode exactly these (32/64-bit code,
legacy prefixes 66/67/segment, REX):

    88 /r  MOV r/m8, r8        8A /r  MOV r8, r/m8        C6 /0 ib  MOV r/m8, imm8
    89 /r  MOV r/m, r          8B /r  MOV r, r/m          C7 /0 iz  MOV r/m, imm16/32 (sign-extended)
    0F B6 /r  MOVZX r, r/m8    0F B7 /r  MOVZX r, r/m16

Anything else raises :class:`DecodeError` -- the VMM reports it instead of guessing.
"""

from __future__ import annotations

from dataclasses import dataclass

SEGMENT_PREFIXES = frozenset({0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65})
OPSIZE_PREFIX = 0x66
ADDRSIZE_PREFIX = 0x67


class DecodeError(ValueError):
    """The instruction that touched MMIO is not one of the supported MOV forms."""


@dataclass(frozen=True)
class MmioInstruction:
    length: int
    size: int  # bytes moved to/from the device
    is_write: bool
    reg: int | None = None  # GPR number 0..15 (destination of a load, source of a store)
    high_byte: bool = False  # AH/CH/DH/BH: bits 8-15 of GPR reg
    immediate: int | None = None  # store of an immediate
    dest_size: int = 0  # loads: width written to the register (zero-extended from ``size``)

    def store_value(self, reg_value: int) -> int:
        """The bytes a store sends to the device, given the source register's value."""
        if self.immediate is not None:
            return self.immediate & _mask(self.size)
        if self.high_byte:
            return (reg_value >> 8) & 0xFF
        return reg_value & _mask(self.size)

    def load_result(self, old_value: int, data: int) -> int:
        """New value of the destination register after loading ``data`` from the device."""
        data &= _mask(self.size)
        if self.high_byte:
            return (old_value & ~0xFF00) | (data << 8)
        if self.dest_size == 4:
            return data  # 32-bit destinations zero-extend to 64 bits
        if self.dest_size == 8:
            return data
        keep = ~_mask(self.dest_size) & 0xFFFFFFFFFFFFFFFF
        return (old_value & keep) | data


def _mask(size: int) -> int:
    return (1 << (8 * size)) - 1


def _modrm_length(code: bytes, pos: int) -> tuple[int, int, int]:
    """(mod, reg, bytes taken by ModRM+SIB+displacement) for the ModRM byte at ``pos``."""
    if pos >= len(code):
        raise DecodeError("instruction bytes end before the ModRM byte")
    modrm = code[pos]
    mod, reg, rm = modrm >> 6, (modrm >> 3) & 7, modrm & 7
    if mod == 3:
        raise DecodeError("register operand cannot be an MMIO access")
    n = 1
    if rm == 4:
        if pos + 1 >= len(code):
            raise DecodeError("instruction bytes end before the SIB byte")
        sib_base = code[pos + 1] & 7
        n += 1
        if mod == 0 and sib_base == 5:
            n += 4
    elif mod == 0 and rm == 5:
        n += 4  # RIP-relative (64-bit) or absolute disp32 (32-bit)
    if mod == 1:
        n += 1
    elif mod == 2:
        n += 4
    return mod, reg, n


def decode(code: bytes) -> MmioInstruction:
    pos = 0
    opsize16 = False
    while pos < len(code) and (code[pos] in SEGMENT_PREFIXES or code[pos] in (OPSIZE_PREFIX, ADDRSIZE_PREFIX)):
        opsize16 |= code[pos] == OPSIZE_PREFIX
        pos += 1
    rex = 0
    if pos < len(code) and 0x40 <= code[pos] <= 0x4F:
        rex = code[pos]
        pos += 1
    if pos >= len(code):
        raise DecodeError("instruction bytes end before the opcode")
    rex_w, rex_r = bool(rex & 8), bool(rex & 4)
    opsize = 8 if rex_w else 2 if opsize16 else 4
    op = code[pos]
    pos += 1

    def reg8(reg: int) -> tuple[int, bool]:
        # Without REX, 8-bit registers 4-7 are AH, CH, DH, BH.
        if not rex and reg >= 4:
            return reg - 4, True
        return reg | (8 if rex_r else 0), False

    if op == 0x0F:
        if pos >= len(code) or code[pos] not in (0xB6, 0xB7):
            raise DecodeError(f"unsupported MMIO instruction 0f {code[pos]:02x}" if pos < len(code) else "truncated")
        size = 1 if code[pos] == 0xB6 else 2
        pos += 1
        _, reg, n = _modrm_length(code, pos)
        return MmioInstruction(pos + n, size, False, reg | (8 if rex_r else 0), dest_size=opsize)
    if op in (0x88, 0x8A):
        _, reg, n = _modrm_length(code, pos)
        gpr, high = reg8(reg)
        return MmioInstruction(pos + n, 1, op == 0x88, gpr, high, dest_size=1)
    if op in (0x89, 0x8B):
        _, reg, n = _modrm_length(code, pos)
        return MmioInstruction(pos + n, opsize, op == 0x89, reg | (8 if rex_r else 0), dest_size=opsize)
    if op in (0xC6, 0xC7):
        _, reg, n = _modrm_length(code, pos)
        if reg != 0:
            raise DecodeError(f"unsupported MMIO instruction {op:02x} /{reg}")
        pos += n
        imm_size = 1 if op == 0xC6 else 2 if opsize == 2 else 4
        if pos + imm_size > len(code):
            raise DecodeError("instruction bytes end before the immediate")
        imm = int.from_bytes(code[pos : pos + imm_size], "little", signed=True)
        size = 1 if op == 0xC6 else opsize
        return MmioInstruction(pos + imm_size, size, True, immediate=imm & _mask(size))
    raise DecodeError(f"unsupported MMIO instruction opcode {op:02x}")
