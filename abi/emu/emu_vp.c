/* mshv-libvirt emulated /dev/mshv: VP-fd ioctls (§5.10-5.12).
 *
 * Every VP-fd ioctl runs under the VP's own mutex, like the kernel's vp_mutex, so a second
 * call on a VP fd waits while RUN_VP is inside the guest. The partition mutex is never held
 * while a guest runs: VPs of one partition run concurrently on their own threads.
 */
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "emu_int.h"

/* sizeof(struct hv_synthetic_timers_state): 4 timers x {config, count, adjustment,
 * undelivered_msg_expiration_time} + reserved, as the kernel reports it. */
#define EMU_SYNTHETIC_TIMERS_SIZE 200

struct emu_vp *emu_vp_alloc(struct emu_partition *pt, uint32_t index, int *err)
{
    struct emu_vp *vp = calloc(1, sizeof(*vp));
    if (!vp) {
        *err = -ENOMEM;
        return NULL;
    }
    pthread_mutex_init(&vp->lock, NULL);
    pthread_mutex_init(&vp->regs_lock, NULL);
    vp->pt = pt;
    vp->index = index;
    vp->vcpu_fd = -1;
    vp->stats_fd = -1;
    vp->msg_page = MAP_FAILED;
    /* The intercept-message page (mmap pgoff 1) is a shared memfd page so every mapping a VMM
     * makes sees what the next RUN_VP writes. */
    vp->msg_fd = memfd_create("mshv_vp_intercept_msg", MFD_CLOEXEC);
    if (vp->msg_fd < 0 || ftruncate(vp->msg_fd, EMU_PAGE) < 0 ||
        (vp->msg_page = mmap(NULL, EMU_PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, vp->msg_fd, 0)) == MAP_FAILED) {
        *err = -errno;
        emu_vp_free(vp);
        return NULL;
    }
    if (pt->vm_fd >= 0) {
        int rc = emu_kvm_vcpu_create(vp);
        if (rc < 0) {
            /* KVM refusing a vCPU id is what the hypervisor does with a bad VP index. */
            *err = rc == -EINVAL || rc == -ENOMEM ? rc : -EIO;
            emu_vp_free(vp);
            return NULL;
        }
    }
    return vp;
}

void emu_vp_free(struct emu_vp *vp)
{
    emu_kvm_vcpu_destroy(vp);
    if (vp->msg_page != MAP_FAILED)
        munmap(vp->msg_page, EMU_PAGE);
    if (vp->msg_fd >= 0)
        close(vp->msg_fd);
    for (int i = 0; i < MSHV_VP_STATE_COUNT; i++)
        free(vp->state[i]);
    pthread_mutex_destroy(&vp->lock);
    pthread_mutex_destroy(&vp->regs_lock);
    free(vp);
}

uint32_t emu_vp_state_size(struct emu_vp *vp, int type)
{
    uint64_t v = 0;
    switch (type) {
    case MSHV_VP_STATE_XSAVE:
        /* The kernel asks the hypervisor for HV_PARTITION_PROPERTY_MAX_XSAVE_DATA_SIZE. */
        emu_prop_get(vp->pt, HV_PARTITION_PROPERTY_MAX_XSAVE_DATA_SIZE, &v);
        return (uint32_t)v;
    case MSHV_VP_STATE_SYNTHETIC_TIMERS:
        return EMU_SYNTHETIC_TIMERS_SIZE;
    default: /* LAPIC, SIMP, SIEFP: one hypervisor page */
        return (uint32_t)EMU_PAGE;
    }
}

/* Software copy of a state page, created zeroed on first use. */
static uint8_t *soft_state(struct emu_vp *vp, int type, uint32_t size)
{
    if (!vp->state[type])
        vp->state[type] = calloc(1, size);
    return vp->state[type];
}

static long get_set_state(struct emu_vp *vp, uint64_t arg, int is_set)
{
    struct mshv_get_set_vp_state a;
    if (emu_copy_from_user(&a, arg, sizeof(a)))
        return -EFAULT;
    if (a.type >= MSHV_VP_STATE_COUNT || emu_nonzero(a.rsvd, sizeof(a.rsvd)) || !a.buf_sz ||
        (a.buf_sz & (EMU_PAGE - 1)) || (a.buf_ptr & (EMU_PAGE - 1)))
        return -EINVAL;
    if (!emu_access_ok(a.buf_ptr, a.buf_sz))
        return -EFAULT;
    uint32_t size = emu_vp_state_size(vp, a.type);
    /* The required size goes back into buf_sz for GET and SET alike, before the size check,
     * so a caller whose buffer is too small learns what to allocate. */
    if (emu_copy_to_user(arg + offsetof(struct mshv_get_set_vp_state, buf_sz), &size, sizeof(size)))
        return -EFAULT;
    if (size > a.buf_sz)
        return -EINVAL;
    if (a.type != MSHV_VP_STATE_SYNTHETIC_TIMERS && !emu_range_mapped(a.buf_ptr, a.buf_sz))
        return -EFAULT; /* page-based types pin the whole buffer first */
    uint8_t *buf = calloc(1, size);
    if (!buf)
        return -ENOMEM;
    long rc = 0;
    if (is_set && emu_copy_from_user(buf, a.buf_ptr, size)) {
        rc = -EFAULT;
        goto out;
    }
    int kvm = vp->vcpu_fd >= 0;
    if (kvm) {
        /* LAPIC and XSAVE state go to KVM directly: first let it finish a deferred I/O. */
        pthread_mutex_lock(&vp->regs_lock);
        int settled = emu_kvm_settle(vp);
        pthread_mutex_unlock(&vp->regs_lock);
        if (settled < 0) {
            rc = -EIO;
            goto out;
        }
    }
    if (a.type == MSHV_VP_STATE_LAPIC && kvm) {
        rc = is_set ? emu_kvm_set_lapic(vp, buf) : emu_kvm_get_lapic(vp, buf);
    } else if (a.type == MSHV_VP_STATE_XSAVE && kvm) {
        /* KVM's standard (non-compacted) XSAVE image: an opaque blob to the VMM. */
        rc = is_set ? emu_kvm_set_xsave(vp, buf, size) : emu_kvm_get_xsave(vp, buf, size);
    } else {
        /* SIMP, SIEFP, synthetic timers (no SynIC behind them), or no KVM: kept in software. */
        uint8_t *s = soft_state(vp, a.type, size);
        if (!s)
            rc = -ENOMEM;
        else if (is_set)
            memcpy(s, buf, size);
        else
            memcpy(buf, s, size);
    }
    if (rc == 0 && !is_set && emu_copy_to_user(a.buf_ptr, buf, size))
        rc = -EFAULT;
out:
    free(buf);
    return rc;
}

static long run_vp(struct emu_vp *vp, uint64_t arg)
{
    struct hv_message msg;
    if (vp->vcpu_fd < 0)
        return -ENODEV; /* no /dev/kvm: nothing can run guest code */
    memset(&msg, 0, sizeof(msg));
    long rc = emu_kvm_run(vp, &msg);
    if (rc < 0)
        return rc;
    memcpy(vp->msg_page, &msg, sizeof(msg)); /* what a mapping of pgoff 1 shows */
    /* The VMM's message buffer is checked the first time it is used, then written directly. */
    if (emu_vp_copy_to_user(vp, arg, &msg, sizeof(msg)))
        return -EFAULT;
    return 0;
}

long emu_vp_ioctl(struct emu_vp *vp, uint32_t cmd, uint64_t arg)
{
    long r;
    pthread_mutex_lock(&vp->lock);
    switch (cmd) {
    case MSHV_RUN_VP:
        r = run_vp(vp, arg);
        break;
    case MSHV_GET_VP_STATE:
        r = get_set_state(vp, arg, 0);
        break;
    case MSHV_SET_VP_STATE:
        r = get_set_state(vp, arg, 1);
        break;
    case MSHV_ROOT_HVCALL:
        r = emu_root_hvcall(vp->pt, vp, arg);
        break;
    default:
        r = -ENOTTY;
    }
    pthread_mutex_unlock(&vp->lock);
    return r;
}
