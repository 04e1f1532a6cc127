/* mshv-libvirt: our own declarations of the Linux /dev/mshv userspace ABI.
 *
 * Written from the facts recorded in docs/ABI.md (Linux 6.15-6.18
 * layouts, the 6.19 v2 create-partition layout gated by a flag bit, and the two
 * create-partition bits of 7.0). Not copied from any header. Layout rules this project keeps:
 *   - fixed-width types only, no bitfields, no enums inside structs, no pointers
 *     (user addresses travel as uint64_t);
 *   - every hole is an explicit reserved field that the kernel (and our emulated
 *     device) checks for zero;
 *   - layouts never change: new behaviour comes from a new flag bit or a new call.
 *
 * This file is read twice: by the C compiler (emulated device, cffi module) and,
 * filtered by abi/build_mshv.py, by cffi's cdef parser. Keep it to struct
 * definitions, plain enums and #define lines; computed macros become "..." in the
 * cdef so the compiler supplies their values.
 */
#ifndef MSHV_LIBVIRT_MSHV_UAPI_H
#define MSHV_LIBVIRT_MSHV_UAPI_H

#include <stdint.h>
#include <linux/ioctl.h>

#define MSHV_IOCTL 0xB8

/* ---- /dev/mshv ---------------------------------------------------------- */

/* Bit numbers for mshv_create_partition.pt_flags. */
#define MSHV_PT_BIT_LAPIC 0
#define MSHV_PT_BIT_X2APIC 1
#define MSHV_PT_BIT_GPA_SUPER_PAGES 2
/* 6.19: selects the 64-byte mshv_create_partition_v2 under the same ioctl number. */
#define MSHV_PT_BIT_CPU_AND_XSAVE_FEATURES 3
/* 7.0: HV_PARTITION_CREATION_FLAG_NESTED_VIRTUALIZATION_CAPABLE (the guest may run a hypervisor). */
#define MSHV_PT_BIT_NESTED_VIRTUALIZATION 4
/* 7.0: HV_PARTITION_CREATION_FLAG_SMT_ENABLED_GUEST (VPs scheduled as SMT siblings). */
#define MSHV_PT_BIT_SMT_ENABLED_GUEST 5
/* Masks of the bits each kernel generation accepts (anything else: EINVAL), in either layout:
 * V1 6.15-6.18, V2 6.19, V3 7.0. */
#define MSHV_PT_FLAGS_MASK_V1 0x7
#define MSHV_PT_FLAGS_MASK_V2 0xF
#define MSHV_PT_FLAGS_MASK_V3 0x3F

#define MSHV_PT_ISOLATION_NONE 0
#define MSHV_PT_ISOLATION_COUNT 1

struct mshv_create_partition {
    uint64_t pt_flags;
    uint64_t pt_isolation;
};

#define MSHV_NUM_CPU_FEATURES_BANKS 2

/* Only read when pt_flags has bit MSHV_PT_BIT_CPU_AND_XSAVE_FEATURES (6.19+). */
struct mshv_create_partition_v2 {
    uint64_t pt_flags;
    uint64_t pt_isolation;
    uint16_t pt_num_cpu_fbanks;             /* must equal MSHV_NUM_CPU_FEATURES_BANKS */
    uint8_t pt_rsvd[6];                     /* MBZ */
    uint64_t pt_cpu_fbanks[2];              /* disabled processor feature banks */
    uint64_t pt_rsvd1[2];                   /* MBZ */
    uint64_t pt_disabled_xsave;             /* x86_64; MBZ reserved on other arches */
};

/* ---- partition fd ------------------------------------------------------- */

struct mshv_create_vp {
    uint32_t vp_index;                      /* < MSHV_MAX_VPS */
};

#define MSHV_MAX_VPS 256
#define MSHV_MAX_GUEST_IRQS 4096

#define MSHV_SET_MEM_BIT_WRITABLE 0
#define MSHV_SET_MEM_BIT_EXECUTABLE 1
#define MSHV_SET_MEM_BIT_UNMAP 2
#define MSHV_SET_MEM_FLAGS_MASK 0x7

#define MSHV_HV_PAGE_SIZE 0x1000

struct mshv_user_mem_region {
    uint64_t size;                          /* bytes, page aligned, non-zero */
    uint64_t guest_pfn;
    uint64_t userspace_addr;                /* page aligned */
    uint8_t flags;                          /* 1 << MSHV_SET_MEM_BIT_* */
    uint8_t rsvd[7];                        /* MBZ */
};

#define MSHV_IRQFD_BIT_DEASSIGN 0
#define MSHV_IRQFD_BIT_RESAMPLE 1
#define MSHV_IRQFD_FLAGS_MASK 0x3

struct mshv_user_irqfd {
    int32_t fd;
    int32_t resamplefd;
    uint32_t gsi;
    uint32_t flags;
};

#define MSHV_IOEVENTFD_BIT_DATAMATCH 0
#define MSHV_IOEVENTFD_BIT_PIO 1
#define MSHV_IOEVENTFD_BIT_DEASSIGN 2
#define MSHV_IOEVENTFD_FLAGS_MASK 0x7

struct mshv_user_ioeventfd {
    uint64_t datamatch;
    uint64_t addr;
    uint32_t len;                           /* 0 (any), 1, 2, 4 or 8 */
    int32_t fd;
    uint32_t flags;
    uint8_t rsvd[4];                        /* MBZ */
};

struct mshv_user_irq_entry {
    uint32_t gsi;
    uint32_t address_lo;
    uint32_t address_hi;                    /* must be 0 */
    uint32_t data;
};

/* Followed in memory by nr entries of struct mshv_user_irq_entry. */
struct mshv_user_irq_table {
    uint32_t nr;
    uint32_t rsvd;                          /* MBZ */
};

#define MSHV_GPAP_ACCESS_TYPE_ACCESSED 0
#define MSHV_GPAP_ACCESS_TYPE_DIRTY 1
#define MSHV_GPAP_ACCESS_TYPE_COUNT 2
#define MSHV_GPAP_ACCESS_OP_NOOP 0
#define MSHV_GPAP_ACCESS_OP_CLEAR 1
#define MSHV_GPAP_ACCESS_OP_SET 2
#define MSHV_GPAP_ACCESS_OP_COUNT 3

struct mshv_gpap_access_bitmap {
    uint8_t access_type;
    uint8_t access_op;
    uint8_t rsvd[6];                        /* MBZ */
    uint64_t page_count;
    uint64_t gpap_base;
    uint64_t bitmap_ptr;
};

struct mshv_root_hvcall {
    uint16_t code;
    uint16_t reps;                          /* in: rep count, out: reps completed */
    uint16_t in_sz;                         /* 8 ..= MSHV_HV_PAGE_SIZE */
    uint16_t out_sz;                        /* <= MSHV_HV_PAGE_SIZE */
    uint16_t status;                        /* in: MBZ; out: HV_STATUS_* */
    uint8_t rsvd[6];                        /* MBZ */
    uint64_t in_ptr;
    uint64_t out_ptr;
};

/* ---- VP fd -------------------------------------------------------------- */

#define MSHV_RUN_VP_BUF_SZ 256

struct mshv_run_vp {
    uint8_t msg_buf[256];                   /* a struct hv_message */
};

#define MSHV_VP_MMAP_OFFSET_REGISTERS 0
#define MSHV_VP_MMAP_OFFSET_INTERCEPT_MESSAGE 1
#define MSHV_VP_MMAP_OFFSET_GHCB 2
#define MSHV_VP_MMAP_OFFSET_COUNT 3

#define MSHV_VP_STATE_LAPIC 0
#define MSHV_VP_STATE_XSAVE 1
#define MSHV_VP_STATE_SIMP 2
#define MSHV_VP_STATE_SIEFP 3
#define MSHV_VP_STATE_SYNTHETIC_TIMERS 4
#define MSHV_VP_STATE_COUNT 5

struct mshv_get_set_vp_state {
    uint8_t type;                           /* MSHV_VP_STATE_* */
    uint8_t rsvd[3];                        /* MBZ */
    uint32_t buf_sz;                        /* in: page-aligned size; out: size needed */
    uint64_t buf_ptr;                       /* page aligned */
};

/* ---- ioctl numbers (the kernel dispatches on the full 32-bit value) ----- */

/* /dev/mshv fd */
#define MSHV_CREATE_PARTITION _IOW(MSHV_IOCTL, 0x00, struct mshv_create_partition)
/* partition fd */
#define MSHV_INITIALIZE_PARTITION _IO(MSHV_IOCTL, 0x00)
#define MSHV_CREATE_VP _IOW(MSHV_IOCTL, 0x01, struct mshv_create_vp)
#define MSHV_SET_GUEST_MEMORY _IOW(MSHV_IOCTL, 0x02, struct mshv_user_mem_region)
#define MSHV_IRQFD _IOW(MSHV_IOCTL, 0x03, struct mshv_user_irqfd)
#define MSHV_IOEVENTFD _IOW(MSHV_IOCTL, 0x04, struct mshv_user_ioeventfd)
#define MSHV_SET_MSI_ROUTING _IOW(MSHV_IOCTL, 0x05, struct mshv_user_irq_table)
#define MSHV_GET_GPAP_ACCESS_BITMAP _IOWR(MSHV_IOCTL, 0x06, struct mshv_gpap_access_bitmap)
/* partition fd and VP fd (6.15); also /dev/mshv, self-targeted (6.19) */
#define MSHV_ROOT_HVCALL _IOWR(MSHV_IOCTL, 0x07, struct mshv_root_hvcall)
/* VP fd */
#define MSHV_RUN_VP _IOR(MSHV_IOCTL, 0x00, struct mshv_run_vp)
#define MSHV_GET_VP_STATE _IOWR(MSHV_IOCTL, 0x01, struct mshv_get_set_vp_state)
#define MSHV_SET_VP_STATE _IOWR(MSHV_IOCTL, 0x02, struct mshv_get_set_vp_state)

#endif
