/* mshv-libvirt: our own declarations of the Microsoft Hypervisor (TLFS) structures a
 * root-partition VMM exchanges through /dev/mshv on x86_64.
 *
 * The upstream kernel keeps these in kernel-internal headers, so userspace must bring
 * its own. Written from docs/ABI.md sections 6 and 7. Bitfields
 * of the original definitions are flattened into whole integers (the accessors in
 * mshv_libvirt/hv/ decode them), which keeps the layout endian- and compiler-proof.
 * All structures are naturally aligned; abi/emu/static_asserts.c pins every size.
 */
#ifndef MSHV_LIBVIRT_HV_DEFS_H
#define MSHV_LIBVIRT_HV_DEFS_H

#include <stdint.h>

/* ---- messages ----------------------------------------------------------- */

#define HV_MESSAGE_SIZE 256
#define HV_MESSAGE_PAYLOAD_BYTE_COUNT 240

#define HVMSG_NONE 0x00000000
#define HVMSG_UNMAPPED_GPA 0x80000000
#define HVMSG_GPA_INTERCEPT 0x80000001
#define HVMSG_UNACCEPTED_GPA 0x80000003
#define HVMSG_TIMER_EXPIRED 0x80000010
#define HVMSG_INVALID_VP_REGISTER_VALUE 0x80000020
#define HVMSG_UNRECOVERABLE_EXCEPTION 0x80000021
#define HVMSG_UNSUPPORTED_FEATURE 0x80000022
#define HVMSG_OPAQUE_INTERCEPT 0x8000003F
#define HVMSG_HYPERCALL_INTERCEPT 0x80000050
#define HVMSG_X64_IO_PORT_INTERCEPT 0x80010000
#define HVMSG_X64_MSR_INTERCEPT 0x80010001
#define HVMSG_X64_CPUID_INTERCEPT 0x80010002
#define HVMSG_X64_EXCEPTION_INTERCEPT 0x80010003
#define HVMSG_X64_APIC_EOI 0x80010004
#define HVMSG_X64_LEGACY_FP_ERROR 0x80010005
#define HVMSG_X64_HALT 0x80010007
#define HVMSG_X64_INTERRUPTION_DELIVERABLE 0x80010008
#define HVMSG_X64_SIPI_INTERCEPT 0x80010009

struct hv_message_header {
    uint32_t message_type;
    uint8_t payload_size;
    uint8_t message_flags;                  /* bit 0: msg_pending */
    uint8_t reserved[2];
    uint64_t sender;
};

struct hv_message {
    struct hv_message_header header;
    uint64_t payload[30];
};

/* ---- registers ---------------------------------------------------------- */

struct hv_u128 {
    uint64_t low_part;
    uint64_t high_part;
};

/* attributes = x86 descriptor access bits: type[3:0] S[4] DPL[6:5] P[7] AVL[12] L[13] DB[14] G[15] */
struct hv_x64_segment_register {
    uint64_t base;
    uint32_t limit;
    uint16_t selector;
    uint16_t attributes;
};

struct hv_x64_table_register {
    uint16_t pad[3];
    uint16_t limit;
    uint64_t base;
};

union hv_register_value {
    struct hv_u128 reg128;
    uint64_t reg64;
    uint32_t reg32;
    uint16_t reg16;
    uint8_t reg8;
    struct hv_x64_segment_register segment;
    struct hv_x64_table_register table;
};

struct hv_register_assoc {
    uint32_t name;                          /* HV_*REGISTER_* */
    uint32_t reserved1;
    uint64_t reserved2;
    union hv_register_value value;
};

#define HV_REGISTER_EXPLICIT_SUSPEND 0x00000000
#define HV_REGISTER_INTERCEPT_SUSPEND 0x00000001
#define HV_REGISTER_PENDING_INTERRUPTION 0x00010002
#define HV_REGISTER_INTERRUPT_STATE 0x00010003
#define HV_REGISTER_GUEST_OS_ID 0x00090002
#define HV_REGISTER_VP_INDEX 0x00090003
#define HV_X64_REGISTER_RAX 0x00020000
#define HV_X64_REGISTER_RCX 0x00020001
#define HV_X64_REGISTER_RDX 0x00020002
#define HV_X64_REGISTER_RBX 0x00020003
#define HV_X64_REGISTER_RSP 0x00020004
#define HV_X64_REGISTER_RBP 0x00020005
#define HV_X64_REGISTER_RSI 0x00020006
#define HV_X64_REGISTER_RDI 0x00020007
#define HV_X64_REGISTER_R8 0x00020008
#define HV_X64_REGISTER_R9 0x00020009
#define HV_X64_REGISTER_R10 0x0002000A
#define HV_X64_REGISTER_R11 0x0002000B
#define HV_X64_REGISTER_R12 0x0002000C
#define HV_X64_REGISTER_R13 0x0002000D
#define HV_X64_REGISTER_R14 0x0002000E
#define HV_X64_REGISTER_R15 0x0002000F
#define HV_X64_REGISTER_RIP 0x00020010
#define HV_X64_REGISTER_RFLAGS 0x00020011
#define HV_X64_REGISTER_XMM0 0x00030000
#define HV_X64_REGISTER_CR0 0x00040000
#define HV_X64_REGISTER_CR2 0x00040001
#define HV_X64_REGISTER_CR3 0x00040002
#define HV_X64_REGISTER_CR4 0x00040003
#define HV_X64_REGISTER_CR8 0x00040004
#define HV_X64_REGISTER_XFEM 0x00040005
#define HV_X64_REGISTER_DR0 0x00050000
#define HV_X64_REGISTER_DR1 0x00050001
#define HV_X64_REGISTER_DR2 0x00050002
#define HV_X64_REGISTER_DR3 0x00050003
#define HV_X64_REGISTER_DR6 0x00050004
#define HV_X64_REGISTER_DR7 0x00050005
#define HV_X64_REGISTER_ES 0x00060000
#define HV_X64_REGISTER_CS 0x00060001
#define HV_X64_REGISTER_SS 0x00060002
#define HV_X64_REGISTER_DS 0x00060003
#define HV_X64_REGISTER_FS 0x00060004
#define HV_X64_REGISTER_GS 0x00060005
#define HV_X64_REGISTER_LDTR 0x00060006
#define HV_X64_REGISTER_TR 0x00060007
#define HV_X64_REGISTER_IDTR 0x00070000
#define HV_X64_REGISTER_GDTR 0x00070001
#define HV_X64_REGISTER_TSC 0x00080000
#define HV_X64_REGISTER_EFER 0x00080001
#define HV_X64_REGISTER_KERNEL_GS_BASE 0x00080002
#define HV_X64_REGISTER_APIC_BASE 0x00080003
#define HV_X64_REGISTER_PAT 0x00080004
#define HV_X64_REGISTER_SYSENTER_CS 0x00080005
#define HV_X64_REGISTER_SYSENTER_EIP 0x00080006
#define HV_X64_REGISTER_SYSENTER_ESP 0x00080007
#define HV_X64_REGISTER_STAR 0x00080008
#define HV_X64_REGISTER_LSTAR 0x00080009
#define HV_X64_REGISTER_CSTAR 0x0008000A
#define HV_X64_REGISTER_SFMASK 0x0008000B

/* ---- x86 intercept payloads (each starts at hv_message.payload) --------- */

struct hv_x64_intercept_message_header {
    uint32_t vp_index;
    uint8_t instruction_length_cr8;         /* bits 0-3 instruction length, 4-7 cr8 */
    uint8_t intercept_access_type;          /* HV_INTERCEPT_ACCESS_* */
    uint16_t execution_state;               /* cpl[1:0] cr0_pe[2] cr0_am[3] efer_lma[4] ... */
    struct hv_x64_segment_register cs_segment;
    uint64_t rip;
    uint64_t rflags;
};

#define HV_INTERCEPT_ACCESS_READ 0
#define HV_INTERCEPT_ACCESS_WRITE 1
#define HV_INTERCEPT_ACCESS_EXECUTE 2

/* access_info: bits 0-2 access size (1, 2 or 4), bit 3 string op, bit 4 rep prefix */
struct hv_x64_io_port_intercept_message {
    struct hv_x64_intercept_message_header header;
    uint16_t port_number;
    uint8_t access_info;
    uint8_t instruction_byte_count;
    uint32_t reserved;
    uint64_t rax;
    uint8_t instruction_bytes[16];
    struct hv_x64_segment_register ds_segment;
    struct hv_x64_segment_register es_segment;
    uint64_t rcx;
    uint64_t rsi;
    uint64_t rdi;
};

/* memory_access_info: bit 0 gva_valid, bit 1 gva_gpa_valid */
struct hv_x64_memory_intercept_message {
    struct hv_x64_intercept_message_header header;
    uint32_t cache_type;
    uint8_t instruction_byte_count;
    uint8_t memory_access_info;
    uint8_t tpr_priority;
    uint8_t reserved1;
    uint64_t guest_virtual_address;
    uint64_t guest_physical_address;
    uint8_t instruction_bytes[16];
};

struct hv_x64_cpuid_intercept_message {
    struct hv_x64_intercept_message_header header;
    uint64_t rax;
    uint64_t rcx;
    uint64_t rdx;
    uint64_t rbx;
    uint64_t default_result_rax;
    uint64_t default_result_rcx;
    uint64_t default_result_rdx;
    uint64_t default_result_rbx;
};

struct hv_x64_msr_intercept_message {
    struct hv_x64_intercept_message_header header;
    uint32_t msr_number;
    uint32_t reserved;
    uint64_t rdx;
    uint64_t rax;
};

struct hv_x64_exception_intercept_message {
    struct hv_x64_intercept_message_header header;
    uint16_t exception_vector;
    uint8_t exception_info;                 /* bit 0 error_code_valid, bit 1 software */
    uint8_t instruction_byte_count;
    uint32_t error_code;
    uint64_t exception_parameter;
    uint64_t reserved;
    uint8_t instruction_bytes[16];
    struct hv_x64_segment_register ds_segment;
    struct hv_x64_segment_register ss_segment;
    uint64_t rax;
    uint64_t rcx;
    uint64_t rdx;
    uint64_t rbx;
    uint64_t rsp;
    uint64_t rbp;
    uint64_t rsi;
    uint64_t rdi;
    uint64_t r8;
    uint64_t r9;
    uint64_t r10;
    uint64_t r11;
    uint64_t r12;
    uint64_t r13;
    uint64_t r14;
    uint64_t r15;
};

/* HVMSG_X64_HALT and HVMSG_UNRECOVERABLE_EXCEPTION carry only the header. */
struct hv_x64_halt_message {
    struct hv_x64_intercept_message_header header;
};

struct hv_x64_apic_eoi_message {
    uint32_t vp_index;
    uint32_t interrupt_vector;
};

/* ---- hypercalls passed through MSHV_ROOT_HVCALL ------------------------- */

#define HVCALL_GET_PARTITION_PROPERTY 0x0044
#define HVCALL_SET_PARTITION_PROPERTY 0x0045
#define HVCALL_INSTALL_INTERCEPT 0x004d
#define HVCALL_GET_VP_REGISTERS 0x0050
#define HVCALL_SET_VP_REGISTERS 0x0051
#define HVCALL_TRANSLATE_VIRTUAL_ADDRESS 0x0052
#define HVCALL_CLEAR_VIRTUAL_INTERRUPT 0x0056
#define HVCALL_REGISTER_INTERCEPT_RESULT 0x0091
#define HVCALL_ASSERT_VIRTUAL_INTERRUPT 0x0094
#define HVCALL_SIGNAL_EVENT_DIRECT 0x00c0
#define HVCALL_POST_MESSAGE_DIRECT 0x00c1
#define HVCALL_GET_GPA_PAGES_ACCESS_STATES 0x00c9
#define HVCALL_GET_VP_CPUID_VALUES 0x00f4
#define HVCALL_GET_PARTITION_PROPERTY_EX 0x0101

#define HV_STATUS_SUCCESS 0x0000
#define HV_STATUS_INVALID_HYPERCALL_CODE 0x0002
#define HV_STATUS_INVALID_HYPERCALL_INPUT 0x0003
#define HV_STATUS_INVALID_ALIGNMENT 0x0004
#define HV_STATUS_INVALID_PARAMETER 0x0005
#define HV_STATUS_ACCESS_DENIED 0x0006
#define HV_STATUS_INVALID_PARTITION_STATE 0x0007
#define HV_STATUS_OPERATION_DENIED 0x0008
#define HV_STATUS_UNKNOWN_PROPERTY 0x0009
#define HV_STATUS_PROPERTY_VALUE_OUT_OF_RANGE 0x000A
#define HV_STATUS_INSUFFICIENT_MEMORY 0x000B
#define HV_STATUS_INVALID_PARTITION_ID 0x000D
#define HV_STATUS_INVALID_VP_INDEX 0x000E
#define HV_STATUS_NOT_FOUND 0x0010
#define HV_STATUS_INVALID_PORT_ID 0x0011
#define HV_STATUS_INVALID_CONNECTION_ID 0x0012
#define HV_STATUS_INSUFFICIENT_BUFFERS 0x0013
#define HV_STATUS_NOT_ACKNOWLEDGED 0x0014
#define HV_STATUS_INVALID_VP_STATE 0x0015
#define HV_STATUS_NO_RESOURCES 0x001D
#define HV_STATUS_PROCESSOR_FEATURE_NOT_SUPPORTED 0x0020
#define HV_STATUS_INVALID_LP_INDEX 0x0041
#define HV_STATUS_INVALID_REGISTER_VALUE 0x0050
#define HV_STATUS_OPERATION_FAILED 0x0071
#define HV_STATUS_TIME_OUT 0x0078
#define HV_STATUS_CALL_PENDING 0x0079
#define HV_STATUS_VTL_ALREADY_ENABLED 0x0086

#define HV_PARTITION_PROPERTY_PRIVILEGE_FLAGS 0x00010000
#define HV_PARTITION_PROPERTY_SYNTHETIC_PROC_FEATURES 0x00010001
#define HV_PARTITION_PROPERTY_TIME_FREEZE 0x00030003
#define HV_PARTITION_PROPERTY_GPA_PAGE_ACCESS_TRACKING 0x00050005
#define HV_PARTITION_PROPERTY_UNIMPLEMENTED_MSR_ACTION 0x00050017
#define HV_PARTITION_PROPERTY_PROCESSOR_XSAVE_FEATURES 0x00060002
#define HV_PARTITION_PROPERTY_PHYSICAL_ADDRESS_WIDTH 0x00060006
#define HV_PARTITION_PROPERTY_MAX_XSAVE_DATA_SIZE 0x00060008
#define HV_PARTITION_PROPERTY_PROCESSOR_FEATURES0 0x0006000a
#define HV_PARTITION_PROPERTY_PROCESSOR_FEATURES1 0x0006000b

/* The kernel overwrites partition_id in every passthrough input. */
struct hv_input_get_partition_property {
    uint64_t partition_id;
    uint32_t property_code;
    uint32_t padding;
};

struct hv_output_get_partition_property {
    uint64_t property_value;
};

struct hv_input_set_partition_property {
    uint64_t partition_id;
    uint32_t property_code;
    uint32_t padding;
    uint64_t property_value;
};

/* Followed by uint32_t names[reps]; output is union hv_register_value[reps]. */
struct hv_input_get_vp_registers {
    uint64_t partition_id;
    uint32_t vp_index;
    uint8_t input_vtl;
    uint8_t rsvd_z8;
    uint16_t rsvd_z16;
};

/* Followed by struct hv_register_assoc elements[reps]. */
struct hv_input_set_vp_registers {
    uint64_t partition_id;
    uint32_t vp_index;
    uint8_t input_vtl;
    uint8_t rsvd_z8;
    uint16_t rsvd_z16;
};

#define HV_X64_INTERRUPT_TYPE_FIXED 0
#define HV_X64_INTERRUPT_TYPE_LOWESTPRIORITY 1
#define HV_X64_INTERRUPT_TYPE_NMI 4
#define HV_X64_INTERRUPT_TYPE_INIT 5
#define HV_X64_INTERRUPT_TYPE_SIPI 6
#define HV_X64_INTERRUPT_TYPE_EXTINT 7

/* control: bits 0-31 interrupt type, bit 32 level triggered, bit 33 logical destination */
struct hv_input_assert_virtual_interrupt {
    uint64_t partition_id;
    uint64_t control;
    uint64_t dest_addr;                     /* APIC id */
    uint32_t vector;
    uint8_t target_vtl;
    uint8_t rsvd_z0;
    uint16_t rsvd_z1;
};

#define HV_INTERCEPT_TYPE_X64_IO_PORT 0
#define HV_INTERCEPT_TYPE_X64_MSR 1
#define HV_INTERCEPT_TYPE_X64_CPUID 2
#define HV_INTERCEPT_TYPE_EXCEPTION 3
#define HV_INTERCEPT_TYPE_MMIO 5

struct hv_input_install_intercept {
    uint64_t partition_id;
    uint32_t access_type;                   /* mask: READ 1, WRITE 2, EXECUTE 4 */
    uint32_t intercept_type;
    uint64_t intercept_parameter;
};

struct hv_input_translate_virtual_address {
    uint64_t partition_id;
    uint32_t vp_index;
    uint32_t padding;
    uint64_t control_flags;
    uint64_t gva_page;
};

struct hv_output_translate_virtual_address {
    uint64_t translation_result;            /* low 32 bits: result code (0 = success) */
    uint64_t gpa_page;
};

#endif
