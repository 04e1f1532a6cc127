"""Raw access to the emulated /dev/mshv (abi/emu) for the tests in this directory.

Everything goes through the compiled module's ``mshv_dev_*`` entry points with hand-built
argument structs, so the tests see exactly what a caller of ioctl(2) would: a return value and
an errno. Memory with known properties (mapped, read-only, holes) comes from libc's mmap.

ioctl numbers, hypercall codes and struct layouts are docs/ABI.md's (§2.3, §3.1, §6.1), taken from
tests/abi/facts.py and struct formats written here: never from the compiled module's declarations,
so a wrong number or layout there fails these tests instead of agreeing with itself.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from mshv_libvirt._mshv import ffi, lib

from tests.abi import facts as F

PAGE = F.PAGE
KERNEL_ADDR = 0xFFFF_8000_0000_0000  # above TASK_SIZE_MAX: access_ok() fails (docs/ABI.md §4.4)
EMU_MODE = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

RW = mmap.PROT_READ | mmap.PROT_WRITE


# ---- memory ---------------------------------------------------------------------------------


def map_pages(npages: int, prot: int = RW) -> int:
    addr = _libc.mmap(None, npages * PAGE, prot, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS, -1, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap")
    return int(addr)


def unmap(addr: int, size: int) -> None:
    _libc.munmap(addr, size)


def protect(addr: int, size: int, prot: int) -> None:
    if _libc.mprotect(addr, size, prot) != 0:
        raise OSError(ctypes.get_errno(), "mprotect")


def unmapped_addr() -> int:
    """A page-aligned user address with no mapping, now or later.

    Below vm.mmap_min_addr nothing gets mapped by accident, unlike a page we just unmapped
    (a later thread stack or buffer may land there, and writes through it would corrupt it)."""
    return 0x4000


def poke(addr: int, data: bytes) -> None:
    ctypes.memmove(addr, bytes(data), len(data))


def peek(addr: int, size: int) -> bytes:
    return ctypes.string_at(addr, size)


class Mem:
    """Anonymous shared pages at a known address; freed with close()."""

    def __init__(self, size: int, prot: int = RW) -> None:
        self.size = size
        self.addr = map_pages((size + PAGE - 1) // PAGE, prot)

    def write(self, off: int, data: bytes) -> None:
        poke(self.addr + off, data)

    def read(self, off: int, size: int) -> bytes:
        return peek(self.addr + off, size)

    def close(self) -> None:
        if self.addr:
            unmap(self.addr, self.size)
            self.addr = 0


def tail_of_page(data: bytes) -> tuple[int, int]:
    """``data`` placed so it ends exactly where a page ends and an unmapped page begins.

    Returns (address of data, base to unmap with 2 pages)."""
    base = map_pages(2)
    unmap(base + PAGE, PAGE)
    addr = base + PAGE - len(data)
    poke(addr, data)
    return addr, base


# ---- calls ----------------------------------------------------------------------------------


def ioctl(fd: int, request: int, arg: Any = None) -> int:
    """The result, or -errno."""
    if arg is None:
        arg = ffi.NULL
    elif isinstance(arg, int):
        arg = ffi.cast("void *", arg)
    r = lib.mshv_dev_ioctl(fd, request, arg)
    return int(r) if r >= 0 else -int(ffi.errno)


def buf(data: bytes) -> Any:
    """A C copy of ``data`` that outlives the call (cffi owns it)."""
    return ffi.new("char[]", data if data else b"\0")


def addr_of(cdata: Any) -> int:
    return int(ffi.cast("uintptr_t", cdata))


def open_dev() -> int:
    fd = int(lib.mshv_dev_open(EMU_MODE))
    assert fd >= 0, os.strerror(ffi.errno)
    return fd


def close(fd: int) -> int:
    r = lib.mshv_dev_close(fd)
    return 0 if r == 0 else -int(ffi.errno)


def create_partition(dev: int, flags: int = 0x7, isolation: int = 0) -> int:
    return ioctl(dev, F.MSHV_CREATE_PARTITION, buf(struct.pack("<QQ", flags, isolation)))


def initialize(pt: int) -> int:
    return ioctl(pt, F.MSHV_INITIALIZE_PARTITION)


def create_vp(pt: int, index: int) -> int:
    return ioctl(pt, F.MSHV_CREATE_VP, buf(struct.pack("<I", index)))


def mem_region(size: int, gfn: int, uaddr: int, flags: int = 0x3, rsvd: bytes = bytes(7)) -> bytes:
    return struct.pack("<QQQB7s", size, gfn, uaddr, flags, rsvd)


def set_memory(pt: int, size: int, gfn: int, uaddr: int, flags: int = 0x3, rsvd: bytes = bytes(7)) -> int:
    return ioctl(pt, F.MSHV_SET_GUEST_MEMORY, buf(mem_region(size, gfn, uaddr, flags, rsvd)))


def irqfd(pt: int, fd: int, gsi: int, flags: int = 0, resamplefd: int = -1) -> int:
    return ioctl(pt, F.MSHV_IRQFD, buf(struct.pack("<iiII", fd, resamplefd, gsi, flags)))


def ioeventfd(
    pt: int, fd: int, addr: int, length: int, flags: int = 0, datamatch: int = 0, rsvd: bytes = bytes(4)
) -> int:
    return ioctl(pt, F.MSHV_IOEVENTFD, buf(struct.pack("<QQIiI4s", datamatch, addr, length, fd, flags, rsvd)))


def msi_routing(pt: int, entries: Iterable[tuple[int, int, int, int]], nr: int | None = None, rsvd: int = 0) -> int:
    ents = list(entries)
    data = struct.pack("<II", len(ents) if nr is None else nr, rsvd)
    data += b"".join(struct.pack("<IIII", *e) for e in ents)
    return ioctl(pt, F.MSHV_SET_MSI_ROUTING, buf(data))


def msi_entry(gsi: int, vector: int, dest: int = 0, level: bool = False) -> tuple[int, int, int, int]:
    return (gsi, 0xFEE00000 | (dest << 12), 0, vector | (int(level) << 15) | (int(level) << 14))


def gpap(pt: int, access_type: int, op: int, count: int, base: int, bitmap: int, rsvd: bytes = bytes(6)) -> int:
    return ioctl(
        pt, F.MSHV_GET_GPAP_ACCESS_BITMAP, buf(struct.pack("<BB6sQQQ", access_type, op, rsvd, count, base, bitmap))
    )


def eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def eventfd_count(fd: int) -> int:
    try:
        count: int = struct.unpack("<Q", os.read(fd, 8))[0]
        return count
    except BlockingIOError:
        return 0


# ---- hypercalls -----------------------------------------------------------------------------


@dataclass
class Hv:
    rc: int  # ioctl result or -errno
    status: int  # args.status as written back
    reps: int  # args.reps as written back
    out: bytes  # the output buffer after the call


def hvcall_struct(
    code: int,
    reps: int = 0,
    in_sz: int = 0,
    out_sz: int = 0,
    status: int = 0,
    rsvd: bytes = bytes(6),
    in_ptr: int = 0,
    out_ptr: int = 0,
) -> bytes:
    return struct.pack("<HHHHH6sQQ", code, reps, in_sz, out_sz, status, rsvd, in_ptr, out_ptr)


def hvcall(fd: int, code: int, data: bytes, out_size: int = 0, reps: int = 0) -> Hv:
    inp = buf(data)
    out = ffi.new("char[]", max(out_size, 1))
    arg = buf(
        hvcall_struct(code, reps, len(data), out_size, in_ptr=addr_of(inp), out_ptr=addr_of(out) if out_size else 0)
    )
    rc = ioctl(fd, F.MSHV_ROOT_HVCALL, arg)
    status, reps_done = hvcall_result(arg)
    return Hv(rc, status, reps_done, bytes(ffi.buffer(out, out_size)))


def hvcall_result(arg: Any) -> tuple[int, int]:
    """(status, reps) as the ioctl wrote them back into a 32-byte mshv_root_hvcall (§3.1)."""
    reps_done, status = struct.unpack_from("<2xH4xH", bytes(ffi.buffer(arg, 32)))
    return status, reps_done


def get_property(pt: int, code: int) -> Hv:
    return hvcall(pt, F.HVCALL_GET_PARTITION_PROPERTY, struct.pack("<QII", 0, code, 0), 8)


def set_property(fd: int, code: int, value: int) -> Hv:
    return hvcall(fd, F.HVCALL_SET_PARTITION_PROPERTY, struct.pack("<QIIQ", 0, code, 0, value))


def _value(v: Any) -> bytes:
    if isinstance(v, bytes):
        return v.ljust(16, b"\0")
    if isinstance(v, Seg):
        return struct.pack("<QIHH", v.base, v.limit, v.selector, v.attributes)
    if isinstance(v, Table):
        return struct.pack("<HHHHQ", 0, 0, 0, v.limit, v.base)
    return struct.pack("<QQ", v & (2**64 - 1), v >> 64)


@dataclass(frozen=True)
class Seg:
    base: int
    limit: int
    selector: int
    attributes: int


@dataclass(frozen=True)
class Table:
    base: int
    limit: int


def set_regs(fd: int, vp_index: int, regs: Mapping[int, Any]) -> Hv:
    data = struct.pack("<QIBBH", 0, vp_index, 0, 0, 0)
    for name, v in regs.items():
        data += struct.pack("<IIQ", name, 0, 0) + _value(v)
    return hvcall(fd, F.HVCALL_SET_VP_REGISTERS, data, 0, len(regs))


def get_regs_raw(fd: int, vp_index: int, names: list[int]) -> Hv:
    data = struct.pack("<QIBBH", 0, vp_index, 0, 0, 0) + struct.pack(f"<{len(names)}I", *names)
    return hvcall(fd, F.HVCALL_GET_VP_REGISTERS, data, 16 * len(names), len(names))


def get_regs(fd: int, vp_index: int, names: list[int]) -> list[int]:
    h = get_regs_raw(fd, vp_index, names)
    assert h.rc == 0 and h.status == 0, (h.rc, h.status)
    return [int.from_bytes(h.out[16 * i : 16 * i + 16], "little") for i in range(len(names))]


def get_seg(fd: int, vp_index: int, name: int) -> Seg:
    h = get_regs_raw(fd, vp_index, [name])
    assert h.rc == 0
    return Seg(*struct.unpack_from("<QIHH", h.out))


def errname(rc: int) -> str:
    return "0" if rc >= 0 else errno.errorcode.get(-rc, str(-rc))
