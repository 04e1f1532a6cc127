"""Argument validation on /dev/mshv and partition fds: one rule per test, exact errno.

Expected values: docs/ABI.md §4.1-4.8 (order and errno of each check, 6.15-6.18 behaviour; create-
partition as the newest kernel, 7.0, with older generations in test_kernel_generations.py), §3 (flag
masks, reserved fields byte by byte, alignment, limits) and, where only the hypervisor decides (calls
before INITIALIZE, access tracking off), the emulated hypervisor's answers of §9.5; the one KVM-forced
difference (a containing GPA range) is §9.6. ioctl numbers are §2.3 via tests/abi/facts.py.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator

import pytest

from tests.abi import facts as F

from .emutil import (
    KERNEL_ADDR,
    PAGE,
    Mem,
    buf,
    close,
    create_partition,
    create_vp,
    eventfd,
    gpap,
    initialize,
    ioctl,
    ioeventfd,
    irqfd,
    map_pages,
    msi_entry,
    msi_routing,
    peek,
    protect,
    set_memory,
    set_property,
    tail_of_page,
    unmap,
    unmapped_addr,
)

V2_BIT = F.PT_CPU_AND_XSAVE_FEATURES  # §3.2
TRACKING = F.PROP_GPA_PAGE_ACCESS_TRACKING  # §6.4


def v2(
    flags: int = 0x7 | V2_BIT,
    isolation: int = 0,
    nbanks: int = 2,
    rsvd: bytes = bytes(6),
    banks: tuple[int, int] = (0, 0),
    rsvd1: bytes = bytes(16),
    xsave: int = 0,
) -> bytes:
    return struct.pack("<QQH6s2Q16sQ", flags, isolation, nbanks, rsvd, *banks, rsvd1, xsave)


# ---- MSHV_CREATE_PARTITION (§5.1) -----------------------------------------------------------


@pytest.mark.parametrize("flags", [0, 1, 2, 4, 3, 5, 6, 7])
def test_create_partition_known_flags(dev: int, flags: int) -> None:
    fd = create_partition(dev, flags)
    assert fd >= 0
    close(fd)


@pytest.mark.parametrize("bit", range(6, 64))
def test_create_partition_unknown_flag_bit(dev: int, bit: int) -> None:
    assert create_partition(dev, 1 << bit) == -errno.EINVAL


@pytest.mark.parametrize("isolation", [1, 2, 0xFF, 1 << 32, 2**64 - 1])
def test_create_partition_isolation_out_of_range(dev: int, isolation: int) -> None:
    assert create_partition(dev, 0x7, isolation) == -errno.EINVAL


def test_create_partition_unreadable_arg(dev: int) -> None:
    assert ioctl(dev, F.MSHV_CREATE_PARTITION, unmapped_addr()) == -errno.EFAULT
    assert ioctl(dev, F.MSHV_CREATE_PARTITION, KERNEL_ADDR) == -errno.EFAULT


def test_create_partition_v2(dev: int) -> None:
    fd = ioctl(dev, F.MSHV_CREATE_PARTITION, buf(v2(banks=(0x1234, 0xFFFF), xsave=0xF0)))
    assert fd >= 0
    close(fd)


def test_create_partition_v2_reads_64_bytes(dev: int) -> None:
    # The v1 struct ends where an unmapped page starts: fine without bit 3, EFAULT with it.
    addr, base = tail_of_page(struct.pack("<QQ", 0x7, 0))
    try:
        fd = ioctl(dev, F.MSHV_CREATE_PARTITION, addr)
        assert fd >= 0
        close(fd)
        addr2, base2 = tail_of_page(struct.pack("<QQ", 0x7 | V2_BIT, 0))
        assert ioctl(dev, F.MSHV_CREATE_PARTITION, addr2) == -errno.EFAULT
        unmap(base2, PAGE)
    finally:
        unmap(base, PAGE)


@pytest.mark.parametrize("nbanks", [0, 1, 3, 0xFFFF])
def test_create_partition_v2_bank_count(dev: int, nbanks: int) -> None:
    assert ioctl(dev, F.MSHV_CREATE_PARTITION, buf(v2(nbanks=nbanks))) == -errno.EINVAL


@pytest.mark.parametrize("byte", range(6))
@pytest.mark.parametrize("value", [1, 0x80, 0xFF])
def test_create_partition_v2_rsvd(dev: int, byte: int, value: int) -> None:
    rsvd = bytearray(6)
    rsvd[byte] = value
    assert ioctl(dev, F.MSHV_CREATE_PARTITION, buf(v2(rsvd=bytes(rsvd)))) == -errno.EINVAL


@pytest.mark.parametrize("byte", range(16))
def test_create_partition_v2_rsvd1(dev: int, byte: int) -> None:
    rsvd1 = bytearray(16)
    rsvd1[byte] = 1
    assert ioctl(dev, F.MSHV_CREATE_PARTITION, buf(v2(rsvd1=bytes(rsvd1)))) == -errno.EINVAL


@pytest.mark.parametrize("bit", range(6, 64, 5))
def test_create_partition_v2_rechecks_flags(dev: int, bit: int) -> None:
    assert ioctl(dev, F.MSHV_CREATE_PARTITION, buf(v2(flags=V2_BIT | 1 << bit))) == -errno.EINVAL
    assert ioctl(dev, F.MSHV_CREATE_PARTITION, buf(v2(isolation=1))) == -errno.EINVAL


# ---- MSHV_INITIALIZE_PARTITION (§5.2) -------------------------------------------------------


def test_initialize_is_idempotent_and_ignores_its_argument(pt: int) -> None:
    assert initialize(pt) == 0
    assert initialize(pt) == 0
    assert ioctl(pt, F.MSHV_INITIALIZE_PARTITION, KERNEL_ADDR) == 0


def test_create_vp_before_initialize_fails_in_the_hypervisor(pt: int) -> None:
    # HV_STATUS_INVALID_PARTITION_STATE -> EIO (inferred); the ioctl's own checks come first.
    assert create_vp(pt, 0) == -errno.EIO
    assert create_vp(pt, 256) == -errno.EINVAL


def test_map_memory_before_initialize_fails_in_the_hypervisor(pt: int) -> None:
    mem = Mem(PAGE)
    try:
        assert set_memory(pt, PAGE, 0, mem.addr) == -errno.EIO
        assert set_memory(pt, 0, 0, mem.addr) == -errno.EINVAL
        assert set_memory(pt, PAGE, 0, unmapped_addr()) == -errno.EINVAL
    finally:
        mem.close()


# ---- MSHV_CREATE_VP (§5.3) ------------------------------------------------------------------


@pytest.mark.parametrize("index", [256, 257, 1000, 1 << 31, 2**32 - 1])
def test_create_vp_index_out_of_range(ipt: int, index: int) -> None:
    assert create_vp(ipt, index) == -errno.EINVAL


def test_create_vp_duplicate(ipt: int) -> None:
    fd = create_vp(ipt, 1)
    assert fd >= 0
    assert create_vp(ipt, 1) == -errno.EEXIST
    close(fd)


@pytest.mark.parametrize("index", [0, 1, 17, 255])
def test_create_vp_any_index_below_256(ipt: int, index: int) -> None:
    fd = create_vp(ipt, index)
    assert fd >= 0
    close(fd)


def test_create_vp_unreadable_arg(ipt: int) -> None:
    assert ioctl(ipt, F.MSHV_CREATE_VP, unmapped_addr()) == -errno.EFAULT
    assert ioctl(ipt, F.MSHV_CREATE_VP, None) == -errno.EFAULT


# ---- MSHV_SET_GUEST_MEMORY (§5.4) -----------------------------------------------------------


@pytest.fixture
def ram() -> Iterator[Mem]:
    mem = Mem(16 * PAGE)
    yield mem
    mem.close()


def test_map_and_unmap(ipt: int, ram: Mem) -> None:
    assert set_memory(ipt, 16 * PAGE, 0x100, ram.addr) == 0
    assert set_memory(ipt, 16 * PAGE, 0x100, ram.addr, flags=1 << 2) == 0
    # Gone: unmapping again finds no region.
    assert set_memory(ipt, 16 * PAGE, 0x100, ram.addr, flags=1 << 2) == -errno.EINVAL


@pytest.mark.parametrize("flags", [0, 1, 2, 3])
def test_map_flag_combinations(ipt: int, ram: Mem, flags: int) -> None:
    assert set_memory(ipt, PAGE, 0x10, ram.addr, flags) == 0


def test_map_size_zero(ipt: int, ram: Mem) -> None:
    assert set_memory(ipt, 0, 0, ram.addr) == -errno.EINVAL


@pytest.mark.parametrize("size", [1, 100, PAGE - 1, PAGE + 1, 2 * PAGE + 512])
def test_map_size_unaligned(ipt: int, ram: Mem, size: int) -> None:
    assert set_memory(ipt, size, 0, ram.addr) == -errno.EINVAL


@pytest.mark.parametrize("offset", [1, 8, 2048, PAGE - 1])
def test_map_uaddr_unaligned(ipt: int, ram: Mem, offset: int) -> None:
    assert set_memory(ipt, PAGE, 0, ram.addr + offset) == -errno.EINVAL


@pytest.mark.parametrize("bit", range(3, 8))
def test_map_unknown_flag(ipt: int, ram: Mem, bit: int) -> None:
    assert set_memory(ipt, PAGE, 0, ram.addr, flags=1 << bit) == -errno.EINVAL
    # also with UNMAP set: the flag check comes first
    assert set_memory(ipt, PAGE, 0, ram.addr, flags=(1 << bit) | 4) == -errno.EINVAL


@pytest.mark.parametrize("byte", range(7))
@pytest.mark.parametrize("value", [1, 0xFF])
def test_map_rsvd(ipt: int, ram: Mem, byte: int, value: int) -> None:
    rsvd = bytearray(7)
    rsvd[byte] = value
    assert set_memory(ipt, PAGE, 0, ram.addr, rsvd=bytes(rsvd)) == -errno.EINVAL
    assert set_memory(ipt, PAGE, 0, ram.addr, flags=4, rsvd=bytes(rsvd)) == -errno.EINVAL


def test_map_unreadable_arg(ipt: int) -> None:
    assert ioctl(ipt, F.MSHV_SET_GUEST_MEMORY, unmapped_addr()) == -errno.EFAULT


@pytest.mark.parametrize("uaddr", [KERNEL_ADDR, 0x7FFF_FFFF_F000, 2**64 - PAGE])
def test_map_access_ok_fails_with_einval(ipt: int, uaddr: int) -> None:
    # access_ok() failing is EINVAL here, not EFAULT.
    assert set_memory(ipt, 2 * PAGE, 0, uaddr) == -errno.EINVAL


def test_map_no_vma_at_start(ipt: int) -> None:
    assert set_memory(ipt, PAGE, 0, unmapped_addr()) == -errno.EINVAL


def test_map_hole_inside_fails_pinning(ipt: int) -> None:
    base = map_pages(3)
    unmap(base + PAGE, PAGE)
    try:
        # vma_lookup() finds the first page; pinning the whole range faults on the hole.
        assert set_memory(ipt, 3 * PAGE, 0, base) == -errno.EFAULT
        assert set_memory(ipt, PAGE, 0, base) == 0
    finally:
        unmap(base, PAGE)
        unmap(base + 2 * PAGE, PAGE)


@pytest.mark.parametrize(
    "gfn,npages,uoff",
    [
        (0x100, 4, 64),  # starts inside the old GPA range
        (0xFE, 4, 64),  # ends inside it
        (0x108, 8, 64),  # last page is the old region's last page
        (0x200, 4, 0),  # user range starts inside the old one
        (0x200, 4, -2),  # user range ends inside the old one
    ],
)
def test_map_overlap_endpoints(ipt: int, gfn: int, npages: int, uoff: int) -> None:
    mem = Mem(128 * PAGE)
    try:
        base = mem.addr + 32 * PAGE
        assert set_memory(ipt, 16 * PAGE, 0x100, base) == 0
        assert set_memory(ipt, npages * PAGE, gfn, base + uoff * PAGE) == -errno.EEXIST
    finally:
        mem.close()


def test_map_containing_region_passes_the_6_15_endpoint_test(nokvm: None, dev: int) -> None:
    # 6.15 only looks up the new range's endpoints: a region strictly containing an old one
    # (in GPA and in user space) is not caught. (With KVM backing the memslot itself refuses.)
    pt = create_partition(dev)
    assert initialize(pt) == 0
    mem = Mem(64 * PAGE)
    try:
        assert set_memory(pt, 4 * PAGE, 0x108, mem.addr + 8 * PAGE) == 0
        assert set_memory(pt, 32 * PAGE, 0x100, mem.addr) == 0
    finally:
        close(pt)
        mem.close()


def test_map_user_range_containing_another_passes(ipt: int) -> None:
    # Same quirk in user space, which KVM does not mind either.
    mem = Mem(64 * PAGE)
    try:
        assert set_memory(ipt, 4 * PAGE, 0x108, mem.addr + 8 * PAGE) == 0
        assert set_memory(ipt, 32 * PAGE, 0x1000, mem.addr) == 0
    finally:
        mem.close()


def test_map_adjacent_regions(ipt: int) -> None:
    mem = Mem(8 * PAGE)
    try:
        assert set_memory(ipt, 4 * PAGE, 0x100, mem.addr) == 0
        assert set_memory(ipt, 4 * PAGE, 0x104, mem.addr + 4 * PAGE) == 0
    finally:
        mem.close()


@pytest.mark.parametrize("prot", [0, 1], ids=["PROT_NONE", "PROT_READ"])
def test_map_unwritable_user_memory_fails_pinning(ipt: int, prot: int) -> None:
    # 6.15 pins guest RAM with FOLL_WRITE even for a read-only guest mapping.
    mem = Mem(2 * PAGE)
    protect(mem.addr + PAGE, PAGE, prot)
    try:
        assert set_memory(ipt, 2 * PAGE, 0x10, mem.addr, flags=0) == -errno.EFAULT
        assert set_memory(ipt, PAGE, 0x10, mem.addr, flags=0) == 0
    finally:
        mem.close()


def test_unmap_no_region(ipt: int, ram: Mem) -> None:
    assert set_memory(ipt, PAGE, 0x100, ram.addr, flags=4) == -errno.EINVAL


@pytest.mark.parametrize(
    "size,gfn,uoff",
    [(8 * PAGE, 0x100, 0), (16 * PAGE, 0x101, 0), (16 * PAGE, 0x100, PAGE), (32 * PAGE, 0x100, 0)],
    ids=["short", "gfn-inside", "uaddr", "long"],
)
def test_unmap_must_match_exactly(ipt: int, ram: Mem, size: int, gfn: int, uoff: int) -> None:
    assert set_memory(ipt, 16 * PAGE, 0x100, ram.addr) == 0
    assert set_memory(ipt, size, gfn, ram.addr + uoff, flags=4) == -errno.EINVAL
    assert set_memory(ipt, 16 * PAGE, 0x100, ram.addr, flags=4) == 0


def test_unmap_ignores_other_flag_bits(ipt: int, ram: Mem) -> None:
    assert set_memory(ipt, PAGE, 0x100, ram.addr) == 0
    assert set_memory(ipt, PAGE, 0x100, ram.addr, flags=4 | 3) == 0


def test_unmap_ignores_vma(ipt: int) -> None:
    mem = Mem(PAGE)
    addr = mem.addr
    assert set_memory(ipt, PAGE, 0x100, addr) == 0
    mem.close()  # the VMM freed the memory first: unmapping still works
    assert set_memory(ipt, PAGE, 0x100, addr, flags=4) == 0


# ---- MSHV_IRQFD (§5.5) ----------------------------------------------------------------------


@pytest.fixture
def efd() -> Iterator[int]:
    fd = eventfd()
    yield fd
    os.close(fd)


def test_irqfd_assign_and_deassign(ipt: int, efd: int) -> None:
    assert irqfd(ipt, efd, 5) == 0
    assert irqfd(ipt, efd, 5, flags=1) == 0
    assert irqfd(ipt, efd, 5) == 0  # free again


@pytest.mark.parametrize("bit", range(2, 32))
def test_irqfd_unknown_flag(ipt: int, efd: int, bit: int) -> None:
    assert irqfd(ipt, efd, 0, flags=1 << bit) == -errno.EINVAL


def test_irqfd_flags_checked_before_fd(ipt: int) -> None:
    assert irqfd(ipt, -1, 0, flags=1 << 5) == -errno.EINVAL


@pytest.mark.parametrize("flags", [0, 1])
def test_irqfd_bad_fd(ipt: int, flags: int) -> None:
    assert irqfd(ipt, -1, 0, flags=flags) == -errno.EBADF
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    assert irqfd(ipt, r, 0, flags=flags) == -errno.EBADF


@pytest.mark.parametrize("flags", [0, 1])
def test_irqfd_not_an_eventfd(ipt: int, dev: int, flags: int) -> None:
    r, w = os.pipe()
    try:
        assert irqfd(ipt, r, 0, flags=flags) == -errno.EINVAL
        assert irqfd(ipt, dev, 0, flags=flags) == -errno.EINVAL  # our handle is no eventfd
        assert irqfd(ipt, ipt, 0, flags=flags) == -errno.EINVAL
    finally:
        os.close(r)
        os.close(w)


def test_irqfd_same_eventfd_twice_is_busy(ipt: int, efd: int) -> None:
    assert irqfd(ipt, efd, 1) == 0
    assert irqfd(ipt, efd, 2) == -errno.EBUSY
    dup = os.dup(efd)
    try:
        assert irqfd(ipt, dup, 3) == -errno.EBUSY  # same eventfd through another number
    finally:
        os.close(dup)


def test_irqfd_two_eventfds_one_gsi(ipt: int, efd: int) -> None:
    other = eventfd()
    try:
        assert irqfd(ipt, efd, 7) == 0
        assert irqfd(ipt, other, 7) == 0
    finally:
        os.close(other)


def test_irqfd_gsi_not_validated(ipt: int, efd: int) -> None:
    assert irqfd(ipt, efd, 0xFFFFFFFF) == 0


def test_irqfd_deassign_without_match_is_fine(ipt: int, efd: int) -> None:
    assert irqfd(ipt, efd, 9, flags=1) == 0


def test_irqfd_deassign_needs_the_same_gsi(ipt: int, efd: int) -> None:
    assert irqfd(ipt, efd, 9) == 0
    assert irqfd(ipt, efd, 10, flags=1) == 0
    assert irqfd(ipt, efd, 11) == -errno.EBUSY  # still bound to gsi 9
    dup = os.dup(efd)
    try:
        assert irqfd(ipt, dup, 9, flags=1) == 0  # any descriptor of the same eventfd
    finally:
        os.close(dup)
    assert irqfd(ipt, efd, 11) == 0


def test_irqfd_resamplefd_ignored_without_resample(ipt: int, efd: int) -> None:
    assert irqfd(ipt, efd, 1, resamplefd=-1) == 0


def test_irqfd_resample_bad_resamplefd(ipt: int, efd: int) -> None:
    assert msi_routing(ipt, [msi_entry(3, 0x40, level=True)]) == 0
    assert irqfd(ipt, efd, 3, flags=2, resamplefd=-1) == -errno.EBADF
    r, w = os.pipe()
    try:
        assert irqfd(ipt, efd, 3, flags=2, resamplefd=r) == -errno.EINVAL
    finally:
        os.close(r)
        os.close(w)


def test_irqfd_resample_needs_a_level_route(ipt: int, efd: int) -> None:
    rs = eventfd()
    try:
        assert irqfd(ipt, efd, 3, flags=2, resamplefd=rs) == -errno.EINVAL  # no route
        assert msi_routing(ipt, [msi_entry(3, 0x40, level=False)]) == 0
        assert irqfd(ipt, efd, 3, flags=2, resamplefd=rs) == -errno.EINVAL  # edge route
        assert msi_routing(ipt, [msi_entry(3, 0x40, level=True)]) == 0
        assert irqfd(ipt, efd, 3, flags=2, resamplefd=rs) == 0
    finally:
        os.close(rs)


def test_irqfd_busy_checked_before_level(ipt: int, efd: int) -> None:
    rs = eventfd()
    try:
        assert irqfd(ipt, efd, 4) == 0
        assert irqfd(ipt, efd, 3, flags=2, resamplefd=rs) == -errno.EBUSY
    finally:
        os.close(rs)


def test_irqfd_unreadable_arg(ipt: int) -> None:
    assert ioctl(ipt, F.MSHV_IRQFD, unmapped_addr()) == -errno.EFAULT


# ---- MSHV_IOEVENTFD (§5.6) ------------------------------------------------------------------

MMIO = 0xFEB00000


def test_ioeventfd_assign_and_deassign(ipt: int, efd: int) -> None:
    assert ioeventfd(ipt, efd, MMIO, 4) == 0
    assert ioeventfd(ipt, efd, MMIO, 4, flags=4) == 0
    assert ioeventfd(ipt, efd, MMIO, 4, flags=4) == -errno.ENOENT


@pytest.mark.parametrize("bit", range(3, 32))
def test_ioeventfd_unknown_flag(ipt: int, efd: int, bit: int) -> None:
    assert ioeventfd(ipt, efd, MMIO, 4, flags=1 << bit) == -errno.EINVAL


@pytest.mark.parametrize("byte", range(4))
@pytest.mark.parametrize("value", [1, 0xFF])
def test_ioeventfd_rsvd(ipt: int, efd: int, byte: int, value: int) -> None:
    rsvd = bytearray(4)
    rsvd[byte] = value
    assert ioeventfd(ipt, efd, MMIO, 4, rsvd=bytes(rsvd)) == -errno.EINVAL
    # reserved bytes are checked before PIO is refused
    assert ioeventfd(ipt, efd, MMIO, 4, flags=2, rsvd=bytes(rsvd)) == -errno.EINVAL


@pytest.mark.parametrize("flags", [2, 3, 6, 7])
def test_ioeventfd_pio_not_supported(ipt: int, efd: int, flags: int) -> None:
    assert ioeventfd(ipt, efd, 0x3F8, 1, flags=flags) == -errno.EOPNOTSUPP
    assert ioeventfd(ipt, -1, 0x3F8, 1, flags=flags) == -errno.EOPNOTSUPP


@pytest.mark.parametrize("length", [3, 5, 6, 7, 9, 16, 2**32 - 1])
def test_ioeventfd_length(ipt: int, efd: int, length: int) -> None:
    assert ioeventfd(ipt, efd, MMIO, length) == -errno.EINVAL


@pytest.mark.parametrize("length", [0, 1, 2, 4, 8])
def test_ioeventfd_natural_lengths(ipt: int, efd: int, length: int) -> None:
    assert ioeventfd(ipt, efd, MMIO + 0x100, length) == 0


@pytest.mark.parametrize("addr,length", [(2**64 - 1, 1), (2**64 - 4, 8), (2**64 - 2, 4)])
def test_ioeventfd_range_wraps(ipt: int, efd: int, addr: int, length: int) -> None:
    assert ioeventfd(ipt, efd, addr, length) == -errno.EINVAL


def test_ioeventfd_bad_fd(ipt: int) -> None:
    assert ioeventfd(ipt, -1, MMIO, 4) == -errno.EBADF
    assert ioeventfd(ipt, -1, MMIO, 4, flags=4) == -errno.EBADF


def test_ioeventfd_not_an_eventfd(ipt: int) -> None:
    r, w = os.pipe()
    try:
        assert ioeventfd(ipt, r, MMIO, 4) == -errno.EINVAL
        assert ioeventfd(ipt, r, MMIO, 4, flags=4) == -errno.EINVAL
        assert ioeventfd(ipt, ipt, MMIO, 4) == -errno.EINVAL
    finally:
        os.close(r)
        os.close(w)


def test_ioeventfd_length_checked_before_fd(ipt: int) -> None:
    assert ioeventfd(ipt, -1, MMIO, 3) == -errno.EINVAL


@pytest.mark.parametrize(
    "first,second,result",
    [
        ((0, 0), (0, 0), -errno.EEXIST),  # two wildcards
        ((1, 5), (0, 0), -errno.EEXIST),  # datamatch vs wildcard
        ((0, 0), (1, 5), -errno.EEXIST),  # wildcard vs datamatch
        ((1, 5), (1, 5), -errno.EEXIST),  # same datamatch
        ((1, 5), (1, 6), 0),  # different datamatch
    ],
)
def test_ioeventfd_collision(ipt: int, first: tuple[int, int], second: tuple[int, int], result: int) -> None:
    a, b = eventfd(), eventfd()
    try:
        assert ioeventfd(ipt, a, MMIO, 4, flags=first[0], datamatch=first[1]) == 0
        assert ioeventfd(ipt, b, MMIO, 4, flags=second[0], datamatch=second[1]) == result
    finally:
        os.close(a)
        os.close(b)


def test_ioeventfd_other_length_does_not_collide(ipt: int, efd: int) -> None:
    other = eventfd()
    try:
        assert ioeventfd(ipt, efd, MMIO, 4) == 0
        assert ioeventfd(ipt, other, MMIO, 8) == 0
    finally:
        os.close(other)


@pytest.mark.parametrize(
    "change",
    [{"addr": MMIO + 4}, {"length": 8}, {"flags": 1 | 4}, {"datamatch": 6}, {"other_fd": True}],
    ids=["addr", "len", "wildcardness", "datamatch", "eventfd"],
)
def test_ioeventfd_deassign_must_match(ipt: int, efd: int, change: dict[str, int]) -> None:
    base_flags = 1 if "datamatch" in change else 0
    assert ioeventfd(ipt, efd, MMIO, 4, flags=base_flags, datamatch=5) == 0
    fd = eventfd() if change.get("other_fd") else efd
    try:
        flags = change.get("flags", base_flags | 4)
        assert (
            ioeventfd(
                ipt,
                fd,
                change.get("addr", MMIO),
                change.get("length", 4),
                flags=flags,
                datamatch=change.get("datamatch", 5),
            )
            == -errno.ENOENT
        )
        assert ioeventfd(ipt, efd, MMIO, 4, flags=base_flags | 4, datamatch=5) == 0
    finally:
        if fd != efd:
            os.close(fd)


def test_ioeventfd_deassign_wildcard_ignores_datamatch(ipt: int, efd: int) -> None:
    assert ioeventfd(ipt, efd, MMIO, 4) == 0
    assert ioeventfd(ipt, efd, MMIO, 4, flags=4, datamatch=1234) == 0


def test_ioeventfd_unreadable_arg(ipt: int) -> None:
    assert ioctl(ipt, F.MSHV_IOEVENTFD, unmapped_addr()) == -errno.EFAULT


# ---- MSHV_SET_MSI_ROUTING (§5.7) ------------------------------------------------------------


def test_routing_table(ipt: int) -> None:
    assert msi_routing(ipt, [msi_entry(g, 0x30 + g) for g in range(24)]) == 0
    assert msi_routing(ipt, []) == 0  # nr == 0 clears


def test_routing_max_size(ipt: int) -> None:
    assert msi_routing(ipt, [msi_entry(g, 0x40) for g in range(4096)]) == 0


@pytest.mark.parametrize("nr", [4097, 10000, 2**32 - 1])
def test_routing_too_many(ipt: int, nr: int) -> None:
    assert msi_routing(ipt, [], nr=nr) == -errno.EINVAL


@pytest.mark.parametrize("rsvd", [1, 0x100, 0x10000, 0x1000000, 0xFFFFFFFF])
def test_routing_rsvd(ipt: int, rsvd: int) -> None:
    # each of the four bytes of rsvd
    assert msi_routing(ipt, [msi_entry(1, 0x40)], rsvd=rsvd) == -errno.EINVAL


@pytest.mark.parametrize("gsi", [4096, 4097, 2**31, 2**32 - 1])
def test_routing_gsi_out_of_range(ipt: int, gsi: int) -> None:
    assert msi_routing(ipt, [msi_entry(1, 0x40), (gsi, 0xFEE00000, 0, 0x41)]) == -errno.EINVAL


@pytest.mark.parametrize("hi", [1, 0xFF, 0xFFFFFFFF])
def test_routing_address_hi(ipt: int, hi: int) -> None:
    assert msi_routing(ipt, [(5, 0xFEE00000, hi, 0x40)]) == -errno.EINVAL


def test_routing_duplicate_gsi(ipt: int) -> None:
    assert msi_routing(ipt, [msi_entry(5, 0x40), msi_entry(6, 0x41), msi_entry(5, 0x42)]) == -errno.EINVAL


def test_routing_duplicate_gsi_zero_accepted_6_15_quirk(ipt: int, efd: int) -> None:
    # 6.15 tests the stored gsi number for != 0, so gsi 0 may repeat; the last entry wins.
    assert msi_routing(ipt, [msi_entry(0, 0x40, level=False), msi_entry(0, 0x41, level=True)]) == 0
    rs = eventfd()
    try:
        assert irqfd(ipt, efd, 0, flags=2, resamplefd=rs) == 0  # level: the second entry won
    finally:
        os.close(rs)


def test_routing_nr_zero_clears(ipt: int, efd: int) -> None:
    rs = eventfd()
    try:
        assert msi_routing(ipt, [msi_entry(3, 0x40, level=True)]) == 0
        assert msi_routing(ipt, []) == 0
        assert irqfd(ipt, efd, 3, flags=2, resamplefd=rs) == -errno.EINVAL  # route gone
    finally:
        os.close(rs)


def test_routing_replaces_the_table(ipt: int, efd: int) -> None:
    rs = eventfd()
    try:
        assert msi_routing(ipt, [msi_entry(3, 0x40, level=True)]) == 0
        assert msi_routing(ipt, [msi_entry(4, 0x40, level=True)]) == 0
        assert irqfd(ipt, efd, 3, flags=2, resamplefd=rs) == -errno.EINVAL
    finally:
        os.close(rs)


def test_routing_failed_update_keeps_the_old_table(ipt: int, efd: int) -> None:
    rs = eventfd()
    try:
        assert msi_routing(ipt, [msi_entry(3, 0x40, level=True)]) == 0
        assert msi_routing(ipt, [msi_entry(4, 0x40), (5, 0xFEE00000, 1, 0)]) == -errno.EINVAL
        assert irqfd(ipt, efd, 3, flags=2, resamplefd=rs) == 0
    finally:
        os.close(rs)


def test_routing_unreadable(ipt: int) -> None:
    assert ioctl(ipt, F.MSHV_SET_MSI_ROUTING, unmapped_addr()) == -errno.EFAULT
    # header readable, entries not
    addr, base = tail_of_page(struct.pack("<II", 2, 0))
    try:
        assert ioctl(ipt, F.MSHV_SET_MSI_ROUTING, addr) == -errno.EFAULT
    finally:
        unmap(base, PAGE)
    # nr == 0 reads no entries at all
    addr, base = tail_of_page(struct.pack("<II", 0, 0))
    try:
        assert ioctl(ipt, F.MSHV_SET_MSI_ROUTING, addr) == 0
    finally:
        unmap(base, PAGE)


# ---- MSHV_GET_GPAP_ACCESS_BITMAP (§5.8) -----------------------------------------------------


@pytest.fixture
def tracked(ipt: int) -> Iterator[tuple[int, Mem]]:
    """Initialized partition, 16 pages at GPA 0x100, access tracking on, a bitmap buffer."""
    mem = Mem(16 * PAGE)
    out = Mem(PAGE)
    assert set_memory(ipt, 16 * PAGE, 0x100, mem.addr) == 0
    h = set_property(ipt, TRACKING, 1)
    assert (h.rc, h.status) == (0, 0)
    yield ipt, out
    mem.close()
    out.close()


@pytest.mark.parametrize("access_type", [2, 3, 0x80, 0xFF])
def test_gpap_access_type(tracked: tuple[int, Mem], access_type: int) -> None:
    pt, out = tracked
    assert gpap(pt, access_type, 0, 16, 0x100, out.addr) == -errno.EINVAL


@pytest.mark.parametrize("op", [3, 4, 0xFF])
def test_gpap_access_op(tracked: tuple[int, Mem], op: int) -> None:
    pt, out = tracked
    assert gpap(pt, 0, op, 16, 0x100, out.addr) == -errno.EINVAL


@pytest.mark.parametrize("byte", range(6))
@pytest.mark.parametrize("value", [1, 0xFF])
def test_gpap_rsvd(tracked: tuple[int, Mem], byte: int, value: int) -> None:
    pt, out = tracked
    rsvd = bytearray(6)
    rsvd[byte] = value
    assert gpap(pt, 0, 0, 16, 0x100, out.addr, rsvd=bytes(rsvd)) == -errno.EINVAL


def test_gpap_page_count_zero(tracked: tuple[int, Mem]) -> None:
    pt, out = tracked
    assert gpap(pt, 0, 0, 0, 0x100, out.addr) == -errno.EINVAL


def test_gpap_null_bitmap(tracked: tuple[int, Mem]) -> None:
    pt, _ = tracked
    assert gpap(pt, 0, 0, 16, 0x100, 0) == -errno.EINVAL


def test_gpap_unwritable_bitmap(tracked: tuple[int, Mem]) -> None:
    pt, _ = tracked
    assert gpap(pt, 1, 0, 16, 0x100, unmapped_addr()) == -errno.EFAULT
    ro = Mem(PAGE, prot=1)
    try:
        assert gpap(pt, 1, 0, 16, 0x100, ro.addr) == -errno.EFAULT
    finally:
        ro.close()


def test_gpap_unreadable_arg(tracked: tuple[int, Mem]) -> None:
    pt, _ = tracked
    assert ioctl(pt, F.MSHV_GET_GPAP_ACCESS_BITMAP, unmapped_addr()) == -errno.EFAULT


def test_gpap_huge_page_count_is_enomem(tracked: tuple[int, Mem]) -> None:
    # The kernel's vzalloc(page_count) fails (E2BIG/EBADFD cannot trigger on x86-64).
    pt, out = tracked
    assert gpap(pt, 0, 0, 2**40, 0x100, out.addr) == -errno.ENOMEM


def test_gpap_without_tracking_fails_in_the_hypervisor(ipt: int) -> None:
    # Our choice: HV_STATUS_INVALID_PARTITION_STATE -> EIO when tracking was never enabled.
    out = Mem(PAGE)
    try:
        assert gpap(ipt, 1, 0, 16, 0x100, out.addr) == -errno.EIO
        assert gpap(ipt, 2, 0, 16, 0x100, out.addr) == -errno.EINVAL  # own checks first
    finally:
        out.close()


def test_gpap_noop_behaves_as_set(tracked: tuple[int, Mem]) -> None:
    pt, out = tracked
    out.write(0, b"\xaa" * 8)
    assert gpap(pt, 1, 0, 16, 0x100, out.addr) == 0  # NOOP: reports clean, then SETs
    assert out.read(0, 3) == b"\0\0\xaa"  # 2 bytes written, tail untouched
    assert gpap(pt, 1, 1, 16, 0x100, out.addr) == 0  # CLEAR: reports what NOOP set
    assert out.read(0, 2) == b"\xff\xff"
    assert gpap(pt, 1, 2, 16, 0x100, out.addr) == 0  # SET: reports clean after CLEAR
    assert out.read(0, 2) == b"\0\0"
    assert gpap(pt, 0, 0, 16, 0x100, out.addr) == 0  # setting dirty set accessed too
    assert out.read(0, 2) == b"\xff\xff"


def test_gpap_tail_bits_are_zero(tracked: tuple[int, Mem]) -> None:
    pt, out = tracked
    assert gpap(pt, 0, 2, 12, 0x100, out.addr) == 0
    out.write(0, b"\x55\x55")
    assert gpap(pt, 0, 0, 12, 0x100, out.addr) == 0
    assert out.read(0, 2) == b"\xff\x0f"


def test_gpap_pages_outside_regions_read_clean(tracked: tuple[int, Mem]) -> None:
    pt, out = tracked
    assert gpap(pt, 1, 2, 32, 0x0F8, out.addr) == 0
    assert gpap(pt, 1, 0, 32, 0x0F8, out.addr) == 0
    assert peek(out.addr, 4) == bytes([0x00, 0xFF, 0xFF, 0x00])
