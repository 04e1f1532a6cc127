"""A bad pointer is EFAULT on a VP's hot calls, also after good buffers have served that VP.

The emulated device copies user memory with a system call until a page has served a VP once, and
with memcpy after that (abi/emu/emu_uaccess.c). What the kernel's copy_{from,to}_user answers must
not change for pointers that were never good: a range that wraps or reaches past user space, an
unmapped page, a read-only page written to (docs/ABI.md §4: a failed copy is EFAULT). Each case
first makes the VP's calls succeed with good buffers, so the remembered pages are in play.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator

import pytest

from tests.abi import facts as F

from .emutil import KERNEL_ADDR, PAGE, Mem, addr_of, buf, hvcall_struct, ioctl, unmapped_addr
from .guest import CODE, JMP_SELF, REG, Guest

pytestmark = [pytest.mark.kvm, pytest.mark.usefixtures("kvm")]

OUT_80 = b"\xe6\x80"
WRAPS = 2**64 - 16  # 16 bytes from the top: the range wraps past zero
BAD = [WRAPS, KERNEL_ADDR, 2**64 - PAGE]
GET_VP_REGISTERS = F.HVCALL_GET_VP_REGISTERS  # §4.9; input: partition id, vp_index, vtl, rsvd, names


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest()
    g.load(CODE, OUT_80 + JMP_SELF)
    g.long_mode()
    yield g
    g.close()


@pytest.mark.parametrize("bad", BAD, ids=["wraps", "kernel", "top-page"])
def test_run_vp_into_a_bad_buffer_after_good_ones(guest: Guest, bad: int) -> None:
    good = buf(bytes(F.RUN_VP_BUF_SZ))
    assert ioctl(guest.vps[0], F.MSHV_RUN_VP, good) == 0  # the OUT, into a buffer now remembered
    assert ioctl(guest.vps[0], F.MSHV_RUN_VP, good) == 0  # not completed: the same OUT again
    assert ioctl(guest.vps[0], F.MSHV_RUN_VP, bad) == -errno.EFAULT


def test_run_vp_into_an_unmapped_or_read_only_page_after_good_ones(guest: Guest) -> None:
    good = buf(bytes(F.RUN_VP_BUF_SZ))
    ro = Mem(PAGE, prot=1)
    try:
        assert ioctl(guest.vps[0], F.MSHV_RUN_VP, good) == 0
        assert ioctl(guest.vps[0], F.MSHV_RUN_VP, unmapped_addr()) == -errno.EFAULT
        assert ioctl(guest.vps[0], F.MSHV_RUN_VP, ro.addr) == -errno.EFAULT
    finally:
        ro.close()


@pytest.mark.parametrize("where", ["arg", "in_ptr", "out_ptr"])
@pytest.mark.parametrize("bad", BAD, ids=["wraps", "kernel", "top-page"])
def test_register_hypercall_with_a_bad_pointer_after_good_ones(guest: Guest, where: str, bad: int) -> None:
    vp = guest.vps[0]
    inp = buf(struct.pack("<QIBBHI", 0, 0, 0, 0, 0, REG["rip"]))
    out = buf(bytes(16))
    in_ptr, out_ptr = int(addr_of(inp)), int(addr_of(out))
    good = buf(hvcall_struct(GET_VP_REGISTERS, 1, 20, 16, in_ptr=in_ptr, out_ptr=out_ptr))
    for _ in range(2):
        assert ioctl(vp, F.MSHV_ROOT_HVCALL, good) == 0
    if where == "arg":
        assert ioctl(vp, F.MSHV_ROOT_HVCALL, bad) == -errno.EFAULT
        return
    ptrs = {"in_ptr": in_ptr, "out_ptr": out_ptr, where: bad}
    arg = buf(hvcall_struct(GET_VP_REGISTERS, 1, 20, 16, in_ptr=ptrs["in_ptr"], out_ptr=ptrs["out_ptr"]))
    assert ioctl(vp, F.MSHV_ROOT_HVCALL, arg) == -errno.EFAULT


def test_register_hypercall_output_to_a_read_only_page_after_good_ones(guest: Guest) -> None:
    vp = guest.vps[0]
    inp = buf(struct.pack("<QIBBHI", 0, 0, 0, 0, 0, REG["rip"]))
    out = buf(bytes(16))
    ro = Mem(PAGE, prot=1)
    try:
        good = buf(hvcall_struct(GET_VP_REGISTERS, 1, 20, 16, in_ptr=int(addr_of(inp)), out_ptr=int(addr_of(out))))
        assert ioctl(vp, F.MSHV_ROOT_HVCALL, good) == 0
        arg = buf(hvcall_struct(GET_VP_REGISTERS, 1, 20, 16, in_ptr=int(addr_of(inp)), out_ptr=ro.addr))
        assert ioctl(vp, F.MSHV_ROOT_HVCALL, arg) == -errno.EFAULT
    finally:
        ro.close()
