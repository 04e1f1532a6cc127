/* mshv-libvirt emulated /dev/mshv: partition-fd ioctls.
 *
 * Each handler checks its arguments in the order of the upstream driver (mshv_root_main.c,
 * mshv_eventfd.c; docs/ABI.md §4): the first failing check decides
 * the errno. What the hypervisor itself would refuse comes last, as an HV_STATUS mapped
 * through the kernel's hv_result_to_errno table.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "emu_int.h"

static uint64_t next_partition_id = 0x10000;

struct emu_partition *emu_partition_alloc(void)
{
    struct emu_partition *pt = calloc(1, sizeof(*pt));
    if (!pt)
        return NULL;
    pthread_mutex_init(&pt->lock, NULL);
    pthread_mutex_init(&pt->state, NULL);
    pt->refs = 1;
    pt->id = __atomic_add_fetch(&next_partition_id, 1, __ATOMIC_RELAXED);
    pt->vm_fd = -1;
    pt->prop_processors_per_socket = 1;
    pt->prop_xsave_features = emu_kvm_xsave_states();
    pt->created_ns = emu_now_ns();
    return pt;
}

static int dup_high(int fd)
{
    int d = fcntl(fd, F_DUPFD_CLOEXEC, 256);
    return d >= 0 ? d : fcntl(fd, F_DUPFD_CLOEXEC, 0);
}

/* Errno of a KVM call the hypervisor would have made instead: keep the ones a VMM can act on. */
static int kvm_errno(int e)
{
    return (e == EINVAL || e == EEXIST || e == ENOMEM || e == EFAULT || e == EBUSY) ? e : EIO;
}

struct emu_vp *emu_partition_vp(struct emu_partition *pt, uint32_t index)
{
    struct emu_vp *vp = NULL;
    pthread_mutex_lock(&pt->state);
    if (index < MSHV_MAX_VPS)
        vp = pt->vps[index];
    pthread_mutex_unlock(&pt->state);
    return vp;
}

/* ---- MSHV_INITIALIZE_PARTITION (§5.2) ---- */

static long initialize(struct emu_partition *pt)
{
    if (pt->initialized) /* idempotent */
        return 0;
    if (emu_kvm_wanted() && emu_kvm_fd() >= 0) {
        int r = emu_kvm_vm_create(pt);
        if (r < 0)
            return r;
    }
    pt->initialized = 1;
    return 0;
}

/* ---- MSHV_CREATE_VP (§5.3) ---- */

static long create_vp(struct emu_partition *pt, uint64_t arg)
{
    struct mshv_create_vp a;
    int err = 0;
    if (emu_copy_from_user(&a, arg, sizeof(a)))
        return -EFAULT;
    if (a.vp_index >= MSHV_MAX_VPS)
        return -EINVAL;
    if (pt->vps[a.vp_index])
        return -EEXIST;
    /* HvCallCreateVp on a partition that was never initialized: the hypervisor answers
     * HV_STATUS_INVALID_PARTITION_STATE -> EIO (inferred, §5.2). */
    if (!pt->initialized)
        return -EIO;
    struct emu_vp *vp = emu_vp_alloc(pt, a.vp_index, &err);
    if (!vp)
        return err;
    emu_partition_get(pt); /* the VP fd's reference, dropped on its last close */
    int fd = emu_handle_new(EMU_KIND_VP, vp);
    if (fd < 0) {
        __atomic_sub_fetch(&pt->refs, 1, __ATOMIC_ACQ_REL); /* never the last: we are in a call */
        emu_vp_free(vp);
        return fd;
    }
    pthread_mutex_lock(&pt->state);
    pt->vps[a.vp_index] = vp; /* VPs live until the partition dies, as in the kernel */
    pthread_mutex_unlock(&pt->state);
    return fd;
}

/* ---- MSHV_SET_GUEST_MEMORY (§5.4) ---- */

static struct emu_region *region_by_gfn(struct emu_partition *pt, uint64_t gfn)
{
    for (size_t i = 0; i < pt->nregions; i++) {
        struct emu_region *r = &pt->regions[i];
        if (gfn >= r->gfn && gfn < r->gfn + r->npages)
            return r;
    }
    return NULL;
}

static struct emu_region *region_by_uaddr(struct emu_partition *pt, uint64_t uaddr)
{
    for (size_t i = 0; i < pt->nregions; i++) {
        struct emu_region *r = &pt->regions[i];
        if (uaddr >= r->uaddr && uaddr < r->uaddr + (r->npages << 12))
            return r;
    }
    return NULL;
}

static int free_slot(struct emu_partition *pt)
{
    for (int s = 0;; s++) {
        size_t i;
        for (i = 0; i < pt->nregions; i++)
            if (pt->regions[i].slot == s)
                break;
        if (i == pt->nregions)
            return s;
    }
}

static int alloc_tracking(struct emu_region *r)
{
    size_t n = (size_t)((r->npages + 7) / 8);
    r->dirty = calloc(1, n);
    r->accessed = calloc(1, n);
    if (r->dirty && r->accessed)
        return 0;
    free(r->dirty);
    free(r->accessed);
    r->dirty = r->accessed = NULL;
    return -ENOMEM;
}

static long map_memory(struct emu_partition *pt, const struct mshv_user_mem_region *m)
{
    uint64_t npages = m->size >> 12;
    if (!emu_access_ok(m->userspace_addr, m->size))
        return -EINVAL; /* access_ok failure is EINVAL here, not EFAULT */
    if (!emu_vma_present(m->userspace_addr))
        return -EINVAL; /* vma_lookup() found nothing at the start address */
    /* 6.15 overlap test, which this emulator mirrors: only the endpoints of the new range are
     * looked up, in GPA space and in user space, so a region that strictly contains an older
     * one passes (6.19 tests whole GFN intervals and allows user-space overlap). */
    if (region_by_gfn(pt, m->guest_pfn) || region_by_gfn(pt, m->guest_pfn + npages - 1) ||
        region_by_uaddr(pt, m->userspace_addr) || region_by_uaddr(pt, m->userspace_addr + m->size - 1))
        return -EEXIST;
    /* pin_user_pages_fast() over the whole range: any hole faults. */
    if (!emu_range_mapped(m->userspace_addr, m->size))
        return -EFAULT;
    /* HvCallMapGpaPages before HvCallInitializePartition: INVALID_PARTITION_STATE (inferred). */
    if (!pt->initialized)
        return -EIO;
    if (pt->nregions == pt->cap_regions) {
        size_t cap = pt->cap_regions ? pt->cap_regions * 2 : 16;
        struct emu_region *n = realloc(pt->regions, cap * sizeof(*n));
        if (!n)
            return -ENOMEM;
        pthread_mutex_lock(&pt->state);
        pt->regions = n;
        pt->cap_regions = cap;
        pthread_mutex_unlock(&pt->state);
    }
    struct emu_region r = {m->guest_pfn, npages, m->userspace_addr, m->flags, -1, NULL, NULL};
    if (pt->prop_gpa_tracking && alloc_tracking(&r))
        return -ENOMEM;
    if (pt->vm_fd >= 0) {
        r.slot = free_slot(pt);
        int rc = emu_kvm_slot_set(pt, &r);
        if (rc < 0) {
            free(r.dirty);
            free(r.accessed);
            return -kvm_errno(-rc);
        }
    }
    pthread_mutex_lock(&pt->state);
    pt->regions[pt->nregions++] = r;
    pthread_mutex_unlock(&pt->state);
    return 0;
}

static long unmap_memory(struct emu_partition *pt, const struct mshv_user_mem_region *m)
{
    struct emu_region *r = region_by_gfn(pt, m->guest_pfn);
    if (!r)
        return -EINVAL; /* ENOENT only in 2026+ kernels */
    /* No partial unmap: the request must describe the region exactly. */
    if (r->uaddr != m->userspace_addr || r->gfn != m->guest_pfn || r->npages != m->size >> 12)
        return -EINVAL;
    if (pt->vm_fd >= 0)
        emu_kvm_slot_delete(pt, r);
    pthread_mutex_lock(&pt->state);
    free(r->dirty);
    free(r->accessed);
    *r = pt->regions[--pt->nregions];
    pthread_mutex_unlock(&pt->state);
    return 0;
}

static long set_guest_memory(struct emu_partition *pt, uint64_t arg)
{
    struct mshv_user_mem_region m;
    if (emu_copy_from_user(&m, arg, sizeof(m)))
        return -EFAULT;
    if (!m.size || (m.size & (EMU_PAGE - 1)) || (m.userspace_addr & (EMU_PAGE - 1)) ||
        (m.flags & ~MSHV_SET_MEM_FLAGS_MASK) || emu_nonzero(m.rsvd, sizeof(m.rsvd)))
        return -EINVAL;
    if (m.flags & (1u << MSHV_SET_MEM_BIT_UNMAP)) /* other flag bits are ignored */
        return unmap_memory(pt, &m);
    return map_memory(pt, &m);
}

int emu_gpa_lookup(struct emu_partition *pt, uint64_t gpa, uint64_t *hva, uint64_t *avail, int *writable)
{
    int found = 0;
    pthread_mutex_lock(&pt->state);
    struct emu_region *r = region_by_gfn(pt, gpa >> 12);
    if (r) {
        uint64_t off = gpa - (r->gfn << 12);
        *hva = r->uaddr + off;
        *avail = (r->npages << 12) - off;
        if (writable)
            *writable = !!(r->flags & (1u << MSHV_SET_MEM_BIT_WRITABLE));
        found = 1;
    }
    pthread_mutex_unlock(&pt->state);
    return found;
}

int emu_read_gpa(struct emu_partition *pt, uint64_t gpa, void *buf, size_t n)
{
    while (n > 0) {
        uint64_t hva, avail;
        if (!emu_gpa_lookup(pt, gpa, &hva, &avail, NULL))
            return -ENOENT;
        size_t chunk = n < avail ? n : (size_t)avail;
        /* Mapping the region checked (and populated) every page of it, as the kernel's pinning
         * does, so guest RAM is read directly: a system call per read was most of the cost of
         * decoding an exit. (A VMM that unmaps guest RAM still mapped into the partition faults
         * here; under KVM its guest would fault as well.) */
        memcpy(buf, (const void *)(uintptr_t)hva, chunk);
        buf = (char *)buf + chunk;
        gpa += chunk;
        n -= chunk;
    }
    return 0;
}

/* ---- GPA access tracking (HV_PARTITION_PROPERTY_GPA_PAGE_ACCESS_TRACKING) ----
 * KVM can only observe writes (dirty logging), so "accessed" is approximated by
 * "written or explicitly set"; both start clear when tracking is switched on. */

int emu_gpa_tracking_set(struct emu_partition *pt, int on)
{
    int rc = 0;
    pthread_mutex_lock(&pt->state);
    pt->prop_gpa_tracking = on;
    for (size_t i = 0; i < pt->nregions && !rc; i++) {
        struct emu_region *r = &pt->regions[i];
        if (on && !r->dirty)
            rc = alloc_tracking(r);
        if (!on) {
            free(r->dirty);
            free(r->accessed);
            r->dirty = r->accessed = NULL;
        }
        if (!rc && pt->vm_fd >= 0)
            rc = emu_kvm_slot_set(pt, r); /* toggles KVM_MEM_LOG_DIRTY_PAGES */
    }
    pthread_mutex_unlock(&pt->state);
    return rc;
}

static void bit_put(uint8_t *map, uint64_t i, int v)
{
    if (v)
        map[i / 8] |= (uint8_t)(1u << (i % 8));
    else
        map[i / 8] &= (uint8_t)~(1u << (i % 8));
}

static int bit_get(const uint8_t *map, uint64_t i)
{
    return (map[i / 8] >> (i % 8)) & 1;
}

/* HvCallGetGpaPagesAccessStates: state byte per page (bit 0 accessed, bit 1 dirty), then the
 * requested clear/set. Pages outside any region read as 0 (our choice: the hypervisor's
 * answer for unmapped GPAs is not documented). */
int emu_gpa_access_states(struct emu_partition *pt, uint64_t base, uint64_t count, int clear_a, int set_a,
                          int clear_d, int set_d, uint8_t *states)
{
    int rc = 0;
    pthread_mutex_lock(&pt->state);
    for (size_t i = 0; i < pt->nregions; i++) {
        struct emu_region *r = &pt->regions[i];
        if (!r->dirty || r->gfn >= base + count || r->gfn + r->npages <= base || pt->vm_fd < 0)
            continue;
        size_t n = (size_t)((r->npages + 63) / 64 * 8);
        uint8_t *log = calloc(1, n);
        if (!log || emu_kvm_dirty_log(pt, r, log) < 0) {
            free(log);
            rc = -EIO;
            break;
        }
        for (uint64_t p = 0; p < r->npages; p++)
            if (bit_get(log, p)) {
                bit_put(r->dirty, p, 1);
                bit_put(r->accessed, p, 1);
            }
        free(log);
    }
    for (uint64_t i = 0; i < count && !rc; i++) {
        uint64_t gfn = base + i;
        struct emu_region *r = region_by_gfn(pt, gfn);
        states[i] = 0;
        if (!r || !r->dirty)
            continue;
        uint64_t p = gfn - r->gfn;
        states[i] = (uint8_t)(bit_get(r->accessed, p) | (bit_get(r->dirty, p) << 1));
        if (clear_a)
            bit_put(r->accessed, p, 0);
        if (clear_d)
            bit_put(r->dirty, p, 0);
        if (set_a)
            bit_put(r->accessed, p, 1);
        if (set_d)
            bit_put(r->dirty, p, 1);
    }
    pthread_mutex_unlock(&pt->state);
    return rc;
}

/* ---- MSHV_GET_GPAP_ACCESS_BITMAP (§5.8) ---- */

static long gpap_access_bitmap(struct emu_partition *pt, uint64_t arg)
{
    struct mshv_gpap_access_bitmap a;
    if (emu_copy_from_user(&a, arg, sizeof(a)))
        return -EFAULT;
    if (a.access_type >= MSHV_GPAP_ACCESS_TYPE_COUNT || a.access_op >= MSHV_GPAP_ACCESS_OP_COUNT ||
        emu_nonzero(a.rsvd, sizeof(a.rsvd)) || !a.page_count || !a.bitmap_ptr)
        return -EINVAL;
    /* The kernel's E2BIG (page_count * 1-byte state overflows) and EBADFD (bitmap larger than
     * the state buffer) cannot trigger on x86-64; its vzalloc(page_count) can fail, which we
     * model as ENOMEM beyond 4 Gi pages. */
    if (a.page_count > (1ULL << 32))
        return -ENOMEM;
    /* Without HV_PARTITION_PROPERTY_GPA_PAGE_ACCESS_TRACKING = 1 the hypervisor has no access
     * states to report: we answer HV_STATUS_INVALID_PARTITION_STATE -> EIO (our choice). */
    if (!pt->prop_gpa_tracking)
        return -EIO;
    uint8_t *states = calloc(1, (size_t)a.page_count);
    if (!states)
        return -ENOMEM;
    int clear = a.access_op == MSHV_GPAP_ACCESS_OP_CLEAR;
    int rc;
    /* Quirk kept: only CLEAR is tested, so NOOP behaves like SET. */
    if (a.access_type == MSHV_GPAP_ACCESS_TYPE_ACCESSED) /* clearing accessed clears dirty */
        rc = emu_gpa_access_states(pt, a.gpap_base, a.page_count, clear, !clear, clear, 0, states);
    else /* setting dirty sets accessed */
        rc = emu_gpa_access_states(pt, a.gpap_base, a.page_count, 0, !clear, clear, !clear, states);
    if (rc == 0) {
        uint8_t mask = a.access_type == MSHV_GPAP_ACCESS_TYPE_ACCESSED ? 1 : 2;
        size_t nbytes = (size_t)((a.page_count + 7) / 8);
        /* Reuse the state buffer for the bitmap, as the kernel does; tail bits are zero. */
        for (uint64_t i = 0; i < a.page_count; i++) {
            int v = states[i] & mask;
            if (i % 8 == 0)
                states[i / 8] = 0; /* byte i/8 <= i: its state was already consumed */
            if (v)
                states[i / 8] |= (uint8_t)(1u << (i % 8));
        }
        if (emu_copy_to_user(a.bitmap_ptr, states, nbytes))
            rc = -EFAULT;
    }
    free(states);
    return rc;
}

/* ---- MSHV_IRQFD (§5.5) ---- */

static void irqfd_drop(struct emu_partition *pt, size_t i)
{
    struct emu_irqfd *q = &pt->irqfds[i];
    if (pt->vm_fd >= 0)
        emu_kvm_irqfd(pt, q->efd, q->gsi, 1);
    close(q->efd);
    if (q->resamplefd >= 0)
        close(q->resamplefd);
    pthread_mutex_lock(&pt->state);
    pt->irqfds[i] = pt->irqfds[--pt->nirqfds];
    pthread_mutex_unlock(&pt->state);
}

static const struct mshv_user_irq_entry *route_for(struct emu_partition *pt, uint32_t gsi)
{
    for (uint32_t i = 0; i < pt->nroutes; i++)
        if (pt->routes[i].gsi == gsi)
            return &pt->routes[i];
    return NULL;
}

static long irqfd(struct emu_partition *pt, uint64_t arg)
{
    struct mshv_user_irqfd a;
    int rc;
    if (emu_copy_from_user(&a, arg, sizeof(a)))
        return -EFAULT;
    if (a.flags & ~MSHV_IRQFD_FLAGS_MASK)
        return -EINVAL;
    if (a.flags & (1u << MSHV_IRQFD_BIT_DEASSIGN)) {
        if ((rc = emu_eventfd_check(a.fd)))
            return rc;
        /* Every irqfd with this eventfd and gsi; nothing matching is not an error. */
        for (size_t i = pt->nirqfds; i-- > 0;)
            if (pt->irqfds[i].gsi == a.gsi && emu_same_file(a.fd, pt->irqfds[i].efd))
                irqfd_drop(pt, i);
        return 0;
    }
    if ((rc = emu_eventfd_check(a.fd)))
        return rc; /* EBADF: no such descriptor; EINVAL: not an eventfd */
    int resample = !!(a.flags & (1u << MSHV_IRQFD_BIT_RESAMPLE));
    if (resample && (rc = emu_eventfd_check(a.resamplefd)))
        return rc; /* resamplefd is only looked at with RESAMPLE */
    for (size_t i = 0; i < pt->nirqfds; i++)
        if (emu_same_file(a.fd, pt->irqfds[i].efd))
            return -EBUSY; /* one eventfd drives one irqfd per partition */
    if (resample) {
        /* x86: a resampler only makes sense on a level-triggered route (MSI data bit 15). */
        const struct mshv_user_irq_entry *e = route_for(pt, a.gsi);
        if (!e || !(e->data & (1u << 15)))
            return -EINVAL;
    }
    if (pt->nirqfds == pt->cap_irqfds) {
        size_t cap = pt->cap_irqfds ? pt->cap_irqfds * 2 : 16;
        struct emu_irqfd *n = realloc(pt->irqfds, cap * sizeof(*n));
        if (!n)
            return -ENOMEM;
        pthread_mutex_lock(&pt->state);
        pt->irqfds = n;
        pt->cap_irqfds = cap;
        pthread_mutex_unlock(&pt->state);
    }
    struct emu_irqfd q = {dup_high(a.fd), -1, a.gsi};
    if (q.efd < 0)
        return -errno;
    if (resample && (q.resamplefd = dup_high(a.resamplefd)) < 0) {
        rc = -errno;
        close(q.efd);
        return rc;
    }
    /* KVM only supports resamplers with a full in-kernel irqchip; ours is split, so the
     * resamplefd is signalled from the EOI exit instead (emu_kvm.c). */
    if (pt->vm_fd >= 0 && (rc = emu_kvm_irqfd(pt, q.efd, q.gsi, 0)) < 0) {
        close(q.efd);
        if (q.resamplefd >= 0)
            close(q.resamplefd);
        return -kvm_errno(-rc);
    }
    pthread_mutex_lock(&pt->state);
    pt->irqfds[pt->nirqfds++] = q;
    pthread_mutex_unlock(&pt->state);
    return 0;
}

/* ---- MSHV_IOEVENTFD (§5.6) ---- */

static void ioeventfd_drop(struct emu_partition *pt, size_t i)
{
    struct emu_ioeventfd *e = &pt->ioeventfds[i];
    if (pt->vm_fd >= 0)
        emu_kvm_ioeventfd(pt, e, 1);
    close(e->efd);
    pt->ioeventfds[i] = pt->ioeventfds[--pt->nioeventfds];
}

static long ioeventfd(struct emu_partition *pt, uint64_t arg)
{
    struct mshv_user_ioeventfd a;
    int rc;
    if (emu_copy_from_user(&a, arg, sizeof(a)))
        return -EFAULT;
    if ((a.flags & ~MSHV_IOEVENTFD_FLAGS_MASK) || emu_nonzero(a.rsvd, sizeof(a.rsvd)))
        return -EINVAL;
    if (a.flags & (1u << MSHV_IOEVENTFD_BIT_PIO))
        return -EOPNOTSUPP; /* port-I/O doorbells are not implemented upstream */
    int wildcard = !(a.flags & (1u << MSHV_IOEVENTFD_BIT_DATAMATCH));
    if (a.flags & (1u << MSHV_IOEVENTFD_BIT_DEASSIGN)) {
        if ((rc = emu_eventfd_check(a.fd)))
            return rc;
        for (size_t i = 0; i < pt->nioeventfds; i++) {
            struct emu_ioeventfd *e = &pt->ioeventfds[i];
            if (e->addr != a.addr || e->len != a.len || e->wildcard != wildcard || !emu_same_file(a.fd, e->efd))
                continue;
            if (!e->wildcard && e->datamatch != a.datamatch)
                continue;
            ioeventfd_drop(pt, i);
            return 0;
        }
        return -ENOENT;
    }
    if (a.len != 0 && a.len != 1 && a.len != 2 && a.len != 4 && a.len != 8)
        return -EINVAL; /* natural sizes, or 0 for any size */
    if (a.addr + a.len < a.addr)
        return -EINVAL; /* range wraps */
    if ((rc = emu_eventfd_check(a.fd)))
        return rc;
    struct emu_ioeventfd e = {-1, a.addr, wildcard ? 0 : a.datamatch, a.len, wildcard};
    for (size_t i = 0; i < pt->nioeventfds; i++) {
        struct emu_ioeventfd *o = &pt->ioeventfds[i];
        if (o->addr == e.addr && o->len == e.len && (o->wildcard || e.wildcard || o->datamatch == e.datamatch))
            return -EEXIST;
    }
    if (pt->nioeventfds == pt->cap_ioeventfds) {
        size_t cap = pt->cap_ioeventfds ? pt->cap_ioeventfds * 2 : 16;
        struct emu_ioeventfd *n = realloc(pt->ioeventfds, cap * sizeof(*n));
        if (!n)
            return -ENOMEM;
        pt->ioeventfds = n;
        pt->cap_ioeventfds = cap;
    }
    if ((e.efd = dup_high(a.fd)) < 0)
        return -errno;
    if (pt->vm_fd >= 0 && (rc = emu_kvm_ioeventfd(pt, &e, 0)) < 0) {
        close(e.efd);
        return -kvm_errno(-rc);
    }
    pt->ioeventfds[pt->nioeventfds++] = e;
    return 0;
}

void emu_partition_release_eventfds(struct emu_partition *pt)
{
    while (pt->nirqfds)
        irqfd_drop(pt, pt->nirqfds - 1);
    while (pt->nioeventfds)
        ioeventfd_drop(pt, pt->nioeventfds - 1);
}

/* ---- MSHV_SET_MSI_ROUTING (§5.7) ---- */

static long set_msi_routing(struct emu_partition *pt, uint64_t arg)
{
    struct mshv_user_irq_table t;
    struct mshv_user_irq_entry *in = NULL, *out = NULL;
    uint32_t nout = 0;
    long rc = 0;
    if (emu_copy_from_user(&t, arg, sizeof(t)))
        return -EFAULT;
    if (t.nr > MSHV_MAX_GUEST_IRQS || t.rsvd)
        return -EINVAL;
    if (t.nr) {
        in = malloc(sizeof(*in) * t.nr);
        out = malloc(sizeof(*out) * t.nr);
        if (!in || !out) {
            rc = -ENOMEM;
            goto done;
        }
        if (emu_copy_from_user(in, arg + sizeof(t), sizeof(*in) * t.nr)) {
            rc = -EFAULT;
            goto done;
        }
    }
    int *slot_of = NULL;
    if (t.nr && !(slot_of = malloc(sizeof(int) * MSHV_MAX_GUEST_IRQS))) {
        rc = -ENOMEM;
        goto done;
    }
    if (slot_of)
        for (int g = 0; g < MSHV_MAX_GUEST_IRQS; g++)
            slot_of[g] = -1;
    for (uint32_t i = 0; i < t.nr; i++) {
        const struct mshv_user_irq_entry *e = &in[i];
        if (e->gsi >= MSHV_MAX_GUEST_IRQS || e->address_hi) {
            rc = -EINVAL;
            break;
        }
        if (slot_of[e->gsi] >= 0) {
            /* 6.15 quirk: the duplicate test looks at the stored gsi number, which is 0 for
             * gsi 0, so repeating gsi 0 is accepted and the last entry wins. */
            if (e->gsi != 0) {
                rc = -EINVAL;
                break;
            }
            out[slot_of[e->gsi]] = *e;
            continue;
        }
        slot_of[e->gsi] = (int)nout;
        out[nout++] = *e;
    }
    free(slot_of);
    if (rc)
        goto done;
    pthread_mutex_lock(&pt->state);
    free(pt->routes);
    pt->routes = out; /* nr == 0 clears the table */
    pt->nroutes = nout;
    out = NULL;
    pthread_mutex_unlock(&pt->state);
    if (pt->vm_fd >= 0 && (rc = emu_kvm_routing(pt)) < 0)
        rc = -kvm_errno((int)-rc);
done:
    free(in);
    free(out);
    return rc;
}

/* ---- dispatch ---- */

long emu_partition_ioctl(struct emu_partition *pt, uint32_t cmd, uint64_t arg)
{
    long r;
    pthread_mutex_lock(&pt->lock);
    switch (cmd) {
    case MSHV_INITIALIZE_PARTITION:
        r = initialize(pt); /* the argument is ignored */
        break;
    case MSHV_CREATE_VP:
        r = create_vp(pt, arg);
        break;
    case MSHV_SET_GUEST_MEMORY:
        r = set_guest_memory(pt, arg);
        break;
    case MSHV_IRQFD:
        r = irqfd(pt, arg);
        break;
    case MSHV_IOEVENTFD:
        r = ioeventfd(pt, arg);
        break;
    case MSHV_SET_MSI_ROUTING:
        r = set_msi_routing(pt, arg);
        break;
    case MSHV_GET_GPAP_ACCESS_BITMAP:
        r = gpap_access_bitmap(pt, arg);
        break;
    case MSHV_ROOT_HVCALL:
        r = emu_root_hvcall(pt, NULL, arg);
        break;
    default:
        r = -ENOTTY;
    }
    pthread_mutex_unlock(&pt->lock);
    return r;
}

void emu_partition_destroy(struct emu_partition *pt)
{
    emu_partition_release_eventfds(pt); /* normally already done by the fd's release */
    for (int i = 0; i < MSHV_MAX_VPS; i++)
        if (pt->vps[i])
            emu_vp_free(pt->vps[i]);
    for (size_t i = 0; i < pt->nregions; i++) {
        free(pt->regions[i].dirty);
        free(pt->regions[i].accessed);
    }
    if (pt->vm_fd >= 0)
        close(pt->vm_fd); /* memslots and vCPUs go with the VM */
    free(pt->regions);
    free(pt->irqfds);
    free(pt->ioeventfds);
    free(pt->routes);
    pthread_mutex_destroy(&pt->lock);
    pthread_mutex_destroy(&pt->state);
    free(pt);
}
