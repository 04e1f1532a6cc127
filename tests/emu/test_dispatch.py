"""ioctl dispatch per fd type and handle lifetime.

The kernel switches on the full 32-bit command per file type: the right number on the wrong fd,
or the right nr with another size or direction, is simply unknown -> ENOTTY.

Expected values: docs/ABI.md §2 (descriptor kinds, dispatch rule, the numbers of §2.3 and the foreign
numbers of §2.4), §4.13 (lifetime) and §9.1 (what an emulated handle is).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Iterator

import pytest
from mshv_libvirt._mshv import ffi, lib

from tests.abi import facts as F

from .emutil import (
    buf,
    close,
    create_partition,
    create_vp,
    get_property,
    initialize,
    ioctl,
    open_dev,
)

DEV_IOCTLS = {"MSHV_CREATE_PARTITION"}
PT_IOCTLS = {
    "MSHV_INITIALIZE_PARTITION",
    "MSHV_CREATE_VP",
    "MSHV_SET_GUEST_MEMORY",
    "MSHV_IRQFD",
    "MSHV_IOEVENTFD",
    "MSHV_SET_MSI_ROUTING",
    "MSHV_GET_GPAP_ACCESS_BITMAP",
    "MSHV_ROOT_HVCALL",
}
VP_IOCTLS = {"MSHV_RUN_VP", "MSHV_GET_VP_STATE", "MSHV_SET_VP_STATE", "MSHV_ROOT_HVCALL"}
ALL = sorted(DEV_IOCTLS | PT_IOCTLS | VP_IOCTLS)

# Numbers a caller may meet elsewhere (mshv_vtl, the Microsoft downstream driver, older drafts):
# unknown to the upstream root driver on every fd.
FOREIGN = [
    0x4004B800,  # MSHV_CHECK_EXTENSION (mshv_vtl): CREATE_PARTITION's nr with size 4
    0xC010B801,  # downstream MSHV_GET_HOST_PARTITION_PROPERTY (= MSHV_GET_VP_STATE's value)
    0x8008B801,  # older rust-vmm GET_HOST_PARTITION_PROPERTY
    0x8001B81D,  # MSHV_CREATE_VTL
    0xC010B805,  # mshv_vtl MSHV_GET_VP_REGISTERS
    0x4010B806,  # mshv_vtl MSHV_SET_VP_REGISTERS
    0xC030B81F,  # MSHV_HVCALL (vtl)
    0x0000B827,  # MSHV_RETURN_TO_LOWER_VTL
    0x4008B808,  # downstream CREATE_DEVICE-like nr 0x08
    0xC008B8F0,  # deprecated downstream range
    0x0000AE01,  # a KVM number
    0x00005401,  # TCGETS
    0,
    0xFFFFFFFF,
]


def _variants(number: int) -> list[int]:
    """Same nr and type, other size or direction."""
    size = (number >> 16) & 0x3FFF
    direction = number >> 30
    out = []
    for d in range(4):
        if d != direction:
            out.append((number & 0x3FFFFFFF) | (d << 30))
    for s in (size + 1, size - 1 if size else 8, 0x3FFF):
        out.append((number & ~(0x3FFF << 16)) | (s << 16))
    return out


@pytest.fixture
def handles(dev: int) -> Iterator[dict[str, int]]:
    pt = create_partition(dev)
    assert initialize(pt) == 0
    vp = create_vp(pt, 0)
    yield {"dev": dev, "partition": pt, "vp": vp}
    close(vp)
    close(pt)


ALLOWED = {"dev": DEV_IOCTLS, "partition": PT_IOCTLS, "vp": VP_IOCTLS}


WRONG_FD = [(kind, name) for kind in ("dev", "partition", "vp") for name in ALL if name not in ALLOWED[kind]]


@pytest.mark.parametrize("kind,name", WRONG_FD)
def test_known_number_on_the_wrong_fd_is_enotty(handles: dict[str, int], kind: str, name: str) -> None:
    # A valid-looking argument so only the dispatch can fail.
    arg = ffi.new("char[]", 4096)
    assert ioctl(handles[kind], F.IOCTLS[name], arg) == -errno.ENOTTY


# 0xC010B801 has the value of MSHV_GET_VP_STATE: foreign only on the other fds.
FOREIGN_ON = [
    (kind, n)
    for kind in ("dev", "partition", "vp")
    for n in FOREIGN
    if n not in {F.IOCTLS[name] for name in ALLOWED[kind]}
]


@pytest.mark.parametrize("kind,number", FOREIGN_ON, ids=lambda v: hex(v) if isinstance(v, int) else v)
def test_foreign_numbers_are_enotty(handles: dict[str, int], kind: str, number: int) -> None:
    assert ioctl(handles[kind], number, ffi.new("char[]", 4096)) == -errno.ENOTTY


@pytest.mark.parametrize("kind", ["dev", "partition", "vp"])
@pytest.mark.parametrize("name", ALL)
def test_same_nr_other_size_or_direction_is_enotty(handles: dict[str, int], kind: str, name: str) -> None:
    for number in _variants(F.IOCTLS[name]):
        assert ioctl(handles[kind], number, ffi.new("char[]", 4096)) == -errno.ENOTTY, hex(number)


@pytest.mark.parametrize("nr", range(0x08, 0x100, 7))
def test_unassigned_nrs_are_enotty(handles: dict[str, int], nr: int) -> None:
    for kind in ("dev", "partition", "vp"):
        for number in (0xC020B800 | nr, 0x4010B800 | nr, 0x0000B800 | nr):
            if number & 0xFF == 0:
                continue
            assert ioctl(handles[kind], number, ffi.new("char[]", 4096)) == -errno.ENOTTY


def test_root_hvcall_on_dev_is_enotty_before_6_19(dev: int) -> None:
    # The self-targeted /dev/mshv hypercall only exists from 6.19; we mirror 6.15-6.18.
    assert ioctl(dev, F.MSHV_ROOT_HVCALL, ffi.new("char[]", 64)) == -errno.ENOTTY


def test_only_the_low_32_bits_of_the_request_count(handles: dict[str, int]) -> None:
    # ioctl(2) takes an unsigned int command: bits above 31 never reach the driver.
    h = get_property(handles["partition"], 0x00050017)
    assert h.rc == 0
    arg = buf(struct.pack("<I", 1))  # mshv_create_vp, §3.1
    fd = ioctl(handles["partition"], F.MSHV_CREATE_VP | (0xDEAD << 32), arg)
    assert fd >= 0
    close(fd)


def test_handles_are_real_cloexec_descriptors(handles: dict[str, int]) -> None:
    for fd in handles.values():
        assert fd >= 0
        os.fstat(fd)
        assert lib.mshv_dev_is_emulated(fd) == 1
    for kind in ("partition", "vp"):
        assert fcntl.fcntl(handles[kind], fcntl.F_GETFD) & fcntl.FD_CLOEXEC


def test_plain_descriptors_are_not_emulator_handles() -> None:
    r, w = os.pipe()
    try:
        assert lib.mshv_dev_is_emulated(r) == 0
        assert lib.mshv_dev_is_emulated(-1) == 0
        assert lib.mshv_dev_is_emulated(1 << 20) == 0
    finally:
        os.close(r)
        os.close(w)


def test_close_then_the_number_is_not_ours() -> None:
    dev = open_dev()
    assert close(dev) == 0
    assert lib.mshv_dev_is_emulated(dev) == 0
    assert close(dev) == -errno.EBADF


def test_a_handle_closed_behind_our_back_is_forgotten() -> None:
    dev = open_dev()
    os.close(dev)  # not through the shim
    assert lib.mshv_dev_is_emulated(dev) == 0
    # The number comes back as something else: it must not be mistaken for the old handle.
    r, w = os.pipe()
    try:
        for fd in (r, w):
            assert lib.mshv_dev_is_emulated(fd) == 0
    finally:
        os.close(r)
        os.close(w)


def test_vp_fd_keeps_the_partition_alive(dev: int) -> None:
    pt = create_partition(dev)
    assert initialize(pt) == 0
    vp = create_vp(pt, 0)
    assert close(pt) == 0
    # The VP still works: it holds a partition reference, as in the kernel.
    page = ffi.new("char[]", 8192)
    aligned = (int(ffi.cast("uintptr_t", page)) + 4095) & ~4095
    arg = buf(struct.pack("<B3sIQ", F.VP_STATE_SYNTHETIC_TIMERS, bytes(3), 4096, aligned))  # §3.1, §4.11
    assert ioctl(vp, F.MSHV_GET_VP_STATE, arg) == 0
    assert close(vp) == 0


def test_vp_survives_its_fd_as_in_the_kernel(dev: int) -> None:
    # VPs live until the partition is destroyed: closing the fd does not free the index.
    pt = create_partition(dev)
    assert initialize(pt) == 0
    vp = create_vp(pt, 3)
    assert vp >= 0
    assert close(vp) == 0
    assert create_vp(pt, 3) == -errno.EEXIST
    close(pt)


def test_many_partitions_come_and_go(dev: int) -> None:
    for _ in range(20):
        pt = create_partition(dev)
        assert pt >= 0
        assert initialize(pt) == 0
        vps = [create_vp(pt, i) for i in range(2)]
        assert all(v >= 0 for v in vps)
        for v in vps:
            close(v)
        close(pt)


def test_ioctl_argument_pointer_is_user_memory(dev: int) -> None:
    # A NULL or wild argument pointer is EFAULT, never a crash.
    assert ioctl(dev, F.MSHV_CREATE_PARTITION, None) == -errno.EFAULT
    assert ioctl(dev, F.MSHV_CREATE_PARTITION, 8) == -errno.EFAULT
    assert ioctl(dev, F.MSHV_CREATE_PARTITION, 0xFFFF_8000_0000_0000) == -errno.EFAULT
    fd = ioctl(dev, F.MSHV_CREATE_PARTITION, buf(struct.pack("<QQ", 7, 0)))
    assert fd >= 0
    close(fd)
