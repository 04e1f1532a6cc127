"""MSHV_ROOT_HVCALL: the ioctl's own checks, HV_STATUS -> errno, and the hypercalls the emulated
hypervisor answers (properties, registers, interrupts).

Expected values: docs/ABI.md §4.9 (checks in order, allow-list, write-back), §5 (status codes and
their errno), §6 (input layouts, property codes, interrupt types, translate results), §8 (register
names and formats) and, for what only the hypervisor decides, §9.5 (the emulated hypervisor's
answers). Register reset values are the x86 reset state.
"""

from __future__ import annotations

import errno
import struct
from typing import Any

import pytest
from mshv_libvirt._mshv import ffi

from tests.abi import facts as F

from .emutil import (
    KERNEL_ADDR,
    PAGE,
    Mem,
    Seg,
    Table,
    addr_of,
    buf,
    close,
    create_partition,
    create_vp,
    get_property,
    get_regs,
    get_regs_raw,
    get_seg,
    hvcall,
    hvcall_result,
    hvcall_struct,
    initialize,
    ioctl,
    set_property,
    set_regs,
    unmapped_addr,
)

GET_PROP = 0x44  # §4.9 / §6.1
SET_PROP = 0x45
ALLOWED = list(F.ALLOW_LIST_6_15)
REG = F.REG  # §8.2
# §6.4 property codes
PROP_MSR_ACTION = 0x00050017
PROP_TIME_FREEZE = 0x00030003
PROP_SYNTH_FEATURES = 0x00010001
PROP_MAX_XSAVE = 0x00060008
PROP_PHYS_BITS = 0x00060006

# §5 status codes
HV_STATUS_INVALID_HYPERCALL_INPUT = 3
HV_STATUS_INVALID_PARAMETER = 5
HV_STATUS_ACCESS_DENIED = 6
HV_STATUS_INVALID_PARTITION_STATE = 7
HV_STATUS_UNKNOWN_PROPERTY = 9
HV_STATUS_PROPERTY_VALUE_OUT_OF_RANGE = 0xA
HV_STATUS_INVALID_VP_INDEX = 0xE
HV_STATUS_INVALID_VP_STATE = 0x15


def raw(fd: int, **fields: Any) -> int:
    """MSHV_ROOT_HVCALL with a hand-built struct (defaults: a valid GET_PARTITION_PROPERTY)."""
    inp = fields.pop("inp", None)
    if inp is None:
        inp = buf(struct.pack("<QII", 0, PROP_MSR_ACTION, 0))
    out = ffi.new("char[]", PAGE)
    args: dict[str, Any] = {"code": GET_PROP, "in_sz": 16, "out_sz": 8, "in_ptr": addr_of(inp), "out_ptr": addr_of(out)}
    args.update(fields)
    return ioctl(fd, F.MSHV_ROOT_HVCALL, buf(hvcall_struct(**args)))


# ---- the ioctl's own checks, in order ------------------------------------------------------


def test_valid_call(pt: int) -> None:
    assert raw(pt) == 0


@pytest.mark.parametrize("status", [1, 2, 0x100, 0xFFFF])
def test_status_must_be_zero(pt: int, status: int) -> None:
    assert raw(pt, status=status) == -errno.EINVAL


def test_in_ptr_null(pt: int) -> None:
    assert raw(pt, in_ptr=0) == -errno.EINVAL


@pytest.mark.parametrize("in_sz", range(8))
def test_in_sz_below_8(pt: int, in_sz: int) -> None:
    assert raw(pt, in_sz=in_sz) == -errno.EINVAL


@pytest.mark.parametrize("byte", range(6))
@pytest.mark.parametrize("value", [1, 0xFF])
def test_rsvd(pt: int, byte: int, value: int) -> None:
    rsvd = bytearray(6)
    rsvd[byte] = value
    assert raw(pt, rsvd=bytes(rsvd)) == -errno.EINVAL


@pytest.mark.parametrize("in_sz", [4097, 8192, 0xFFFF])
def test_in_sz_above_page(pt: int, in_sz: int) -> None:
    assert raw(pt, in_sz=in_sz) == -errno.EINVAL


def test_in_sz_of_a_page_is_fine(pt: int) -> None:
    page = ffi.new("char[]", PAGE)
    ffi.memmove(page, struct.pack("<QII", 0, PROP_MSR_ACTION, 0), 16)
    assert raw(pt, inp=page, in_sz=PAGE) == 0


def test_out_ptr_with_out_sz_zero(pt: int) -> None:
    assert raw(pt, out_sz=0) == -errno.EINVAL


@pytest.mark.parametrize("out_sz", [4097, 0xFFFF])
def test_out_sz_above_page(pt: int, out_sz: int) -> None:
    assert raw(pt, out_sz=out_sz) == -errno.EINVAL


def test_out_sz_without_out_ptr_is_not_checked(pt: int) -> None:
    # Documented MBZ but unchecked by the kernel.
    assert raw(pt, out_ptr=0, out_sz=100) == 0
    assert raw(pt, out_ptr=0, out_sz=0) == 0


@pytest.mark.parametrize("code", [0, 1, 0x43, 0x4E, 0x4F, 0x53, 0x54, 0x99, 0x101, 0x1000, 0xFFFF])
def test_code_not_in_the_6_15_allow_list(pt: int, code: int) -> None:
    assert raw(pt, code=code) == -errno.EINVAL


def test_code_checked_before_input_is_read(pt: int) -> None:
    assert raw(pt, code=0x4E, in_ptr=unmapped_addr()) == -errno.EINVAL


@pytest.mark.parametrize("code", ALLOWED)
def test_every_allowed_code_gets_past_the_ioctl(vp: int, ipt: int, code: int) -> None:
    # Past the allow-list the input is read: an unreadable one is EFAULT for every code.
    fd = ipt
    assert raw(fd, code=code, in_ptr=unmapped_addr()) == -errno.EFAULT


def test_set_partition_property_on_a_vp_fd(vp: int) -> None:
    assert set_property(vp, PROP_MSR_ACTION, 1).rc == -errno.EINVAL


def test_set_partition_property_on_the_partition_fd(ipt: int) -> None:
    h = set_property(ipt, PROP_MSR_ACTION, 1)
    assert (h.rc, h.status) == (0, 0)
    h = get_property(ipt, PROP_MSR_ACTION)
    assert struct.unpack("<Q", h.out)[0] == 1


def test_get_partition_property_on_a_vp_fd(vp: int) -> None:
    h = get_property(vp, PROP_MSR_ACTION)
    assert (h.rc, h.status) == (0, 0)


@pytest.mark.parametrize("where", ["unmapped", "kernel"])
def test_unreadable_input(pt: int, where: str) -> None:
    addr = unmapped_addr() if where == "unmapped" else KERNEL_ADDR
    assert raw(pt, in_ptr=addr) == -errno.EFAULT


def test_unreadable_struct(pt: int) -> None:
    assert ioctl(pt, F.MSHV_ROOT_HVCALL, unmapped_addr()) == -errno.EFAULT
    assert ioctl(pt, F.MSHV_ROOT_HVCALL, None) == -errno.EFAULT


def test_struct_not_writable(pt: int) -> None:
    # Read fine, written back with the status: a read-only struct fails only at the end.
    inp = buf(struct.pack("<QII", 0, PROP_MSR_ACTION, 0))
    out = ffi.new("char[]", 8)
    mem = Mem(PAGE)
    try:
        mem.write(0, hvcall_struct(GET_PROP, in_sz=16, out_sz=8, in_ptr=addr_of(inp), out_ptr=addr_of(out)))
        from .emutil import protect

        protect(mem.addr, PAGE, 1)
        assert ioctl(pt, F.MSHV_ROOT_HVCALL, mem.addr) == -errno.EFAULT
    finally:
        mem.close()


def test_unwritable_output(pt: int) -> None:
    inp = buf(struct.pack("<QII", 0, PROP_MSR_ACTION, 0))
    arg = buf(hvcall_struct(GET_PROP, in_sz=16, out_sz=8, in_ptr=addr_of(inp), out_ptr=unmapped_addr()))
    assert ioctl(pt, F.MSHV_ROOT_HVCALL, arg) == -errno.EFAULT
    assert hvcall_result(arg)[0] == 0  # the struct was still written back first


def test_input_beyond_in_sz_reads_as_zero(pt: int) -> None:
    # in_sz = 8: only the partition id is copied; property code 0 is unknown.
    inp = buf(struct.pack("<QII", 0, PROP_MSR_ACTION, 0))
    arg = buf(hvcall_struct(GET_PROP, in_sz=8, in_ptr=addr_of(inp)))
    assert ioctl(pt, F.MSHV_ROOT_HVCALL, arg) == -errno.EIO
    assert hvcall_result(arg)[0] == HV_STATUS_UNKNOWN_PROPERTY


def test_callers_input_is_not_modified(pt: int) -> None:
    # The kernel writes the partition id into its own copy of the input only.
    data = struct.pack("<QII", 0xDEADBEEF, PROP_MSR_ACTION, 0)
    inp = buf(data)
    out = ffi.new("char[]", 8)
    arg = buf(hvcall_struct(GET_PROP, in_sz=16, out_sz=8, in_ptr=addr_of(inp), out_ptr=addr_of(out)))
    assert ioctl(pt, F.MSHV_ROOT_HVCALL, arg) == 0
    assert bytes(ffi.buffer(inp, 16)) == data


# ---- HV_STATUS -> errno, status/reps written back ------------------------------------------


def test_unknown_property(pt: int) -> None:
    h = get_property(pt, 0x12345678)
    assert (h.rc, h.status) == (-errno.EIO, HV_STATUS_UNKNOWN_PROPERTY)
    h = set_property(pt, 0x12345678, 0)
    assert (h.rc, h.status) == (-errno.EIO, HV_STATUS_UNKNOWN_PROPERTY)


def test_reps_on_a_simple_call(pt: int) -> None:
    h = hvcall(pt, GET_PROP, struct.pack("<QII", 0, PROP_MSR_ACTION, 0), 8, reps=1)
    assert (h.rc, h.status, h.reps) == (-errno.EINVAL, HV_STATUS_INVALID_HYPERCALL_INPUT, 0)


@pytest.mark.parametrize("code,value", [(PROP_MSR_ACTION, 2), (PROP_TIME_FREEZE, 7), (0x00050005, 2)])
def test_property_value_out_of_range(pt: int, code: int, value: int) -> None:
    h = set_property(pt, code, value)
    assert (h.rc, h.status) == (-errno.EIO, HV_STATUS_PROPERTY_VALUE_OUT_OF_RANGE)


@pytest.mark.parametrize("code", [PROP_MAX_XSAVE, PROP_PHYS_BITS, 0x00060007, 0x00030005])
def test_read_only_property(pt: int, code: int) -> None:
    assert get_property(pt, code).rc == 0
    h = set_property(pt, code, 1)
    assert (h.rc, h.status) == (-errno.EIO, HV_STATUS_ACCESS_DENIED)


def test_early_property_only_before_initialize(pt: int) -> None:
    h = set_property(pt, PROP_SYNTH_FEATURES, 0x1234)
    assert (h.rc, h.status) == (0, 0)
    assert initialize(pt) == 0
    h = set_property(pt, PROP_SYNTH_FEATURES, 0x5678)
    assert (h.rc, h.status) == (-errno.EIO, HV_STATUS_INVALID_PARTITION_STATE)
    assert struct.unpack("<Q", get_property(pt, PROP_SYNTH_FEATURES).out)[0] == 0x1234


@pytest.mark.parametrize("code", [PROP_MSR_ACTION, PROP_TIME_FREEZE, 0x00050005])
def test_runtime_properties_round_trip(ipt: int, code: int) -> None:
    for v in (1, 0):
        assert set_property(ipt, code, v).status == 0
        assert struct.unpack("<Q", get_property(ipt, code).out)[0] == v


def test_property_values(pt: int) -> None:
    bits = struct.unpack("<Q", get_property(pt, PROP_PHYS_BITS).out)[0]
    assert 32 <= bits <= 52
    size = struct.unpack("<Q", get_property(pt, PROP_MAX_XSAVE).out)[0]
    assert size >= 576 and size % 64 == 0


def test_register_calls_name_a_vp(ipt: int) -> None:
    h = get_regs_raw(ipt, 5, [REG["rax"]])
    assert (h.rc, h.status, h.reps) == (-errno.EINVAL, HV_STATUS_INVALID_VP_INDEX, 0)


def test_register_calls_without_kvm_are_enodev(nokvm: None, dev: int) -> None:
    pt = create_partition(dev)
    assert initialize(pt) == 0
    vp = create_vp(pt, 0)
    try:
        assert get_regs_raw(vp, 0, [REG["rax"]]).rc == -errno.ENODEV
        assert set_regs(vp, 0, {REG["rax"]: 1}).rc == -errno.ENODEV
        h = hvcall(pt, 0x94, struct.pack("<QQQIBBH", 0, 0, 0, 0x30, 0, 0, 0))
        assert h.rc == -errno.ENODEV
    finally:
        close(vp)
        close(pt)


# ---- registers (KVM) ------------------------------------------------------------------------


@pytest.mark.usefixtures("kvm")
class TestRegisters:
    def test_gprs_round_trip(self, vp: int) -> None:
        names = [REG["rax"] + i for i in range(16)]
        values = {n: 0x1111111111111111 * (i + 1) & (2**64 - 1) for i, n in enumerate(names)}
        h = set_regs(vp, 0, values)
        assert (h.rc, h.status, h.reps) == (0, 0, 16)
        assert get_regs(vp, 0, names) == [values[n] for n in names]

    def test_rip_rflags(self, vp: int) -> None:
        assert set_regs(vp, 0, {REG["rip"]: 0x1234, REG["rflags"]: 0x202}).rc == 0
        assert get_regs(vp, 0, [REG["rip"], REG["rflags"]]) == [0x1234, 0x202]

    def test_segments_and_tables(self, vp: int) -> None:
        code = Seg(0, 0xFFFFFFFF, 0x08, 0xA09B)
        data = Seg(0, 0xFFFFFFFF, 0x10, 0xC093)
        regs = {
            REG["cr0"]: 0x80050033,
            REG["cr3"]: 0x1000,
            REG["cr4"]: 0x20,
            REG["efer"]: 0x500,
            REG["cs"]: code,
            REG["ds"]: data,
            REG["ss"]: data,
            REG["gdtr"]: Table(0x500, 23),
            REG["idtr"]: Table(0x5000, 0xFFF),
        }
        h = set_regs(vp, 0, regs)
        assert (h.rc, h.status) == (0, 0)
        assert get_seg(vp, 0, REG["cs"]) == code
        assert get_seg(vp, 0, REG["ss"]) == data
        cr0, cr3, cr4, efer = get_regs(vp, 0, [REG["cr0"], REG["cr3"], REG["cr4"], REG["efer"]])
        assert (cr0 & 0x80000001, cr3, cr4 & 0x20, efer & 0x500) == (0x80000001, 0x1000, 0x20, 0x500)
        raw = get_regs_raw(vp, 0, [REG["gdtr"], REG["idtr"]]).out
        assert struct.unpack_from("<HHHHQ", raw, 0)[3:] == (23, 0x500)
        assert struct.unpack_from("<HHHHQ", raw, 16)[3:] == (0xFFF, 0x5000)

    def test_reset_state_is_real_mode(self, vp: int) -> None:
        cs = get_seg(vp, 0, REG["cs"])
        assert (cs.selector, cs.base, cs.attributes & 0x80) == (0xF000, 0xFFFF0000, 0x80)
        assert get_regs(vp, 0, [REG["rip"]]) == [0xFFF0]

    @pytest.mark.parametrize(
        "name,value",
        [
            (0x00080004, 0x0007040600070406),  # PAT
            (0x00080002, 0xFFFF888000000000),  # KERNEL_GS_BASE
            (0x00080008, 0x0023001000000000),  # STAR
            (0x00080009, 0xFFFFFFFF81000000),  # LSTAR
            (0x0008000A, 0xFFFFFFFF81000100),  # CSTAR
            (0x0008000B, 0x47700),  # SFMASK
            (0x00080005, 0x10),  # SYSENTER_CS
            (0x00080006, 0xFFFFFFFF81000200),  # SYSENTER_EIP
            (0x00080007, 0xFFFF888000010000),  # SYSENTER_ESP
            (0x00050000, 0x1000),  # DR0
            (0x00050003, 0x4000),  # DR3
            (0x00050005, 0x401),  # DR7
            (0x00040001, 0xDEAD000),  # CR2
            (0x00040004, 5),  # CR8
            (0x00030003, 0x0123456789ABCDEF0011223344556677),  # XMM3
            (0x00090002, 0x8100000000000000),  # GUEST_OS_ID (kept in software)
        ],
    )
    def test_register_round_trip(self, vp: int, name: int, value: int) -> None:
        h = set_regs(vp, 0, {name: value})
        assert (h.rc, h.status) == (0, 0)
        assert get_regs(vp, 0, [name]) == [value]

    def test_tsc(self, vp: int) -> None:
        # Writes are accepted; whether KVM honours them is the host's business (kvm-pvm hosts
        # keep the guest TSC on the host's), so only reading is pinned down here.
        assert set_regs(vp, 0, {0x00080000: 1 << 40}).status == 0
        (a,) = get_regs(vp, 0, [0x00080000])
        (b,) = get_regs(vp, 0, [0x00080000])
        assert b >= a

    def test_xfem(self, vp: int) -> None:
        assert set_regs(vp, 0, {REG["cr4"]: 0x40000 | 0x20}).status == 0  # OSXSAVE
        assert set_regs(vp, 0, {REG["xfem"]: 3}).status == 0
        assert get_regs(vp, 0, [REG["xfem"]]) == [3]

    def test_vp_index_is_read_only(self, ipt: int) -> None:
        fd = create_vp(ipt, 7)
        try:
            assert get_regs(fd, 7, [REG["vp_index"]]) == [7]
            h = set_regs(fd, 7, {REG["vp_index"]: 1})
            assert (h.rc, h.status) == (-errno.EINVAL, HV_STATUS_INVALID_PARAMETER)
        finally:
            close(fd)

    def test_unknown_register_stops_the_batch(self, vp: int) -> None:
        h = get_regs_raw(vp, 0, [REG["rax"], REG["rbx"], 0x00F00000, REG["rcx"]])
        assert (h.rc, h.status, h.reps) == (-errno.EINVAL, HV_STATUS_INVALID_PARAMETER, 2)
        h = set_regs(vp, 0, {REG["rax"]: 5, 0x00F00000: 1, REG["rbx"]: 6})
        assert (h.rc, h.status, h.reps) == (-errno.EINVAL, HV_STATUS_INVALID_PARAMETER, 1)
        # elements before the bad one were applied, as with the hypervisor
        assert get_regs(vp, 0, [REG["rax"]]) == [5]

    def test_partial_output_is_copied_back(self, vp: int) -> None:
        set_regs(vp, 0, {REG["rax"]: 0xAB})
        h = get_regs_raw(vp, 0, [REG["rax"], 0x00F00000])
        assert h.status == HV_STATUS_INVALID_PARAMETER
        assert h.out[:8] == struct.pack("<Q", 0xAB)

    def test_any_vp_fd_reaches_every_vp(self, ipt: int) -> None:
        # vp_index inside the input is trusted by the kernel: a VP fd can address its siblings.
        a, b = create_vp(ipt, 0), create_vp(ipt, 1)
        try:
            assert set_regs(a, 1, {REG["rbx"]: 42}).status == 0
            assert get_regs(b, 1, [REG["rbx"]]) == [42]
            assert get_regs(ipt, 1, [REG["rbx"]]) == [42]
        finally:
            close(a)
            close(b)

    @pytest.mark.parametrize(
        "vtl,z8,z16,status",
        [
            (0, 1, 0, HV_STATUS_INVALID_HYPERCALL_INPUT),
            (0, 0, 1, HV_STATUS_INVALID_HYPERCALL_INPUT),
            (0x11, 0, 0, HV_STATUS_INVALID_PARAMETER),
            (0x20, 0, 0, HV_STATUS_INVALID_PARAMETER),
            (0x10, 0, 0, 0),
        ],
    )
    def test_register_call_header(self, vp: int, vtl: int, z8: int, z16: int, status: int) -> None:
        data = struct.pack("<QIBBH", 0, 0, vtl, z8, z16) + struct.pack("<I", REG["rax"])
        assert hvcall(vp, 0x50, data, 16, 1).status == status

    def test_rep_list_must_fit_the_page(self, vp: int) -> None:
        data = struct.pack("<QIBBH", 0, 0, 0, 0, 0) + struct.pack("<I", REG["rax"])
        h = hvcall(vp, 0x50, data, 16, reps=1021)  # 16 + 4 * 1021 > 4096
        assert (h.rc, h.status) == (-errno.EINVAL, HV_STATUS_INVALID_HYPERCALL_INPUT)

    def test_256_registers_in_one_call(self, vp: int) -> None:
        names = [REG["rax"] + (i % 18) for i in range(256)]
        h = get_regs_raw(vp, 0, names)
        assert (h.rc, h.status, h.reps) == (0, 0, 256)

    def test_invalid_control_register_value(self, vp: int) -> None:
        # CR0.PG without PE is refused by KVM_SET_SREGS as the hypervisor refuses it.
        h = set_regs(vp, 0, {REG["cr0"]: 0x80000000})
        assert (h.rc, h.status) == (-errno.EINVAL, 0x50)

    def test_cpuid_values(self, vp: int) -> None:
        # leaf 1 of VP 0: initial APIC id (EBX[31:24]) is the VP index
        data = struct.pack("<QIIII", 0, 0, 0, 0, 0) + struct.pack("<IIQQ", 1, 0, 0, 0)
        h = hvcall(vp, 0xF4, data, 16, reps=1)
        assert (h.rc, h.status, h.reps) == (0, 0, 1)
        eax, ebx, _ecx, _edx = struct.unpack("<4I", h.out)
        assert ebx >> 24 == 0 and eax != 0

    def test_translate_without_paging(self, vp: int) -> None:
        data = struct.pack("<QIIQQ", 0, 0, 0, 0, 0x123)
        h = hvcall(vp, 0x52, data, 16)
        assert (h.rc, h.status) == (0, 0)
        result, gpa_page = struct.unpack("<QQ", h.out)
        assert gpa_page == 0x123 and result == 4  # identity, but nothing mapped there: GPA_UNMAPPED

    @pytest.mark.parametrize(
        "control,vector,status",
        [
            (0, 0x30, 0),
            (1, 0x30, 0),
            (4, 0, 0),
            (5, 0, 0),
            (6, 0x10, 0),
            (1 << 32, 0x30, 0),
            (3, 0x30, HV_STATUS_INVALID_PARAMETER),
            (8, 0x30, HV_STATUS_INVALID_PARAMETER),
            (0, 0x100, HV_STATUS_INVALID_PARAMETER),
            (1 << 40, 0x30, HV_STATUS_INVALID_HYPERCALL_INPUT),
        ],
    )
    def test_assert_virtual_interrupt(self, vp: int, ipt: int, control: int, vector: int, status: int) -> None:
        data = struct.pack("<QQQIBBH", 0, control, 0, vector, 0, 0, 0)
        assert hvcall(ipt, 0x94, data).status == status

    def test_misc_calls(self, vp: int, ipt: int) -> None:
        assert hvcall(ipt, 0x56, struct.pack("<QQ", 0, 0)).status == 0  # CLEAR_VIRTUAL_INTERRUPT
        assert hvcall(ipt, 0x91, struct.pack("<QIIQ", 0, 0, 0, 0)).status == 0  # REGISTER_INTERCEPT_RESULT
        assert hvcall(ipt, 0x4D, struct.pack("<QIIQ", 0, 3, 0, 0x3F8)).status == 0  # INSTALL_INTERCEPT io
        assert hvcall(ipt, 0x4D, struct.pack("<QIIQ", 0, 3, 4, 0)).status == HV_STATUS_INVALID_PARAMETER
        # no SynIC behind SIGNAL_EVENT_DIRECT / POST_MESSAGE_DIRECT
        assert hvcall(ipt, 0xC0, struct.pack("<QIBBHI", 0, 0, 0, 0, 0, 0)).status == HV_STATUS_INVALID_VP_STATE
        assert hvcall(ipt, 0xC1, struct.pack("<QII", 0, 9, 0)).status == HV_STATUS_INVALID_VP_INDEX
