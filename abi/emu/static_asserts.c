/* mshv-libvirt: compile-time pins of every ABI layout (docs/ABI.md §3, §6, §7).
 * A layout change here is an ABI break: this file fails to compile instead. */
#include <stddef.h>

#include "hv_defs.h"
#include "mshv_uapi.h"

#define SIZE(t, n) _Static_assert(sizeof(t) == (n), "sizeof " #t)
#define OFF(t, f, n) _Static_assert(offsetof(t, f) == (n), "offsetof " #t "." #f)

SIZE(struct mshv_create_partition, 16);
SIZE(struct mshv_create_partition_v2, 64);
OFF(struct mshv_create_partition_v2, pt_num_cpu_fbanks, 16);
OFF(struct mshv_create_partition_v2, pt_rsvd, 18);
OFF(struct mshv_create_partition_v2, pt_cpu_fbanks, 24);
OFF(struct mshv_create_partition_v2, pt_rsvd1, 40);
OFF(struct mshv_create_partition_v2, pt_disabled_xsave, 56);
SIZE(struct mshv_create_vp, 4);
SIZE(struct mshv_user_mem_region, 32);
OFF(struct mshv_user_mem_region, flags, 24);
OFF(struct mshv_user_mem_region, rsvd, 25);
SIZE(struct mshv_user_irqfd, 16);
SIZE(struct mshv_user_ioeventfd, 32);
OFF(struct mshv_user_ioeventfd, len, 16);
OFF(struct mshv_user_ioeventfd, fd, 20);
OFF(struct mshv_user_ioeventfd, flags, 24);
OFF(struct mshv_user_ioeventfd, rsvd, 28);
SIZE(struct mshv_user_irq_entry, 16);
SIZE(struct mshv_user_irq_table, 8);
SIZE(struct mshv_gpap_access_bitmap, 32);
OFF(struct mshv_gpap_access_bitmap, rsvd, 2);
OFF(struct mshv_gpap_access_bitmap, page_count, 8);
OFF(struct mshv_gpap_access_bitmap, bitmap_ptr, 24);
SIZE(struct mshv_root_hvcall, 32);
OFF(struct mshv_root_hvcall, status, 8);
OFF(struct mshv_root_hvcall, rsvd, 10);
OFF(struct mshv_root_hvcall, in_ptr, 16);
OFF(struct mshv_root_hvcall, out_ptr, 24);
SIZE(struct mshv_run_vp, 256);
SIZE(struct mshv_get_set_vp_state, 16);
OFF(struct mshv_get_set_vp_state, buf_sz, 4);
OFF(struct mshv_get_set_vp_state, buf_ptr, 8);

SIZE(struct hv_message_header, 16);
SIZE(struct hv_message, 256);
SIZE(struct hv_x64_segment_register, 16);
SIZE(struct hv_x64_table_register, 16);
SIZE(union hv_register_value, 16);
SIZE(struct hv_register_assoc, 32);
OFF(struct hv_register_assoc, value, 16);
SIZE(struct hv_x64_intercept_message_header, 40);
OFF(struct hv_x64_intercept_message_header, execution_state, 6);
OFF(struct hv_x64_intercept_message_header, cs_segment, 8);
OFF(struct hv_x64_intercept_message_header, rip, 24);
SIZE(struct hv_x64_io_port_intercept_message, 128);
OFF(struct hv_x64_io_port_intercept_message, port_number, 40);
OFF(struct hv_x64_io_port_intercept_message, rax, 48);
OFF(struct hv_x64_io_port_intercept_message, instruction_bytes, 56);
OFF(struct hv_x64_io_port_intercept_message, rdi, 120);
SIZE(struct hv_x64_memory_intercept_message, 80);
OFF(struct hv_x64_memory_intercept_message, instruction_byte_count, 44);
OFF(struct hv_x64_memory_intercept_message, guest_physical_address, 56);
OFF(struct hv_x64_memory_intercept_message, instruction_bytes, 64);
SIZE(struct hv_x64_cpuid_intercept_message, 104);
SIZE(struct hv_x64_msr_intercept_message, 64);
SIZE(struct hv_x64_exception_intercept_message, 240);
SIZE(struct hv_x64_halt_message, 40);
SIZE(struct hv_x64_apic_eoi_message, 8);
SIZE(struct hv_input_get_partition_property, 16);
SIZE(struct hv_input_set_partition_property, 24);
SIZE(struct hv_input_get_vp_registers, 16);
SIZE(struct hv_input_set_vp_registers, 16);
SIZE(struct hv_input_assert_virtual_interrupt, 32);
SIZE(struct hv_input_install_intercept, 24);
SIZE(struct hv_input_translate_virtual_address, 32);
SIZE(struct hv_output_translate_virtual_address, 16);
