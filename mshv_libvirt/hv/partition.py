"""``PartitionFd``: one guest partition. Made only by ``MshvSystem.create_partition``."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import _ffi
from .errors import HypercallError, MshvError
from .ioctls import (
    MSHV_CREATE_VP,
    MSHV_INITIALIZE_PARTITION,
    MSHV_IOEVENTFD,
    MSHV_IRQFD,
    MSHV_ROOT_HVCALL,
    MSHV_SET_GUEST_MEMORY,
    MSHV_SET_MSI_ROUTING,
)
from .memory import GuestMemory
from .vp import VpFd

HVCALL_GET_PARTITION_PROPERTY = 0x0044
HVCALL_SET_PARTITION_PROPERTY = 0x0045
HVCALL_ASSERT_VIRTUAL_INTERRUPT = 0x0094

MEM_WRITABLE = 1 << 0
MEM_EXECUTABLE = 1 << 1
MEM_UNMAP = 1 << 2


@dataclass(frozen=True)
class MsiRoute:
    gsi: int
    address_lo: int
    address_hi: int
    data: int


@dataclass(frozen=True)
class HvcallResult:
    status: int
    reps: int
    output: bytes


class HvcallBuffers:
    """One hypercall's argument and page-sized input and output, kept for reuse.

    A VP's register calls (two per exit in the VMM) then pass the same three buffers every time
    instead of three fresh allocations, which also lets the emulated device check them once.
    Not thread-safe: the owner serialises its use (``VpFd`` does).
    """

    def __init__(self) -> None:
        # SAFETY: owned here, so they outlive every ioctl that points at them.
        self.inbuf = _ffi.new("uint8_t[]", 4096)
        self.outbuf = _ffi.new("uint8_t[]", 4096)
        self.arg = _ffi.new("struct mshv_root_hvcall *")
        self.in_ptr = _ffi.address(self.inbuf)
        self.out_ptr = _ffi.address(self.outbuf)


def hvcall(
    fd: int, code: int, data: bytes, out_size: int = 0, reps: int = 0, bufs: HvcallBuffers | None = None
) -> HvcallResult:
    """MSHV_ROOT_HVCALL on any fd that accepts it; raises on errno or HV_STATUS failure."""
    if not 8 <= len(data) <= 4096 or out_size > 4096:
        raise ValueError("hypercall input must be 8..4096 bytes and output at most 4096")
    if bufs is None:
        bufs = HvcallBuffers()
    # The kernel writes partition_id into its own copy of input bytes 0..7 and at most out_sz bytes
    # of output. rsvd stays zero (MBZ); status is reset, the previous call wrote it back.
    _ffi.memmove_to(bufs.in_ptr, data)
    arg = bufs.arg
    arg.code = code
    arg.reps = reps
    arg.in_sz = len(data)
    arg.out_sz = out_size
    arg.status = 0
    arg.in_ptr = bufs.in_ptr
    arg.out_ptr = bufs.out_ptr if out_size else 0
    outbuf = bufs.outbuf
    _, err = _ffi.ioctl(fd, MSHV_ROOT_HVCALL, arg)
    status = int(arg.status)
    if err or status:
        if status:
            raise HypercallError(code, status, err or None)
        raise MshvError(err, "MSHV_ROOT_HVCALL", f"hypercall {code:#06x}")
    done = int(arg.reps)
    if reps and done != reps:
        raise HypercallError(code, 0x0071, None)  # treat a short rep count as failure (QEMU, rust-vmm)
    return HvcallResult(status, done, _ffi.buffer(outbuf, out_size) if out_size else b"")


class PartitionFd:
    """Owns one partition descriptor. Construct only through ``MshvSystem``."""

    _fd = -1  # so __del__ is safe on an object whose constructor refused

    def __init__(self, fd: int, _token: object = None) -> None:
        if _token is not _PRIVATE:
            raise TypeError("PartitionFd is created by MshvSystem.create_partition()")
        self._fd = fd
        self._vps: dict[int, VpFd] = {}

    @classmethod
    def _from_fd(cls, fd: int) -> PartitionFd:
        return cls(fd, _PRIVATE)

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("PartitionFd is closed")
        return self._fd

    def _ioctl(self, name: str, request: int, arg: Any) -> int:
        r, err = _ffi.ioctl(self.fileno(), request, arg)
        if err:
            raise MshvError(err, name)
        return r

    def initialize(self) -> None:
        self._ioctl("MSHV_INITIALIZE_PARTITION", MSHV_INITIALIZE_PARTITION, None)

    def set_guest_memory(self, size: int, guest_pfn: int, userspace_addr: int, flags: int) -> None:
        """The raw MSHV_SET_GUEST_MEMORY call (rsvd is always zero here)."""
        # SAFETY: struct mshv_user_mem_region is cffi-owned; rsvd[7] is MBZ and stays zero;
        # userspace_addr must be memory the caller keeps mapped while the region exists.
        arg = _ffi.new(
            "struct mshv_user_mem_region *",
            {"size": size, "guest_pfn": guest_pfn, "userspace_addr": userspace_addr, "flags": flags},
        )
        self._ioctl("MSHV_SET_GUEST_MEMORY", MSHV_SET_GUEST_MEMORY, arg)

    def map_memory(self, guest_pfn: int, mem: GuestMemory, *, writable: bool = True, executable: bool = True) -> None:
        flags = (MEM_WRITABLE if writable else 0) | (MEM_EXECUTABLE if executable else 0)
        self.set_guest_memory(mem.size, guest_pfn, mem.address, flags)

    def unmap_memory(self, guest_pfn: int, mem: GuestMemory) -> None:
        self.set_guest_memory(mem.size, guest_pfn, mem.address, MEM_UNMAP)

    def create_vp(self, vp_index: int) -> VpFd:
        # SAFETY: struct mshv_create_vp has no reserved fields.
        arg = _ffi.new("struct mshv_create_vp *", {"vp_index": vp_index})
        fd = self._ioctl("MSHV_CREATE_VP", MSHV_CREATE_VP, arg)
        vp = VpFd._from_fd(fd, vp_index)  # wrapped before anything else can fail
        self._vps[vp_index] = vp
        return vp

    def hvcall(self, code: int, input: bytes, out_size: int = 0, reps: int = 0) -> HvcallResult:
        return hvcall(self.fileno(), code, input, out_size, reps)

    def get_property(self, code: int) -> int:
        out = self.hvcall(HVCALL_GET_PARTITION_PROPERTY, struct.pack("<QII", 0, code, 0), 8).output
        return int.from_bytes(out[:8], "little")

    def set_property(self, code: int, value: int) -> None:
        self.hvcall(HVCALL_SET_PARTITION_PROPERTY, struct.pack("<QIIQ", 0, code, 0, value))

    def irqfd(self, fd: int, gsi: int, *, resamplefd: int = -1, deassign: bool = False) -> None:
        flags = (1 if deassign else 0) | (2 if resamplefd >= 0 and not deassign else 0)
        # SAFETY: struct mshv_user_irqfd has no reserved fields; fd must be an eventfd.
        arg = _ffi.new(
            "struct mshv_user_irqfd *",
            {"fd": fd, "resamplefd": max(resamplefd, 0) if flags & 2 else 0, "gsi": gsi, "flags": flags},
        )
        self._ioctl("MSHV_IRQFD", MSHV_IRQFD, arg)

    def ioeventfd(
        self,
        fd: int,
        addr: int,
        length: int,
        *,
        datamatch: int | None = None,
        pio: bool = False,
        deassign: bool = False,
    ) -> None:
        flags = (1 if datamatch is not None else 0) | (2 if pio else 0) | (4 if deassign else 0)
        # SAFETY: rsvd[4] is MBZ and stays zero.
        arg = _ffi.new(
            "struct mshv_user_ioeventfd *",
            {"datamatch": datamatch or 0, "addr": addr, "len": length, "fd": fd, "flags": flags},
        )
        self._ioctl("MSHV_IOEVENTFD", MSHV_IOEVENTFD, arg)

    def set_msi_routing(self, routes: Sequence[MsiRoute]) -> None:
        # SAFETY: header (nr, rsvd=0) followed directly by nr entries, in one cffi-owned buffer.
        size = _ffi.sizeof("struct mshv_user_irq_table") + len(routes) * _ffi.sizeof("struct mshv_user_irq_entry")
        raw = bytearray(size)
        struct.pack_into("<II", raw, 0, len(routes), 0)
        for i, r in enumerate(routes):
            struct.pack_into("<IIII", raw, 8 + 16 * i, r.gsi, r.address_lo, r.address_hi, r.data)
        buf = _ffi.new("uint8_t[]", bytes(raw))
        self._ioctl("MSHV_SET_MSI_ROUTING", MSHV_SET_MSI_ROUTING, buf)

    def assert_interrupt(
        self,
        vector: int,
        apic_id: int = 0,
        *,
        interrupt_type: int = 0,
        level: bool = False,
        logical: bool = False,
    ) -> None:
        control = interrupt_type | (int(level) << 32) | (int(logical) << 33)
        data = struct.pack("<QQQIBBH", 0, control, apic_id, vector, 0, 0, 0)
        self.hvcall(HVCALL_ASSERT_VIRTUAL_INTERRUPT, data)

    def close(self) -> None:
        for vp in getattr(self, "_vps", {}).values():
            vp.close()
        self._vps = {}
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            _ffi.close(fd)

    def __enter__(self) -> PartitionFd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


_PRIVATE = object()
