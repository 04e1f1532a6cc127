"""MSHV_GET/SET_VP_STATE and mmap of the VP fd.

Expected values: docs/ABI.md §4.11 (checks in order, required sizes written back, pinning), §4.12
(mmap page offsets and errno), §3.3 (state types), §4.11's LAPIC field order and XSAVE legacy area;
the emulator's own answers (no register page, sizes from KVM, state without KVM) are §9.4-9.6.
"""

from __future__ import annotations

import errno
import mmap
import struct
from collections.abc import Iterator

import pytest
from mshv_libvirt._mshv import ffi, lib

from tests.abi import facts as F

from .emutil import (
    KERNEL_ADDR,
    PAGE,
    Mem,
    buf,
    close,
    create_partition,
    create_vp,
    get_property,
    initialize,
    ioctl,
    map_pages,
    protect,
    unmap,
    unmapped_addr,
)

LAPIC, XSAVE, SIMP, SIEFP, TIMERS = range(5)  # §3.3
GET, SET = "MSHV_GET_VP_STATE", "MSHV_SET_VP_STATE"


def state(vp: int, which: str, kind: int, buf_sz: int, buf_ptr: int, rsvd: bytes = bytes(3)) -> tuple[int, int]:
    """(result, buf_sz as written back)."""
    arg = buf(struct.pack("<B3sIQ", kind, rsvd, buf_sz, buf_ptr))
    r = ioctl(vp, F.IOCTLS[which], arg)
    return r, struct.unpack_from("<I", bytes(ffi.buffer(arg, 16)), 4)[0]


@pytest.fixture
def page() -> Iterator[Mem]:
    mem = Mem(4 * PAGE)
    yield mem
    mem.close()


def xsave_size(fd: int) -> int:
    size: int = struct.unpack("<Q", get_property(fd, F.PROP_MAX_XSAVE_DATA_SIZE).out)[0]
    return size


@pytest.mark.parametrize("which", [GET, SET])
@pytest.mark.parametrize("kind", [5, 6, 0x80, 0xFF])
def test_type_out_of_range(vp: int, page: Mem, which: str, kind: int) -> None:
    assert state(vp, which, kind, PAGE, page.addr)[0] == -errno.EINVAL


@pytest.mark.parametrize("which", [GET, SET])
@pytest.mark.parametrize("byte", range(3))
@pytest.mark.parametrize("value", [1, 0xFF])
def test_rsvd(vp: int, page: Mem, which: str, byte: int, value: int) -> None:
    rsvd = bytearray(3)
    rsvd[byte] = value
    assert state(vp, which, LAPIC, PAGE, page.addr, bytes(rsvd))[0] == -errno.EINVAL


@pytest.mark.parametrize("which", [GET, SET])
def test_buf_sz_zero(vp: int, page: Mem, which: str) -> None:
    assert state(vp, which, TIMERS, 0, page.addr) == (-errno.EINVAL, 0)


@pytest.mark.parametrize("which", [GET, SET])
@pytest.mark.parametrize("size", [1, 200, PAGE - 1, PAGE + 1, 3 * PAGE - 8])
def test_buf_sz_unaligned(vp: int, page: Mem, which: str, size: int) -> None:
    # rejected before the required size is written back
    assert state(vp, which, TIMERS, size, page.addr) == (-errno.EINVAL, size)


@pytest.mark.parametrize("which", [GET, SET])
@pytest.mark.parametrize("offset", [1, 8, 2048])
def test_buf_ptr_unaligned(vp: int, page: Mem, which: str, offset: int) -> None:
    assert state(vp, which, TIMERS, PAGE, page.addr + offset)[0] == -errno.EINVAL


@pytest.mark.parametrize("which", [GET, SET])
def test_buf_outside_user_space(vp: int, which: str) -> None:
    assert state(vp, which, LAPIC, PAGE, KERNEL_ADDR) == (-errno.EFAULT, PAGE)
    assert state(vp, which, LAPIC, 2 * PAGE, 0x7FFF_FFFF_F000) == (-errno.EFAULT, 2 * PAGE)


@pytest.mark.parametrize("which", [GET, SET])
def test_unreadable_arg(vp: int, which: str) -> None:
    assert ioctl(vp, F.IOCTLS[which], unmapped_addr()) == -errno.EFAULT


@pytest.mark.parametrize("which", [GET, SET])
@pytest.mark.parametrize("kind,size", [(LAPIC, PAGE), (SIMP, PAGE), (SIEFP, PAGE), (TIMERS, 200)])
def test_required_size_written_back(vp: int, page: Mem, which: str, kind: int, size: int) -> None:
    assert state(vp, which, kind, 4 * PAGE, page.addr) == (0, size)


@pytest.mark.parametrize("which", [GET, SET])
def test_xsave_size_is_the_property(vp: int, page: Mem, which: str) -> None:
    size = xsave_size(vp)
    assert size <= 4 * PAGE
    assert state(vp, which, XSAVE, 4 * PAGE, page.addr) == (0, size)


@pytest.mark.parametrize("which", [GET, SET])
def test_too_small_buffer(monkeypatch: pytest.MonkeyPatch, ipt: int, page: Mem, which: str) -> None:
    # A host whose XSAVE area is larger than a page (AVX-512/AMX): EINVAL, and buf_sz tells
    # the caller what to allocate -- for GET and SET alike.
    monkeypatch.setenv("MSHV_LIBVIRT_EMU_XSAVE_SIZE", str(3 * PAGE))
    vp = create_vp(ipt, 1)
    try:
        assert state(vp, which, XSAVE, PAGE, page.addr) == (-errno.EINVAL, 3 * PAGE)
        assert state(vp, which, XSAVE, 3 * PAGE, page.addr) == (0, 3 * PAGE)
    finally:
        close(vp)


@pytest.mark.parametrize("which", [GET, SET])
@pytest.mark.parametrize("kind", [LAPIC, SIMP, SIEFP, XSAVE])
def test_unmapped_buffer_fails_pinning(vp: int, which: str, kind: int) -> None:
    assert state(vp, which, kind, PAGE, unmapped_addr()) == (-errno.EFAULT, PAGE if kind != XSAVE else xsave_size(vp))


@pytest.mark.parametrize("which", [GET, SET])
def test_read_only_buffer_fails_pinning(vp: int, which: str) -> None:
    # The page types are pinned with FOLL_WRITE even for SET.
    mem = Mem(PAGE)
    protect(mem.addr, PAGE, 1)
    try:
        assert state(vp, which, SIMP, PAGE, mem.addr)[0] == -errno.EFAULT
    finally:
        mem.close()


def test_timers_unmapped_buffer(vp: int) -> None:
    assert state(vp, GET, TIMERS, PAGE, unmapped_addr())[0] == -errno.EFAULT
    assert state(vp, SET, TIMERS, PAGE, unmapped_addr())[0] == -errno.EFAULT


@pytest.mark.parametrize("kind,size", [(SIMP, PAGE), (SIEFP, PAGE), (TIMERS, 200)])
def test_software_state_round_trip(vp: int, page: Mem, kind: int, size: int) -> None:
    data = bytes((i * 7 + kind) & 0xFF for i in range(size))
    page.write(0, data)
    assert state(vp, SET, kind, PAGE, page.addr)[0] == 0
    page.write(0, bytes(size))
    assert state(vp, GET, kind, PAGE, page.addr)[0] == 0
    assert page.read(0, size) == data


def test_state_without_kvm(nokvm: None, dev: int) -> None:
    pt = create_partition(dev)
    assert initialize(pt) == 0
    vp = create_vp(pt, 0)
    mem = Mem(PAGE)
    try:
        for kind in (LAPIC, XSAVE, SIMP, SIEFP, TIMERS):
            assert state(vp, GET, kind, PAGE, mem.addr)[0] == 0
            assert state(vp, SET, kind, PAGE, mem.addr)[0] == 0
    finally:
        mem.close()
        close(vp)
        close(pt)


@pytest.mark.usefixtures("kvm")
def test_lapic_state(ipt: int, page: Mem) -> None:
    vp = create_vp(ipt, 3)
    try:
        assert state(vp, GET, LAPIC, PAGE, page.addr)[0] == 0
        fields = list(struct.unpack_from("<44I", page.read(0, 176)))
        assert fields[0] == 3  # apic_id = VP index
        assert fields[1] & 0xFF >= 0x10  # version: an integrated APIC
        fields[36] = 0x10000 | 0x30  # lvt_lint1: masked, vector 0x30
        page.write(0, struct.pack("<44I", *fields))
        assert state(vp, SET, LAPIC, PAGE, page.addr)[0] == 0
        page.write(0, bytes(PAGE))
        assert state(vp, GET, LAPIC, PAGE, page.addr)[0] == 0
        assert struct.unpack_from("<44I", page.read(0, 176))[36] == 0x10030
    finally:
        close(vp)


@pytest.mark.usefixtures("kvm")
def test_xsave_state_round_trip(vp: int, page: Mem) -> None:
    size = xsave_size(vp)
    assert state(vp, GET, XSAVE, 4 * PAGE, page.addr)[0] == 0
    blob = page.read(0, size)
    fcw = struct.unpack_from("<H", blob)[0]
    assert fcw == 0x37F  # x87 reset value
    page.write(0, struct.pack("<H", 0x27F))
    # XSTATE_BV bit 0: the x87 state is present (else it loads as its reset value)
    page.write(512, bytes([blob[512] | 1]))
    assert state(vp, SET, XSAVE, 4 * PAGE, page.addr)[0] == 0
    page.write(0, bytes(8))
    assert state(vp, GET, XSAVE, 4 * PAGE, page.addr)[0] == 0
    assert struct.unpack_from("<H", page.read(0, 2))[0] == 0x27F


# ---- mmap -----------------------------------------------------------------------------------


def vmmap(fd: int, length: int, offset: int, flags: int = mmap.MAP_SHARED) -> tuple[int, int]:
    p = lib.mshv_dev_mmap(ffi.NULL, length, mmap.PROT_READ | mmap.PROT_WRITE, flags, fd, offset)
    if p == ffi.cast("void *", -1):
        return 0, ffi.errno
    return int(ffi.cast("uintptr_t", p)), 0


def test_mmap_intercept_message_page(vp: int) -> None:
    addr, err = vmmap(vp, PAGE, 1 * mmap.PAGESIZE)
    assert err == 0 and addr
    unmap(addr, PAGE)


@pytest.mark.parametrize("pgoff", [0, 2])
def test_mmap_absent_pages(vp: int, pgoff: int) -> None:
    # No register page (as for encrypted partitions) and no GHCB (SNP only).
    assert vmmap(vp, PAGE, pgoff * mmap.PAGESIZE) == (0, errno.ENODEV)


@pytest.mark.parametrize("pgoff", [3, 4, 100, 1 << 20])
def test_mmap_unknown_offset(vp: int, pgoff: int) -> None:
    assert vmmap(vp, PAGE, pgoff * mmap.PAGESIZE) == (0, errno.EINVAL)


@pytest.mark.parametrize("offset", [1, 100, PAGE + 8])
def test_mmap_unaligned_offset(vp: int, offset: int) -> None:
    assert vmmap(vp, PAGE, offset) == (0, errno.EINVAL)


def test_mmap_zero_length(vp: int) -> None:
    assert vmmap(vp, 0, PAGE) == (0, errno.EINVAL)


def test_mmap_other_fds(dev: int, pt: int) -> None:
    assert vmmap(dev, PAGE, 0) == (0, errno.ENODEV)
    assert vmmap(pt, PAGE, 0) == (0, errno.ENODEV)


def test_mmap_page_is_shared_between_mappings(vp: int) -> None:
    a, _ = vmmap(vp, PAGE, PAGE)
    b, _ = vmmap(vp, PAGE, PAGE)
    try:
        from .emutil import peek, poke

        poke(a, b"hello")
        assert peek(b, 5) == b"hello"
    finally:
        unmap(a, PAGE)
        unmap(b, PAGE)


def test_mmap_length_not_checked(vp: int) -> None:
    addr, err = vmmap(vp, 3 * PAGE, PAGE)
    assert err == 0
    unmap(addr, 3 * PAGE)
    _ = map_pages  # (touching beyond the first page would SIGBUS, as with the kernel)
