"""Linux x86 boot protocol (Documentation/x86/boot.rst), 64-bit entry.

We never run the real-mode setup code: the VMM fills ``boot_params`` (the "zero page") itself and
enters the kernel in long mode with paging on, RSI pointing at ``boot_params``. Two entry points
are supported, both reached with the same register state:

* the bzImage's own 64-bit entry, ``code32_start + 0x200`` of the protected-mode part, which runs
  the in-kernel decompressor first;
* host-side decompression: the setup header records where the compressed payload is
  (``payload_offset``/``payload_length``); when it is an ELF ``vmlinux`` compressed with a format
  the standard library reads, we decompress it here and load its PT_LOAD segments at their
  physical addresses, entering at ``e_entry`` (the kernel's ``startup_64``, the very code the
  decompressor jumps to). On hosts where supervisor-mode guest code is emulated (kvm-pvm) the
  in-guest decompressor alone takes minutes; the host does the same work in about a second.

All functions are pure: they turn bytes into a :class:`KernelImage` and a 4 KiB ``boot_params``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from . import layout

SETUP_HEADER_OFFSET = 0x1F1
BOOT_FLAG = 0xAA55
HDRS_MAGIC = b"HdrS"
MIN_PROTOCOL = 0x020C  # 2.12: xloadflags (XLF_KERNEL_64) exists
XLF_KERNEL_64 = 1 << 0
LOADED_HIGH = 1 << 0
TYPE_OF_LOADER_UNDEFINED = 0xFF
ENTRY_64_OFFSET = 0x200
E820_MAX_ENTRIES = 128

# boot_params field offsets (arch/x86/include/uapi/asm/bootparam.h layout, documented in boot.rst).
BP_ACPI_RSDP_ADDR = 0x070
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_TYPE_OF_LOADER = 0x210
BP_RAMDISK_IMAGE = 0x218
BP_RAMDISK_SIZE = 0x21C
BP_CMD_LINE_PTR = 0x228
BP_E820_TABLE = 0x2D0


class LoaderError(Exception):
    """The kernel or initrd cannot be loaded (the message says why)."""


class E820Type(IntEnum):
    RAM = 1
    RESERVED = 2
    ACPI = 3


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: E820Type


@dataclass(frozen=True)
class SetupHeader:
    """The fields of the bzImage setup header the loader acts on, plus its raw bytes."""

    setup_sects: int
    version: int
    loadflags: int
    xloadflags: int
    initrd_addr_max: int
    cmdline_size: int
    init_size: int
    pref_address: int
    payload_offset: int
    payload_length: int
    raw: bytes  # 0x1f1 .. end of header, copied verbatim into boot_params

    @property
    def protected_mode_offset(self) -> int:
        return (self.setup_sects + 1) * 512


@dataclass(frozen=True)
class Segment:
    """One piece of the kernel to copy into guest memory."""

    gpa: int
    data: bytes
    mem_size: int  # >= len(data); the tail is zero-filled (ELF .bss)


@dataclass(frozen=True)
class KernelImage:
    header: SetupHeader
    segments: tuple[Segment, ...]
    entry: int
    host_decompressed: bool
    end: int  # first byte the kernel will not claim while booting (initrd must start above)
    payload_cached: bool = False  # the decompressed payload came from the daemon's cache


def parse_setup_header(image: bytes) -> SetupHeader:
    """Validate a bzImage and read its setup header (boot protocol >= 2.12 with a 64-bit entry)."""
    if len(image) < 0x400:
        raise LoaderError("kernel image is too small to be a bzImage")
    (boot_flag,) = struct.unpack_from("<H", image, 0x1FE)
    if boot_flag != BOOT_FLAG or image[0x202:0x206] != HDRS_MAGIC:
        raise LoaderError("kernel image has no Linux setup header (boot_flag 0xAA55 and 'HdrS' missing)")
    (version,) = struct.unpack_from("<H", image, 0x206)
    if version < MIN_PROTOCOL:
        raise LoaderError(f"boot protocol {version >> 8}.{version & 0xFF} is too old (2.12 or later needed)")
    setup_sects = image[0x1F1] or 4  # boot.rst: 0 means 4
    loadflags = image[0x211]
    (initrd_addr_max,) = struct.unpack_from("<I", image, 0x22C)
    (xloadflags,) = struct.unpack_from("<H", image, 0x236)
    (cmdline_size,) = struct.unpack_from("<I", image, 0x238)
    payload_offset, payload_length = struct.unpack_from("<II", image, 0x248)
    (pref_address,) = struct.unpack_from("<Q", image, 0x258)
    (init_size,) = struct.unpack_from("<I", image, 0x260)
    if not xloadflags & XLF_KERNEL_64:
        raise LoaderError("kernel has no 64-bit entry point (XLF_KERNEL_64 is clear)")
    if not loadflags & LOADED_HIGH:
        raise LoaderError("kernel is not a bzImage (LOADED_HIGH is clear)")
    header_end = 0x202 + image[0x201]
    if (setup_sects + 1) * 512 >= len(image):
        raise LoaderError("kernel image is truncated (no protected-mode part)")
    return SetupHeader(
        setup_sects=setup_sects,
        version=version,
        loadflags=loadflags,
        xloadflags=xloadflags,
        initrd_addr_max=initrd_addr_max,
        cmdline_size=cmdline_size,
        init_size=init_size,
        pref_address=pref_address,
        payload_offset=payload_offset,
        payload_length=payload_length,
        raw=bytes(image[SETUP_HEADER_OFFSET:header_end]),
    )


def _decompress(payload: bytes) -> bytes | None:
    """Decompress a kernel payload if the standard library knows its format, else None.

    Each decompressor is imported when a payload needs it: a VMM whose kernel is not compressed (or
    is decompressed by the guest) never loads them."""
    corrupt: tuple[type[Exception], ...] = (OSError, EOFError)  # and the format's own error, once imported
    try:
        if payload.startswith(b"\xfd7zXZ\x00") or payload.startswith(b"\x5d\x00\x00"):
            import lzma

            corrupt += (lzma.LZMAError,)
            fmt = lzma.FORMAT_XZ if payload.startswith(b"\xfd") else lzma.FORMAT_ALONE
            return lzma.LZMADecompressor(format=fmt).decompress(payload)
        if payload.startswith(b"\x1f\x8b"):
            import zlib

            corrupt += (zlib.error,)
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
        if payload.startswith(b"BZh"):
            import bz2

            return bz2.BZ2Decompressor().decompress(payload)
    except corrupt:
        return None
    return None  # zstd, lz4, lzo: leave it to the in-kernel decompressor


def parse_elf_segments(elf: bytes | memoryview) -> tuple[int, tuple[Segment, ...]] | None:
    """(entry, PT_LOAD segments at their physical addresses) of an x86-64 ELF, or None if not one."""
    if len(elf) < 64 or elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        return None
    (e_machine,) = struct.unpack_from("<H", elf, 18)
    if e_machine != 62:  # EM_X86_64
        return None
    (e_entry,) = struct.unpack_from("<Q", elf, 24)
    (e_phoff,) = struct.unpack_from("<Q", elf, 32)
    e_phentsize, e_phnum = struct.unpack_from("<HH", elf, 54)
    segments = []
    for i in range(e_phnum):
        base = e_phoff + i * e_phentsize
        if base + 56 > len(elf):
            return None
        p_type, _flags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz = struct.unpack_from("<IIQQQQQ", elf, base)
        if p_type != 1:  # PT_LOAD
            continue
        if p_offset + p_filesz > len(elf) or p_memsz < p_filesz:
            return None
        segments.append(Segment(p_paddr, bytes(elf[p_offset : p_offset + p_filesz]), p_memsz))
    if not segments or not any(s.gpa <= e_entry < s.gpa + s.mem_size for s in segments):
        return None
    return e_entry, tuple(segments)


# A cached payload (driver/kernel_cache.py): this line, the SHA-256 of the compressed payload it was made
# from, then the decompressed ELF. The digest, not the cache's file name, ties it to an image.
PAYLOAD_CACHE_MAGIC = b"mshv-libvirt decompressed kernel payload 1\n"


def _compressed(image: bytes, header: SetupHeader) -> bytes:
    start = header.protected_mode_offset + header.payload_offset
    return bytes(image[start : start + header.payload_length])


def cached_payload(image: bytes) -> bytes | None:
    """What the cache keeps of a bzImage: the magic line, the compressed payload's digest and the payload
    decompressed, when it is an x86-64 ELF the host can load; else None."""
    import hashlib

    header = parse_setup_header(image)
    if not header.payload_length:
        return None
    compressed = _compressed(image, header)
    raw = _decompress(compressed)
    if raw is None or parse_elf_segments(raw) is None:
        return None
    return PAYLOAD_CACHE_MAGIC + hashlib.sha256(compressed).digest() + raw


def _from_cache(entry: bytes, compressed: bytes) -> tuple[int, tuple[Segment, ...]] | None:
    import hashlib

    n = len(PAYLOAD_CACHE_MAGIC)
    if entry[:n] != PAYLOAD_CACHE_MAGIC or entry[n : n + 32] != hashlib.sha256(compressed).digest():
        return None  # another image's, or not one at all: decompress instead
    return parse_elf_segments(memoryview(entry)[n + 32 :])


def load_kernel_image(image: bytes, *, host_decompress: bool = True, cached: bytes | None = None) -> KernelImage:
    """Decide what goes where: the protected-mode part at 1 MiB, or the decompressed vmlinux.

    ``cached``: what the daemon's cache holds for this image (:func:`cached_payload`), used instead of
    decompressing again when its digest is this image's payload's; ``KernelImage.payload_cached`` says so."""
    header = parse_setup_header(image)
    pm = header.protected_mode_offset
    if host_decompress and header.payload_length:
        compressed = _compressed(image, header)
        parsed = _from_cache(cached, compressed) if cached is not None else None
        hit = parsed is not None
        if parsed is None:
            raw = _decompress(compressed)
            parsed = parse_elf_segments(raw) if raw is not None else None
        if parsed is not None:
            entry, segments = parsed
            if min(s.gpa for s in segments) < layout.KERNEL_LOAD_ADDR:
                raise LoaderError("decompressed kernel wants to load below 1 MiB")
            end = max(s.gpa + s.mem_size for s in segments)
            return KernelImage(header, segments, entry, host_decompressed=True, end=end, payload_cached=hit)
    body = bytes(image[pm:])
    # The decompressor may move itself to pref_address and needs init_size bytes from there.
    end = max(
        layout.KERNEL_LOAD_ADDR + len(body),
        max(layout.KERNEL_LOAD_ADDR, header.pref_address) + header.init_size,
    )
    return KernelImage(
        header,
        (Segment(layout.KERNEL_LOAD_ADDR, body, len(body)),),
        layout.KERNEL_LOAD_ADDR + ENTRY_64_OFFSET,
        host_decompressed=False,
        end=end,
    )


def e820_map(ram: Sequence[layout.RamRange]) -> list[E820Entry]:
    """RAM minus the EBDA/ROM window below 1 MiB, where the ACPI tables live, and the PCI ECAM window
    reserved (Linux uses an MCFG region only when the firmware's memory map reserves it)."""
    entries = [
        E820Entry(0, layout.EBDA_START, E820Type.RAM),
        E820Entry(layout.EBDA_START, 0xA0000 - layout.EBDA_START, E820Type.RESERVED),
        E820Entry(layout.ACPI_START, layout.ACPI_END - layout.ACPI_START, E820Type.RESERVED),
    ]
    for r in ram:
        start = max(r.gpa, layout.KERNEL_LOAD_ADDR)
        if r.end > start:
            entries.append(E820Entry(start, r.end - start, E820Type.RAM))
    entries.append(E820Entry(layout.PCI_ECAM_ADDR, layout.PCI_ECAM_SIZE, E820Type.RESERVED))
    return sorted(entries, key=lambda e: e.addr)


def place_initrd(header: SetupHeader, ram: Sequence[layout.RamRange], size: int, kernel_end: int) -> int:
    """Highest page-aligned address for the initrd below both the RAM top and initrd_addr_max."""
    low = ram[0]
    top = min(low.end, header.initrd_addr_max + 1)
    addr = (top - size) & ~(layout.PAGE_SIZE - 1)
    if size <= 0 or addr < kernel_end:
        raise LoaderError(
            f"initrd of {size} bytes does not fit between the kernel (ends at {kernel_end:#x}) and {top:#x}"
        )
    return addr


def build_boot_params(
    header: SetupHeader,
    *,
    cmdline_addr: int,
    e820: Sequence[E820Entry],
    initrd: tuple[int, int] | None = None,
    rsdp_addr: int = 0,
) -> bytes:
    """The 4 KiB zero page: setup header copied from the image, loader-owned fields filled in."""
    if len(e820) > E820_MAX_ENTRIES:
        raise LoaderError("too many e820 entries")
    bp = bytearray(layout.PAGE_SIZE)
    bp[SETUP_HEADER_OFFSET : SETUP_HEADER_OFFSET + len(header.raw)] = header.raw
    bp[BP_TYPE_OF_LOADER] = TYPE_OF_LOADER_UNDEFINED
    struct.pack_into("<I", bp, BP_CMD_LINE_PTR, cmdline_addr & 0xFFFFFFFF)
    struct.pack_into("<I", bp, BP_EXT_CMD_LINE_PTR, cmdline_addr >> 32)
    if initrd is not None:
        addr, size = initrd
        struct.pack_into("<II", bp, BP_RAMDISK_IMAGE, addr & 0xFFFFFFFF, size & 0xFFFFFFFF)
        struct.pack_into("<II", bp, BP_EXT_RAMDISK_IMAGE, addr >> 32, size >> 32)
    if header.version >= 0x020E:  # acpi_rsdp_addr exists from 2.14
        struct.pack_into("<Q", bp, BP_ACPI_RSDP_ADDR, rsdp_addr)
    bp[BP_E820_ENTRIES] = len(e820)
    for i, e in enumerate(e820):
        struct.pack_into("<QQI", bp, BP_E820_TABLE + 20 * i, e.addr, e.size, int(e.type))
    return bytes(bp)


def encode_cmdline(header: SetupHeader, cmdline: str) -> bytes:
    """NUL-terminated command line, checked against the kernel's cmdline_size."""
    data = cmdline.encode()
    if b"\0" in data:
        raise LoaderError("kernel command line contains a NUL byte")
    limit = min(header.cmdline_size, layout.CMDLINE_MAX - 1)
    if len(data) > limit:
        raise LoaderError(f"kernel command line is {len(data)} bytes; this kernel accepts at most {limit}")
    return data + b"\0"
