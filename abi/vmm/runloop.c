/* mshv-libvirt compiled vCPU run loop (issue 15 part 1); see runloop.h for the interface.
 *
 * Only the upstream ABI is used: MSHV_RUN_VP into the caller's struct mshv_run_vp, the intercept
 * layouts of hv_defs.h, and the SET_VP_REGISTERS hypercall through MSHV_ROOT_HVCALL to complete an
 * instruction (the hypervisor leaves the VP at the intercepted instruction). All of it goes through
 * mshv_dev_ioctl, so the same loop drives the kernel's /dev/mshv and the emulated device.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "hv_defs.h"
#include "mshv_uapi.h"
#include "runloop.h"
#include "serial.h"
#include "shim.h"

#define MAX_PORTS 32
#define PM_TIMER_HZ 3579545u
#define RFLAGS_IF (1u << 9)

struct port_entry {
    uint16_t base, len;
    int kind;
    uint64_t arg;
};

struct port_table {
    int n;
    struct port_entry e[MAX_PORTS];
};

#define PCI_SLOTS 32
#define PCI_CONFIG_SIZE 4096
#define CONFIG_ENABLE 0x80000000u

struct pci_ports {
    uint32_t address; /* atomic: every vCPU and Python's ConfigPorts share it, as they share the register */
    const uint8_t *images[PCI_SLOTS];
};

void *mshv_pci_new(void)
{
    return calloc(1, sizeof(struct pci_ports));
}

void mshv_pci_free(void *pci)
{
    free(pci);
}

int mshv_pci_set_slot(void *pci, int slot, const uint8_t *image)
{
    if (slot < 0 || slot >= PCI_SLOTS)
        return -EINVAL;
    __atomic_store_n(&((struct pci_ports *)pci)->images[slot], image, __ATOMIC_RELEASE);
    return 0;
}

uint32_t mshv_pci_address(void *pci)
{
    return __atomic_load_n(&((struct pci_ports *)pci)->address, __ATOMIC_ACQUIRE);
}

void mshv_pci_set_address(void *pci, uint32_t value)
{
    __atomic_store_n(&((struct pci_ports *)pci)->address, value & 0x80FFFFFCu, __ATOMIC_RELEASE);
}

/* 1: completed (value set for a read); 0: Python's. Mirrors vmm/devices/pci/bridge.py's ConfigPorts. */
static int pci_access(struct pci_ports *p, unsigned offset, unsigned size, int write, uint64_t rax, uint64_t *value)
{
    if (offset == 0 && size == 4) {
        if (write)
            mshv_pci_set_address(p, (uint32_t)rax);
        else
            *value = mshv_pci_address(p);
        return 1;
    }
    if (offset < 4 || write)
        return 0;
    uint32_t a = mshv_pci_address(p);
    unsigned bus = (a >> 16) & 0xFF, slot = (a >> 11) & 0x1F, fn = (a >> 8) & 0x7;
    unsigned reg = (a & 0xFC) + (offset - 4);
    const uint8_t *image = __atomic_load_n(&p->images[slot], __ATOMIC_ACQUIRE);
    if (!(a & CONFIG_ENABLE) || bus != 0 || fn != 0 || image == NULL || reg + size > PCI_CONFIG_SIZE)
        return 1; /* absent: all ones, already in *value */
    uint64_t v = 0;
    for (unsigned i = 0; i < size; i++)
        v |= (uint64_t)image[reg + i] << (8 * i);
    *value = v;
    return 1;
}

#define RTC_CENTURY 0x32
#define RTC_RAM 0x0E

struct rtc_ports {
    uint8_t index; /* atomic: written here and by Python's CmosRtc */
    uint8_t cmos[128];
};

void *mshv_rtc_new(void)
{
    return calloc(1, sizeof(struct rtc_ports));
}

void mshv_rtc_free(void *rtc)
{
    free(rtc);
}

uint8_t *mshv_rtc_cmos(void *rtc)
{
    return ((struct rtc_ports *)rtc)->cmos;
}

uint8_t mshv_rtc_index(void *rtc)
{
    return __atomic_load_n(&((struct rtc_ports *)rtc)->index, __ATOMIC_ACQUIRE);
}

void mshv_rtc_set_index(void *rtc, uint8_t value)
{
    __atomic_store_n(&((struct rtc_ports *)rtc)->index, value, __ATOMIC_RELEASE);
}

/* 1: completed; 0: Python's. Mirrors vmm/devices/rtc.py's read/write for what needs no clock. */
static int rtc_access(struct rtc_ports *r, unsigned offset, unsigned size, int write, uint64_t rax, uint64_t *value)
{
    if (size != 1)
        return 0;
    if (offset == 0) {
        if (write)
            mshv_rtc_set_index(r, (uint8_t)rax);
        else
            *value = mshv_rtc_index(r);
        return 1;
    }
    unsigned reg = mshv_rtc_index(r) & 0x7F;
    if (write || reg < RTC_RAM || reg == RTC_CENTURY)
        return 0;
    *value = __atomic_load_n(&r->cmos[reg], __ATOMIC_RELAXED);
    return 1;
}

struct vcpu_loop {
    const struct port_table *ports;
    int fd;
    uint32_t vp_index;
    struct mshv_run_vp *run;
    int err;
    int interrupt; /* set by another thread (atomic): return KICKED before the next RUN_VP */
    unsigned events;
    struct mshv_loop_stats stats;
    /* The hypercall's input page, reused for every completion: the kernel (and the emulated device,
     * which validates a buffer once) copies in_sz bytes from it. */
    uint8_t *in;
};

void *mshv_port_table_new(void)
{
    return calloc(1, sizeof(struct port_table));
}

int mshv_port_table_add(void *table, uint16_t base, uint16_t len, int kind, uint64_t arg)
{
    struct port_table *t = table;
    if (len == 0 || (uint32_t)base + len > 0x10000 || kind < MSHV_PORT_SINK || kind > MSHV_PORT_STATUS)
        return -EINVAL;
    if (kind >= MSHV_PORT_SERIAL && (arg == 0 || len > 8))
        return -EINVAL;
    if (t->n == MAX_PORTS)
        return -ENOSPC;
    for (int i = 0; i < t->n; i++)
        if (base < t->e[i].base + t->e[i].len && t->e[i].base < base + len)
            return -EEXIST;
    t->e[t->n++] = (struct port_entry){base, len, kind, arg};
    return 0;
}

void mshv_port_table_free(void *table)
{
    free(table);
}

void *mshv_vcpu_loop_new(const void *table, int vp_fd, uint32_t vp_index, void *run_buf)
{
    struct vcpu_loop *l = calloc(1, sizeof(*l));
    if (l == NULL)
        return NULL;
    if (posix_memalign((void **)&l->in, 4096, 4096)) {
        free(l);
        return NULL;
    }
    memset(l->in, 0, 4096);
    l->ports = table;
    l->fd = vp_fd;
    l->vp_index = vp_index;
    l->run = run_buf;
    return l;
}

void mshv_vcpu_loop_free(void *loop)
{
    struct vcpu_loop *l = loop;
    if (l != NULL)
        free(l->in);
    free(l);
}

int mshv_vcpu_loop_errno(const void *loop)
{
    return ((const struct vcpu_loop *)loop)->err;
}

void mshv_vcpu_loop_interrupt(void *loop)
{
    __atomic_store_n(&((struct vcpu_loop *)loop)->interrupt, 1, __ATOMIC_SEQ_CST);
}

void mshv_vcpu_loop_stats(const void *loop, struct mshv_loop_stats *out)
{
    const struct mshv_loop_stats *s = &((const struct vcpu_loop *)loop)->stats;
    out->runs = __atomic_load_n(&s->runs, __ATOMIC_RELAXED);
    out->fast_io = __atomic_load_n(&s->fast_io, __ATOMIC_RELAXED);
    out->halts = __atomic_load_n(&s->halts, __ATOMIC_RELAXED);
    out->to_python = __atomic_load_n(&s->to_python, __ATOMIC_RELAXED);
    out->device_events = __atomic_load_n(&s->device_events, __ATOMIC_RELAXED);
}

unsigned mshv_vcpu_loop_events(void *loop)
{
    struct vcpu_loop *l = loop;
    unsigned events = l->events;
    l->events = 0;
    return events;
}

/* The owner thread alone writes its counters; others read them (relaxed, never torn on x86_64). */
static inline void count(uint64_t *c)
{
    __atomic_store_n(c, *c + 1, __ATOMIC_RELAXED);
}

/* SET_VP_REGISTERS with RIP and, for IN, RAX: one hypercall. */
static int complete(struct vcpu_loop *l, uint64_t rip, int set_rax, uint64_t rax)
{
    struct hv_input_set_vp_registers h = {0};
    h.vp_index = l->vp_index;
    struct hv_register_assoc regs[2];
    memset(regs, 0, sizeof regs);
    int n = 0;
    regs[n].name = HV_X64_REGISTER_RIP;
    regs[n++].value.reg64 = rip;
    if (set_rax) {
        regs[n].name = HV_X64_REGISTER_RAX;
        regs[n++].value.reg64 = rax;
    }
    memcpy(l->in, &h, sizeof h);
    memcpy(l->in + sizeof h, regs, sizeof(regs[0]) * n);
    struct mshv_root_hvcall c = {0};
    c.code = HVCALL_SET_VP_REGISTERS;
    c.reps = (uint16_t)n;
    c.in_sz = (uint16_t)(sizeof h + sizeof(regs[0]) * n);
    c.in_ptr = (uint64_t)(uintptr_t)l->in;
    if (mshv_dev_ioctl(l->fd, MSHV_ROOT_HVCALL, &c) < 0) {
        l->err = errno;
        return -1;
    }
    if (c.status != HV_STATUS_SUCCESS || c.reps != n) {
        l->err = EIO;
        return -1;
    }
    return 0;
}

static uint32_t pm_timer(uint64_t epoch_ns)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    uint64_t now = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
    /* 128-bit product: 64-bit nanoseconds times the rate overflows after 85 minutes. */
    return (uint32_t)((unsigned __int128)(now - epoch_ns) * PM_TIMER_HZ / 1000000000u);
}

/* 1: completed here; 0: Python's (port not in the table, or an access it alone may answer); -1: error. */
static int port_io(struct vcpu_loop *l, const struct hv_x64_io_port_intercept_message *io)
{
    unsigned size = io->access_info & 0x7;
    if ((io->access_info & 0x18) || (size != 1 && size != 2 && size != 4))
        return 0; /* string/rep or odd sizes: Python reports them */
    const struct port_entry *e = NULL;
    for (int i = 0; i < l->ports->n; i++) {
        const struct port_entry *p = &l->ports->e[i];
        if (io->port_number >= p->base && (uint32_t)io->port_number + size <= (uint32_t)p->base + p->len) {
            e = p;
            break;
        }
    }
    if (e == NULL)
        return 0;
    int write = io->header.intercept_access_type == HV_INTERCEPT_ACCESS_WRITE;
    uint64_t next = io->header.rip + (io->header.instruction_length_cr8 & 0xf);
    uint64_t mask = size == 4 ? 0xffffffffu : (1u << (8 * size)) - 1;
    uint64_t value = mask; /* a sink's read floats high, as an unclaimed bus does */
    unsigned offset = io->port_number - e->base;
    if (e->kind == MSHV_PORT_SERIAL) {
        void *uart = (void *)(uintptr_t)e->arg;
        value = 0;
        for (unsigned i = 0; i < size; i++) {
            if (write)
                mshv_serial_write(uart, offset + i, (uint8_t)(io->rax >> (8 * i)), &l->events);
            else
                value |= (uint64_t)mshv_serial_read(uart, offset + i, &l->events) << (8 * i);
        }
    } else if (e->kind == MSHV_PORT_PCI) {
        if (!pci_access((void *)(uintptr_t)e->arg, offset, size, write, io->rax, &value))
            return 0;
        value &= mask;
    } else if (e->kind == MSHV_PORT_RTC) {
        if (!rtc_access((void *)(uintptr_t)e->arg, offset, size, write, io->rax, &value))
            return 0;
    } else if (e->kind == MSHV_PORT_STATUS) {
        if (write || size != 1)
            return 0;
        value = __atomic_load_n((const uint8_t *)(uintptr_t)e->arg, __ATOMIC_ACQUIRE);
    } else if (!write && e->kind == MSHV_PORT_PM_TIMER) {
        value = ((uint64_t)pm_timer(e->arg) >> (8 * offset)) & mask;
    }
    if (write)
        return complete(l, next, 0, 0) ? -1 : 1;
    /* IN AL/AX merges into RAX; IN EAX zero-extends like any 32-bit register write. */
    uint64_t rax = size == 4 ? value : (io->rax & ~mask) | value;
    return complete(l, next, 1, rax) ? -1 : 1;
}

int mshv_vcpu_loop_run(void *loop)
{
    struct vcpu_loop *l = loop;
    const struct hv_message *msg = (const void *)l->run->msg_buf;
    for (;;) {
        if (__atomic_exchange_n(&l->interrupt, 0, __ATOMIC_SEQ_CST))
            return MSHV_LOOP_KICKED;
        if (mshv_dev_ioctl(l->fd, MSHV_RUN_VP, l->run) < 0) {
            /* EAGAIN: an AP woke from wait-for-SIPI without running (KVM backing); run again. */
            if (errno == EAGAIN)
                continue;
            if (errno == EINTR)
                return MSHV_LOOP_KICKED;
            l->err = errno;
            return MSHV_LOOP_ERROR;
        }
        count(&l->stats.runs);
        int r = 0;
        switch (msg->header.message_type) {
        case HVMSG_X64_IO_PORT_INTERCEPT:
            r = port_io(l, (const void *)msg->payload);
            if (r > 0)
                count(&l->stats.fast_io);
            break;
        case HVMSG_X64_HALT:
            /* Woken by an interrupt the hypervisor delivers; with IF clear it never wakes (Python: shutdown). */
            if (((const struct hv_x64_halt_message *)(const void *)msg->payload)->header.rflags & RFLAGS_IF) {
                count(&l->stats.halts);
                r = 1;
            }
            break;
        }
        if (r < 0)
            return MSHV_LOOP_ERROR;
        if (l->events) {
            count(&l->stats.device_events);
            return MSHV_LOOP_DEVICE;
        }
        if (r == 0) {
            count(&l->stats.to_python);
            return MSHV_LOOP_EXIT;
        }
    }
}
