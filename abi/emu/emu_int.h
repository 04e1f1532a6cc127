/* mshv-libvirt emulated /dev/mshv: internals shared by the abi/emu sources (not an ABI).
 *
 * Layering:  emu_core.c      handle table, /dev/mshv fd, lifetime, mmap, dispatch
 *            emu_partition.c partition-fd ioctls (validation in the kernel's order)
 *            emu_vp.c        VP-fd ioctls (RUN_VP, GET/SET_VP_STATE)
 *            emu_hvcall.c    MSHV_ROOT_HVCALL and the hypercalls behind it
 *            emu_kvm.c       KVM backing: VM, memslots, vCPUs, registers, exits
 *            emu_decode.c    just enough x86 decoding to find an intercepted instruction
 *            emu_uaccess.c   copy_{from,to}_user that fail with EFAULT instead of crashing
 *
 * Kernel generation: MSHV_CREATE_PARTITION behaves as the one named by MSHV_LIBVIRT_EMU_KERNEL
 * when the /dev/mshv handle is opened (default: the newest), see enum emu_gen. Everything else
 * mirrors 6.15-6.18 (docs/ABI.md §4) in every generation: ROOT_HVCALL on
 * /dev/mshv is ENOTTY; the 6.15 allow-list (no GET_PARTITION_PROPERTY_EX); the 6.15 endpoint
 * overlap test in GPA and user space; duplicate gsi 0 accepted; unmap miss is EINVAL.
 *
 * Hypervisor answers we had to infer or choose (the kernel only forwards them):
 *   - CREATE_VP / mapping memory before INITIALIZE: INVALID_PARTITION_STATE -> EIO.
 *   - GPAP bitmap / GET_GPA_PAGES_ACCESS_STATES with tracking off: INVALID_PARTITION_STATE -> EIO;
 *     "accessed" = written or explicitly set (KVM only logs writes); unmapped GPAs read clean.
 *   - registers of a VP that is inside RUN_VP: INVALID_VP_STATE; read-only properties:
 *     ACCESS_DENIED; "early" properties after INITIALIZE: INVALID_PARTITION_STATE; SynIC calls
 *     (no SynIC emulated): INVALID_VP_STATE.
 *   - an AP whose RIP the VMM sets leaves wait-for-SIPI; one never given a context waits for
 *     the guest's INIT/SIPI (handled by KVM's LAPIC).
 *   - HVMSG_X64_HALT only for HLT with interrupts off (nothing can wake it); HLT with IF set
 *     waits in the kernel for the interrupt, as with the hypervisor's LAPIC.
 *   - MSHV_PT_BIT_NESTED_VIRTUALIZATION when the backing KVM cannot give a guest VMX or SVM:
 *     HvCallCreatePartition fails with PROCESSOR_FEATURE_NOT_SUPPORTED -> EIO. Without the bit
 *     the guest's CPUID has no VMX/SVM; MSHV_PT_BIT_SMT_ENABLED_GUEST is recorded only (KVM
 *     has no SMT-aware scheduling to switch on).
 * Deviations forced by KVM:
 *   - a GPA range strictly containing an old region passes the 6.15 check but the memslot is
 *     refused (EEXIST); no register page (mmap pgoff 0 -> ENODEV, as for SNP partitions);
 *     XSAVE state is KVM's standard-format image, not the hypervisor's compacted one.
 *   - irqfd resamplers: KVM only resamples with a full in-kernel irqchip, so resamplefds are
 *     signalled from the EOI exit of level-triggered routes (GSI < 24).
 *   - TIME_FREEZE is recorded, not enforced; INSTALL_INTERCEPT is accepted, but only I/O-port
 *     and unmapped-GPA intercepts are ever delivered.
 *   - after a string IN the VMM emulates, KVM has already stored zeros at ES:rDI (overwritten
 *     when the VMM completes the instruction).
 */
#ifndef MSHV_LIBVIRT_EMU_INT_H
#define MSHV_LIBVIRT_EMU_INT_H

#include <linux/kvm.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "hv_defs.h"
#include "mshv_uapi.h"

#define EMU_LOCAL __attribute__((visibility("hidden")))

/* access_ok(): the last user address + 1 on x86-64 with 4-level paging (TASK_SIZE_MAX). */
#define EMU_TASK_SIZE_MAX 0x00007ffffffff000ULL
#define EMU_PAGE 4096ULL

/* Where KVM needs private pages for VMX real mode; inside the hole between IOAPIC and LAPIC. */
#define EMU_KVM_IDENTITY_MAP 0xfeffc000ULL
#define EMU_KVM_TSS 0xfeffd000ULL
#define EMU_IOAPIC_PINS 24

/* HV_TRANSLATE_GVA_* result codes and control flags used by HVCALL_TRANSLATE_VIRTUAL_ADDRESS. */
#define EMU_GVA_SUCCESS 0
#define EMU_GVA_PAGE_NOT_PRESENT 1
#define EMU_GVA_PRIVILEGE_VIOLATION 2
#define EMU_GVA_GPA_UNMAPPED 4
#define EMU_GVA_VALIDATE_WRITE 0x2

enum emu_kind { EMU_KIND_DEV = 1, EMU_KIND_PARTITION, EMU_KIND_VP };

/* The kernel whose MSHV_CREATE_PARTITION a /dev/mshv handle reproduces (§5.1):
 *   6.15-6.18  pt_flags mask 0x7, 16-byte struct only (bit 3 is an unknown bit: EINVAL);
 *   6.19       mask 0xF, bit 3 selects the 64-byte v2 struct (copied and checked in full);
 *   7.0        mask 0x3F: + NESTED_VIRTUALIZATION (4), SMT_ENABLED_GUEST (5), either layout.
 * The value is major * 100 + minor of the oldest kernel of the generation. */
enum emu_gen { EMU_GEN_6_15 = 615, EMU_GEN_6_19 = 619, EMU_GEN_7_0 = 700, EMU_GEN_NEWEST = EMU_GEN_7_0 };

struct emu_partition;

struct emu_region {
    uint64_t gfn, npages, uaddr;
    uint8_t flags;              /* 1 << MSHV_SET_MEM_BIT_* as mapped */
    int slot;                   /* KVM memslot, -1 without KVM */
    uint8_t *dirty;             /* software bitmaps while GPA access tracking is on */
    uint8_t *accessed;
};

struct emu_irqfd {
    int efd;                    /* our dup of the caller's eventfd: identity and KVM deassign */
    int resamplefd;             /* dup or -1 */
    uint32_t gsi;
};

struct emu_ioeventfd {
    int efd;                    /* our dup */
    uint64_t addr, datamatch;
    uint32_t len;
    int wildcard;
};

#define EMU_SOFT_REGS 48
#define EMU_UBUFS 16

/* A user page a VP's calls already copied through (emu_vp_copy_*): 0 empty, else page | 1 (read)
 * | 2 (read and write). */
struct emu_ubuf {
    uint64_t page;
};

/* A port-I/O intercept whose KVM completion has not run yet (emu_kvm.c, "deferred completion").
 * `view` is the VP as mshv shows it (RIP at the instruction); KVM itself is still mid-instruction. */
struct emu_pend {
    int active;
    int is_in, size;
    uint64_t next;              /* RIP after the instruction */
    struct kvm_regs kvm;        /* the registers as KVM itself has them (RIP maybe already past) */
    struct kvm_regs exit;       /* the view as reported, to see what the VMM changed */
    struct kvm_regs view;
    struct kvm_sregs sview;
};

struct emu_soft_reg {
    uint32_t name;
    union hv_register_value value;
};

struct emu_vp {
    struct emu_partition *pt;
    uint32_t index;
    pthread_mutex_t lock;       /* the kernel's vp_mutex: one ioctl per VP at a time */
    int vcpu_fd;                /* -1 without KVM */
    struct kvm_run *run;
    size_t run_size;
    int stats_fd;               /* KVM binary stats ("blocking"), -1 if unavailable */
    int sync_regs;              /* KVM copies regs/sregs into kvm_run at every exit */
    int started;                /* known to be past wait-for-SIPI */
    int msg_fd;                 /* memfd behind the intercept-message page (mmap pgoff 1) */
    struct hv_message *msg_page;
    uint8_t *state[MSHV_VP_STATE_COUNT]; /* software VP state pages (no hardware equivalent) */
    int nsoft;                  /* synthetic registers kept in software (GUEST_OS_ID, SINTx, ...) */
    struct emu_soft_reg soft[EMU_SOFT_REGS];
    /* RUN_VP bookkeeping, guarded by the halt monitor's lock (emu_kvm.c) */
    int in_run;
    pid_t tid;
    int blocked_scans;
    uint64_t last_kick_ns;
    struct emu_vp *mon_next;
    pthread_mutex_t regs_lock;  /* pend, and register access from other threads against RUN_VP */
    struct emu_pend pend;
    struct emu_ubuf ubuf[EMU_UBUFS];
    int ubuf_next;
};

struct emu_partition {
    pthread_mutex_t lock;       /* the kernel's pt_mutex: partition-fd ioctls, one at a time */
    pthread_mutex_t state;      /* held briefly: regions, vps[], routes, properties */
    int refs;                   /* partition fd + one per VP fd + calls in flight */
    uint64_t id;
    uint64_t pt_flags, pt_isolation;
    uint64_t cpu_fbanks[MSHV_NUM_CPU_FEATURES_BANKS], disabled_xsave;
    int initialized;
    int vm_fd;                  /* KVM VM, -1 without KVM */
    struct emu_vp *vps[MSHV_MAX_VPS];
    struct emu_region *regions;
    size_t nregions, cap_regions;
    struct emu_irqfd *irqfds;
    size_t nirqfds, cap_irqfds;
    struct emu_ioeventfd *ioeventfds;
    size_t nioeventfds, cap_ioeventfds;
    struct mshv_user_irq_entry *routes; /* effective MSI table: one entry per gsi */
    uint32_t nroutes;
    /* partition properties (HVCALL_GET/SET_PARTITION_PROPERTY) */
    uint64_t prop_privilege_flags, prop_synthetic_proc_features, prop_time_freeze;
    uint64_t prop_gpa_tracking, prop_msr_action, prop_xsave_features, prop_processors_per_socket;
    uint64_t prop_features0, prop_features1;
    uint64_t created_ns;
};

/* ---- emu_uaccess.c ---- */
EMU_LOCAL int emu_copy_from_user(void *dst, uint64_t src, size_t n);
EMU_LOCAL int emu_copy_to_user(uint64_t dst, const void *src, size_t n);
struct emu_vp;
/* The same, remembering buffers that copied once for this VP (vp may be NULL: no memory). */
EMU_LOCAL int emu_vp_copy_from_user(struct emu_vp *vp, void *dst, uint64_t src, size_t n);
EMU_LOCAL int emu_vp_copy_to_user(struct emu_vp *vp, uint64_t dst, const void *src, size_t n);
EMU_LOCAL int emu_access_ok(uint64_t addr, uint64_t size);
EMU_LOCAL int emu_vma_present(uint64_t addr);
EMU_LOCAL int emu_range_mapped(uint64_t addr, uint64_t size);
EMU_LOCAL int emu_nonzero(const void *p, size_t n);
EMU_LOCAL int emu_eventfd_check(int fd);
EMU_LOCAL int emu_same_file(int a, int b);
EMU_LOCAL uint64_t emu_now_ns(void);
EMU_LOCAL pid_t emu_self(void);
EMU_LOCAL int emu_env_flag(const char *name, int dflt);

/* ---- emu_core.c ---- */
EMU_LOCAL void emu_partition_get(struct emu_partition *pt);
EMU_LOCAL void emu_partition_put(struct emu_partition *pt);
EMU_LOCAL int emu_handle_new(enum emu_kind kind, void *obj);
EMU_LOCAL int emu_gen_parse(const char *spec); /* enum emu_gen, -1 if not a known kernel */
EMU_LOCAL int emu_fd_is_handle(int fd);

/* ---- emu_partition.c ---- */
EMU_LOCAL struct emu_partition *emu_partition_alloc(void);
EMU_LOCAL long emu_partition_ioctl(struct emu_partition *pt, uint32_t cmd, uint64_t arg);
EMU_LOCAL void emu_partition_release_eventfds(struct emu_partition *pt);
EMU_LOCAL void emu_partition_destroy(struct emu_partition *pt);
EMU_LOCAL int emu_gpa_lookup(struct emu_partition *pt, uint64_t gpa, uint64_t *hva, uint64_t *avail,
                             int *writable);
EMU_LOCAL int emu_read_gpa(struct emu_partition *pt, uint64_t gpa, void *buf, size_t n);
EMU_LOCAL int emu_gpa_tracking_set(struct emu_partition *pt, int on);
EMU_LOCAL int emu_gpa_access_states(struct emu_partition *pt, uint64_t base, uint64_t count, int clear_a,
                                    int set_a, int clear_d, int set_d, uint8_t *states);
EMU_LOCAL struct emu_vp *emu_partition_vp(struct emu_partition *pt, uint32_t index);

/* ---- emu_vp.c ---- */
EMU_LOCAL struct emu_vp *emu_vp_alloc(struct emu_partition *pt, uint32_t index, int *err);
EMU_LOCAL void emu_vp_free(struct emu_vp *vp);
EMU_LOCAL long emu_vp_ioctl(struct emu_vp *vp, uint32_t cmd, uint64_t arg);
EMU_LOCAL uint32_t emu_vp_state_size(struct emu_vp *vp, int type);

/* ---- emu_hvcall.c ---- */
EMU_LOCAL long emu_root_hvcall(struct emu_partition *pt, struct emu_vp *caller, uint64_t arg);
EMU_LOCAL int emu_hv_status_errno(uint16_t status);
EMU_LOCAL uint16_t emu_prop_get(struct emu_partition *pt, uint32_t code, uint64_t *value);

/* ---- emu_kvm.c ---- */
EMU_LOCAL int emu_kvm_fd(void);
EMU_LOCAL int emu_kvm_wanted(void);
EMU_LOCAL int emu_kvm_vm_create(struct emu_partition *pt);
EMU_LOCAL int emu_kvm_slot_set(struct emu_partition *pt, struct emu_region *r);
EMU_LOCAL void emu_kvm_slot_delete(struct emu_partition *pt, struct emu_region *r);
EMU_LOCAL int emu_kvm_dirty_log(struct emu_partition *pt, struct emu_region *r, uint8_t *bitmap);
EMU_LOCAL int emu_kvm_vcpu_create(struct emu_vp *vp);
EMU_LOCAL void emu_kvm_vcpu_destroy(struct emu_vp *vp);
EMU_LOCAL int emu_kvm_irqfd(struct emu_partition *pt, int efd, uint32_t gsi, int deassign);
EMU_LOCAL int emu_kvm_ioeventfd(struct emu_partition *pt, const struct emu_ioeventfd *e, int deassign);
EMU_LOCAL int emu_kvm_routing(struct emu_partition *pt);
EMU_LOCAL int emu_kvm_signal_msi(struct emu_partition *pt, uint32_t addr_lo, uint32_t addr_hi, uint32_t data);
EMU_LOCAL long emu_kvm_run(struct emu_vp *vp, struct hv_message *msg);
EMU_LOCAL int emu_kvm_vp_running(struct emu_vp *vp);
/* Runs a deferred I/O completion now (KVM as the VMM left the view); callers hold regs_lock. */
EMU_LOCAL int emu_kvm_settle(struct emu_vp *vp);
EMU_LOCAL uint32_t emu_kvm_xsave_size(void);
EMU_LOCAL uint64_t emu_kvm_xsave_states(void);
EMU_LOCAL uint32_t emu_kvm_phys_bits(void);
EMU_LOCAL int emu_kvm_nested(void); /* 1 if KVM can give a guest VMX or SVM */
EMU_LOCAL uint64_t emu_kvm_tsc_hz(struct emu_partition *pt);
EMU_LOCAL int emu_kvm_get_lapic(struct emu_vp *vp, uint8_t *page);
EMU_LOCAL int emu_kvm_set_lapic(struct emu_vp *vp, const uint8_t *page);
EMU_LOCAL int emu_kvm_get_xsave(struct emu_vp *vp, uint8_t *buf, uint32_t size);
EMU_LOCAL int emu_kvm_set_xsave(struct emu_vp *vp, const uint8_t *buf, uint32_t size);
EMU_LOCAL int emu_kvm_cpuid(struct emu_vp *vp, uint32_t leaf, uint32_t subleaf, uint32_t out[4]);
EMU_LOCAL int emu_kvm_translate(struct emu_vp *vp, uint64_t gva, int write, uint64_t *gpa);

/* Register access for HVCALL_GET/SET_VP_REGISTERS: a batch reads lazily and writes back once. */
struct emu_regctx {
    struct emu_vp *vp;
    unsigned have, dirty;
    int rip_written;
    struct kvm_regs regs;
    struct kvm_sregs sregs;
    struct kvm_debugregs dregs;
    struct kvm_fpu fpu;
    struct kvm_xcrs xcrs;
    struct kvm_vcpu_events ev;
};
EMU_LOCAL void emu_regctx_init(struct emu_regctx *c, struct emu_vp *vp);
EMU_LOCAL uint16_t emu_reg_get(struct emu_regctx *c, uint32_t name, union hv_register_value *out);
EMU_LOCAL uint16_t emu_reg_set(struct emu_regctx *c, uint32_t name, const union hv_register_value *in);
EMU_LOCAL uint16_t emu_regctx_flush(struct emu_regctx *c);

/* ---- emu_decode.c ---- */
struct emu_insn {
    int len;                    /* total length in bytes */
    int mode;                   /* 16, 32 or 64 */
    int opsize, adsize;         /* effective operand/address size in bytes */
    int rep;                    /* 0, 0xF2 or 0xF3 */
    int seg;                    /* segment override 0..5 (ES CS SS DS FS GS) or -1 */
    int rex;
    int map;                    /* 1: one-byte, 2: 0F, 3: 0F38, 4: 0F3A */
    int opcode;
    int has_modrm, modrm, has_sib, sib;
    int64_t disp;
    uint64_t imm;
    int memop;                  /* 1: ModRM memory, 2: moffs, 3: string source, 4: string dest, 5: both */
    uint64_t moffs;
};
/* Decodes one instruction; returns its length, or -1 if the bytes are not one we know. */
EMU_LOCAL int emu_decode(const uint8_t *b, int n, int mode, struct emu_insn *in);
/* 1 if the instruction is an IN/OUT/INS/OUTS of the given direction, port and size. */
EMU_LOCAL int emu_insn_is_io(const struct emu_insn *in, int is_in, uint16_t port, int size, uint64_t rdx);
/* 1 if the instruction may write memory through its memory operand. */
EMU_LOCAL int emu_insn_writes_mem(const struct emu_insn *in);
/* Size of the memory operand in bytes, 0 if unknown. */
EMU_LOCAL int emu_insn_mem_size(const struct emu_insn *in);
/* The value a MOV store writes (1), or 0 if not a store whose value is known. */
EMU_LOCAL int emu_insn_store_value(const struct emu_insn *in, const uint64_t gpr[16], uint64_t *value);
/* Linear address of the memory operand (next_rip: address after the instruction). */
EMU_LOCAL int emu_insn_linear(const struct emu_insn *in, const uint64_t gpr[16], const struct kvm_sregs *s,
                              uint64_t next_rip, uint64_t *lin);

#endif
