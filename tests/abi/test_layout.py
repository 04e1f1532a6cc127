"""Struct layouts, ioctl numbers and named constants as the compiler computed them, pinned to the
upstream ABI. Expected values: docs/ABI.md §2.3 (ioctl numbers), §3.1 (argument structs), §6.1 (hypercall
inputs), §7 (messages) and §8.1 (register formats), stated literally here or in tests/abi/facts.py."""

from __future__ import annotations

import pytest
from mshv_libvirt._mshv import ffi, lib

from . import facts

# struct -> (size, {field: (offset, size)})
LAYOUTS = {
    "mshv_create_partition": (16, {"pt_flags": (0, 8), "pt_isolation": (8, 8)}),
    "mshv_create_partition_v2": (
        64,
        {"pt_flags": (0, 8), "pt_isolation": (8, 8), "pt_num_cpu_fbanks": (16, 2), "pt_rsvd": (18, 6),
         "pt_cpu_fbanks": (24, 16), "pt_rsvd1": (40, 16), "pt_disabled_xsave": (56, 8)},
    ),
    "mshv_create_vp": (4, {"vp_index": (0, 4)}),
    "mshv_user_mem_region": (
        32, {"size": (0, 8), "guest_pfn": (8, 8), "userspace_addr": (16, 8), "flags": (24, 1), "rsvd": (25, 7)}
    ),
    "mshv_user_irqfd": (16, {"fd": (0, 4), "resamplefd": (4, 4), "gsi": (8, 4), "flags": (12, 4)}),
    "mshv_user_ioeventfd": (
        32, {"datamatch": (0, 8), "addr": (8, 8), "len": (16, 4), "fd": (20, 4), "flags": (24, 4), "rsvd": (28, 4)}
    ),
    "mshv_user_irq_entry": (16, {"gsi": (0, 4), "address_lo": (4, 4), "address_hi": (8, 4), "data": (12, 4)}),
    "mshv_user_irq_table": (8, {"nr": (0, 4), "rsvd": (4, 4)}),
    "mshv_gpap_access_bitmap": (
        32,
        {"access_type": (0, 1), "access_op": (1, 1), "rsvd": (2, 6), "page_count": (8, 8), "gpap_base": (16, 8),
         "bitmap_ptr": (24, 8)},
    ),
    "mshv_root_hvcall": (
        32,
        {"code": (0, 2), "reps": (2, 2), "in_sz": (4, 2), "out_sz": (6, 2), "status": (8, 2), "rsvd": (10, 6),
         "in_ptr": (16, 8), "out_ptr": (24, 8)},
    ),
    "mshv_run_vp": (256, {"msg_buf": (0, 256)}),
    "mshv_get_set_vp_state": (16, {"type": (0, 1), "rsvd": (1, 3), "buf_sz": (4, 4), "buf_ptr": (8, 8)}),
    "hv_message_header": (16, {"message_type": (0, 4), "payload_size": (4, 1), "message_flags": (5, 1),
                               "reserved": (6, 2), "sender": (8, 8)}),
    "hv_message": (256, {"header": (0, 16), "payload": (16, 240)}),
    "hv_x64_segment_register": (16, {"base": (0, 8), "limit": (8, 4), "selector": (12, 2), "attributes": (14, 2)}),
    "hv_x64_table_register": (16, {"pad": (0, 6), "limit": (6, 2), "base": (8, 8)}),
    "hv_register_assoc": (32, {"name": (0, 4), "reserved1": (4, 4), "reserved2": (8, 8), "value": (16, 16)}),
    "hv_x64_intercept_message_header": (
        40, {"vp_index": (0, 4), "instruction_length_cr8": (4, 1), "intercept_access_type": (5, 1),
             "execution_state": (6, 2), "cs_segment": (8, 16), "rip": (24, 8), "rflags": (32, 8)}
    ),
    "hv_x64_io_port_intercept_message": (
        128, {"port_number": (40, 2), "access_info": (42, 1), "instruction_byte_count": (43, 1), "rax": (48, 8),
              "instruction_bytes": (56, 16), "ds_segment": (72, 16), "es_segment": (88, 16), "rcx": (104, 8),
              "rsi": (112, 8), "rdi": (120, 8)}
    ),
    "hv_x64_memory_intercept_message": (
        80, {"cache_type": (40, 4), "instruction_byte_count": (44, 1), "memory_access_info": (45, 1),
             "guest_virtual_address": (48, 8), "guest_physical_address": (56, 8), "instruction_bytes": (64, 16)}
    ),
    "hv_x64_cpuid_intercept_message": (104, {"rax": (40, 8), "default_result_rbx": (96, 8)}),
    "hv_x64_msr_intercept_message": (64, {"msr_number": (40, 4), "rdx": (48, 8), "rax": (56, 8)}),
    "hv_x64_exception_intercept_message": (240, {"exception_vector": (40, 2), "error_code": (44, 4),
                                                 "instruction_bytes": (64, 16), "rax": (112, 8), "r15": (232, 8)}),
    "hv_x64_apic_eoi_message": (8, {"vp_index": (0, 4), "interrupt_vector": (4, 4)}),
    "hv_input_get_vp_registers": (16, {"vp_index": (8, 4), "input_vtl": (12, 1)}),
    "hv_input_set_partition_property": (24, {"property_code": (8, 4), "property_value": (16, 8)}),
    "hv_input_assert_virtual_interrupt": (32, {"control": (8, 8), "dest_addr": (16, 8), "vector": (24, 4)}),
}  # fmt: skip


def test_every_declared_type_matches_the_compiler() -> None:
    # cffi checks a cdef against the compiler only when a type is first used: force them all.
    _, structs, unions = ffi.list_types()
    assert len(structs) >= 30
    for name in structs:
        assert ffi.sizeof(f"struct {name}") > 0
    for name in unions:
        assert ffi.sizeof(f"union {name}") == 16


@pytest.mark.parametrize(("name", "value"), sorted(facts.IOCTLS.items()))
def test_ioctl_numbers(name: str, value: int) -> None:
    assert getattr(lib, name) == value


# Register names docs/ABI.md §8.2 lists that abi/include does not declare (the emulator takes them as
# numbers): the only facts allowed to be missing from the compiled module.
UNDECLARED = {f"HV_X64_REGISTER_XMM{i}" for i in range(1, 16)} | {
    "HV_X64_REGISTER_FP_CONTROL_STATUS",
    "HV_X64_REGISTER_XMM_CONTROL_STATUS",
}


def test_every_exported_constant_is_a_documented_fact() -> None:
    # Each integer constant of abi/include that the compiled module exports has the value of
    # docs/ABI.md; a new one needs its section there and its line in tests/abi/facts.py.
    documented = facts.upstream_constants()
    exported = {n: getattr(lib, n) for n in dir(lib) if n.isupper()}
    undocumented = sorted(set(exported) - set(documented))
    assert undocumented == [], "add these to docs/ABI.md and tests/abi/facts.py"
    wrong = {n: (hex(v), hex(documented[n])) for n, v in exported.items() if v != documented[n]}
    assert wrong == {}
    assert set(documented) - set(exported) == UNDECLARED


@pytest.mark.parametrize("struct", sorted(LAYOUTS))
def test_struct_layout(struct: str) -> None:
    size, fields = LAYOUTS[struct]
    assert ffi.sizeof(f"struct {struct}") == size
    for field, (offset, fsize) in fields.items():
        assert ffi.offsetof(f"struct {struct}", field) == offset, field
        ftype = dict(ffi.typeof(f"struct {struct}").fields)[field].type
        assert ffi.sizeof(ftype) == fsize, field


def test_flag_masks_and_limits() -> None:
    # 6.15-6.18, 6.19 (+ CPU_AND_XSAVE_FEATURES), 7.0 (+ NESTED_VIRTUALIZATION, SMT_ENABLED_GUEST):
    # upstream's MSHV_PT_FLAGS_MASK is (1 << MSHV_PT_BIT_COUNT) - 1 in each.
    assert (lib.MSHV_PT_FLAGS_MASK_V1, lib.MSHV_PT_FLAGS_MASK_V2, lib.MSHV_PT_FLAGS_MASK_V3) == (0x7, 0xF, 0x3F)
    bits = (
        lib.MSHV_PT_BIT_LAPIC,
        lib.MSHV_PT_BIT_X2APIC,
        lib.MSHV_PT_BIT_GPA_SUPER_PAGES,
        lib.MSHV_PT_BIT_CPU_AND_XSAVE_FEATURES,
        lib.MSHV_PT_BIT_NESTED_VIRTUALIZATION,
        lib.MSHV_PT_BIT_SMT_ENABLED_GUEST,
    )
    assert bits == (0, 1, 2, 3, 4, 5)
    for count, mask in ((3, lib.MSHV_PT_FLAGS_MASK_V1), (4, lib.MSHV_PT_FLAGS_MASK_V2), (6, lib.MSHV_PT_FLAGS_MASK_V3)):
        assert mask == sum(1 << b for b in bits[:count])
    assert lib.MSHV_SET_MEM_FLAGS_MASK == 0x7
    assert lib.MSHV_IRQFD_FLAGS_MASK == 0x3
    assert lib.MSHV_IOEVENTFD_FLAGS_MASK == 0x7
    assert (lib.MSHV_MAX_VPS, lib.MSHV_MAX_GUEST_IRQS, lib.MSHV_HV_PAGE_SIZE) == (256, 4096, 4096)
