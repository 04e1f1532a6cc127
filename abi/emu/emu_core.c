/* mshv-libvirt emulated /dev/mshv: handles, dispatch, lifetime, mmap.
 *
 * Reproduces the upstream mshv_root driver as recorded in docs/ABI.md:
 * 6.15-6.18 validation order and errno, with MSHV_CREATE_PARTITION as the kernel generation
 * that MSHV_LIBVIRT_EMU_KERNEL names at open (enum emu_gen). Where /dev/kvm exists a partition
 * is a KVM VM and guest code really runs (emu_kvm.c); otherwise everything still validates
 * and the calls that need a guest fail with ENODEV.
 *
 * Handles are eventfds (real descriptors, so numbers never collide). For each we keep a
 * private dup ("shadow"): kcmp(KCMP_FILE) against it tells a live handle from a table entry
 * whose number the process closed behind our back and reused.
 *
 * Lifetime mirrors the kernel: a VP fd holds a partition reference; closing the partition fd
 * drops its irqfds/ioeventfds at once; the partition (KVM VM, vCPUs, memslots) goes when the
 * last reference does. Calls in flight hold a reference too, so closing a VP fd while another
 * thread sits in RUN_VP is safe.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kcmp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "emu.h"
#include "emu_int.h"

struct handle {
    enum emu_kind kind;         /* 0: free slot */
    void *obj;                  /* struct emu_partition * or struct emu_vp * */
    int shadow;
    int gen;                    /* /dev/mshv handles: enum emu_gen */
};

static pthread_mutex_t tab_lock = PTHREAD_MUTEX_INITIALIZER;
static struct handle *tab;
static int tab_len;
static unsigned long tab_epoch; /* bumped (under tab_lock) whenever an entry is set or cleared */

/* The kcmp that proves a number is still our file is a system call, and a VMM makes two VP-fd calls
 * per exit (RUN_VP, the register hypercall). So a thread remembers the VP numbers it has verified,
 * valid until the table changes. The price (docs/ABI.md §9.6): a VP number closed with plain
 * close(2), reused for another file, and then used on the same thread before any emulated handle is
 * created or closed is still taken for the VP. Device and partition handles are checked every time. */
#define TL_VPS 2
static __thread struct {
    int fd;
    unsigned long epoch;
} tl_vp[TL_VPS] = {{-1, 0}, {-1, 0}};
static __thread int tl_next;

void emu_partition_get(struct emu_partition *pt)
{
    __atomic_add_fetch(&pt->refs, 1, __ATOMIC_ACQ_REL);
}

void emu_partition_put(struct emu_partition *pt)
{
    if (__atomic_sub_fetch(&pt->refs, 1, __ATOMIC_ACQ_REL) == 0)
        emu_partition_destroy(pt);
}

static struct emu_partition *handle_partition(const struct handle *h)
{
    if (h->kind == EMU_KIND_PARTITION)
        return h->obj;
    if (h->kind == EMU_KIND_VP)
        return ((struct emu_vp *)h->obj)->pt;
    return NULL;
}

/* Is fd still the file we handed out? Callers hold tab_lock. */
static int fresh(int fd, const struct handle *h)
{
    long r = syscall(SYS_kcmp, (long)emu_self(), (long)emu_self(), (long)KCMP_FILE, (long)fd, (long)h->shadow);
    if (r >= 0)
        return r == 0;
    return errno != EBADF; /* kcmp filtered or absent: trust the table */
}

/* What the kernel's release() does when the last descriptor of a file goes away. */
static void release(const struct handle *h)
{
    struct emu_partition *pt = handle_partition(h);
    close(h->shadow);
    if (h->kind == EMU_KIND_PARTITION) {
        pthread_mutex_lock(&pt->lock);
        emu_partition_release_eventfds(pt);
        pthread_mutex_unlock(&pt->lock);
    }
    if (pt)
        emu_partition_put(pt);
}

/* Finds a live handle and takes a partition reference for the caller. Stale entries are
 * released as the kernel would have released them on close(). */
static int lookup(int fd, struct handle *out)
{
    struct handle stale;
    pthread_mutex_lock(&tab_lock);
    if (fd < 0 || fd >= tab_len || !tab[fd].kind) {
        pthread_mutex_unlock(&tab_lock);
        return 0;
    }
    int known = 0;
    for (int i = 0; i < TL_VPS; i++)
        known |= tl_vp[i].fd == fd && tl_vp[i].epoch == tab_epoch;
    if (known || fresh(fd, &tab[fd])) {
        if (!known && tab[fd].kind == EMU_KIND_VP) {
            tl_vp[tl_next].fd = fd;
            tl_vp[tl_next].epoch = tab_epoch;
            tl_next = (tl_next + 1) % TL_VPS;
        }
        *out = tab[fd];
        struct emu_partition *pt = handle_partition(out);
        if (pt)
            emu_partition_get(pt);
        pthread_mutex_unlock(&tab_lock);
        return 1;
    }
    stale = tab[fd];
    tab[fd].kind = 0;
    tab_epoch++;
    pthread_mutex_unlock(&tab_lock);
    release(&stale);
    return 0;
}

int emu_fd_is_handle(int fd)
{
    pthread_mutex_lock(&tab_lock);
    int r = fd >= 0 && fd < tab_len && tab[fd].kind && fresh(fd, &tab[fd]);
    pthread_mutex_unlock(&tab_lock);
    return r;
}

/* Returns the new descriptor, or -errno. On success the handle owns one partition reference
 * (taken by the caller for partitions, by the VP handle for VPs). */
int emu_handle_new(enum emu_kind kind, void *obj)
{
    int fd = eventfd(0, EFD_CLOEXEC);
    if (fd < 0)
        return -errno;
    int shadow = fcntl(fd, F_DUPFD_CLOEXEC, 256);
    if (shadow < 0)
        shadow = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (shadow < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    pthread_mutex_lock(&tab_lock);
    if (fd >= tab_len) {
        int len = tab_len ? tab_len : 64;
        while (len <= fd)
            len *= 2;
        struct handle *t = realloc(tab, sizeof(*t) * (size_t)len);
        if (!t) {
            pthread_mutex_unlock(&tab_lock);
            close(shadow);
            close(fd);
            return -ENOMEM;
        }
        memset(t + tab_len, 0, sizeof(*t) * (size_t)(len - tab_len));
        tab = t;
        tab_len = len;
    }
    struct handle stale = tab[fd];
    tab[fd] = (struct handle){kind, obj, shadow, 0};
    tab_epoch++;
    pthread_mutex_unlock(&tab_lock);
    if (stale.kind) /* the number was closed behind our back and has just come back */
        release(&stale);
    return fd;
}

/* "6.15" .. "6.18", "6.19" or "7.0", optionally with a patch level ("7.0.2"); unset or "": the
 * newest. Anything else is -1 (emu_open refuses it rather than guess). */
int emu_gen_parse(const char *spec)
{
    if (!spec || !*spec)
        return EMU_GEN_NEWEST;
    unsigned long part[3] = {0, 0, 0};
    int n = 0;
    const char *p = spec;
    for (;;) {
        char *end;
        if (*p < '0' || *p > '9' || n == 3)
            return -1;
        part[n++] = strtoul(p, &end, 10);
        if (*end == '\0')
            break;
        if (*end != '.')
            return -1;
        p = end + 1;
    }
    if (n < 2)
        return -1;
    if (part[0] == 6 && part[1] >= 15 && part[1] <= 18)
        return EMU_GEN_6_15;
    if (part[0] == 6 && part[1] == 19)
        return EMU_GEN_6_19;
    if (part[0] == 7 && part[1] == 0)
        return EMU_GEN_7_0;
    return -1;
}

int emu_open(void)
{
    /* Fixed for the handle's lifetime, as a running kernel's driver is. */
    int gen = emu_gen_parse(getenv("MSHV_LIBVIRT_EMU_KERNEL"));
    if (gen < 0) {
        errno = EINVAL;
        return -1;
    }
    int fd = emu_handle_new(EMU_KIND_DEV, NULL);
    if (fd < 0) {
        errno = -fd;
        return -1;
    }
    pthread_mutex_lock(&tab_lock);
    tab[fd].gen = gen;
    pthread_mutex_unlock(&tab_lock);
    return fd;
}

int mshv_emu_kernel(int fd)
{
    struct handle h;
    if (!lookup(fd, &h)) {
        errno = EBADF;
        return -1;
    }
    if (h.kind != EMU_KIND_DEV) {
        struct emu_partition *pt = handle_partition(&h);
        if (pt)
            emu_partition_put(pt);
        errno = ENOTTY;
        return -1;
    }
    return h.gen;
}

int emu_owns(int fd)
{
    struct handle h;
    if (!lookup(fd, &h))
        return 0;
    struct emu_partition *pt = handle_partition(&h);
    if (pt)
        emu_partition_put(pt);
    return 1;
}

int mshv_emu_kvm_available(void)
{
    return emu_kvm_wanted() && emu_kvm_fd() >= 0;
}

/* MSHV_CREATE_PARTITION (§5.1) as kernel generation ``gen``: the flag mask, and whether bit 3
 * switches to the 64-byte v2 struct, are the generation's. */
static long create_partition(uint64_t arg, int gen)
{
    struct mshv_create_partition v1;
    struct mshv_create_partition_v2 v2;
    uint64_t mask = gen >= EMU_GEN_7_0    ? MSHV_PT_FLAGS_MASK_V3
                    : gen >= EMU_GEN_6_19 ? MSHV_PT_FLAGS_MASK_V2
                                          : MSHV_PT_FLAGS_MASK_V1;
    if (emu_copy_from_user(&v1, arg, sizeof(v1)))
        return -EFAULT;
    if ((v1.pt_flags & ~mask) || v1.pt_isolation >= MSHV_PT_ISOLATION_COUNT)
        return -EINVAL;
    memset(&v2, 0, sizeof(v2));
    if (v1.pt_flags & (1ULL << MSHV_PT_BIT_CPU_AND_XSAVE_FEATURES)) { /* 6.19+ (the mask let it through) */
        /* Same ioctl number (size 16), but the kernel copies all 64 bytes and re-checks the
         * v1 fields on the fresh copy before looking at the new ones. */
        if (emu_copy_from_user(&v2, arg, sizeof(v2)))
            return -EFAULT;
        if ((v2.pt_flags & ~mask) || v2.pt_isolation >= MSHV_PT_ISOLATION_COUNT)
            return -EINVAL;
        if (v2.pt_num_cpu_fbanks != MSHV_NUM_CPU_FEATURES_BANKS || emu_nonzero(v2.pt_rsvd, sizeof(v2.pt_rsvd)) ||
            emu_nonzero(v2.pt_rsvd1, sizeof(v2.pt_rsvd1)))
            return -EINVAL;
        v1.pt_flags = v2.pt_flags;
        v1.pt_isolation = v2.pt_isolation;
    }
    /* The hypercall: a KVM that cannot nest has no VMX/SVM to give (inferred status, emu_int.h). */
    if ((v1.pt_flags & (1ULL << MSHV_PT_BIT_NESTED_VIRTUALIZATION)) && emu_kvm_wanted() && emu_kvm_fd() >= 0 &&
        !emu_kvm_nested())
        return -emu_hv_status_errno(HV_STATUS_PROCESSOR_FEATURE_NOT_SUPPORTED);
    struct emu_partition *pt = emu_partition_alloc();
    if (!pt)
        return -ENOMEM;
    pt->pt_flags = v1.pt_flags;
    pt->pt_isolation = v1.pt_isolation;
    memcpy(pt->cpu_fbanks, v2.pt_cpu_fbanks, sizeof(pt->cpu_fbanks));
    pt->disabled_xsave = v2.pt_disabled_xsave;
    int fd = emu_handle_new(EMU_KIND_PARTITION, pt); /* takes over the initial reference */
    if (fd < 0)
        emu_partition_put(pt);
    return fd;
}

/* MSHV_LIBVIRT_EMU_DEBUG=1: what each CREATE_PARTITION asked for and got, on stderr (the VM's
 * log), so a test can see what reached the device independently of what the VMM says. */
static void create_partition_trace(uint64_t arg, int gen, long r)
{
    struct mshv_create_partition a;
    if (!emu_env_flag("MSHV_LIBVIRT_EMU_DEBUG", 0) || emu_copy_from_user(&a, arg, sizeof(a)))
        return;
    if (r >= 0)
        fprintf(stderr, "mshv-emu: Linux %d.%d: MSHV_CREATE_PARTITION pt_flags=%#llx: fd %ld\n", gen / 100,
                gen % 100, (unsigned long long)a.pt_flags, r);
    else
        fprintf(stderr, "mshv-emu: Linux %d.%d: MSHV_CREATE_PARTITION pt_flags=%#llx: errno %ld (%s)\n", gen / 100,
                gen % 100, (unsigned long long)a.pt_flags, -r, strerror((int)-r));
}

long emu_ioctl(int fd, unsigned long request, void *arg)
{
    struct handle h;
    long r;
    /* ioctl(2) passes the command as a 32-bit unsigned int; the drivers switch on all of it. */
    uint32_t cmd = (uint32_t)request;
    uint64_t uarg = (uint64_t)(uintptr_t)arg;
    if (!lookup(fd, &h)) {
        errno = EBADF;
        return -1;
    }
    switch (h.kind) {
    case EMU_KIND_DEV:
        /* MSHV_ROOT_HVCALL on /dev/mshv (6.19's self-targeted call) is ENOTTY, as in 6.15-6.18. */
        if (cmd == MSHV_CREATE_PARTITION) {
            r = create_partition(uarg, h.gen);
            create_partition_trace(uarg, h.gen, r);
        } else {
            r = -ENOTTY;
        }
        break;
    case EMU_KIND_PARTITION:
        r = emu_partition_ioctl(h.obj, cmd, uarg);
        break;
    case EMU_KIND_VP:
        r = emu_vp_ioctl(h.obj, cmd, uarg);
        break;
    default:
        r = -ENOTTY;
    }
    struct emu_partition *pt = handle_partition(&h);
    if (pt)
        emu_partition_put(pt);
    if (r < 0) {
        errno = (int)-r;
        return -1;
    }
    return r;
}

int emu_close(int fd)
{
    pthread_mutex_lock(&tab_lock);
    if (fd < 0 || fd >= tab_len || !tab[fd].kind) {
        pthread_mutex_unlock(&tab_lock);
        return close(fd);
    }
    struct handle h = tab[fd];
    int ours = fresh(fd, &h);
    tab[fd].kind = 0;
    tab_epoch++;
    pthread_mutex_unlock(&tab_lock);
    int r = ours ? close(fd) : 0;
    int e = errno;
    release(&h);
    errno = e;
    return r;
}

void *emu_mmap(void *addr, size_t len, int prot, int flags, int fd, long offset)
{
    struct handle h;
    void *p = MAP_FAILED;
    if (flags & MAP_ANONYMOUS) /* mmap(2) ignores the descriptor then */
        return mmap(addr, len, prot, flags, -1, offset);
    if (!lookup(fd, &h)) {
        errno = EBADF;
        return MAP_FAILED;
    }
    long page = sysconf(_SC_PAGESIZE);
    if (len == 0 || offset < 0 || offset % page) {
        errno = EINVAL; /* mmap(2)'s own checks, before the driver sees the call */
    } else if (h.kind != EMU_KIND_VP) {
        errno = ENODEV; /* /dev/mshv and partition files have no mmap method */
    } else {
        struct emu_vp *vp = h.obj;
        switch (offset / page) {
        case MSHV_VP_MMAP_OFFSET_INTERCEPT_MESSAGE:
            /* A shared memfd page that RUN_VP keeps current; like the kernel's fault handler,
             * touching the mapping beyond that page raises SIGBUS. */
            p = mmap(addr, len, prot, flags, vp->msg_fd, 0);
            break;
        case MSHV_VP_MMAP_OFFSET_REGISTERS: /* not emulated: absent, as for SNP partitions */
        case MSHV_VP_MMAP_OFFSET_GHCB:      /* only SNP partitions have one */
            errno = ENODEV;
            break;
        default:
            errno = EINVAL;
        }
    }
    struct emu_partition *pt = handle_partition(&h);
    if (pt)
        emu_partition_put(pt);
    return p;
}
