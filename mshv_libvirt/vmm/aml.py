"""A small AML encoder: the few ACPI Machine Language terms and resource descriptors the DSDT uses.

Encodings are those of the ACPI 6.5 specification: chapter 20.2 (AML grammar: PkgLength, NameSeg,
NameString, integer constants, NameOp/ScopeOp/DeviceOp/BufferOp/PackageOp) and section 6.4 (resource
data types: I/O port, IRQ, end tag, Word/DWord/QWord address space descriptors). Every function returns
bytes; nothing is interpreted, so a term is exactly what its caller builds.
"""

from __future__ import annotations

import re
import struct

ZERO_OP = 0x00
ONE_OP = 0x01
ONES_OP = 0xFF
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
QWORD_PREFIX = 0x0E
NAME_OP = 0x08
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82  # after EXT_OP_PREFIX
ROOT_CHAR = 0x5C
PARENT_PREFIX = 0x5E
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F

_NAME_SEG = re.compile(r"[A-Z_][A-Z0-9_]{0,3}")
_EISA_ID = re.compile(r"[A-Z]{3}[0-9A-F]{4}")


def pkg_length(body_len: int) -> bytes:
    """The PkgLength of a package whose contents after the PkgLength are ``body_len`` bytes: it counts
    itself. One byte holds up to 63; otherwise bits 7-6 of the lead byte say how many bytes follow, its
    bits 3-0 are the low nibble and each following byte the next 8 bits (up to 2^28 - 1)."""
    if body_len + 1 < 0x40:
        return bytes([body_len + 1])
    for extra in (1, 2, 3):
        total = body_len + 1 + extra
        if total < 1 << (4 + 8 * extra):
            return bytes([(extra << 6) | (total & 0x0F)]) + (total >> 4).to_bytes(extra, "little")
    raise ValueError(f"AML package of {body_len} bytes is too long")


def name_seg(seg: str) -> bytes:
    """A 4-character NameSeg, padded with '_' as ASL does."""
    if not _NAME_SEG.fullmatch(seg):
        raise ValueError(f"{seg!r} is not an ACPI name segment")
    return seg.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """``\\_SB_.PCI0``, ``^FOO`` or ``PCI0``: prefixes, then one, two (DualNamePrefix) or more
    (MultiNamePrefix + count) segments."""
    prefix = b""
    while path[:1] in ("\\", "^"):
        prefix += bytes([ROOT_CHAR if path[0] == "\\" else PARENT_PREFIX])
        path = path[1:]
    segs = [name_seg(s) for s in path.split(".")] if path else []
    if not segs:
        return prefix + b"\x00"  # NullName
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segs)
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


def integer(value: int) -> bytes:
    """The shortest ComputationalData for ``value``: Zero/One/Ones ops, else Byte/Word/DWord/QWord."""
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    if value == (1 << 64) - 1:
        return bytes([ONES_OP])
    for prefix, fmt, bits in ((BYTE_PREFIX, "<B", 8), (WORD_PREFIX, "<H", 16), (DWORD_PREFIX, "<I", 32)):
        if 0 <= value < 1 << bits:
            return bytes([prefix]) + struct.pack(fmt, value)
    if 0 <= value < 1 << 64:
        return bytes([QWORD_PREFIX]) + struct.pack("<Q", value)
    raise ValueError(f"{value} does not fit an AML integer")


def eisa_id(text: str) -> bytes:
    """ASL's EisaId("PNP0A08"): three letters of 5 bits each (A = 1) then four hex digits, stored big
    endian in a DWord constant (so PNP0A08 is 41 D0 0A 08)."""
    if not _EISA_ID.fullmatch(text):
        raise ValueError(f"{text!r} is not an EISA id")
    letters = [ord(c) - 0x40 for c in text[:3]]
    value = (letters[0] << 26) | (letters[1] << 21) | (letters[2] << 16) | int(text[3:], 16)
    return bytes([DWORD_PREFIX]) + value.to_bytes(4, "big")


def name(seg: str, data: bytes) -> bytes:
    """Name (seg, data)."""
    return bytes([NAME_OP]) + name_string(seg) + data


def scope(path: str, *terms: bytes) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([SCOPE_OP]) + pkg_length(len(body)) + body


def device(seg: str, *terms: bytes) -> bytes:
    body = name_string(seg) + b"".join(terms)
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length(len(body)) + body


def package(*elements: bytes) -> bytes:
    body = bytes([len(elements)]) + b"".join(elements)
    return bytes([PACKAGE_OP]) + pkg_length(len(body)) + body


def buffer(data: bytes) -> bytes:
    body = integer(len(data)) + data
    return bytes([BUFFER_OP]) + pkg_length(len(body)) + body


# --- resource descriptors (ACPI 6.5 section 6.4) ---

# Address space descriptors: resource types and general flags (table 6.48 and following).
RESOURCE_MEMORY = 0
RESOURCE_IO = 1
RESOURCE_BUS = 2
FLAG_MAX_FIXED = 1 << 3  # _MAF
FLAG_MIN_FIXED = 1 << 2  # _MIF
# bit 1 clear: positive decode; bit 0 clear: a producer (the bridge hands this range to its children)
PRODUCER_FIXED = FLAG_MAX_FIXED | FLAG_MIN_FIXED
MEM_READ_WRITE = 1 << 0  # _RW
MEM_NON_CACHEABLE = 0 << 1  # _MEM
IO_ENTIRE_RANGE = 3  # _RNG: ISA and non-ISA ranges

_SMALL_IO = (0x08 << 3) | 7
_SMALL_IRQ = (0x04 << 3) | 2
_SMALL_END = (0x0F << 3) | 1
_LARGE_DWORD = 0x80 | 0x07
_LARGE_WORD = 0x80 | 0x08
_LARGE_QWORD = 0x80 | 0x0A


def io_port(minimum: int, maximum: int, alignment: int, length: int) -> bytes:
    """IO (Decode16, min, max, alignment, length)."""
    return struct.pack("<BBHHBB", _SMALL_IO, 1, minimum, maximum, alignment, length)


def irq_no_flags(*irqs: int) -> bytes:
    """IRQNoFlags () {irqs}: the two-byte form, meaning edge triggered, active high, exclusive."""
    mask = 0
    for irq in irqs:
        if not 0 <= irq < 16:
            raise ValueError(f"IRQ {irq} is not an ISA IRQ")
        mask |= 1 << irq
    return struct.pack("<BH", _SMALL_IRQ, mask)


def _address_space(tag: int, fmt: str, kind: int, type_flags: int, minimum: int, length: int) -> bytes:
    # granularity 0 with fixed min and max: a fixed-size, fixed-location range (table 6.44)
    body = struct.pack("<BBB" + fmt * 5, kind, PRODUCER_FIXED, type_flags, 0, minimum, minimum + length - 1, 0, length)
    return struct.pack("<BH", tag, len(body)) + body


def word_bus_number(first: int, last: int) -> bytes:
    """WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, first, last, 0, count)."""
    return _address_space(_LARGE_WORD, "H", RESOURCE_BUS, 0, first, last - first + 1)


def word_io(minimum: int, length: int) -> bytes:
    """WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0, min, max, 0, length)."""
    return _address_space(_LARGE_WORD, "H", RESOURCE_IO, IO_ENTIRE_RANGE, minimum, length)


def dword_memory(minimum: int, length: int) -> bytes:
    """DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite, ...)."""
    return _address_space(_LARGE_DWORD, "I", RESOURCE_MEMORY, MEM_READ_WRITE | MEM_NON_CACHEABLE, minimum, length)


def qword_memory(minimum: int, length: int) -> bytes:
    """QWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite, ...)."""
    return _address_space(_LARGE_QWORD, "Q", RESOURCE_MEMORY, MEM_READ_WRITE | MEM_NON_CACHEABLE, minimum, length)


def resource_template(*descriptors: bytes) -> bytes:
    """ResourceTemplate () {...}: a Buffer of the descriptors and an end tag. The end tag's checksum is
    0, which the specification defines as "treat as if the checksum succeeded" (iasl emits 0 too)."""
    return buffer(b"".join(descriptors) + bytes([_SMALL_END, 0]))
