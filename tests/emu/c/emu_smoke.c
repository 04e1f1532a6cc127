/* Standalone C harness for the emulated /dev/mshv (abi/emu), without Python or cffi.
 *
 * Built by tests/emu/test_c_harness.py (optionally with ASan/UBSan) against abi/include and
 * every C file of abi/emu. Part 1 checks a few validation rules and kernel generations; part 2
 * (only with /dev/kvm) runs a 64-bit guest through OUT, IN, an MMIO write and read and HLT,
 * completing each intercept the way a VMM does. Exit status 0 means every check passed; 77
 * means "no KVM, part 2 skipped".
 *
 * Expected values: errno and order from docs/ABI.md §4, messages §7, the emulator's choices §9. The
 * names come from abi/include, so the numbers this file relies on are pinned below to the values of
 * docs/ABI.md (§2.3, §3.2, §4.9, §7.2, §8.2) written out literally: a wrong header fails the build.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "emu.h"
#include "hv_defs.h"
#include "mshv_uapi.h"

int mshv_emu_kvm_available(void);

#define PIN(name, value) _Static_assert((name) == (value), #name " is not docs/ABI.md's " #value)
PIN(MSHV_CREATE_PARTITION, 0x4010B800u);
PIN(MSHV_INITIALIZE_PARTITION, 0x0000B800u);
PIN(MSHV_CREATE_VP, 0x4004B801u);
PIN(MSHV_SET_GUEST_MEMORY, 0x4020B802u);
PIN(MSHV_IOEVENTFD, 0x4020B804u);
PIN(MSHV_ROOT_HVCALL, 0xC020B807u);
PIN(MSHV_RUN_VP, 0x8100B800u);
PIN(MSHV_IOEVENTFD_BIT_PIO, 1);
PIN(MSHV_PT_BIT_SMT_ENABLED_GUEST, 5);
PIN(HVCALL_GET_PARTITION_PROPERTY, 0x0044);
PIN(HVCALL_GET_VP_REGISTERS, 0x0050);
PIN(HVCALL_SET_VP_REGISTERS, 0x0051);
PIN(HVMSG_UNMAPPED_GPA, 0x80000000u);
PIN(HVMSG_X64_IO_PORT_INTERCEPT, 0x80010000u);
PIN(HVMSG_X64_HALT, 0x80010007u);
PIN(HV_X64_REGISTER_RAX, 0x00020000);
PIN(HV_X64_REGISTER_RCX, 0x00020001);
PIN(HV_X64_REGISTER_RSP, 0x00020004);
PIN(HV_X64_REGISTER_RIP, 0x00020010);
PIN(HV_X64_REGISTER_RFLAGS, 0x00020011);
PIN(HV_X64_REGISTER_CR0, 0x00040000);
PIN(HV_X64_REGISTER_CR3, 0x00040002);
PIN(HV_X64_REGISTER_CR4, 0x00040003);
PIN(HV_X64_REGISTER_ES, 0x00060000);
PIN(HV_X64_REGISTER_CS, 0x00060001);
PIN(HV_X64_REGISTER_SS, 0x00060002);
PIN(HV_X64_REGISTER_DS, 0x00060003);
PIN(HV_X64_REGISTER_GDTR, 0x00070001);
PIN(HV_X64_REGISTER_EFER, 0x00080001);

static int failures;

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d: check failed: %s (errno %d)\n", __FILE__, __LINE__, #cond, errno); \
            failures++;                                                                            \
        }                                                                                          \
    } while (0)

static long call(int fd, unsigned long req, void *arg)
{
    long r = emu_ioctl(fd, req, arg);
    return r < 0 ? -errno : r;
}

static long hvcall(int fd, uint16_t code, uint16_t reps, const void *in, uint16_t in_sz, void *out,
                   uint16_t out_sz, uint16_t *status)
{
    struct mshv_root_hvcall a;
    memset(&a, 0, sizeof(a));
    a.code = code;
    a.reps = reps;
    a.in_sz = in_sz;
    a.out_sz = out_sz;
    a.in_ptr = (uint64_t)(uintptr_t)in;
    a.out_ptr = (uint64_t)(uintptr_t)out;
    long r = call(fd, MSHV_ROOT_HVCALL, &a);
    *status = a.status;
    return r;
}

struct regs_in {
    struct hv_input_set_vp_registers h;
    struct hv_register_assoc e[24];
};

static void set_regs(int vp, const struct hv_register_assoc *e, int n)
{
    struct regs_in in;
    uint16_t st;
    memset(&in, 0, sizeof(in));
    memcpy(in.e, e, sizeof(*e) * (size_t)n);
    CHECK(hvcall(vp, HVCALL_SET_VP_REGISTERS, (uint16_t)n, &in, (uint16_t)(16 + 32 * n), NULL, 0, &st) == 0);
    CHECK(st == 0);
}

static uint64_t get_reg(int vp, uint32_t name)
{
    struct {
        struct hv_input_get_vp_registers h;
        uint32_t name;
    } in;
    union hv_register_value out;
    uint16_t st;
    memset(&in, 0, sizeof(in));
    in.name = name;
    CHECK(hvcall(vp, HVCALL_GET_VP_REGISTERS, 1, &in, sizeof(in), &out, sizeof(out), &st) == 0);
    return out.reg64;
}

static struct hv_register_assoc r64(uint32_t name, uint64_t v)
{
    struct hv_register_assoc a;
    memset(&a, 0, sizeof(a));
    a.name = name;
    a.value.reg64 = v;
    return a;
}

static struct hv_register_assoc seg(uint32_t name, uint16_t sel, uint16_t attr)
{
    struct hv_register_assoc a;
    memset(&a, 0, sizeof(a));
    a.name = name;
    a.value.segment.limit = 0xFFFFFFFF;
    a.value.segment.selector = sel;
    a.value.segment.attributes = attr;
    return a;
}

static void validation(int dev)
{
    struct mshv_create_partition cp = {1ULL << 6, 0}; /* beyond 7.0's mask */
    CHECK(call(dev, MSHV_CREATE_PARTITION, &cp) == -EINVAL);
    CHECK(call(dev, MSHV_CREATE_PARTITION, NULL) == -EFAULT);
    CHECK(call(dev, MSHV_INITIALIZE_PARTITION, NULL) == -ENOTTY);
    cp.pt_flags = 7;
    int pt = (int)call(dev, MSHV_CREATE_PARTITION, &cp);
    CHECK(pt >= 0);
    struct mshv_create_vp cv = {0};
    CHECK(call(pt, MSHV_CREATE_VP, &cv) == -EIO); /* not initialized */
    CHECK(call(pt, MSHV_INITIALIZE_PARTITION, NULL) == 0);
    cv.vp_index = 256;
    CHECK(call(pt, MSHV_CREATE_VP, &cv) == -EINVAL);
    struct mshv_user_mem_region m = {4096, 0, 4096, 3, {0, 0, 1, 0, 0, 0, 0}};
    CHECK(call(pt, MSHV_SET_GUEST_MEMORY, &m) == -EINVAL);
    struct mshv_user_ioeventfd io;
    memset(&io, 0, sizeof(io));
    io.flags = 1u << MSHV_IOEVENTFD_BIT_PIO;
    CHECK(call(pt, MSHV_IOEVENTFD, &io) == -EOPNOTSUPP);
    struct mshv_root_hvcall hc;
    memset(&hc, 0, sizeof(hc));
    hc.code = HVCALL_GET_PARTITION_PROPERTY;
    hc.in_sz = 16;
    CHECK(call(pt, MSHV_ROOT_HVCALL, &hc) == -EINVAL); /* in_ptr == 0 */
    CHECK(emu_owns(pt) == 1);
    CHECK(emu_close(pt) == 0);
    CHECK(emu_owns(pt) == 0);
}

static int guest(int dev)
{
    struct mshv_create_partition cp = {7, 0};
    int pt = (int)call(dev, MSHV_CREATE_PARTITION, &cp);
    CHECK(pt >= 0 && call(pt, MSHV_INITIALIZE_PARTITION, NULL) == 0);
    uint8_t *mem = mmap(NULL, 2 << 20, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    struct mshv_user_mem_region m = {2 << 20, 0, (uint64_t)(uintptr_t)mem, 3, {0}};
    CHECK(call(pt, MSHV_SET_GUEST_MEMORY, &m) == 0);
    struct mshv_create_vp cv = {0};
    int vp = (int)call(pt, MSHV_CREATE_VP, &cv);
    CHECK(vp >= 0);
    uint64_t *pml4 = (void *)(mem + 0x1000), *pdpt = (void *)(mem + 0x2000), *pd = (void *)(mem + 0x3000);
    pml4[0] = 0x2003;
    pdpt[0] = 0x3003;
    for (uint64_t i = 0; i < 512; i++)
        pd[i] = (i << 21) | 0x83;
    uint64_t gdt[3] = {0, 0x00AF9B000000FFFFULL, 0x00CF93000000FFFFULL};
    memcpy(mem + 0x500, gdt, sizeof(gdt));
    static const uint8_t code[] = {
        0x66, 0xBA, 0xF8, 0x03,                   /* mov dx, 0x3f8 */
        0xB0, 0x41,                               /* mov al, 'A' */
        0xEE,                                     /* out dx, al       @ +6 */
        0xEC,                                     /* in al, dx        @ +7 */
        0x48, 0xBB, 0, 0, 0, 0x10, 0, 0, 0, 0,    /* mov rbx, 0x10000000 */
        0x88, 0x03,                               /* mov [rbx], al    @ +18 */
        0x8A, 0x0B,                               /* mov cl, [rbx]    @ +20 */
        0xFA, 0xF4,                               /* cli; hlt         @ +22 */
    };
    memcpy(mem + 0x10000, code, sizeof(code));
    struct hv_register_assoc regs[] = {
        r64(HV_X64_REGISTER_CR3, 0x1000), r64(HV_X64_REGISTER_CR4, 0x20),
        r64(HV_X64_REGISTER_CR0, 0x80050033), r64(HV_X64_REGISTER_EFER, 0x500),
        seg(HV_X64_REGISTER_CS, 8, 0xA09B), seg(HV_X64_REGISTER_DS, 16, 0xC093),
        seg(HV_X64_REGISTER_SS, 16, 0xC093), seg(HV_X64_REGISTER_ES, 16, 0xC093),
        r64(HV_X64_REGISTER_GDTR, 0), r64(HV_X64_REGISTER_RIP, 0x10000),
        r64(HV_X64_REGISTER_RFLAGS, 2), r64(HV_X64_REGISTER_RSP, 0x8000),
    };
    regs[8].value.table.base = 0x500;
    regs[8].value.table.limit = 23;
    set_regs(vp, regs, (int)(sizeof(regs) / sizeof(regs[0])));

    struct mshv_run_vp run;
    struct hv_message *msg = (struct hv_message *)&run;
    struct hv_x64_intercept_message_header *h = (void *)msg->payload;
    struct hv_x64_io_port_intercept_message *io = (void *)msg->payload;
    struct hv_x64_memory_intercept_message *mm = (void *)msg->payload;

    CHECK(call(vp, MSHV_RUN_VP, &run) == 0); /* OUT: VP left at the instruction */
    CHECK(msg->header.message_type == HVMSG_X64_IO_PORT_INTERCEPT && io->port_number == 0x3F8);
    CHECK(h->rip == 0x10006 && (h->instruction_length_cr8 & 0xF) == 1 && h->intercept_access_type == 1);
    CHECK((io->rax & 0xFF) == 'A' && get_reg(vp, HV_X64_REGISTER_RIP) == 0x10006);
    struct hv_register_assoc next = r64(HV_X64_REGISTER_RIP, 0x10007);
    set_regs(vp, &next, 1);

    CHECK(call(vp, MSHV_RUN_VP, &run) == 0); /* IN: RAX untouched until the VMM completes it */
    CHECK(msg->header.message_type == HVMSG_X64_IO_PORT_INTERCEPT && h->intercept_access_type == 0);
    CHECK(h->rip == 0x10007 && get_reg(vp, HV_X64_REGISTER_RAX) == 'A');
    struct hv_register_assoc in_done[] = {r64(HV_X64_REGISTER_RIP, 0x10008), r64(HV_X64_REGISTER_RAX, 0x5A)};
    set_regs(vp, in_done, 2);

    CHECK(call(vp, MSHV_RUN_VP, &run) == 0); /* MMIO write */
    CHECK(msg->header.message_type == HVMSG_UNMAPPED_GPA && mm->guest_physical_address == 0x10000000);
    CHECK(h->rip == 0x10012 && (h->instruction_length_cr8 & 0xF) == 2 && h->intercept_access_type == 1);
    CHECK(mm->instruction_bytes[0] == 0x88 && mm->instruction_bytes[1] == 0x03);
    next = r64(HV_X64_REGISTER_RIP, 0x10014);
    set_regs(vp, &next, 1);

    CHECK(call(vp, MSHV_RUN_VP, &run) == 0); /* MMIO read */
    CHECK(msg->header.message_type == HVMSG_UNMAPPED_GPA && h->intercept_access_type == 0);
    CHECK(h->rip == 0x10014 && (h->instruction_length_cr8 & 0xF) == 2);
    struct hv_register_assoc rd_done[] = {r64(HV_X64_REGISTER_RIP, 0x10016), r64(HV_X64_REGISTER_RCX, 0x77)};
    set_regs(vp, rd_done, 2);

    CHECK(call(vp, MSHV_RUN_VP, &run) == 0); /* HLT with interrupts off */
    CHECK(msg->header.message_type == HVMSG_X64_HALT && h->rip == 0x10017);
    CHECK(get_reg(vp, HV_X64_REGISTER_RCX) == 0x77);

    CHECK(emu_close(vp) == 0 && emu_close(pt) == 0);
    munmap(mem, 2 << 20);
    return 0;
}

/* MSHV_LIBVIRT_EMU_KERNEL picks the create-partition rules of a kernel generation at open. */
static void generations(void)
{
    struct mshv_create_partition smt = {7 | 1ULL << MSHV_PT_BIT_SMT_ENABLED_GUEST, 0};
    setenv("MSHV_LIBVIRT_EMU_KERNEL", "6.19", 1);
    int old = emu_open();
    CHECK(old >= 0 && mshv_emu_kernel(old) == 619);
    CHECK(call(old, MSHV_CREATE_PARTITION, &smt) == -EINVAL);
    setenv("MSHV_LIBVIRT_EMU_KERNEL", "6.20", 1);
    CHECK(emu_open() == -1 && errno == EINVAL);
    unsetenv("MSHV_LIBVIRT_EMU_KERNEL");
    int newest = emu_open();
    CHECK(newest >= 0 && mshv_emu_kernel(newest) == 700 && mshv_emu_kernel(old) == 619);
    int pt = (int)call(newest, MSHV_CREATE_PARTITION, &smt);
    CHECK(pt >= 0 && mshv_emu_kernel(pt) == -1);
    emu_close(pt);
    emu_close(newest);
    emu_close(old);
}

int main(void)
{
    int dev = emu_open();
    CHECK(dev >= 0);
    validation(dev);
    generations();
    int kvm = mshv_emu_kvm_available();
    if (kvm)
        guest(dev);
    emu_close(dev);
    if (failures)
        return 1;
    return kvm ? 0 : 77;
}
