/* mshv-libvirt emulated /dev/mshv: KVM backing.
 *
 * Partition = KVM VM with a split irqchip (LAPIC in the kernel, as the hypervisor's LAPIC;
 * PIC/IOAPIC are the VMM's job, as on mshv). Memory regions = memslots. VP = vCPU with KVM's
 * supported CPUID. MSHV_RUN_VP = KVM_RUN, with exits translated into the hv_message the
 * hypervisor would post:
 *
 *   KVM_EXIT_IO          -> HVMSG_X64_IO_PORT_INTERCEPT
 *   KVM_EXIT_MMIO        -> HVMSG_UNMAPPED_GPA (HVMSG_GPA_INTERCEPT inside a mapped region)
 *   halted, IF clear     -> HVMSG_X64_HALT
 *   KVM_EXIT_SHUTDOWN    -> HVMSG_UNRECOVERABLE_EXCEPTION (triple fault)
 *   KVM_EXIT_IOAPIC_EOI  -> HVMSG_X64_APIC_EOI
 *   signal               -> EINTR
 *
 * The one real semantic gap: after an I/O or MMIO intercept the hypervisor leaves the VP AT
 * the instruction with registers untouched, and the VMM completes it (RIP += length, RAX or
 * the destination register). KVM instead finishes the access itself on the next KVM_RUN, and
 * depending on host and access kind RIP is already past the instruction at the exit (measured
 * on this project's kvm-pvm hosts: OUT and MMIO writes arrive advanced, IN and MMIO reads do
 * not). So at each such exit we (1) read the registers, (2) let KVM finish its pending access
 * with immediate_exit = 1 (KVM_RUN returns EINTR without entering the guest), (3) read the
 * registers again, (4) work out where the instruction starts and how long it is, without
 * assuming either convention, by decoding, and (5) put the pre-exit registers back with RIP at
 * the instruction. Plain IN/OUT skip (2)-(5) once the host's convention is confirmed (see
 * "deferred completion").
 *
 * HLT: with the LAPIC in the kernel KVM halts the vCPU itself and never exits. A monitor
 * thread watches each running vCPU's "blocking" statistic and, once one has been blocked for a
 * while, kicks its thread with a private real-time signal; the VP then reports HVMSG_X64_HALT
 * if it is halted with interrupts disabled (nothing can wake it), or goes back into the guest.
 * The kick never becomes a spurious EINTR: its handler marks the thread it lands on, so after an
 * EINTR that mark says whether it was ours (see "Signals" at emu_kvm_run).
 *
 * Per exit the fast path costs one system call, the KVM_RUN: registers come from
 * KVM_CAP_SYNC_REGS, plain port I/O is completed by KVM's own pending completion ("deferred
 * completion" below), guest RAM is read directly, and the signal mask is left alone.
 */
#include <cpuid.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "emu_int.h"

/* The VMM sandbox (abi/vmm/sandbox.c), when it is linked in: the emulator also builds without it
 * (tests/emu/c). 2 is MSHV_SANDBOX_HELPER there. */
int mshv_sandbox_thread_enter(int kind, const char *name) __attribute__((weak));
#define EMU_SANDBOX_HELPER 2

#define RFLAGS_IF (1ull << 9)
#define RFLAGS_VM (1ull << 17)
#define CR0_PE 1ull
#define CR0_WP (1ull << 16)
#define CR0_AM (1ull << 18)
#define CR0_PG (1ull << 31)
#define CR4_PSE (1ull << 4)
#define CR4_PAE (1ull << 5)
#define CR4_LA57 (1ull << 12)
#define EFER_LMA (1ull << 10)
#define PTE_ADDR 0x000FFFFFFFFFF000ull

static pthread_mutex_t kvm_lock = PTHREAD_MUTEX_INITIALIZER;
static int kvm_fd = -2; /* -2: not opened yet, -1: unavailable */
static int kvm_handed = -1; /* an open /dev/kvm given by the VMM's parent (a sandboxed VMM opens nothing) */
static int vcpu_mmap_size;
static struct kvm_cpuid2 *supported;
static int cap_readonly, cap_user_msr, cap_idmap, cap_sync_regs;
static uint32_t xsave_size = 4096, phys_bits;
static uint64_t xsave_states;
static long stats_blocking = -2; /* byte offset of "blocking" in the stats file, -1 if none */

static int msr_rw(struct emu_vp *vp, uint32_t index, uint64_t *v, int write);
static int mxcsr_access(struct emu_vp *vp, uint32_t *v, int write);
static int xsave_legacy(struct emu_vp *vp, uint32_t *mxcsr, int write, const struct kvm_fpu *f);

/* ------------------------------------------------------------------------------------------ */
/* opening /dev/kvm (lazily) and what it offers                                                */

int emu_kvm_wanted(void)
{
    /* MSHV_LIBVIRT_EMU_KVM=0 forces the no-KVM behaviour (validation only, ENODEV to run). */
    return emu_env_flag("MSHV_LIBVIRT_EMU_KVM", 1);
}

static void host_cpuid_defaults(void)
{
    unsigned a, b, c, d;
    phys_bits = 36;
    if (__get_cpuid(0x80000000, &a, &b, &c, &d) && a >= 0x80000008 && __get_cpuid(0x80000008, &a, &b, &c, &d))
        phys_bits = a & 0xFF;
    xsave_states = 3; /* x87 + SSE */
    if (__get_cpuid_max(0, NULL) >= 0xD) {
        __cpuid_count(0xD, 0, a, b, c, d);
        xsave_states = ((uint64_t)d << 32) | a;
    }
}

static const struct kvm_cpuid_entry2 *cpuid_find(const struct kvm_cpuid2 *t, uint32_t fn, uint32_t idx)
{
    for (uint32_t i = 0; t && i < t->nent; i++) {
        const struct kvm_cpuid_entry2 *e = &t->entries[i];
        if (e->function == fn && (!(e->flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX) || e->index == idx))
            return e;
    }
    return NULL;
}

void emu_kvm_use_fd(int fd)
{
    pthread_mutex_lock(&kvm_lock);
    if (kvm_fd == -2)
        kvm_handed = fd;
    pthread_mutex_unlock(&kvm_lock);
}

int emu_kvm_fd(void)
{
    pthread_mutex_lock(&kvm_lock);
    if (kvm_fd == -2) {
        host_cpuid_defaults();
        kvm_fd = kvm_handed >= 0 ? kvm_handed : open("/dev/kvm", O_RDWR | O_CLOEXEC);
        if (kvm_fd >= 0 && ioctl(kvm_fd, KVM_GET_API_VERSION, 0) != KVM_API_VERSION) {
            close(kvm_fd);
            kvm_fd = -1;
        }
        if (kvm_fd >= 0) {
            vcpu_mmap_size = ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
            for (int n = 128; n <= 4096; n *= 2) {
                free(supported);
                supported = calloc(1, sizeof(*supported) + n * sizeof(struct kvm_cpuid_entry2));
                if (!supported)
                    break;
                supported->nent = (uint32_t)n;
                if (ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, supported) == 0)
                    break;
                if (errno != E2BIG) {
                    free(supported);
                    supported = NULL;
                    break;
                }
            }
            if (vcpu_mmap_size <= 0 || !supported || ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_SPLIT_IRQCHIP) <= 0 ||
                ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_IMMEDIATE_EXIT) <= 0) {
                close(kvm_fd); /* too old to give mshv semantics */
                kvm_fd = -1;
            }
        }
        if (kvm_fd >= 0) {
            cap_readonly = ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_READONLY_MEM) > 0;
            cap_user_msr = ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_X86_USER_SPACE_MSR) > 0;
            cap_idmap = ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_SET_IDENTITY_MAP_ADDR) > 0;
            int sync = ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_SYNC_REGS);
            cap_sync_regs = sync > 0 && (sync & (KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS)) ==
                                            (KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS);
            int x2 = ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE2);
            xsave_size = x2 > 4096 ? (uint32_t)x2 : 4096;
            const struct kvm_cpuid_entry2 *e = cpuid_find(supported, 0xD, 0);
            if (e)
                xsave_states = ((uint64_t)e->edx << 32) | e->eax;
            if ((e = cpuid_find(supported, 0x80000008, 0)))
                phys_bits = e->eax & 0xFF;
        }
    }
    int fd = kvm_fd;
    pthread_mutex_unlock(&kvm_lock);
    return fd;
}

uint32_t emu_kvm_xsave_size(void)
{
    if (emu_kvm_wanted())
        emu_kvm_fd();
    /* Test hook: a larger HV_PARTITION_PROPERTY_MAX_XSAVE_DATA_SIZE (as on AVX-512/AMX hosts),
     * so the "buffer too small" path of MSHV_GET/SET_VP_STATE can be exercised anywhere. */
    const char *env = getenv("MSHV_LIBVIRT_EMU_XSAVE_SIZE");
    long v = env ? strtol(env, NULL, 0) : 0;
    return v > (long)xsave_size && v <= (1 << 20) ? (uint32_t)v : xsave_size;
}

uint64_t emu_kvm_xsave_states(void)
{
    if (emu_kvm_wanted())
        emu_kvm_fd();
    else if (!phys_bits)
        host_cpuid_defaults();
    return xsave_states;
}

uint32_t emu_kvm_phys_bits(void)
{
    if (emu_kvm_wanted())
        emu_kvm_fd();
    else if (!phys_bits)
        host_cpuid_defaults();
    return phys_bits;
}

/* CPUID.1:ECX.VMX (bit 5), CPUID.80000001h:ECX.SVM (bit 2): what a nested hypervisor needs. */
#define CPUID1_ECX_VMX (1u << 5)
#define CPUID80000001_ECX_SVM (1u << 2)

int emu_kvm_nested(void)
{
    if (emu_kvm_fd() < 0)
        return 0;
    const struct kvm_cpuid_entry2 *e = cpuid_find(supported, 1, 0);
    const struct kvm_cpuid_entry2 *x = cpuid_find(supported, 0x80000001, 0);
    return (e && (e->ecx & CPUID1_ECX_VMX)) || (x && (x->ecx & CPUID80000001_ECX_SVM));
}

uint64_t emu_kvm_tsc_hz(struct emu_partition *pt)
{
    for (int i = 0; i < MSHV_MAX_VPS; i++) {
        struct emu_vp *vp = emu_partition_vp(pt, (uint32_t)i);
        if (vp && vp->vcpu_fd >= 0) {
            int khz = ioctl(vp->vcpu_fd, KVM_GET_TSC_KHZ, 0);
            return khz > 0 ? (uint64_t)khz * 1000 : 0;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* VM, memory, interrupts                                                                      */

int emu_kvm_vm_create(struct emu_partition *pt)
{
    int kvm = emu_kvm_fd(), vm;
    do
        vm = ioctl(kvm, KVM_CREATE_VM, 0);
    while (vm < 0 && errno == EINTR);
    if (vm < 0)
        return errno == ENOMEM ? -ENOMEM : -EIO;
    /* Private pages KVM needs for real-mode guests on VMX; harmless elsewhere. */
    uint64_t idmap = EMU_KVM_IDENTITY_MAP;
    if (cap_idmap)
        ioctl(vm, KVM_SET_IDENTITY_MAP_ADDR, &idmap);
    ioctl(vm, KVM_SET_TSS_ADDR, (unsigned long)EMU_KVM_TSS);
    /* LAPIC in the kernel, no PIC/IOAPIC/PIT: the hypervisor's split of work. GSIs below 24
     * stay reserved for the VMM's IOAPIC routes so level-triggered EOIs exit to us. */
    struct kvm_enable_cap cap;
    memset(&cap, 0, sizeof(cap));
    cap.cap = KVM_CAP_SPLIT_IRQCHIP;
    cap.args[0] = EMU_IOAPIC_PINS;
    if (ioctl(vm, KVM_ENABLE_CAP, &cap) < 0) {
        close(vm);
        return -EIO;
    }
    if (cap_user_msr) {
        /* Unknown MSRs come to us, so HV_PARTITION_PROPERTY_UNIMPLEMENTED_MSR_ACTION decides. */
        memset(&cap, 0, sizeof(cap));
        cap.cap = KVM_CAP_X86_USER_SPACE_MSR;
        cap.args[0] = KVM_MSR_EXIT_REASON_UNKNOWN;
        ioctl(vm, KVM_ENABLE_CAP, &cap);
    }
    pt->vm_fd = vm;
    return 0;
}

int emu_kvm_slot_set(struct emu_partition *pt, struct emu_region *r)
{
    struct kvm_userspace_memory_region m;
    memset(&m, 0, sizeof(m));
    m.slot = (uint32_t)r->slot;
    if (!(r->flags & (1u << MSHV_SET_MEM_BIT_WRITABLE)) && cap_readonly)
        m.flags |= KVM_MEM_READONLY; /* guest writes then exit as MMIO: HVMSG_GPA_INTERCEPT */
    if (r->dirty)
        m.flags |= KVM_MEM_LOG_DIRTY_PAGES;
    m.guest_phys_addr = r->gfn << 12;
    m.memory_size = r->npages << 12;
    m.userspace_addr = r->uaddr;
    if (r->gfn >> 52 || r->npages >> 52)
        return -EINVAL; /* beyond any guest physical address */
    return ioctl(pt->vm_fd, KVM_SET_USER_MEMORY_REGION, &m) < 0 ? -errno : 0;
}

void emu_kvm_slot_delete(struct emu_partition *pt, struct emu_region *r)
{
    struct kvm_userspace_memory_region m;
    memset(&m, 0, sizeof(m));
    m.slot = (uint32_t)r->slot;
    ioctl(pt->vm_fd, KVM_SET_USER_MEMORY_REGION, &m);
}

int emu_kvm_dirty_log(struct emu_partition *pt, struct emu_region *r, uint8_t *bitmap)
{
    struct kvm_dirty_log log;
    memset(&log, 0, sizeof(log));
    log.slot = (uint32_t)r->slot;
    log.dirty_bitmap = bitmap;
    return ioctl(pt->vm_fd, KVM_GET_DIRTY_LOG, &log) < 0 ? -errno : 0;
}

int emu_kvm_irqfd(struct emu_partition *pt, int efd, uint32_t gsi, int deassign)
{
    struct kvm_irqfd q;
    memset(&q, 0, sizeof(q));
    q.fd = (uint32_t)efd;
    q.gsi = gsi;
    q.flags = deassign ? KVM_IRQFD_FLAG_DEASSIGN : 0;
    return ioctl(pt->vm_fd, KVM_IRQFD, &q) < 0 ? -errno : 0;
}

int emu_kvm_ioeventfd(struct emu_partition *pt, const struct emu_ioeventfd *e, int deassign)
{
    struct kvm_ioeventfd q;
    memset(&q, 0, sizeof(q));
    q.datamatch = e->datamatch;
    q.addr = e->addr;
    q.len = e->len;
    q.fd = e->efd;
    q.flags = (e->wildcard ? 0 : KVM_IOEVENTFD_FLAG_DATAMATCH) | (deassign ? KVM_IOEVENTFD_FLAG_DEASSIGN : 0);
    return ioctl(pt->vm_fd, KVM_IOEVENTFD, &q) < 0 ? -errno : 0;
}

int emu_kvm_routing(struct emu_partition *pt)
{
    pthread_mutex_lock(&pt->state);
    uint32_t n = pt->nroutes;
    struct kvm_irq_routing *t = calloc(1, sizeof(*t) + n * sizeof(struct kvm_irq_routing_entry));
    if (!t) {
        pthread_mutex_unlock(&pt->state);
        return -ENOMEM;
    }
    t->nr = n;
    for (uint32_t i = 0; i < n; i++) {
        t->entries[i].gsi = pt->routes[i].gsi;
        t->entries[i].type = KVM_IRQ_ROUTING_MSI;
        t->entries[i].u.msi.address_lo = pt->routes[i].address_lo;
        t->entries[i].u.msi.address_hi = pt->routes[i].address_hi;
        t->entries[i].u.msi.data = pt->routes[i].data;
    }
    pthread_mutex_unlock(&pt->state);
    int r = ioctl(pt->vm_fd, KVM_SET_GSI_ROUTING, t) < 0 ? -errno : 0;
    free(t);
    return r;
}

int emu_kvm_signal_msi(struct emu_partition *pt, uint32_t addr_lo, uint32_t addr_hi, uint32_t data)
{
    struct kvm_msi msi;
    memset(&msi, 0, sizeof(msi));
    msi.address_lo = addr_lo;
    msi.address_hi = addr_hi;
    msi.data = data;
    return ioctl(pt->vm_fd, KVM_SIGNAL_MSI, &msi) < 0 ? -errno : 0;
}

/* ------------------------------------------------------------------------------------------ */
/* vCPUs                                                                                        */

static void stats_locate(int fd)
{
    struct kvm_stats_header h;
    if (pread(fd, &h, sizeof(h), 0) != (ssize_t)sizeof(h) || h.num_desc > 4096 || h.name_size > 256) {
        stats_blocking = -1;
        return;
    }
    size_t dsz = sizeof(struct kvm_stats_desc) + h.name_size;
    char *d = malloc(dsz * h.num_desc);
    stats_blocking = -1;
    if (d && pread(fd, d, dsz * h.num_desc, h.desc_offset) == (ssize_t)(dsz * h.num_desc)) {
        for (uint32_t i = 0; i < h.num_desc; i++) {
            struct kvm_stats_desc *x = (struct kvm_stats_desc *)(d + i * dsz);
            if (strncmp(x->name, "blocking", h.name_size) == 0) {
                stats_blocking = (long)h.data_offset + x->offset;
                break;
            }
        }
    }
    free(d);
}

int emu_kvm_vcpu_create(struct emu_vp *vp)
{
    struct emu_partition *pt = vp->pt;
    int fd = ioctl(pt->vm_fd, KVM_CREATE_VCPU, (unsigned long)vp->index);
    if (fd < 0)
        return -errno;
    vp->vcpu_fd = fd;
    vp->run_size = (size_t)vcpu_mmap_size;
    vp->run = mmap(NULL, vp->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (vp->run == MAP_FAILED) {
        vp->run = NULL;
        return -ENOMEM;
    }
    /* KVM's supported CPUID, with this VP's APIC id (= VP index, as the hypervisor assigns). */
    size_t sz = sizeof(*supported) + supported->nent * sizeof(struct kvm_cpuid_entry2);
    struct kvm_cpuid2 *c = malloc(sz);
    if (!c)
        return -ENOMEM;
    memcpy(c, supported, sz);
    int nested = !!(pt->pt_flags & (1u << MSHV_PT_BIT_NESTED_VIRTUALIZATION));
    for (uint32_t i = 0; i < c->nent; i++) {
        struct kvm_cpuid_entry2 *e = &c->entries[i];
        if (e->function == 1) {
            e->ebx = (e->ebx & 0x00FFFFFF) | (vp->index << 24);
            if (!(pt->pt_flags & (1u << MSHV_PT_BIT_X2APIC)))
                e->ecx &= ~(1u << 21); /* x2APIC only for X2APIC-capable partitions */
            if (!nested)
                e->ecx &= ~CPUID1_ECX_VMX; /* VMX/SVM only for nested-capable partitions (7.0) */
        }
        if (e->function == 0x80000001 && !nested)
            e->ecx &= ~CPUID80000001_ECX_SVM;
        if (e->function == 0xB || e->function == 0x1F)
            e->edx = vp->index;
    }
    int r = ioctl(fd, KVM_SET_CPUID2, c);
    free(c);
    if (r < 0)
        return -EIO;
    /* Measured on kvm-pvm hosts: KVM rebuilds its APIC-id map while creating a vCPU but before
     * that vCPU is online, so the newest vCPU is missing from the map and interrupts aimed at
     * it (MSIs, INIT/SIPI, fixed IPIs) are dropped until something dirties the map. Toggling
     * the APIC-base enable bit (reset state either way) does. */
    uint64_t base;
    if (msr_rw(vp, 0x1B, &base, 0) && (base & 0x800)) {
        uint64_t off = base & ~0x800ull;
        msr_rw(vp, 0x1B, &off, 1);
        msr_rw(vp, 0x1B, &base, 1);
    }
    if (cap_sync_regs) {
        /* Registers arrive with every exit in kvm_run: two ioctls fewer per intercept. */
        vp->run->kvm_valid_regs = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS;
        vp->sync_regs = 1;
    }
    vp->stats_fd = ioctl(fd, KVM_GET_STATS_FD, 0);
    pthread_mutex_lock(&kvm_lock);
    if (stats_blocking == -2 && vp->stats_fd >= 0)
        stats_locate(vp->stats_fd);
    pthread_mutex_unlock(&kvm_lock);
    return 0;
}

void emu_kvm_vcpu_destroy(struct emu_vp *vp)
{
    if (vp->run)
        munmap(vp->run, vp->run_size);
    if (vp->stats_fd >= 0)
        close(vp->stats_fd);
    if (vp->vcpu_fd >= 0)
        close(vp->vcpu_fd); /* the vCPU itself lives until the VM is closed */
    vp->run = NULL;
    vp->stats_fd = vp->vcpu_fd = -1;
}

int emu_kvm_cpuid(struct emu_vp *vp, uint32_t leaf, uint32_t subleaf, uint32_t out[4])
{
    memset(out, 0, 4 * sizeof(uint32_t));
    struct kvm_cpuid2 *c = calloc(1, sizeof(*c) + 512 * sizeof(struct kvm_cpuid_entry2));
    if (!c)
        return -ENOMEM;
    c->nent = 512;
    int r = ioctl(vp->vcpu_fd, KVM_GET_CPUID2, c) < 0 ? -errno : 0;
    const struct kvm_cpuid_entry2 *e = r ? NULL : cpuid_find(c, leaf, subleaf);
    if (e) {
        out[0] = e->eax;
        out[1] = e->ebx;
        out[2] = e->ecx;
        out[3] = e->edx;
    }
    free(c);
    return r;
}

/* hv_local_interrupt_controller_state: 44 u32 fields at the start of the LAPIC state page. */
static const int lapic_map[] = {
    0x20, 0x30, 0xD0, 0xE0, 0xF0,                                   /* id, version, ldr, dfr, svr */
    0x100, 0x110, 0x120, 0x130, 0x140, 0x150, 0x160, 0x170,         /* isr[8] */
    0x180, 0x190, 0x1A0, 0x1B0, 0x1C0, 0x1D0, 0x1E0, 0x1F0,         /* tmr[8] */
    0x200, 0x210, 0x220, 0x230, 0x240, 0x250, 0x260, 0x270,         /* irr[8] */
    0x280, 0x310, 0x300,                                            /* esr, icr_high, icr_low */
    0x320, 0x330, 0x340, 0x350, 0x360, 0x370, 0x2F0,                /* LVT timer..error, cmci */
    -1, 0x380, 0x390, 0x3E0, -1,                                    /* error_status, timer, remote_read */
};

int emu_kvm_get_lapic(struct emu_vp *vp, uint8_t *page)
{
    struct kvm_lapic_state st;
    if (ioctl(vp->vcpu_fd, KVM_GET_LAPIC, &st) < 0)
        return -EIO;
    for (size_t i = 0; i < sizeof(lapic_map) / sizeof(lapic_map[0]); i++) {
        uint32_t v = 0;
        if (lapic_map[i] >= 0)
            memcpy(&v, st.regs + lapic_map[i], 4);
        if (i == 0)
            v >>= 24; /* the xAPIC ID register keeps the id in bits 31:24 */
        memcpy(page + 4 * i, &v, 4);
    }
    return 0;
}

int emu_kvm_set_lapic(struct emu_vp *vp, const uint8_t *page)
{
    struct kvm_lapic_state st;
    if (ioctl(vp->vcpu_fd, KVM_GET_LAPIC, &st) < 0)
        return -EIO;
    for (size_t i = 0; i < sizeof(lapic_map) / sizeof(lapic_map[0]); i++) {
        uint32_t v;
        memcpy(&v, page + 4 * i, 4);
        if (i == 0)
            v <<= 24;
        if (lapic_map[i] >= 0)
            memcpy(st.regs + lapic_map[i], &v, 4);
    }
    return ioctl(vp->vcpu_fd, KVM_SET_LAPIC, &st) < 0 ? -EINVAL : 0;
}

int emu_kvm_get_xsave(struct emu_vp *vp, uint8_t *buf, uint32_t size)
{
    unsigned long req = xsave_size > 4096 ? KVM_GET_XSAVE2 : KVM_GET_XSAVE;
    uint8_t *x = calloc(1, xsave_size > size ? xsave_size : size);
    if (!x)
        return -ENOMEM;
    int r = ioctl(vp->vcpu_fd, req, x) < 0 ? -EIO : 0;
    memcpy(buf, x, size);
    free(x);
    return r;
}

int emu_kvm_set_xsave(struct emu_vp *vp, const uint8_t *buf, uint32_t size)
{
    uint8_t *x = calloc(1, xsave_size > size ? xsave_size : size);
    if (!x)
        return -ENOMEM;
    memcpy(x, buf, size);
    int r = ioctl(vp->vcpu_fd, KVM_SET_XSAVE, x) < 0 ? -EINVAL : 0;
    free(x);
    return r;
}

/* ------------------------------------------------------------------------------------------ */
/* guest page tables                                                                            */

static int read_entry(struct emu_partition *pt, uint64_t gpa, int size, uint64_t *e)
{
    *e = 0;
    return emu_read_gpa(pt, gpa, e, (size_t)size) == 0;
}

/* Linear -> guest physical through the VP's paging mode; returns an EMU_GVA_* code. */
static int walk(struct emu_partition *pt, const struct kvm_sregs *s, uint64_t lin, int write, uint64_t *gpa)
{
    uint64_t e;
    int wp = !!(s->cr0 & CR0_WP);
    if (!(s->cr0 & CR0_PG)) {
        *gpa = (s->efer & EFER_LMA) ? lin : (lin & 0xFFFFFFFFull);
        return EMU_GVA_SUCCESS;
    }
    if (s->efer & EFER_LMA) {
        int levels = (s->cr4 & CR4_LA57) ? 5 : 4;
        uint64_t table = s->cr3 & PTE_ADDR;
        for (int lvl = levels; lvl >= 1; lvl--) {
            int shift = 12 + 9 * (lvl - 1);
            if (!read_entry(pt, table + ((lin >> shift) & 511) * 8, 8, &e) || !(e & 1))
                return EMU_GVA_PAGE_NOT_PRESENT;
            if (write && wp && !(e & 2))
                return EMU_GVA_PRIVILEGE_VIOLATION;
            if (lvl == 1 || ((lvl == 2 || lvl == 3) && (e & 0x80))) {
                uint64_t off = (1ull << shift) - 1;
                *gpa = (e & PTE_ADDR & ~off) | (lin & off);
                return EMU_GVA_SUCCESS;
            }
            table = e & PTE_ADDR;
        }
        return EMU_GVA_PAGE_NOT_PRESENT;
    }
    lin &= 0xFFFFFFFFull;
    if (s->cr4 & CR4_PAE) {
        if (!read_entry(pt, (s->cr3 & 0xFFFFFFE0ull) + ((lin >> 30) & 3) * 8, 8, &e) || !(e & 1))
            return EMU_GVA_PAGE_NOT_PRESENT;
        if (!read_entry(pt, (e & PTE_ADDR) + ((lin >> 21) & 511) * 8, 8, &e) || !(e & 1))
            return EMU_GVA_PAGE_NOT_PRESENT;
        if (write && wp && !(e & 2))
            return EMU_GVA_PRIVILEGE_VIOLATION;
        if (e & 0x80) {
            *gpa = (e & PTE_ADDR & ~0x1FFFFFull) | (lin & 0x1FFFFF);
            return EMU_GVA_SUCCESS;
        }
        if (!read_entry(pt, (e & PTE_ADDR) + ((lin >> 12) & 511) * 8, 8, &e) || !(e & 1))
            return EMU_GVA_PAGE_NOT_PRESENT;
        if (write && wp && !(e & 2))
            return EMU_GVA_PRIVILEGE_VIOLATION;
        *gpa = (e & PTE_ADDR) | (lin & 0xFFF);
        return EMU_GVA_SUCCESS;
    }
    if (!read_entry(pt, (s->cr3 & 0xFFFFF000ull) + ((lin >> 22) & 1023) * 4, 4, &e) || !(e & 1))
        return EMU_GVA_PAGE_NOT_PRESENT;
    if (write && wp && !(e & 2))
        return EMU_GVA_PRIVILEGE_VIOLATION;
    if ((e & 0x80) && (s->cr4 & CR4_PSE)) {
        *gpa = (e & 0xFFC00000ull) | (((e >> 13) & 0xFF) << 32) | (lin & 0x3FFFFF);
        return EMU_GVA_SUCCESS;
    }
    if (!read_entry(pt, (e & 0xFFFFF000ull) + ((lin >> 12) & 1023) * 4, 4, &e) || !(e & 1))
        return EMU_GVA_PAGE_NOT_PRESENT;
    if (write && wp && !(e & 2))
        return EMU_GVA_PRIVILEGE_VIOLATION;
    *gpa = (e & 0xFFFFF000ull) | (lin & 0xFFF);
    return EMU_GVA_SUCCESS;
}

int emu_kvm_translate(struct emu_vp *vp, uint64_t gva, int write, uint64_t *gpa)
{
    struct kvm_sregs s;
    if (vp->pend.active)
        s = vp->pend.sview; /* an I/O completion changes no special register */
    else if (ioctl(vp->vcpu_fd, KVM_GET_SREGS, &s) < 0)
        return -1;
    return walk(vp->pt, &s, gva, write, gpa);
}

static int cpu_mode(const struct kvm_sregs *s, uint64_t rflags)
{
    if (!(s->cr0 & CR0_PE) || (rflags & RFLAGS_VM))
        return 16;
    if ((s->efer & EFER_LMA) && s->cs.l)
        return 64;
    return s->cs.db ? 32 : 16;
}

/* Instruction bytes at CS:rip; returns how many could be read (stops at unmapped memory). */
static int fetch(struct emu_partition *pt, const struct kvm_sregs *s, int mode, uint64_t rip, uint8_t *buf, int n)
{
    uint64_t lin = mode == 64 ? rip : ((s->cs.base + rip) & 0xFFFFFFFFull);
    int got = 0;
    while (got < n) {
        uint64_t gpa;
        int chunk = (int)(EMU_PAGE - ((lin + (uint64_t)got) & (EMU_PAGE - 1)));
        if (chunk > n - got)
            chunk = n - got;
        if (walk(pt, s, lin + (uint64_t)got, 0, &gpa) != EMU_GVA_SUCCESS ||
            emu_read_gpa(pt, gpa, buf + got, (size_t)chunk) < 0)
            break;
        got += chunk;
    }
    return got;
}

/* The bytes around RIP an exit needs, read once: up to 15 before it (a candidate start when
 * KVM already moved RIP past the instruction) and 16 from it. */
struct code_window {
    uint8_t b[31];
    int back;                   /* valid bytes before RIP: b[15 - back] .. b[14] */
    int fwd;                    /* valid bytes from RIP: b[15] .. b[15 + fwd - 1] */
};

static void fetch_window(struct emu_partition *pt, const struct kvm_sregs *s, int mode, uint64_t rip,
                         struct code_window *w)
{
    uint64_t mask = mode == 64 ? ~0ull : 0xFFFFFFFFull;
    uint64_t lo = ((mode == 64 ? rip : s->cs.base + rip) - 15) & mask;
    uint8_t ok[31] = {0};
    memset(w, 0, sizeof(*w));
    /* one page walk per page touched (normally one), instead of one per byte range */
    for (int i = 0; i < 31;) {
        uint64_t lin = (lo + (uint64_t)i) & mask, gpa;
        int chunk = (int)(EMU_PAGE - (lin & (EMU_PAGE - 1)));
        chunk = chunk < 31 - i ? chunk : 31 - i;
        if (walk(pt, s, lin, 0, &gpa) == EMU_GVA_SUCCESS && emu_read_gpa(pt, gpa, w->b + i, (size_t)chunk) == 0)
            memset(ok + i, 1, (size_t)chunk);
        i += chunk;
    }
    while (w->fwd < 16 && ok[15 + w->fwd])
        w->fwd++;
    while (w->back < 15 && ok[14 - w->back])
        w->back++;
}

/* The instruction bytes starting `before` bytes ahead of RIP. */
static const uint8_t *win_at(const struct code_window *w, int before)
{
    return w->b + 15 - before;
}

/* How many message bytes are known for an instruction starting `before` bytes ahead of RIP. */
static int win_count(const struct code_window *w, int before)
{
    int n = before + w->fwd;
    return n < 16 ? n : 16;
}

/* ------------------------------------------------------------------------------------------ */
/* registers                                                                                    */

enum { G_REGS = 1, G_SREGS = 2, G_DREGS = 4, G_FPU = 8, G_XCRS = 16, G_EV = 32 };

void emu_regctx_init(struct emu_regctx *c, struct emu_vp *vp)
{
    memset(c, 0, sizeof(*c));
    c->vp = vp;
}

static int need(struct emu_regctx *c, unsigned g)
{
    static const unsigned long get[] = {KVM_GET_REGS, KVM_GET_SREGS, KVM_GET_DEBUGREGS, KVM_GET_FPU,
                                        KVM_GET_XCRS, KVM_GET_VCPU_EVENTS};
    void *dst[] = {&c->regs, &c->sregs, &c->dregs, &c->fpu, &c->xcrs, &c->ev};
    if (c->have & g)
        return 1;
    if (c->vp->pend.active && (g == G_REGS || g == G_SREGS)) {
        /* A deferred I/O completion: the VP as mshv shows it, without asking KVM. */
        if (g == G_REGS)
            c->regs = c->vp->pend.view;
        else
            c->sregs = c->vp->pend.sview;
        c->have |= g;
        return 1;
    }
    if (emu_kvm_settle(c->vp) < 0)
        return 0; /* anything else is KVM's own state: let it finish the I/O first */
    int i = __builtin_ctz(g);
    if (ioctl(c->vp->vcpu_fd, get[i], dst[i]) < 0)
        return 0;
    if (g == G_FPU && !mxcsr_access(c->vp, &c->fpu.mxcsr, 0))
        return 0; /* KVM_GET_FPU does not fill in MXCSR */
    c->have |= g;
    return 1;
}

static struct hv_x64_segment_register seg_to_hv(const struct kvm_segment *k)
{
    struct hv_x64_segment_register h;
    h.base = k->base;
    h.limit = k->limit;
    h.selector = k->selector;
    h.attributes = (uint16_t)((k->type & 0xF) | (k->s & 1) << 4 | (k->dpl & 3) << 5 |
                              (k->present && !k->unusable) << 7 | (k->avl & 1) << 12 | (k->l & 1) << 13 |
                              (k->db & 1) << 14 | (k->g & 1) << 15);
    return h;
}

static void seg_from_hv(struct kvm_segment *k, const struct hv_x64_segment_register *h)
{
    uint16_t a = h->attributes;
    memset(k, 0, sizeof(*k));
    k->base = h->base;
    k->limit = h->limit;
    k->selector = h->selector;
    k->type = a & 0xF;
    k->s = (a >> 4) & 1;
    k->dpl = (a >> 5) & 3;
    k->present = (a >> 7) & 1;
    k->avl = (a >> 12) & 1;
    k->l = (a >> 13) & 1;
    k->db = (a >> 14) & 1;
    k->g = (a >> 15) & 1;
    k->unusable = !k->present; /* the hypervisor has no separate "unusable" bit */
}

static uint32_t msr_of(uint32_t name)
{
    switch (name) {
    case HV_X64_REGISTER_TSC: return 0x10;
    case HV_X64_REGISTER_KERNEL_GS_BASE: return 0xC0000102;
    case HV_X64_REGISTER_PAT: return 0x277;
    case HV_X64_REGISTER_SYSENTER_CS: return 0x174;
    case HV_X64_REGISTER_SYSENTER_ESP: return 0x175;
    case HV_X64_REGISTER_SYSENTER_EIP: return 0x176;
    case HV_X64_REGISTER_STAR: return 0xC0000081;
    case HV_X64_REGISTER_LSTAR: return 0xC0000082;
    case HV_X64_REGISTER_CSTAR: return 0xC0000083;
    case HV_X64_REGISTER_SFMASK: return 0xC0000084;
    case 0x0008000D: return 0xFE;         /* MSR_MTRR_CAP */
    case 0x0008000E: return 0x2FF;        /* MSR_MTRR_DEF_TYPE */
    case 0x00080070: return 0x250;        /* MTRR_FIX64K_00000 */
    case 0x00080071: return 0x258;        /* MTRR_FIX16K_80000 */
    case 0x00080072: return 0x259;        /* MTRR_FIX16K_A0000 */
    case 0x0008007B: return 0xC0000103;   /* TSC_AUX */
    case 0x00080084: return 0x48;         /* SPEC_CTRL */
    case 0x00080096: return 0x3B;         /* TSC_ADJUST */
    }
    if (name >= 0x00080010 && name <= 0x0008001F)
        return 0x200 + 2 * (name - 0x00080010); /* MTRR_PHYS_BASE0..15 */
    if (name >= 0x00080040 && name <= 0x0008004F)
        return 0x201 + 2 * (name - 0x00080040); /* MTRR_PHYS_MASK0..15 */
    if (name >= 0x00080073 && name <= 0x0008007A)
        return 0x268 + (name - 0x00080073); /* MTRR_FIX4K_C0000..F8000 */
    return 0;
}

static int msr_rw(struct emu_vp *vp, uint32_t index, uint64_t *v, int write)
{
    struct {
        struct kvm_msrs h;
        struct kvm_msr_entry e;
    } m;
    memset(&m, 0, sizeof(m));
    m.h.nmsrs = 1;
    m.e.index = index;
    m.e.data = write ? *v : 0;
    if (ioctl(vp->vcpu_fd, write ? KVM_SET_MSRS : KVM_GET_MSRS, &m) != 1)
        return 0;
    if (!write)
        *v = m.e.data;
    return 1;
}

/* hv register order RAX RCX RDX RBX RSP RBP RSI RDI R8..R15 RIP RFLAGS -> kvm_regs field */
static __u64 *gpr_slot(struct kvm_regs *r, uint32_t i)
{
    __u64 *t[18] = {&r->rax, &r->rcx, &r->rdx, &r->rbx, &r->rsp, &r->rbp, &r->rsi, &r->rdi, &r->r8,
                    &r->r9,  &r->r10, &r->r11, &r->r12, &r->r13, &r->r14, &r->r15, &r->rip, &r->rflags};
    return t[i];
}

static struct kvm_segment *seg_of(struct kvm_sregs *s, uint32_t name)
{
    struct kvm_segment *t[8] = {&s->es, &s->cs, &s->ss, &s->ds, &s->fs, &s->gs, &s->ldt, &s->tr};
    return t[name - HV_X64_REGISTER_ES];
}

static __u64 *cr_of(struct kvm_sregs *s, uint32_t name)
{
    switch (name & ~0x1000u) { /* INTERMEDIATE_CRx (0x0004100x) alias CRx here: no nesting */
    case HV_X64_REGISTER_CR0: return &s->cr0;
    case HV_X64_REGISTER_CR2: return &s->cr2;
    case HV_X64_REGISTER_CR3: return &s->cr3;
    case HV_X64_REGISTER_CR4: return &s->cr4;
    case HV_X64_REGISTER_CR8: return &s->cr8;
    }
    return NULL;
}

static int is_soft(uint32_t name)
{
    /* Synthetic registers without a KVM counterpart here (no Hyper-V enlightenments): kept in
     * software so a VMM can write and read them back. */
    return name == HV_REGISTER_EXPLICIT_SUSPEND || name == HV_REGISTER_INTERCEPT_SUSPEND || name == 0x3 ||
           name == 0x00010006 || (name >= 0x00090000 && name <= 0x000AFFFF && name != HV_REGISTER_VP_INDEX &&
                                  name != 0x00090004);
}

static struct emu_soft_reg *soft_find(struct emu_vp *vp, uint32_t name, int create)
{
    for (int i = 0; i < vp->nsoft; i++)
        if (vp->soft[i].name == name)
            return &vp->soft[i];
    if (!create || vp->nsoft == EMU_SOFT_REGS)
        return NULL;
    struct emu_soft_reg *r = &vp->soft[vp->nsoft++];
    memset(r, 0, sizeof(*r));
    r->name = name;
    return r;
}

/* Pending interruption <-> vcpu events: pending[0], type[3:1], error_code_valid[4], vector[31:16],
 * error code[63:32]; types 0 external, 2 NMI, 3 exception, 4 software interrupt. */
static uint64_t pending_get(const struct kvm_vcpu_events *ev)
{
    if (ev->exception.injected)
        return 1 | 3u << 1 | (uint64_t)(ev->exception.has_error_code & 1) << 4 |
               (uint64_t)ev->exception.nr << 16 | (uint64_t)ev->exception.error_code << 32;
    if (ev->nmi.injected)
        return 1 | 2u << 1 | 2ull << 16;
    if (ev->interrupt.injected)
        return 1 | (ev->interrupt.soft ? 4u : 0u) << 1 | (uint64_t)ev->interrupt.nr << 16;
    return 0;
}

static void pending_set(struct kvm_vcpu_events *ev, uint64_t v)
{
    ev->exception.injected = 0;
    ev->nmi.injected = 0;
    ev->interrupt.injected = 0;
    if (!(v & 1))
        return;
    uint8_t vec = (uint8_t)(v >> 16);
    switch ((v >> 1) & 7) {
    case 2:
        ev->nmi.injected = 1;
        break;
    case 3:
        ev->exception.injected = 1;
        ev->exception.nr = vec;
        ev->exception.has_error_code = (v >> 4) & 1;
        ev->exception.error_code = (uint32_t)(v >> 32);
        break;
    default:
        ev->interrupt.injected = 1;
        ev->interrupt.nr = vec;
        ev->interrupt.soft = ((v >> 1) & 7) == 4;
    }
}

uint16_t emu_reg_get(struct emu_regctx *c, uint32_t name, union hv_register_value *out)
{
    struct emu_vp *vp = c->vp;
    __u64 *cr;
    out->reg128.low_part = out->reg128.high_part = 0;
    if (name <= HV_X64_REGISTER_RFLAGS && name >= HV_X64_REGISTER_RAX) {
        if (!need(c, G_REGS))
            return HV_STATUS_INVALID_VP_STATE;
        out->reg64 = *gpr_slot(&c->regs, name - HV_X64_REGISTER_RAX);
        return 0;
    }
    if ((cr = cr_of(&c->sregs, name))) {
        if (!need(c, G_SREGS))
            return HV_STATUS_INVALID_VP_STATE;
        out->reg64 = *cr;
        return 0;
    }
    if (name >= HV_X64_REGISTER_ES && name <= HV_X64_REGISTER_TR) {
        if (!need(c, G_SREGS))
            return HV_STATUS_INVALID_VP_STATE;
        out->segment = seg_to_hv(seg_of(&c->sregs, name));
        return 0;
    }
    if (name == HV_X64_REGISTER_IDTR || name == HV_X64_REGISTER_GDTR) {
        if (!need(c, G_SREGS))
            return HV_STATUS_INVALID_VP_STATE;
        struct kvm_dtable *t = name == HV_X64_REGISTER_IDTR ? &c->sregs.idt : &c->sregs.gdt;
        out->table.limit = t->limit;
        out->table.base = t->base;
        return 0;
    }
    if (name == HV_X64_REGISTER_EFER || name == HV_X64_REGISTER_APIC_BASE) {
        if (!need(c, G_SREGS))
            return HV_STATUS_INVALID_VP_STATE;
        out->reg64 = name == HV_X64_REGISTER_EFER ? c->sregs.efer : c->sregs.apic_base;
        return 0;
    }
    if (name >= HV_X64_REGISTER_DR0 && name <= HV_X64_REGISTER_DR7) {
        if (!need(c, G_DREGS))
            return HV_STATUS_INVALID_VP_STATE;
        uint32_t i = name - HV_X64_REGISTER_DR0;
        out->reg64 = i < 4 ? c->dregs.db[i] : i == 4 ? c->dregs.dr6 : c->dregs.dr7;
        return 0;
    }
    if (name == HV_X64_REGISTER_XFEM) {
        if (!need(c, G_XCRS))
            return HV_STATUS_INVALID_VP_STATE;
        for (uint32_t i = 0; i < c->xcrs.nr_xcrs; i++)
            if (c->xcrs.xcrs[i].xcr == 0)
                out->reg64 = c->xcrs.xcrs[i].value;
        return 0;
    }
    if (name >= HV_X64_REGISTER_XMM0 && name <= 0x00030019) {
        if (!need(c, G_FPU))
            return HV_STATUS_INVALID_VP_STATE;
        uint32_t i = name - HV_X64_REGISTER_XMM0;
        if (i < 16) {
            memcpy(&out->reg128, c->fpu.xmm[i], 16);
        } else if (i < 24) {
            memcpy(&out->reg128, c->fpu.fpr[i - 16], 16);
        } else if (i == 24) { /* FP_CONTROL_STATUS: fcw, fsw, ftw, -, last opcode, last rip */
            uint8_t *p = (uint8_t *)&out->reg128;
            memcpy(p, &c->fpu.fcw, 2);
            memcpy(p + 2, &c->fpu.fsw, 2);
            p[4] = c->fpu.ftwx;
            memcpy(p + 6, &c->fpu.last_opcode, 2);
            memcpy(p + 8, &c->fpu.last_ip, 8);
        } else { /* XMM_CONTROL_STATUS: last rdp, mxcsr, mxcsr mask */
            uint8_t *p = (uint8_t *)&out->reg128;
            uint32_t mask = 0xFFFF;
            memcpy(p, &c->fpu.last_dp, 8);
            memcpy(p + 8, &c->fpu.mxcsr, 4);
            memcpy(p + 12, &mask, 4);
        }
        return 0;
    }
    if (name == HV_REGISTER_PENDING_INTERRUPTION || name == HV_REGISTER_INTERRUPT_STATE) {
        if (!need(c, G_EV))
            return HV_STATUS_INVALID_VP_STATE;
        out->reg64 = name == HV_REGISTER_PENDING_INTERRUPTION
                         ? pending_get(&c->ev)
                         : (uint64_t)(c->ev.interrupt.shadow != 0) | (uint64_t)(c->ev.nmi.masked != 0) << 1;
        return 0;
    }
    if (name == HV_REGISTER_VP_INDEX || name == 0x0008000C /* INITIAL_APIC_ID */) {
        out->reg64 = vp->index;
        return 0;
    }
    if (name == 0x00090004) { /* TIME_REF_COUNT: 100 ns units */
        out->reg64 = (emu_now_ns() - vp->pt->created_ns) / 100;
        return 0;
    }
    uint32_t msr = msr_of(name);
    if (msr) {
        uint64_t v;
        if (emu_kvm_settle(vp) < 0 || !msr_rw(vp, msr, &v, 0))
            return HV_STATUS_INVALID_PARAMETER;
        out->reg64 = v;
        return 0;
    }
    if (is_soft(name)) {
        struct emu_soft_reg *r = soft_find(vp, name, 0);
        if (r)
            *out = r->value;
        else if (name == 0x000A0011) /* SVERSION */
            out->reg64 = 1;
        return 0;
    }
    return HV_STATUS_INVALID_PARAMETER; /* unknown register name */
}

uint16_t emu_reg_set(struct emu_regctx *c, uint32_t name, const union hv_register_value *in)
{
    struct emu_vp *vp = c->vp;
    __u64 *cr;
    if (name <= HV_X64_REGISTER_RFLAGS && name >= HV_X64_REGISTER_RAX) {
        if (!need(c, G_REGS))
            return HV_STATUS_INVALID_VP_STATE;
        *gpr_slot(&c->regs, name - HV_X64_REGISTER_RAX) = in->reg64;
        c->dirty |= G_REGS;
        if (name == HV_X64_REGISTER_RIP)
            c->rip_written = 1;
        return 0;
    }
    if ((cr = cr_of(&c->sregs, name))) {
        if (!need(c, G_SREGS))
            return HV_STATUS_INVALID_VP_STATE;
        *cr = in->reg64;
        c->dirty |= G_SREGS;
        return 0;
    }
    if (name >= HV_X64_REGISTER_ES && name <= HV_X64_REGISTER_TR) {
        if (!need(c, G_SREGS))
            return HV_STATUS_INVALID_VP_STATE;
        seg_from_hv(seg_of(&c->sregs, name), &in->segment);
        c->dirty |= G_SREGS;
        return 0;
    }
    if (name == HV_X64_REGISTER_IDTR || name == HV_X64_REGISTER_GDTR) {
        if (!need(c, G_SREGS))
            return HV_STATUS_INVALID_VP_STATE;
        struct kvm_dtable *t = name == HV_X64_REGISTER_IDTR ? &c->sregs.idt : &c->sregs.gdt;
        t->limit = in->table.limit;
        t->base = in->table.base;
        c->dirty |= G_SREGS;
        return 0;
    }
    if (name == HV_X64_REGISTER_EFER || name == HV_X64_REGISTER_APIC_BASE) {
        if (!need(c, G_SREGS))
            return HV_STATUS_INVALID_VP_STATE;
        *(name == HV_X64_REGISTER_EFER ? &c->sregs.efer : &c->sregs.apic_base) = in->reg64;
        c->dirty |= G_SREGS;
        return 0;
    }
    if (name >= HV_X64_REGISTER_DR0 && name <= HV_X64_REGISTER_DR7) {
        if (!need(c, G_DREGS))
            return HV_STATUS_INVALID_VP_STATE;
        uint32_t i = name - HV_X64_REGISTER_DR0;
        *(i < 4 ? &c->dregs.db[i] : i == 4 ? &c->dregs.dr6 : &c->dregs.dr7) = in->reg64;
        c->dirty |= G_DREGS;
        return 0;
    }
    if (name == HV_X64_REGISTER_XFEM) {
        if (!need(c, G_XCRS))
            return HV_STATUS_INVALID_VP_STATE;
        uint32_t i;
        for (i = 0; i < c->xcrs.nr_xcrs && c->xcrs.xcrs[i].xcr != 0; i++) {
        }
        if (i == c->xcrs.nr_xcrs) {
            if (i >= KVM_MAX_XCRS)
                return HV_STATUS_INVALID_VP_STATE;
            c->xcrs.nr_xcrs++;
        }
        c->xcrs.xcrs[i].xcr = 0;
        c->xcrs.xcrs[i].value = in->reg64;
        c->dirty |= G_XCRS;
        return 0;
    }
    if (name >= HV_X64_REGISTER_XMM0 && name <= 0x00030019) {
        if (!need(c, G_FPU))
            return HV_STATUS_INVALID_VP_STATE;
        uint32_t i = name - HV_X64_REGISTER_XMM0;
        const uint8_t *p = (const uint8_t *)&in->reg128;
        if (i < 16) {
            memcpy(c->fpu.xmm[i], p, 16);
        } else if (i < 24) {
            memcpy(c->fpu.fpr[i - 16], p, 16);
        } else if (i == 24) {
            memcpy(&c->fpu.fcw, p, 2);
            memcpy(&c->fpu.fsw, p + 2, 2);
            c->fpu.ftwx = p[4];
            memcpy(&c->fpu.last_opcode, p + 6, 2);
            memcpy(&c->fpu.last_ip, p + 8, 8);
        } else {
            memcpy(&c->fpu.last_dp, p, 8);
            memcpy(&c->fpu.mxcsr, p + 8, 4);
        }
        c->dirty |= G_FPU;
        return 0;
    }
    if (name == HV_REGISTER_PENDING_INTERRUPTION || name == HV_REGISTER_INTERRUPT_STATE) {
        if (!need(c, G_EV))
            return HV_STATUS_INVALID_VP_STATE;
        if (name == HV_REGISTER_PENDING_INTERRUPTION) {
            pending_set(&c->ev, in->reg64);
        } else {
            c->ev.interrupt.shadow = (in->reg64 & 1) ? KVM_X86_SHADOW_INT_MOV_SS : 0;
            c->ev.nmi.masked = (in->reg64 >> 1) & 1;
            c->ev.flags |= KVM_VCPUEVENT_VALID_SHADOW;
        }
        c->dirty |= G_EV;
        return 0;
    }
    if (name == HV_REGISTER_VP_INDEX || name == 0x0008000C || name == 0x00090004)
        return HV_STATUS_INVALID_PARAMETER; /* read-only */
    uint32_t msr = msr_of(name);
    if (msr) {
        uint64_t v = in->reg64;
        if (emu_kvm_settle(vp) < 0)
            return HV_STATUS_INVALID_VP_STATE;
        return msr_rw(vp, msr, &v, 1) ? 0 : HV_STATUS_INVALID_REGISTER_VALUE;
    }
    if (is_soft(name)) {
        struct emu_soft_reg *r = soft_find(vp, name, 1);
        if (!r)
            return HV_STATUS_INSUFFICIENT_BUFFERS;
        r->value = *in;
        return 0;
    }
    return HV_STATUS_INVALID_PARAMETER;
}

uint16_t emu_regctx_flush(struct emu_regctx *c)
{
    int fd = c->vp->vcpu_fd;
    if (c->vp->pend.active && c->dirty == G_REGS) {
        /* Only general registers written (RIP, RAX: the VMM completing the I/O): they stay in
         * the view until RUN_VP, which hands them to KVM's pending completion for free. */
        c->vp->pend.view = c->regs;
        c->dirty = 0;
        return 0;
    }
    if (c->dirty && emu_kvm_settle(c->vp) < 0)
        return HV_STATUS_INVALID_VP_STATE;
    /* Special registers first: mode changes (CR0/CR4/EFER/CS) must be consistent as a set. */
    if ((c->dirty & G_SREGS) && ioctl(fd, KVM_SET_SREGS, &c->sregs) < 0)
        return HV_STATUS_INVALID_REGISTER_VALUE;
    if ((c->dirty & G_XCRS) && ioctl(fd, KVM_SET_XCRS, &c->xcrs) < 0)
        return HV_STATUS_INVALID_REGISTER_VALUE;
    if ((c->dirty & G_REGS) && ioctl(fd, KVM_SET_REGS, &c->regs) < 0)
        return HV_STATUS_INVALID_REGISTER_VALUE;
    /* KVM_SET_FPU ignores MXCSR (and leaves XSTATE_BV alone): the legacy area goes in through XSAVE */
    if ((c->dirty & G_FPU) && (ioctl(fd, KVM_SET_FPU, &c->fpu) < 0 || !xsave_legacy(c->vp, &c->fpu.mxcsr, 1, &c->fpu)))
        return HV_STATUS_INVALID_REGISTER_VALUE;
    if ((c->dirty & G_DREGS) && ioctl(fd, KVM_SET_DEBUGREGS, &c->dregs) < 0)
        return HV_STATUS_INVALID_REGISTER_VALUE;
    if ((c->dirty & G_EV) && ioctl(fd, KVM_SET_VCPU_EVENTS, &c->ev) < 0)
        return HV_STATUS_INVALID_REGISTER_VALUE;
    if (c->rip_written && !c->vp->started) {
        /* With the LAPIC in KVM, application processors start in wait-for-SIPI. A VMM that
         * sets an AP's RIP explicitly wants it to run from there (the hypervisor starts VPs
         * from the context the VMM gives them); one that does not leaves it to the guest's
         * INIT/SIPI, which KVM handles. (Our inference of the hypervisor's behaviour.) */
        struct kvm_mp_state mp;
        if (ioctl(fd, KVM_GET_MP_STATE, &mp) == 0 &&
            (mp.mp_state == KVM_MP_STATE_UNINITIALIZED || mp.mp_state == KVM_MP_STATE_INIT_RECEIVED)) {
            mp.mp_state = KVM_MP_STATE_RUNNABLE;
            ioctl(fd, KVM_SET_MP_STATE, &mp);
        }
        c->vp->started = 1;
    }
    c->dirty = 0;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* the halt monitor and the kick signal                                                         */

static pthread_mutex_t mon_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t mon_cond = PTHREAD_COND_INITIALIZER;
static struct emu_vp *mon_list;
static int mon_started;
static int kick_sig = 0; /* 0: not chosen yet, -1: none available */

#define MON_PERIOD_NS 10000000ull        /* scan every 10 ms */
#define MON_REKICK_NS 100000000ull       /* at most one kick per 100 ms per VP */

/* Set by our kick on the thread it lands on: tells the monitor's EINTR from the caller's. A thread
 * writes it (emu_kvm_run) before it can be kicked, so the handler never makes the first access to
 * this dlopen'ed module's TLS (which may allocate). */
static __thread volatile sig_atomic_t tls_kicked;

static void kick_handler(int sig)
{
    (void)sig;
    tls_kicked = 1;
}

static int kick_signal(void)
{
    int known = __atomic_load_n(&kick_sig, __ATOMIC_ACQUIRE);
    if (known)
        return known; /* chosen once per process; no lock on the way into every RUN_VP */
    pthread_mutex_lock(&mon_lock);
    if (kick_sig == 0) {
        int none = -1;
        const char *env = getenv("MSHV_LIBVIRT_EMU_KICK_SIGNAL");
        int want = env ? atoi(env) : 0;
        for (int s = want ? want : SIGRTMAX - 1; s >= SIGRTMIN + 2; s = want ? 0 : s - 1) {
            struct sigaction old, sa;
            if (sigaction(s, NULL, &old) == 0 && old.sa_handler == SIG_DFL && !(old.sa_flags & SA_SIGINFO)) {
                memset(&sa, 0, sizeof(sa));
                sa.sa_handler = kick_handler;
                sigemptyset(&sa.sa_mask);
                if (sigaction(s, &sa, NULL) == 0) {
                    __atomic_store_n(&kick_sig, s, __ATOMIC_RELEASE);
                    break;
                }
            }
            if (want)
                break;
        }
        if (kick_sig == 0)
            __atomic_store_n(&kick_sig, none, __ATOMIC_RELEASE);
    }
    int s = kick_sig;
    pthread_mutex_unlock(&mon_lock);
    return s;
}

static int read_blocking(struct emu_vp *vp)
{
    uint64_t v;
    if (vp->stats_fd < 0 || stats_blocking < 0)
        return -1;
    if (pread(vp->stats_fd, &v, sizeof(v), stats_blocking) != (ssize_t)sizeof(v))
        return -1;
    return v != 0;
}

static void *monitor(void *arg)
{
    (void)arg;
    /* Under the VMM sandbox this thread keeps only what its loop needs (abi/vmm/sandbox.c). */
    if (mshv_sandbox_thread_enter && mshv_sandbox_thread_enter(EMU_SANDBOX_HELPER, "emu-monitor") < 0)
        return NULL; /* no monitor: halted VPs are then kicked only by their callers */
    sigset_t sys;
    sigemptyset(&sys);
    sigaddset(&sys, SIGSYS); /* a denied call must reach the reporting handler, not kill silently */
    pthread_sigmask(SIG_UNBLOCK, &sys, NULL);
    struct timespec period = {0, (long)MON_PERIOD_NS};
    pthread_mutex_lock(&mon_lock);
    for (;;) {
        while (!mon_list)
            pthread_cond_wait(&mon_cond, &mon_lock);
        uint64_t now = emu_now_ns();
        for (struct emu_vp *vp = mon_list; vp; vp = vp->mon_next) {
            int b = read_blocking(vp); /* -1: unknown, so poll as if blocked */
            vp->blocked_scans = b == 0 ? 0 : vp->blocked_scans + 1;
            if (vp->blocked_scans >= 2 && now - vp->last_kick_ns >= MON_REKICK_NS && kick_sig > 0) {
                vp->last_kick_ns = now;
                syscall(SYS_tgkill, emu_self(), vp->tid, kick_sig);
            }
        }
        pthread_mutex_unlock(&mon_lock);
        nanosleep(&period, NULL);
        pthread_mutex_lock(&mon_lock);
    }
    return NULL;
}

static void mon_start_locked(void)
{
    if (!mon_started) {
        pthread_t t;
        pthread_attr_t at;
        sigset_t all, old;
        pthread_attr_init(&at);
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&at, 64 * 1024);
        sigfillset(&all); /* the monitor never takes anyone's signals */
        pthread_sigmask(SIG_BLOCK, &all, &old);
        mon_started = pthread_create(&t, &at, monitor, NULL) == 0;
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        pthread_attr_destroy(&at);
    }
}

static void mon_enter(struct emu_vp *vp)
{
    pthread_mutex_lock(&mon_lock);
    static __thread pid_t tid;
    if (!tid)
        tid = (pid_t)syscall(SYS_gettid);
    vp->tid = tid;
    vp->blocked_scans = 0;
    vp->last_kick_ns = 0;
    __atomic_store_n(&vp->in_run, 1, __ATOMIC_RELEASE);
    vp->mon_next = mon_list;
    mon_list = vp;
    mon_start_locked();
    pthread_cond_signal(&mon_cond);
    pthread_mutex_unlock(&mon_lock);
}

void emu_kvm_prestart(void)
{
    if (!emu_kvm_wanted() || emu_kvm_fd() < 0)
        return;
    kick_signal();
    pthread_mutex_lock(&mon_lock);
    mon_start_locked();
    pthread_mutex_unlock(&mon_lock);
}

static void mon_leave(struct emu_vp *vp)
{
    pthread_mutex_lock(&mon_lock);
    for (struct emu_vp **p = &mon_list; *p; p = &(*p)->mon_next)
        if (*p == vp) {
            *p = vp->mon_next;
            break;
        }
    __atomic_store_n(&vp->in_run, 0, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&mon_lock);
}

int emu_kvm_vp_running(struct emu_vp *vp)
{
    return __atomic_load_n(&vp->in_run, __ATOMIC_ACQUIRE);
}

/* ------------------------------------------------------------------------------------------ */
/* exits -> hv_message                                                                          */

static void fill_header(struct hv_x64_intercept_message_header *h, struct emu_vp *vp, const struct kvm_regs *r,
                        const struct kvm_sregs *s, uint64_t rip, int len, int access)
{
    int pe = !!(s->cr0 & CR0_PE);
    int cpl = !pe ? 0 : (r->rflags & RFLAGS_VM) ? 3 : (s->ss.dpl & 3);
    h->vp_index = vp->index;
    h->instruction_length_cr8 = (uint8_t)((len & 0xF) | ((s->cr8 & 0xF) << 4));
    h->intercept_access_type = (uint8_t)access;
    /* execution_state: cpl[1:0] cr0_pe[2] cr0_am[3] efer_lma[4] */
    h->execution_state = (uint16_t)(cpl | pe << 2 | !!(s->cr0 & CR0_AM) << 3 | !!(s->efer & EFER_LMA) << 4);
    h->cs_segment = seg_to_hv(&s->cs);
    h->rip = rip;
    h->rflags = r->rflags;
}

static void set_type(struct hv_message *msg, uint32_t type, size_t payload)
{
    msg->header.message_type = type;
    msg->header.payload_size = (uint8_t)payload;
    msg->header.message_flags = 0;
    msg->header.sender = 0;
}

/* Registers as they were at the exit. */
static int exit_regs(struct emu_vp *vp, struct kvm_regs *r, struct kvm_sregs *s)
{
    if (vp->sync_regs) {
        memcpy(r, &vp->run->s.regs.regs, sizeof(*r));
        memcpy(s, &vp->run->s.regs.sregs, sizeof(*s));
        return 0;
    }
    return ioctl(vp->vcpu_fd, KVM_GET_REGS, r) < 0 || ioctl(vp->vcpu_fd, KVM_GET_SREGS, s) < 0 ? -1 : 0;
}

/* Let KVM finish the access it is waiting to complete, without entering the guest. Further
 * exits on the way (the write half of a read-modify-write, the next chunk of a string I/O)
 * are completed the same way: the VMM will emulate the whole instruction itself. */
static int complete_pending(struct emu_vp *vp)
{
    struct kvm_run *run = vp->run;
    for (int i = 0; i < 256; i++) {
        run->immediate_exit = 1;
        int r = ioctl(vp->vcpu_fd, KVM_RUN, 0);
        int e = errno;
        run->immediate_exit = 0;
        if (r < 0 && e == EINTR)
            return 0;
        if (r < 0 && e != EAGAIN)
            return -1;
        if (r == 0 && run->exit_reason == KVM_EXIT_IO && run->io.direction == KVM_EXIT_IO_IN)
            memset((uint8_t *)run + run->io.data_offset, 0, (size_t)run->io.size * run->io.count);
        else if (r == 0 && run->exit_reason == KVM_EXIT_MMIO && !run->mmio.is_write)
            memset(run->mmio.data, 0, sizeof(run->mmio.data));
        else if (r == 0 && run->exit_reason != KVM_EXIT_IO && run->exit_reason != KVM_EXIT_MMIO)
            return 0; /* nothing left pending */
    }
    return -1;
}

static void gprs(const struct kvm_regs *r, uint64_t g[16])
{
    uint64_t t[16] = {r->rax, r->rcx, r->rdx, r->rbx, r->rsp, r->rbp, r->rsi, r->rdi,
                      r->r8, r->r9, r->r10, r->r11, r->r12, r->r13, r->r14, r->r15};
    memcpy(g, t, sizeof(t));
}

static uint64_t with_adsize(uint64_t old, uint64_t v, int adsize)
{
    if (adsize == 8)
        return v;
    if (adsize == 4)
        return v & 0xFFFFFFFFull;
    return (old & ~0xFFFFull) | (v & 0xFFFF);
}

/* 1 if the bytes at DS:rsi (for this OUTS) are exactly what KVM handed over. */
static int outs_source_is(struct emu_vp *vp, const struct kvm_sregs *s, const struct emu_insn *in,
                          const struct kvm_regs *r, uint64_t rsi, const uint8_t *data, size_t n)
{
    uint64_t g[16], lin, gpa;
    uint8_t cur[512];
    gprs(r, g);
    g[6] = rsi;
    if (!emu_insn_linear(in, g, s, 0, &lin))
        return 0;
    for (size_t done = 0; done < n;) {
        size_t chunk = EMU_PAGE - ((lin + done) & (EMU_PAGE - 1));
        chunk = chunk < n - done ? chunk : n - done;
        if (walk(vp->pt, s, lin + done, 0, &gpa) != EMU_GVA_SUCCESS || emu_read_gpa(vp->pt, gpa, cur + done, chunk))
            return 0;
        done += chunk;
    }
    return memcmp(cur, data, n) == 0;
}

/* OUTS hands its data to KVM as a write: by the exit KVM has already stepped RSI (and RCX for
 * REP) over the iterations it passes on, whether or not RIP moved. Step them back so the VP is
 * where the instruction began. When RIP still points at the instruction (a REP with iterations
 * left) the data tells which it was: it came either from before RSI or from RSI. */
static void outs_undo(struct emu_vp *vp, const struct kvm_sregs *s, const struct emu_insn *in,
                      const struct kvm_regs *r0, struct kvm_regs *back, uint64_t start, int size,
                      uint32_t count, const uint8_t *data, size_t dlen)
{
    uint64_t step = (uint64_t)size * count;
    uint64_t before = (r0->rflags & (1ull << 10)) ? r0->rsi + step : r0->rsi - step; /* DF */
    int advanced = 1;
    if (start == r0->rip) {
        int was = outs_source_is(vp, s, in, r0, before, data, dlen);
        int is = outs_source_is(vp, s, in, r0, r0->rsi, data, dlen);
        advanced = was || !is;
    }
    if (!advanced)
        return;
    back->rsi = with_adsize(r0->rsi, before, in->adsize);
    if (in->rep)
        back->rcx = with_adsize(r0->rcx, r0->rcx + count, in->adsize);
}

/* ---- deferred completion of plain port I/O ----
 * The slow way to give an I/O exit mshv semantics costs four system calls: let KVM finish its
 * half now (a KVM_RUN with immediate_exit), read the registers it left, put back the pre-exit ones.
 * For IN/OUT without a string operation the emulator can instead leave KVM mid-instruction, report
 * the VP at the instruction from the registers KVM_CAP_SYNC_REGS put in kvm_run, and hand the
 * VMM's completion (RIP past the instruction; for IN, RAX) to KVM's own pending completion at the
 * next RUN_VP: KVM then advances RIP and loads RAX from kvm_run's data in the same KVM_RUN that
 * enters the guest. Any other register access in between (special registers written, MSRs, FPU,
 * state pages) or any other completion first runs the slow way (emu_kvm_settle), so what a VMM can
 * observe is the same. Two facts make it sound, and both are checked, not assumed:
 *   - where the instruction is: the bytes must leave only one reading (decoded at RIP, or ending
 *     at RIP because KVM already advanced past it); otherwise the slow way decides;
 *   - what KVM's completion does for that class (IN/OUT, at/past): each class is used only after a
 *     slow-way exit of it was seen to do exactly that (RIP moved by the length, or not at all; RAX
 *     loaded from the data, or untouched); one contradiction turns the class off for good. */

/* 1: RIP at the instruction, 2: already past it, 0: undecided. *len: its length. */
static int io_classify(const struct code_window *w, int mode, int is_in, uint16_t port, int size, uint64_t rdx,
                       int *len)
{
    struct emu_insn in;
    int at = 0, past = 0;
    memset(&in, 0, sizeof(in));
    if (emu_decode(win_at(w, 0), w->fwd, mode, &in) > 0 && emu_insn_is_io(&in, is_in, port, size, rdx) &&
        (in.opcode & 0xFC) != 0x6C)
        at = in.len;
    for (int l = 1; l <= w->back && !past; l++)
        if (emu_decode(win_at(w, l), l, mode, &in) == l && emu_insn_is_io(&in, is_in, port, size, rdx) &&
            (in.opcode & 0xFC) != 0x6C)
            past = l;
    if (at && !past) {
        *len = at;
        return 1;
    }
    if (past && !at && !is_in) { /* an IN past its instruction: KVM's completion unknown, slow way */
        *len = past;
        return 2;
    }
    return 0;
}

/* [is_in][class - 1]: 0 not seen, 1 confirmed, -1 contradicted (per process: a host property). */
static int io_conv[2][2];
#define IO_PROBE 0xA5A5A5A5u /* what an IN reads while its completion is being observed */

static uint64_t in_result(uint64_t rax, int size, uint64_t data)
{
    /* IN of 1 or 2 bytes keeps the rest of RAX; IN of 4 zero-extends, as KVM and a CPU do. */
    if (size >= 4)
        return data & 0xFFFFFFFFull;
    uint64_t mask = size == 2 ? 0xFFFFull : 0xFFull;
    return (rax & ~mask) | (data & mask);
}

static void io_message(struct emu_vp *vp, struct hv_message *msg, const struct kvm_regs *r,
                       const struct kvm_sregs *s, uint64_t start, int len, int before, const struct code_window *w,
                       int is_in, uint16_t port, int size, int string, int rep)
{
    struct hv_x64_io_port_intercept_message *m = (void *)msg->payload;
    memset(m, 0, sizeof(*m));
    fill_header(&m->header, vp, r, s, start, len, is_in ? HV_INTERCEPT_ACCESS_READ : HV_INTERCEPT_ACCESS_WRITE);
    m->port_number = port;
    m->access_info = (uint8_t)(size | string << 3 | (string && rep) << 4);
    m->rax = r->rax;
    m->instruction_byte_count = (uint8_t)win_count(w, before);
    memcpy(m->instruction_bytes, win_at(w, before), m->instruction_byte_count);
    m->ds_segment = seg_to_hv(&s->ds);
    m->es_segment = seg_to_hv(&s->es);
    m->rcx = r->rcx;
    m->rsi = r->rsi;
    m->rdi = r->rdi;
    set_type(msg, HVMSG_X64_IO_PORT_INTERCEPT, sizeof(*m));
}

/* At RUN_VP: 1 if the VMM did exactly what KVM's pending completion will do (and its IN result is
 * now in kvm_run's data), so that KVM_RUN alone completes the instruction. */
static int pend_resume(struct emu_vp *vp)
{
    struct emu_pend *p = &vp->pend;
    struct kvm_regs want = p->view;
    uint64_t rax = want.rax;
    if (want.rip != p->next)
        return 0;
    want.rip = p->exit.rip;
    want.rax = p->exit.rax;
    if (memcmp(&want, &p->exit, sizeof(want)) != 0)
        return 0; /* another register changed too */
    if (!p->is_in && rax != p->exit.rax)
        return 0;
    if (p->is_in) {
        if (rax != in_result(p->exit.rax, p->size, rax) || vp->run->exit_reason != KVM_EXIT_IO)
            return 0;
        memcpy((uint8_t *)vp->run + vp->run->io.data_offset, &rax, (size_t)p->size);
    }
    /* The slow way's KVM_SET_REGS also made KVM look at pending interrupts again (KVM_REQ_EVENT).
     * Without that, kvm-pvm (guest CPL0 code run by KVM's instruction emulator) left an interrupt
     * that became deliverable pending: the small Linux test kernel went silent after "vgaarb:
     * loaded" (tests/vmm/test_small_kernel_boot.py). Writing the registers through
     * KVM_CAP_SYNC_REGS raises it inside this KVM_RUN, before KVM's pending completion: KVM's own
     * registers, with an IN's result already in RAX (measured on kvm-pvm: with registers written,
     * the completion leaves RAX as written and still moves RIP past the instruction). */
    vp->run->s.regs.regs = p->kvm;
    if (p->is_in)
        vp->run->s.regs.regs.rax = rax;
    vp->run->kvm_dirty_regs |= KVM_SYNC_X86_REGS;
    return 1;
}

int emu_kvm_settle(struct emu_vp *vp)
{
    if (!vp->pend.active)
        return 0;
    vp->pend.active = 0;
    if (complete_pending(vp) < 0 || ioctl(vp->vcpu_fd, KVM_SET_REGS, &vp->pend.view) < 0)
        return -1;
    return 0;
}

static int io_exit(struct emu_vp *vp, struct hv_message *msg)
{
    struct kvm_run *run = vp->run;
    struct kvm_regs r0, r1;
    struct kvm_sregs s;
    int is_in = run->io.direction == KVM_EXIT_IO_IN, size = run->io.size;
    uint16_t port = run->io.port;
    uint32_t count = run->io.count;
    uint8_t data[512];
    size_t dlen = (size_t)size * count < sizeof(data) ? (size_t)size * count : sizeof(data);
    memcpy(data, (uint8_t *)run + run->io.data_offset, dlen);
    if (exit_regs(vp, &r0, &s) < 0)
        return -EIO;
    int mode = cpu_mode(&s, r0.rflags);
    struct code_window w;
    fetch_window(vp->pt, &s, mode, r0.rip, &w);
    int clen = 0, kind = vp->sync_regs ? io_classify(&w, mode, is_in, port, size, r0.rdx, &clen) : 0;
    if (kind && __atomic_load_n(&io_conv[is_in][kind - 1], __ATOMIC_RELAXED) == 1) {
        struct emu_pend *p = &vp->pend;
        uint64_t start = kind == 2 ? r0.rip - (uint64_t)clen : r0.rip;
        p->is_in = is_in;
        p->size = size;
        p->next = start + (uint64_t)clen;
        p->kvm = r0;
        p->exit = r0;
        p->exit.rip = start;
        p->view = p->exit;
        p->sview = s;
        p->active = 1;
        io_message(vp, msg, &p->view, &s, start, clen, kind == 2 ? clen : 0, &w, is_in, port, size, 0, 0);
        return 0;
    }
    if (is_in) {
        /* Observing a plain IN's completion: a known value shows whether KVM loads RAX from the data. */
        uint32_t probe = IO_PROBE;
        uint8_t *d = (uint8_t *)run + run->io.data_offset;
        memset(d, 0, (size_t)size * count);
        if (kind == 1)
            memcpy(d, &probe, (size_t)size);
    }
    if (complete_pending(vp) < 0 || ioctl(vp->vcpu_fd, KVM_GET_REGS, &r1) < 0)
        return -EIO;
    struct emu_insn in;
    uint64_t start = r0.rip;
    int len = 0, before = 0;
    uint64_t delta = r1.rip - r0.rip;
    memset(&in, 0, sizeof(in));
    if (delta >= 1 && delta <= (uint64_t)w.fwd && emu_decode(win_at(&w, 0), (int)delta, mode, &in) == (int)delta &&
        emu_insn_is_io(&in, is_in, port, size, r0.rdx)) {
        len = (int)delta; /* KVM left RIP at the instruction and advanced it on completion */
    } else if (emu_decode(win_at(&w, 0), w.fwd, mode, &in) > 0 && in.rep &&
               emu_insn_is_io(&in, is_in, port, size, r0.rdx)) {
        len = in.len; /* a REP INS/OUTS with iterations left: still at the instruction */
    } else {
        /* RIP was already past the instruction at the exit: find the I/O instruction that ends
         * exactly there (shortest match; a redundant prefix before it would only change the
         * reported start, not where the VMM resumes). */
        for (int l = 1; l <= w.back && !len; l++)
            if (emu_decode(win_at(&w, l), l, mode, &in) == l && emu_insn_is_io(&in, is_in, port, size, r0.rdx)) {
                len = l;
                before = l;
                start = r0.rip - (uint64_t)l;
            }
        if (!len && emu_decode(win_at(&w, 0), w.fwd, mode, &in) > 0 && emu_insn_is_io(&in, is_in, port, size, r0.rdx))
            len = in.len;
    }
    int string = len && (in.opcode & 0xFC) == 0x6C && in.map == 1;
    if (kind && !string && len == clen && (before > 0) == (kind == 2)) {
        /* What KVM's completion did for this class, against what the deferred way relies on. */
        uint64_t rax = is_in ? in_result(r0.rax, size, IO_PROBE) : r0.rax;
        int ok = r1.rax == rax && r1.rip == (kind == 1 ? r0.rip + (uint64_t)len : r0.rip);
        int *c = &io_conv[is_in][kind - 1];
        if (!ok)
            __atomic_store_n(c, -1, __ATOMIC_RELAXED);
        else if (__atomic_load_n(c, __ATOMIC_RELAXED) == 0)
            __atomic_store_n(c, 1, __ATOMIC_RELAXED);
    }
    /* Back to the state before the instruction, as the hypervisor leaves it. */
    struct kvm_regs back = r0;
    back.rip = start;
    if (string && !is_in)
        outs_undo(vp, &s, &in, &r0, &back, start, size, count, data, dlen);
    if (ioctl(vp->vcpu_fd, KVM_SET_REGS, &back) < 0)
        return -EIO;
    io_message(vp, msg, &back, &s, start, len, before, &w, is_in, port, size, string, in.rep);
    return 0;
}

static int mmio_exit(struct emu_vp *vp, struct hv_message *msg)
{
    struct kvm_run *run = vp->run;
    struct kvm_regs r0, r1;
    struct kvm_sregs s;
    uint64_t gpa = run->mmio.phys_addr, data = 0;
    int is_write = run->mmio.is_write;
    uint32_t mlen = run->mmio.len;
    memcpy(&data, run->mmio.data, sizeof(data)); /* before completing overwrites kvm_run */
    if (mlen < 8)
        data &= (1ull << (8 * mlen)) - 1;
    if (!is_write)
        memset(run->mmio.data, 0, sizeof(run->mmio.data));
    if (exit_regs(vp, &r0, &s) < 0 || complete_pending(vp) < 0 || ioctl(vp->vcpu_fd, KVM_GET_REGS, &r1) < 0)
        return -EIO;
    int mode = cpu_mode(&s, r0.rflags);
    uint64_t g[16], start = r0.rip, lin = 0;
    int len = 0, have_lin = 0, before = 0;
    struct emu_insn in;
    struct code_window w;
    gprs(&r0, g);
    uint64_t delta = r1.rip - r0.rip;
    fetch_window(vp->pt, &s, mode, r0.rip, &w);
    memset(&in, 0, sizeof(in));
    if (delta >= 1 && delta <= (uint64_t)w.fwd && emu_decode(win_at(&w, 0), (int)delta, mode, &in) == (int)delta) {
        len = (int)delta; /* at the instruction; completion moved RIP past it */
        have_lin = emu_insn_linear(&in, g, &s, start + (uint64_t)len, &lin);
    } else if (is_write) {
        /* RIP already past a memory write: among the byte ranges that end exactly at RIP and
         * decode to one memory-writing instruction, keep the one whose operand addresses the
         * faulting GPA with the access's size and, for a plain MOV, the value written. x86 is
         * dense ("00 00" is a valid store), so every check counts. */
        int best = 0, best_score = -1, best_ea = 0;
        uint64_t best_lin = 0;
        for (int l = 1; l <= w.back; l++) {
            uint64_t x = 0, v;
            struct emu_insn t;
            if (emu_decode(win_at(&w, l), l, mode, &t) != l || !emu_insn_writes_mem(&t))
                continue;
            int size = emu_insn_mem_size(&t), score = 0;
            if (size && size != (int)mlen && !(size > 8 && mlen == 8))
                continue;
            score += size ? 2 : 1;
            if (emu_insn_store_value(&t, g, &v)) {
                if (v != data)
                    continue;
                score += 2;
            } else {
                score += 1;
            }
            int ea = emu_insn_linear(&t, g, &s, r0.rip, &x) && (x & (EMU_PAGE - 1)) == (gpa & (EMU_PAGE - 1));
            if (ea > best_ea || (ea == best_ea && score > best_score)) {
                best = l, best_score = score, best_ea = ea, best_lin = x;
                in = t;
            }
        }
        if (best) {
            len = best;
            before = best;
            start = r0.rip - (uint64_t)len;
            lin = best_lin;
            have_lin = best_ea;
        }
    }
    if (!len && emu_decode(win_at(&w, 0), w.fwd, mode, &in) > 0) {
        len = in.len; /* e.g. a string instruction with iterations left */
        have_lin = emu_insn_linear(&in, g, &s, start + (uint64_t)len, &lin);
    }
    struct kvm_regs back = r0;
    back.rip = start;
    if (ioctl(vp->vcpu_fd, KVM_SET_REGS, &back) < 0)
        return -EIO;
    struct hv_x64_memory_intercept_message *m = (void *)msg->payload;
    memset(m, 0, sizeof(*m));
    fill_header(&m->header, vp, &r0, &s, start, len, is_write ? HV_INTERCEPT_ACCESS_WRITE : HV_INTERCEPT_ACCESS_READ);
    m->cache_type = 0; /* uncached, as for device memory */
    m->instruction_byte_count = (uint8_t)win_count(&w, before);
    memcpy(m->instruction_bytes, win_at(&w, before), m->instruction_byte_count);
    if (have_lin) {
        uint64_t x;
        m->guest_virtual_address = lin;
        m->memory_access_info = 1; /* gva_valid */
        if (walk(vp->pt, &s, lin, is_write, &x) == EMU_GVA_SUCCESS && (x >> 12) == (gpa >> 12))
            m->memory_access_info |= 2; /* gva_gpa_valid */
    }
    m->guest_physical_address = gpa;
    uint64_t hva, avail;
    /* A write to a read-only region is a GPA intercept; anything else has no mapping. */
    set_type(msg, emu_gpa_lookup(vp->pt, gpa, &hva, &avail, NULL) ? HVMSG_GPA_INTERCEPT : HVMSG_UNMAPPED_GPA,
             sizeof(*m));
    return 0;
}

static int header_only(struct emu_vp *vp, struct hv_message *msg, uint32_t type, int halt)
{
    struct kvm_regs r;
    struct kvm_sregs s;
    if (ioctl(vp->vcpu_fd, KVM_GET_REGS, &r) < 0 || ioctl(vp->vcpu_fd, KVM_GET_SREGS, &s) < 0)
        return -EIO;
    uint64_t rip = r.rip;
    int len = 0;
    if (halt) {
        /* KVM has moved past HLT; report the HLT itself, as an intercept would. */
        int mode = cpu_mode(&s, r.rflags);
        uint8_t op = 0;
        if (fetch(vp->pt, &s, mode, rip - 1, &op, 1) == 1 && op == 0xF4) {
            rip -= 1;
            len = 1;
        }
    }
    struct hv_x64_halt_message *m = (void *)msg->payload;
    memset(m, 0, sizeof(*m));
    fill_header(&m->header, vp, &r, &s, rip, len, HV_INTERCEPT_ACCESS_READ);
    set_type(msg, type, sizeof(*m));
    return 0;
}

/* HLT with interrupts off: nothing but NMI/INIT can wake the VP. */
static int halted_for_good(struct emu_vp *vp, struct hv_message *msg)
{
    struct kvm_mp_state mp;
    struct kvm_regs r;
    if (ioctl(vp->vcpu_fd, KVM_GET_MP_STATE, &mp) < 0 || mp.mp_state != KVM_MP_STATE_HALTED)
        return 0;
    if (ioctl(vp->vcpu_fd, KVM_GET_REGS, &r) < 0 || (r.rflags & RFLAGS_IF))
        return 0;
    return header_only(vp, msg, HVMSG_X64_HALT, 1) == 0;
}

static void eoi_resample(struct emu_partition *pt, uint8_t vector)
{
    /* Level-triggered routes whose vector was just EOIed: tell their resamplers. */
    uint64_t one = 1;
    pthread_mutex_lock(&pt->state);
    for (size_t i = 0; i < pt->nirqfds; i++) {
        if (pt->irqfds[i].resamplefd < 0)
            continue;
        for (uint32_t k = 0; k < pt->nroutes; k++)
            if (pt->routes[k].gsi == pt->irqfds[i].gsi && (pt->routes[k].data & 0xFF) == vector &&
                (pt->routes[k].data & (1u << 15))) {
                ssize_t w = write(pt->irqfds[i].resamplefd, &one, sizeof(one));
                (void)w;
            }
    }
    pthread_mutex_unlock(&pt->state);
}

/* ------------------------------------------------------------------------------------------ */
/* instructions the host's KVM emulator cannot execute                                         */
/*
 * On hosts where KVM runs guest CPL0 code through its instruction emulator (kvm-pvm), a few
 * instructions a real CPU (and so mshv) simply executes make KVM give up with
 * KVM_INTERNAL_ERROR_EMULATION: FWAIT, LDMXCSR/STMXCSR and INT3. These are completed here, with
 * the architectural checks and exceptions, and the VP goes back into the guest. Anything else
 * (or any of these with an operand outside RAM, unmapped, or single-stepping) is still -EIO.
 * MSHV_LIBVIRT_EMU_DEBUG=1 logs each unhandled failure with its instruction bytes to stderr.
 */

#define CR0_MP (1ull << 1)
#define CR0_EM (1ull << 2)
#define CR0_TS (1ull << 3)
#define CR0_NE (1ull << 5)
#define CR4_OSFXSR (1ull << 9)
#define RFLAGS_TF (1ull << 8)

static uint32_t guest_mxcsr_mask(void)
{
    static uint32_t mask;
    if (!mask) {
        uint8_t area[512] __attribute__((aligned(16)));
        memset(area, 0, sizeof(area));
        __asm__ volatile("fxsave %0" : "=m"(area));
        uint32_t m;
        memcpy(&m, area + 28, sizeof(m));
        mask = m ? m : 0xFFBF; /* 0 in the image: the architectural default */
    }
    return mask;
}

/* MXCSR through the XSAVE image: KVM_GET_FPU/KVM_SET_FPU leave kvm_fpu.mxcsr alone. */
static int xsave_legacy(struct emu_vp *vp, uint32_t *mxcsr, int write, const struct kvm_fpu *f)
{
    uint8_t *x = calloc(1, xsave_size > 4096 ? xsave_size : 4096);
    if (!x)
        return 0;
    int ok = ioctl(vp->vcpu_fd, xsave_size > 4096 ? KVM_GET_XSAVE2 : KVM_GET_XSAVE, x) == 0;
    if (ok && !write)
        memcpy(mxcsr, x + 24, 4);
    if (ok && write) {
        if (f) { /* the whole legacy area, as KVM_SET_FPU would write it */
            memcpy(x, &f->fcw, 2);
            memcpy(x + 2, &f->fsw, 2);
            x[4] = f->ftwx;
            memcpy(x + 6, &f->last_opcode, 2);
            memcpy(x + 8, &f->last_ip, 8);
            memcpy(x + 16, &f->last_dp, 8);
            memcpy(x + 32, f->fpr, 128);
            memcpy(x + 160, f->xmm, 256);
            x[512] |= 1; /* XSTATE_BV.X87 */
        }
        memcpy(x + 24, mxcsr, 4);
        x[512] |= 2; /* XSTATE_BV.SSE: MXCSR and the XMM registers in the image are live */
        ok = ioctl(vp->vcpu_fd, KVM_SET_XSAVE, x) == 0;
    }
    free(x);
    return ok;
}

static int mxcsr_access(struct emu_vp *vp, uint32_t *v, int write)
{
    return xsave_legacy(vp, v, write, NULL);
}

/* Copies n bytes at linear `lin` from (write=0) or to (write=1) guest RAM; 1 on success, 0 if any
 * byte is not in plain (for a write: writable) RAM or its translation fails. Translation of every
 * byte is done before anything is written. */
static int lin_copy(struct emu_vp *vp, const struct kvm_sregs *s, uint64_t lin, void *buf, int n, int write)
{
    uint64_t hva[2];
    int len[2], parts = 0;
    for (int done = 0; done < n; parts++) {
        uint64_t gpa, avail;
        int writable = 0;
        int chunk = (int)(EMU_PAGE - ((lin + (uint64_t)done) & (EMU_PAGE - 1)));
        if (chunk > n - done)
            chunk = n - done;
        if (parts == 2 || walk(vp->pt, s, lin + (uint64_t)done, write, &gpa) != EMU_GVA_SUCCESS ||
            !emu_gpa_lookup(vp->pt, gpa, &hva[parts], &avail, &writable) || avail < (uint64_t)chunk ||
            (write && !writable))
            return 0;
        len[parts] = chunk;
        done += chunk;
    }
    uint8_t *p = buf;
    for (int i = 0; i < parts; i++) {
        if (write ? emu_copy_to_user(hva[i], p, (size_t)len[i]) : emu_copy_from_user(p, hva[i], (size_t)len[i]))
            return 0;
        p += len[i];
    }
    return 1;
}

/* Queues a hardware exception for delivery at the next entry (RIP as it is now). */
static int inject_exception(struct emu_vp *vp, int vector, int has_error, uint32_t error)
{
    struct kvm_vcpu_events ev;
    if (ioctl(vp->vcpu_fd, KVM_GET_VCPU_EVENTS, &ev) < 0)
        return 0;
    if (ev.exception.injected || ev.exception.pending || ev.interrupt.injected)
        return 0; /* something already on its way in: leave the failure as it is */
    ev.exception.injected = 1;
    ev.exception.nr = (uint8_t)vector;
    ev.exception.has_error_code = (uint8_t)has_error;
    ev.exception.error_code = error;
    ev.flags &= KVM_VCPUEVENT_VALID_SHADOW | KVM_VCPUEVENT_VALID_SMM | KVM_VCPUEVENT_VALID_NMI_PENDING |
                KVM_VCPUEVENT_VALID_SIPI_VECTOR;
    ev.flags |= KVM_VCPUEVENT_VALID_SHADOW;
    ev.interrupt.shadow = 0;
    return ioctl(vp->vcpu_fd, KVM_SET_VCPU_EVENTS, &ev) == 0;
}

static void fixup_debug(struct emu_vp *vp, const char *what, uint64_t rip, const uint8_t *b, int n)
{
    static int on = -1;
    if (on < 0)
        on = emu_env_flag("MSHV_LIBVIRT_EMU_DEBUG", 0);
    if (!on)
        return;
    fprintf(stderr, "mshv-emu: vp %u: emulation failure at %#llx (%s):", (unsigned)vp->index,
            (unsigned long long)rip, what);
    for (int i = 0; i < n; i++)
        fprintf(stderr, " %02x", b[i]);
    fprintf(stderr, "\n");
}

/* 1: the instruction at RIP was completed (or an exception queued): run on. 0: not handled. */
static int emulation_fixup(struct emu_vp *vp)
{
    struct kvm_regs r;
    struct kvm_sregs s;
    uint8_t b[15];
    if (ioctl(vp->vcpu_fd, KVM_GET_REGS, &r) < 0 || ioctl(vp->vcpu_fd, KVM_GET_SREGS, &s) < 0)
        return 0;
    int mode = cpu_mode(&s, r.rflags);
    int n = fetch(vp->pt, &s, mode, r.rip, b, (int)sizeof(b));
    int cpl = (s.cr0 & CR0_PE) && !(r.rflags & RFLAGS_VM) ? (s.cs.selector & 3) : 0;
    struct emu_insn in;
    if (n <= 0 || cpl != 0 || (r.rflags & RFLAGS_TF) || emu_decode(b, n, mode, &in) < 0) {
        fixup_debug(vp, n <= 0 ? "no code" : cpl ? "not cpl0" : "not decoded", r.rip, b, n);
        return 0;
    }
    int mandatory = 0, lock = 0; /* 66/F2/F3 select other instructions in the 0F map */
    for (int i = 0; i < in.len && (b[i] == 0x66 || b[i] == 0xF2 || b[i] == 0xF3 || b[i] == 0xF0 ||
                                   b[i] == 0x67 || b[i] == 0x26 || b[i] == 0x2E || b[i] == 0x36 ||
                                   b[i] == 0x3E || b[i] == 0x64 || b[i] == 0x65); i++) {
        mandatory |= b[i] == 0x66 || b[i] == 0xF2 || b[i] == 0xF3;
        lock |= b[i] == 0xF0;
    }
    uint64_t next = r.rip + (uint64_t)in.len;
    if (mode != 64)
        next &= mode == 32 ? 0xFFFFFFFFull : 0xFFFF;

    if (in.map == 1 && in.opcode == 0xCC && in.len == 1) {
        /* INT3: a trap, so #BP is delivered with RIP after the instruction */
        r.rip = next;
        if (ioctl(vp->vcpu_fd, KVM_SET_REGS, &r) < 0)
            return 0;
        if (!inject_exception(vp, 3, 0, 0)) {
            r.rip -= 1;
            ioctl(vp->vcpu_fd, KVM_SET_REGS, &r);
            return 0;
        }
        return 1;
    }
    if (in.map == 1 && in.opcode == 0x9B && !lock) {
        /* FWAIT: #NM with CR0.MP and CR0.TS; #MF for a pending unmasked x87 exception (CR0.NE) */
        if ((s.cr0 & (CR0_MP | CR0_TS)) == (CR0_MP | CR0_TS))
            return inject_exception(vp, 7, 0, 0);
        struct kvm_fpu f;
        if (ioctl(vp->vcpu_fd, KVM_GET_FPU, &f) < 0)
            return 0;
        if ((f.fsw & 0x80) && (s.cr0 & CR0_NE))
            return inject_exception(vp, 16, 0, 0);
        r.rip = next;
        return ioctl(vp->vcpu_fd, KVM_SET_REGS, &r) == 0;
    }
    if (in.map == 2 && in.opcode == 0xAE && in.memop == 1 && !mandatory) {
        int reg = (in.modrm >> 3) & 7;
        if (reg != 2 && reg != 3) {
            fixup_debug(vp, "0f ae form", r.rip, b, in.len);
            return 0;
        }
        if (lock || (s.cr0 & CR0_EM) || !(s.cr4 & CR4_OSFXSR))
            return inject_exception(vp, 6, 0, 0);
        if (s.cr0 & CR0_TS)
            return inject_exception(vp, 7, 0, 0);
        uint64_t g[16], lin;
        uint32_t v;
        gprs(&r, g);
        if (!emu_insn_linear(&in, g, &s, next, &lin))
            return 0;
        if (reg == 2) { /* LDMXCSR m32 */
            if (!lin_copy(vp, &s, lin, &v, 4, 0)) {
                fixup_debug(vp, "ldmxcsr operand", r.rip, b, in.len);
                return 0;
            }
            if (v & ~guest_mxcsr_mask())
                return inject_exception(vp, 13, 1, 0);
            if (!mxcsr_access(vp, &v, 1))
                return 0;
        } else { /* STMXCSR m32 */
            if (!mxcsr_access(vp, &v, 0))
                return 0;
            if (!lin_copy(vp, &s, lin, &v, 4, 1)) {
                fixup_debug(vp, "stmxcsr operand", r.rip, b, in.len);
                return 0;
            }
        }
        r.rip = next;
        return ioctl(vp->vcpu_fd, KVM_SET_REGS, &r) == 0;
    }
    fixup_debug(vp, "unhandled", r.rip, b, n);
    return 0;
}

/* 1: keep running, 0: message ready, <0: -errno */
static int handle_exit(struct emu_vp *vp, struct hv_message *msg)
{
    struct kvm_run *run = vp->run;
    switch (run->exit_reason) {
    case KVM_EXIT_IO:
        return io_exit(vp, msg);
    case KVM_EXIT_MMIO:
        return mmio_exit(vp, msg);
    case KVM_EXIT_HLT: /* only without an in-kernel LAPIC */
        return header_only(vp, msg, HVMSG_X64_HALT, 1);
    case KVM_EXIT_SHUTDOWN: /* triple fault */
        return header_only(vp, msg, HVMSG_UNRECOVERABLE_EXCEPTION, 0);
    case KVM_EXIT_IOAPIC_EOI: {
        struct hv_x64_apic_eoi_message *m = (void *)msg->payload;
        memset(m, 0, sizeof(*m));
        m->vp_index = vp->index;
        m->interrupt_vector = run->eoi.vector;
        eoi_resample(vp->pt, run->eoi.vector);
        set_type(msg, HVMSG_X64_APIC_EOI, sizeof(*m));
        return 0;
    }
    case KVM_EXIT_X86_RDMSR:
    case KVM_EXIT_X86_WRMSR: {
        /* An MSR KVM does not implement: HV_PARTITION_PROPERTY_UNIMPLEMENTED_MSR_ACTION. */
        int fault = vp->pt->prop_msr_action == 0;
        run->msr.error = (uint8_t)fault; /* 1: KVM injects #GP */
        if (run->exit_reason == KVM_EXIT_X86_RDMSR)
            run->msr.data = 0;
        return 1;
    }
    case KVM_EXIT_IRQ_WINDOW_OPEN:
        return 1;
    case KVM_EXIT_INTERNAL_ERROR:
        if (run->internal.suberror == KVM_INTERNAL_ERROR_EMULATION && emulation_fixup(vp))
            return 1; /* an instruction the host's emulator lacks, completed here */
        return -EIO;
    default:
        return -EIO; /* failed entry, ...: the VP state is kept */
    }
}

/* Signals. RUN_VP leaves the caller's signal mask alone (changing it twice per exit was two system
 * calls of every exit): a signal the caller lets through interrupts KVM_RUN and its handler runs when
 * KVM_RUN returns, as it would when the kernel's RUN_VP returns EINTR. The monitor's kick is told
 * apart by its own handler (tls_kicked), so it never becomes an EINTR. What this gives up (docs/ABI.md
 * §9.6): a caller's signal whose handler runs while the emulator is between two KVM_RUNs of one
 * RUN_VP (an exit completed inside, or in the same return as a monitor kick) does not end that
 * RUN_VP; the VMM kicks again until its vCPU answers (vmm/vcpu.py). */
static __thread int tls_kick_unblocked;

long emu_kvm_run(struct emu_vp *vp, struct hv_message *msg)
{
    int ks = kick_signal();
    if (ks > 0 && !tls_kick_unblocked) {
        /* once per thread: the kick must reach KVM_RUN even if the thread was born blocking it */
        sigset_t k;
        sigemptyset(&k);
        sigaddset(&k, ks);
        pthread_sigmask(SIG_UNBLOCK, &k, NULL);
        tls_kick_unblocked = 1;
    }
    tls_kicked = 0; /* a kick that landed after the last RUN_VP is stale */
    pthread_mutex_lock(&vp->regs_lock);
    int settled = 0;
    if (vp->pend.active && pend_resume(vp))
        vp->pend.active = 0; /* this KVM_RUN completes the I/O as the VMM did */
    else
        settled = emu_kvm_settle(vp);
    if (settled == 0)
        mon_enter(vp); /* from here register calls from other threads are INVALID_VP_STATE */
    pthread_mutex_unlock(&vp->regs_lock);
    if (settled < 0)
        return -EIO;
    long rc;
    for (;;) {
        vp->run->immediate_exit = 0;
        int r = ioctl(vp->vcpu_fd, KVM_RUN, 0);
        if (r < 0) {
            int e = errno;
            if (e == EINTR) {
                int ours = tls_kicked;
                tls_kicked = 0;
                if (!ours) {
                    rc = -EINTR; /* the caller's signal: its handler has run */
                    break;
                }
                if (halted_for_good(vp, msg)) {
                    rc = 0;
                    break;
                }
                continue;
            }
            if (e == EAGAIN)
                continue; /* an AP left wait-for-SIPI: keep going */
            rc = -EIO;
            break;
        }
        vp->started = 1; /* it ran guest code: no longer waiting for SIPI */
        rc = handle_exit(vp, msg);
        if (rc != 1)
            break;
    }
    pthread_mutex_lock(&vp->regs_lock);
    mon_leave(vp); /* the next exit's registers (vp->pend) are published with this */
    pthread_mutex_unlock(&vp->regs_lock);
    return rc;
}
