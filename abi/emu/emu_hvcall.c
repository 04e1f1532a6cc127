/* mshv-libvirt emulated /dev/mshv: MSHV_ROOT_HVCALL (§5.9) and the hypercalls behind it.
 *
 * The ioctl's own checks come first, in the kernel's order; then the hypercall runs against
 * the emulated hypervisor. Its HV_STATUS goes back in args.status and becomes the errno
 * through hv_result_to_errno (§7); reps completed, the struct and the output buffer are
 * copied back even when the hypercall failed (6.15-6.18).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "emu_int.h"

/* 6.15 pass-through allow-list: every input starts with a u64 partition id. */
static const uint16_t allowed[] = {
    HVCALL_GET_PARTITION_PROPERTY, HVCALL_SET_PARTITION_PROPERTY, HVCALL_INSTALL_INTERCEPT,
    HVCALL_GET_VP_REGISTERS, HVCALL_SET_VP_REGISTERS, HVCALL_TRANSLATE_VIRTUAL_ADDRESS,
    HVCALL_CLEAR_VIRTUAL_INTERRUPT, HVCALL_REGISTER_INTERCEPT_RESULT, HVCALL_ASSERT_VIRTUAL_INTERRUPT,
    HVCALL_GET_GPA_PAGES_ACCESS_STATES, HVCALL_SIGNAL_EVENT_DIRECT, HVCALL_POST_MESSAGE_DIRECT,
    HVCALL_GET_VP_CPUID_VALUES,
};

/* hv_result_to_errno(); codes not in the kernel's table are EIO. */
int emu_hv_status_errno(uint16_t status)
{
    switch (status) {
    case HV_STATUS_SUCCESS:
        return 0;
    case HV_STATUS_INVALID_HYPERCALL_CODE:
    case HV_STATUS_INVALID_HYPERCALL_INPUT:
    case HV_STATUS_INVALID_PARAMETER:
    case HV_STATUS_INVALID_PARTITION_ID:
    case HV_STATUS_INVALID_VP_INDEX:
    case HV_STATUS_INVALID_PORT_ID:
    case HV_STATUS_INVALID_CONNECTION_ID:
    case HV_STATUS_INVALID_LP_INDEX:
    case HV_STATUS_INVALID_REGISTER_VALUE:
        return EINVAL;
    case HV_STATUS_INSUFFICIENT_MEMORY:
        return ENOMEM;
    default:
        return EIO;
    }
}

/* ---- partition properties ---- */

enum { P_RW, P_EARLY, P_RO };

uint16_t emu_prop_get(struct emu_partition *pt, uint32_t code, uint64_t *v)
{
    switch (code) {
    case HV_PARTITION_PROPERTY_PRIVILEGE_FLAGS:
        *v = pt->prop_privilege_flags;
        break;
    case HV_PARTITION_PROPERTY_SYNTHETIC_PROC_FEATURES:
        *v = pt->prop_synthetic_proc_features;
        break;
    case HV_PARTITION_PROPERTY_TIME_FREEZE:
        *v = pt->prop_time_freeze;
        break;
    case 0x00030005: /* REFERENCE_TIME: 100 ns units since creation */
        *v = (emu_now_ns() - pt->created_ns) / 100;
        break;
    case 0x00050003: /* PROCESSORS_PER_SOCKET */
        *v = pt->prop_processors_per_socket;
        break;
    case HV_PARTITION_PROPERTY_GPA_PAGE_ACCESS_TRACKING:
        *v = pt->prop_gpa_tracking;
        break;
    case 0x0005000c: /* ISOLATION_STATE: not isolated */
        *v = 0;
        break;
    case HV_PARTITION_PROPERTY_UNIMPLEMENTED_MSR_ACTION:
        *v = pt->prop_msr_action;
        break;
    case HV_PARTITION_PROPERTY_PROCESSOR_XSAVE_FEATURES:
        *v = pt->prop_xsave_features;
        break;
    case HV_PARTITION_PROPERTY_PHYSICAL_ADDRESS_WIDTH:
        *v = emu_kvm_phys_bits();
        break;
    case 0x00060007: /* XSAVE_STATES: what the host offers minus what v2 creation disabled */
        *v = emu_kvm_xsave_states() & ~pt->disabled_xsave;
        break;
    case HV_PARTITION_PROPERTY_MAX_XSAVE_DATA_SIZE:
        /* Also the size MSHV_GET/SET_VP_STATE(XSAVE) requires. */
        *v = emu_kvm_xsave_size();
        break;
    case 0x00060009: /* PROCESSOR_CLOCK_FREQUENCY */
        *v = emu_kvm_tsc_hz(pt);
        break;
    case HV_PARTITION_PROPERTY_PROCESSOR_FEATURES0:
        *v = pt->prop_features0;
        break;
    case HV_PARTITION_PROPERTY_PROCESSOR_FEATURES1:
        *v = pt->prop_features1;
        break;
    default:
        return HV_STATUS_UNKNOWN_PROPERTY;
    }
    return HV_STATUS_SUCCESS;
}

static uint16_t prop_set(struct emu_partition *pt, uint32_t code, uint64_t v)
{
    uint64_t *slot = NULL;
    int kind = P_RW;
    switch (code) {
    case HV_PARTITION_PROPERTY_PRIVILEGE_FLAGS:
        slot = &pt->prop_privilege_flags, kind = P_EARLY;
        break;
    case HV_PARTITION_PROPERTY_SYNTHETIC_PROC_FEATURES:
        slot = &pt->prop_synthetic_proc_features, kind = P_EARLY;
        break;
    case HV_PARTITION_PROPERTY_PROCESSOR_XSAVE_FEATURES:
        slot = &pt->prop_xsave_features, kind = P_EARLY;
        break;
    case 0x00050003:
        slot = &pt->prop_processors_per_socket, kind = P_EARLY;
        break;
    case HV_PARTITION_PROPERTY_PROCESSOR_FEATURES0:
        slot = &pt->prop_features0, kind = P_EARLY;
        break;
    case HV_PARTITION_PROPERTY_PROCESSOR_FEATURES1:
        slot = &pt->prop_features1, kind = P_EARLY;
        break;
    case HV_PARTITION_PROPERTY_TIME_FREEZE:
        /* Kept, not enforced: KVM guests keep their clocks running (documented). */
        if (v > 1)
            return HV_STATUS_PROPERTY_VALUE_OUT_OF_RANGE;
        slot = &pt->prop_time_freeze;
        break;
    case HV_PARTITION_PROPERTY_UNIMPLEMENTED_MSR_ACTION:
        /* 0: #GP on unknown MSRs (FAULT), 1: ignore writes, read zero. */
        if (v > 1)
            return HV_STATUS_PROPERTY_VALUE_OUT_OF_RANGE;
        slot = &pt->prop_msr_action;
        break;
    case HV_PARTITION_PROPERTY_GPA_PAGE_ACCESS_TRACKING:
        if (v > 1)
            return HV_STATUS_PROPERTY_VALUE_OUT_OF_RANGE;
        if (v != pt->prop_gpa_tracking && emu_gpa_tracking_set(pt, (int)v) < 0)
            return HV_STATUS_NO_RESOURCES;
        return HV_STATUS_SUCCESS;
    case 0x00030005:
    case 0x0005000c:
    case HV_PARTITION_PROPERTY_PHYSICAL_ADDRESS_WIDTH:
    case 0x00060007:
    case HV_PARTITION_PROPERTY_MAX_XSAVE_DATA_SIZE:
    case 0x00060009:
        return HV_STATUS_ACCESS_DENIED; /* read-only properties (our choice of status) */
    default:
        return HV_STATUS_UNKNOWN_PROPERTY;
    }
    /* "Early" properties shape the partition and are fixed once it is initialized. */
    if (kind == P_EARLY && pt->initialized)
        return HV_STATUS_INVALID_PARTITION_STATE;
    pthread_mutex_lock(&pt->state);
    *slot = v;
    pthread_mutex_unlock(&pt->state);
    return HV_STATUS_SUCCESS;
}

/* ---- hypercall bodies ----
 * Each returns an HV_STATUS, fills *done for rep calls, or sets *err for the cases the
 * emulator cannot serve at all (no KVM behind a call that needs a guest: ENODEV). */

struct call {
    struct emu_partition *pt;
    uint16_t code, reps;
    const uint8_t *in;          /* one zero-filled hypervisor page holding in_sz bytes */
    uint8_t *out;               /* one zero-filled page */
    uint16_t done;
    int err;
};

static uint64_t rd64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static uint32_t rd32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Common header of GET/SET_VP_REGISTERS: partition id, vp_index, input_vtl, rsvd_z8/z16. */
static uint16_t vp_header(struct call *c, struct emu_vp **vpp)
{
    struct hv_input_get_vp_registers h;
    memcpy(&h, c->in, sizeof(h));
    if (h.rsvd_z8 || h.rsvd_z16)
        return HV_STATUS_INVALID_HYPERCALL_INPUT;
    /* input_vtl: target_vtl[3:0], use_target_vtl[4]; only VTL0 exists here. */
    if (h.input_vtl & 0xE0 || ((h.input_vtl & 0x10) && (h.input_vtl & 0x0F)))
        return HV_STATUS_INVALID_PARAMETER;
    struct emu_vp *vp = emu_partition_vp(c->pt, h.vp_index);
    if (!vp)
        return HV_STATUS_INVALID_VP_INDEX; /* the kernel trusts vp_index; the hypervisor does not */
    if (vp->vcpu_fd < 0) {
        c->err = ENODEV;
        return HV_STATUS_SUCCESS;
    }
    /* Reading a VP that is inside KVM_RUN would block until it exits; the hypervisor only
     * touches suspended VPs (inferred status). Checked again under regs_lock (vp_lock). */
    if (emu_kvm_vp_running(vp))
        return HV_STATUS_INVALID_VP_STATE;
    *vpp = vp;
    return HV_STATUS_SUCCESS;
}

/* Register access runs under the VP's regs_lock: RUN_VP takes it to consume what was written and
 * to publish the next exit's registers, so a call from another thread (the partition fd) sees one
 * or the other. 0, or INVALID_VP_STATE if the VP went into RUN_VP meanwhile (lock not held). */
static uint16_t vp_lock(struct emu_vp *vp)
{
    pthread_mutex_lock(&vp->regs_lock);
    if (emu_kvm_vp_running(vp)) {
        pthread_mutex_unlock(&vp->regs_lock);
        return HV_STATUS_INVALID_VP_STATE;
    }
    return HV_STATUS_SUCCESS;
}

static uint16_t get_vp_registers(struct call *c)
{
    struct emu_vp *vp = NULL;
    uint16_t st;
    if (16 + 4u * c->reps > EMU_PAGE || 16u * c->reps > EMU_PAGE)
        return HV_STATUS_INVALID_HYPERCALL_INPUT; /* rep list must fit the hypercall pages */
    if ((st = vp_header(c, &vp)) || c->err || (st = vp_lock(vp)))
        return st;
    struct emu_regctx ctx;
    emu_regctx_init(&ctx, vp);
    for (uint16_t i = 0; i < c->reps; i++) {
        union hv_register_value v;
        memset(&v, 0, sizeof(v));
        if ((st = emu_reg_get(&ctx, rd32(c->in + 16 + 4u * i), &v)))
            break; /* reps completed so far stay reported */
        memcpy(c->out + 16u * i, &v, sizeof(v));
        c->done = i + 1;
    }
    pthread_mutex_unlock(&vp->regs_lock);
    return st;
}

static uint16_t set_vp_registers(struct call *c)
{
    struct emu_vp *vp = NULL;
    uint16_t st = HV_STATUS_SUCCESS, fst;
    if (16 + 32u * c->reps > EMU_PAGE)
        return HV_STATUS_INVALID_HYPERCALL_INPUT;
    if ((st = vp_header(c, &vp)) || c->err || (st = vp_lock(vp)))
        return st;
    struct emu_regctx ctx;
    emu_regctx_init(&ctx, vp);
    for (uint16_t i = 0; i < c->reps; i++) {
        struct hv_register_assoc a;
        memcpy(&a, c->in + 16 + 32u * i, sizeof(a));
        if ((st = emu_reg_set(&ctx, a.name, &a.value)))
            break;
        c->done = i + 1;
    }
    /* Registers before a failing element stay set, as with the hypervisor. */
    fst = emu_regctx_flush(&ctx);
    pthread_mutex_unlock(&vp->regs_lock);
    if (fst && !st) {
        st = fst;
        c->done = 0;
    }
    return st;
}

static uint16_t translate_va(struct call *c)
{
    struct hv_input_translate_virtual_address in;
    struct hv_output_translate_virtual_address out = {0, 0};
    memcpy(&in, c->in, sizeof(in));
    struct emu_vp *vp = emu_partition_vp(c->pt, in.vp_index);
    if (!vp)
        return HV_STATUS_INVALID_VP_INDEX;
    if (vp->vcpu_fd < 0) {
        c->err = ENODEV;
        return HV_STATUS_SUCCESS;
    }
    uint16_t st = vp_lock(vp);
    if (st)
        return st;
    uint64_t gpa = 0, hva, avail;
    int res = emu_kvm_translate(vp, in.gva_page << 12, !!(in.control_flags & EMU_GVA_VALIDATE_WRITE), &gpa);
    pthread_mutex_unlock(&vp->regs_lock);
    if (res < 0)
        return HV_STATUS_INVALID_VP_STATE;
    if (res == EMU_GVA_SUCCESS && !emu_gpa_lookup(c->pt, gpa, &hva, &avail, NULL))
        res = EMU_GVA_GPA_UNMAPPED;
    out.translation_result = (uint64_t)res;
    out.gpa_page = gpa >> 12;
    memcpy(c->out, &out, sizeof(out));
    return HV_STATUS_SUCCESS;
}

static uint16_t assert_interrupt(struct call *c)
{
    struct hv_input_assert_virtual_interrupt in;
    memcpy(&in, c->in, sizeof(in));
    uint32_t type = (uint32_t)in.control;
    int level = (int)((in.control >> 32) & 1), logical = (int)((in.control >> 33) & 1);
    if ((in.control >> 34) || in.rsvd_z0 || in.rsvd_z1)
        return HV_STATUS_INVALID_HYPERCALL_INPUT;
    if (in.target_vtl)
        return HV_STATUS_INVALID_PARAMETER;
    switch (type) {
    case HV_X64_INTERRUPT_TYPE_FIXED:
    case HV_X64_INTERRUPT_TYPE_LOWESTPRIORITY:
    case 2: /* SMI */
    case HV_X64_INTERRUPT_TYPE_NMI:
    case HV_X64_INTERRUPT_TYPE_INIT:
    case HV_X64_INTERRUPT_TYPE_SIPI:
    case HV_X64_INTERRUPT_TYPE_EXTINT:
        break;
    default:
        return HV_STATUS_INVALID_PARAMETER;
    }
    if (in.vector > 0xFF)
        return HV_STATUS_INVALID_PARAMETER;
    if (c->pt->vm_fd < 0) {
        c->err = ENODEV;
        return HV_STATUS_SUCCESS;
    }
    /* The same interrupt as an MSI: destination in address[19:12] (+ extended bits in
     * address_hi for x2APIC ids), destination mode in address[2]; vector, delivery mode
     * (= hypervisor interrupt type), assert and trigger mode in data. */
    uint32_t addr_lo = 0xFEE00000u | (uint32_t)((in.dest_addr & 0xFF) << 12) | (uint32_t)(logical << 2);
    uint32_t addr_hi = (uint32_t)(in.dest_addr & ~0xFFull);
    uint32_t data = (in.vector & 0xFF) | (type << 8) | (1u << 14) | ((uint32_t)level << 15);
    if (emu_kvm_signal_msi(c->pt, addr_lo, addr_hi, data) < 0)
        return HV_STATUS_INVALID_PARAMETER;
    return HV_STATUS_SUCCESS;
}

static uint16_t install_intercept(struct call *c)
{
    struct hv_input_install_intercept in;
    memcpy(&in, c->in, sizeof(in));
    /* Accepted and remembered nowhere: I/O-port and unmapped-GPA intercepts are always
     * delivered (as for EXO partitions); CPUID/MSR/exception intercepts are not emulated. */
    if (in.intercept_type > 0xC || in.intercept_type == 4 || in.access_type == 0 || in.access_type > 7)
        return HV_STATUS_INVALID_PARAMETER;
    return HV_STATUS_SUCCESS;
}

static uint16_t gpa_access_states(struct call *c)
{
    /* input: partition id, flags (clear_accessed, set_accessed, clear_dirty, set_dirty),
     * first GPA page; output: one state byte per rep. */
    uint64_t flags = rd64(c->in + 8), base = rd64(c->in + 16);
    if (c->reps > EMU_PAGE)
        return HV_STATUS_INVALID_HYPERCALL_INPUT;
    if (!c->pt->prop_gpa_tracking)
        return HV_STATUS_INVALID_PARTITION_STATE;
    if (emu_gpa_access_states(c->pt, base, c->reps, flags & 1, !!(flags & 2), !!(flags & 4), !!(flags & 8),
                              c->out) < 0)
        return HV_STATUS_OPERATION_FAILED;
    c->done = c->reps;
    return HV_STATUS_SUCCESS;
}

static uint16_t vp_cpuid_values(struct call *c)
{
    /* header: partition id, vp_index, flags, reserved, padding (24 bytes); elements:
     * {eax, ecx, xfem, xss} (24 bytes); output {eax, ebx, ecx, edx} per rep. */
    if (24 + 24u * c->reps > EMU_PAGE || 16u * c->reps > EMU_PAGE)
        return HV_STATUS_INVALID_HYPERCALL_INPUT;
    struct emu_vp *vp = emu_partition_vp(c->pt, rd32(c->in + 8));
    if (!vp)
        return HV_STATUS_INVALID_VP_INDEX;
    if (vp->vcpu_fd < 0) {
        c->err = ENODEV;
        return HV_STATUS_SUCCESS;
    }
    for (uint16_t i = 0; i < c->reps; i++) {
        uint32_t r[4];
        const uint8_t *e = c->in + 24 + 24u * i;
        emu_kvm_cpuid(vp, rd32(e), rd32(e + 4), r);
        memcpy(c->out + 16u * i, r, sizeof(r));
        c->done = i + 1;
    }
    return HV_STATUS_SUCCESS;
}

static int is_rep_call(uint16_t code)
{
    return code == HVCALL_GET_VP_REGISTERS || code == HVCALL_SET_VP_REGISTERS ||
           code == HVCALL_GET_GPA_PAGES_ACCESS_STATES || code == HVCALL_GET_VP_CPUID_VALUES;
}

static uint16_t run_call(struct call *c)
{
    if (!is_rep_call(c->code) && c->reps)
        return HV_STATUS_INVALID_HYPERCALL_INPUT; /* a simple call issued with a rep count */
    switch (c->code) {
    case HVCALL_GET_PARTITION_PROPERTY: {
        uint64_t v = 0;
        uint16_t st = emu_prop_get(c->pt, rd32(c->in + 8), &v);
        memcpy(c->out, &v, 8);
        return st;
    }
    case HVCALL_SET_PARTITION_PROPERTY:
        return prop_set(c->pt, rd32(c->in + 8), rd64(c->in + 16));
    case HVCALL_INSTALL_INTERCEPT:
        return install_intercept(c);
    case HVCALL_GET_VP_REGISTERS:
        return get_vp_registers(c);
    case HVCALL_SET_VP_REGISTERS:
        return set_vp_registers(c);
    case HVCALL_TRANSLATE_VIRTUAL_ADDRESS:
        return translate_va(c);
    case HVCALL_CLEAR_VIRTUAL_INTERRUPT:
    case HVCALL_REGISTER_INTERCEPT_RESULT:
        return HV_STATUS_SUCCESS; /* nothing is latched that would need clearing */
    case HVCALL_ASSERT_VIRTUAL_INTERRUPT:
        return assert_interrupt(c);
    case HVCALL_GET_GPA_PAGES_ACCESS_STATES:
        return gpa_access_states(c);
    case HVCALL_SIGNAL_EVENT_DIRECT:
    case HVCALL_POST_MESSAGE_DIRECT:
        /* input: partition id, vp_index, ... No SynIC is emulated, so no SINT can be live:
         * the hypervisor's answer for a target without an enabled SynIC (our choice). */
        if (!emu_partition_vp(c->pt, rd32(c->in + 8)))
            return HV_STATUS_INVALID_VP_INDEX;
        return HV_STATUS_INVALID_VP_STATE;
    case HVCALL_GET_VP_CPUID_VALUES:
        return vp_cpuid_values(c);
    default:
        return HV_STATUS_INVALID_HYPERCALL_CODE;
    }
}

long emu_root_hvcall(struct emu_partition *pt, struct emu_vp *caller, uint64_t arg)
{
    struct mshv_root_hvcall a;
    size_t i;
    int from_partition_fd = caller == NULL;
    /* On a VP fd (the VMM's per-exit register calls) the argument and buffers are remembered
     * once they copied (emu_vp_copy_*). */
    if (emu_vp_copy_from_user(caller, &a, arg, sizeof(a)))
        return -EFAULT;
    if (a.status || !a.in_ptr || a.in_sz < sizeof(uint64_t) || emu_nonzero(a.rsvd, sizeof(a.rsvd)) ||
        a.in_sz > MSHV_HV_PAGE_SIZE)
        return -EINVAL;
    /* out_sz != 0 with out_ptr == 0 is documented MBZ but not checked: accepted. */
    if (a.out_ptr && (!a.out_sz || a.out_sz > MSHV_HV_PAGE_SIZE))
        return -EINVAL;
    for (i = 0; i < sizeof(allowed) / sizeof(allowed[0]); i++)
        if (a.code == allowed[i])
            break;
    if (i == sizeof(allowed) / sizeof(allowed[0]))
        return -EINVAL;
    /* SET_PARTITION_PROPERTY is the one asynchronous call: partition fd only. (EPERM for a
     * second async call in flight cannot happen: the emulator completes it synchronously.) */
    if (a.code == HVCALL_SET_PARTITION_PROPERTY && !from_partition_fd)
        return -EINVAL;
    uint8_t *in = calloc(1, 2 * EMU_PAGE);
    if (!in)
        return -ENOMEM;
    long rc = 0;
    if (emu_vp_copy_from_user(caller, in, a.in_ptr, a.in_sz)) {
        rc = -EFAULT;
        goto out;
    }
    /* The kernel writes the partition id over the first u64 of its copy of the input. */
    memcpy(in, &pt->id, sizeof(pt->id));
    struct call c = {pt, a.code, a.reps, in, in + EMU_PAGE, 0, 0};
    uint16_t status = run_call(&c);
    if (c.err) {
        rc = -c.err;
        goto out;
    }
    rc = -emu_hv_status_errno(status);
    a.status = status;
    a.reps = a.reps ? c.done : 0;
    if (emu_vp_copy_to_user(caller, arg, &a, sizeof(a)))
        rc = -EFAULT;
    if (a.out_ptr && emu_vp_copy_to_user(caller, a.out_ptr, c.out, a.out_sz))
        rc = -EFAULT;
out:
    free(in);
    return rc;
}
