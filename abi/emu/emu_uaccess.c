/* mshv-libvirt emulated /dev/mshv: user-memory and file-descriptor probes.
 *
 * The kernel reaches user memory through copy_{from,to}_user, which fail with EFAULT on a
 * bad pointer. The emulator lives in the caller's address space, so a plain memcpy from a
 * bad pointer would crash the process instead: every access to caller-supplied memory goes
 * through process_vm_readv/writev on ourselves (same contract: partial copy -> EFAULT), with
 * a pipe round trip as fallback where those syscalls are filtered.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kcmp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "emu_int.h"

static int pvm_usable = 1;          /* cleared if process_vm_* is unavailable here */
static pid_t cached_pid;            /* getpid() is a system call every time in glibc */
static pthread_once_t pid_once = PTHREAD_ONCE_INIT;

static void forget_pid(void)
{
    cached_pid = 0; /* a forked child must address itself, not its parent */
}

static void pid_init(void)
{
    pthread_atfork(NULL, NULL, forget_pid);
}

pid_t emu_self(void)
{
    pthread_once(&pid_once, pid_init);
    pid_t p = __atomic_load_n(&cached_pid, __ATOMIC_RELAXED);
    if (!p) {
        p = getpid();
        __atomic_store_n(&cached_pid, p, __ATOMIC_RELAXED);
    }
    return p;
}
static pthread_mutex_t pipe_lock = PTHREAD_MUTEX_INITIALIZER;
static int probe_pipe[2] = {-1, -1};

int emu_access_ok(uint64_t addr, uint64_t size)
{
    /* access_ok(): the range must not wrap and must end below TASK_SIZE_MAX. */
    uint64_t end = addr + size;
    return end >= addr && end <= EMU_TASK_SIZE_MAX;
}

static void pipe_drain(void)
{
    char scratch[4096];
    while (read(probe_pipe[0], scratch, sizeof(scratch)) > 0) {
    }
}

/* write() faults on an unreadable source and read() on an unwritable destination, both with
 * EFAULT and without a signal: a pipe is a portable user-pointer probe. */
static int pipe_copy(void *dst, const void *src, size_t n)
{
    int rc = 0;
    pthread_mutex_lock(&pipe_lock);
    if (probe_pipe[0] < 0 && pipe2(probe_pipe, O_CLOEXEC | O_NONBLOCK) < 0) {
        pthread_mutex_unlock(&pipe_lock);
        return -EFAULT;
    }
    while (n > 0) {
        size_t chunk = n < 4096 ? n : 4096;
        ssize_t w = write(probe_pipe[1], src, chunk);
        if (w <= 0) {
            rc = -EFAULT;
            break;
        }
        ssize_t r = read(probe_pipe[0], dst, (size_t)w);
        if (r != w || (size_t)w != chunk) {
            pipe_drain();
            rc = -EFAULT;
            break;
        }
        dst = (char *)dst + chunk;
        src = (const char *)src + chunk;
        n -= chunk;
    }
    pthread_mutex_unlock(&pipe_lock);
    return rc;
}

int emu_copy_from_user(void *dst, uint64_t src, size_t n)
{
    if (n == 0)
        return 0;
    if (!emu_access_ok(src, n))
        return -EFAULT;
    if (pvm_usable) {
        struct iovec local = {dst, n};
        struct iovec remote = {(void *)(uintptr_t)src, n};
        ssize_t r = process_vm_readv(emu_self(), &local, 1, &remote, 1, 0);
        if (r == (ssize_t)n)
            return 0;
        if (r >= 0 || (errno != ENOSYS && errno != EPERM))
            return -EFAULT;
        pvm_usable = 0;
    }
    return pipe_copy(dst, (const void *)(uintptr_t)src, n);
}

int emu_copy_to_user(uint64_t dst, const void *src, size_t n)
{
    if (n == 0)
        return 0;
    if (!emu_access_ok(dst, n))
        return -EFAULT;
    if (pvm_usable) {
        /* Like copy_to_user, a read-only destination fails (process_vm_writev does not
         * force writes). */
        struct iovec local = {(void *)src, n};
        struct iovec remote = {(void *)(uintptr_t)dst, n};
        ssize_t r = process_vm_writev(emu_self(), &local, 1, &remote, 1, 0);
        if (r == (ssize_t)n)
            return 0;
        if (r >= 0 || (errno != ENOSYS && errno != EPERM))
            return -EFAULT;
        pvm_usable = 0;
    }
    return pipe_copy((void *)(uintptr_t)dst, src, n);
}

/* The kernel's copy_{from,to}_user costs no system call; the probes above cost one each. A VP's
 * hot calls (RUN_VP's message buffer, the register hypercall's argument and buffers) touch the same
 * few pages every time, so a page that a copy for this VP reached once (for reading, or for
 * writing) is copied with memcpy after that. A bad pointer is still EFAULT: only pages that were
 * reached successfully are remembered, each with the access that succeeded. Callers hold the VP's
 * lock. The price (docs/ABI.md §9.6): a page unmapped or write-protected after it served this VP
 * and then passed again faults in the caller instead of answering EFAULT. */
static int ubuf_covers(const struct emu_vp *vp, uint64_t addr, size_t n, int write)
{
    uint64_t need = write ? 2 : 1;
    if (!emu_access_ok(addr, n))
        return 0; /* a range that wraps (or reaches the kernel) is never "covered" by a vacuous loop */
    for (uint64_t pg = addr & ~(EMU_PAGE - 1); pg < addr + n; pg += EMU_PAGE) {
        int found = 0;
        for (int i = 0; i < EMU_UBUFS && !found; i++)
            found = (vp->ubuf[i].page & ~(EMU_PAGE - 1)) == pg && (vp->ubuf[i].page & 3) >= need;
        if (!found)
            return 0;
    }
    return 1;
}

static void ubuf_remember(struct emu_vp *vp, uint64_t addr, size_t n, int write)
{
    uint64_t access = write ? 2 : 1;
    if (n > 2 * EMU_PAGE)
        return; /* only the small per-call buffers */
    for (uint64_t pg = addr & ~(EMU_PAGE - 1); pg < addr + n; pg += EMU_PAGE) {
        int i;
        for (i = 0; i < EMU_UBUFS && (vp->ubuf[i].page & ~(EMU_PAGE - 1)) != pg; i++) {
        }
        if (i == EMU_UBUFS || !vp->ubuf[i].page) {
            i = vp->ubuf_next;
            vp->ubuf_next = (vp->ubuf_next + 1) % EMU_UBUFS;
            vp->ubuf[i].page = pg;
        }
        if ((vp->ubuf[i].page & 3) < access)
            vp->ubuf[i].page = pg | access;
    }
}

int emu_vp_copy_from_user(struct emu_vp *vp, void *dst, uint64_t src, size_t n)
{
    if (vp && n && ubuf_covers(vp, src, n, 0)) {
        memcpy(dst, (const void *)(uintptr_t)src, n);
        return 0;
    }
    int rc = emu_copy_from_user(dst, src, n);
    if (vp && n && rc == 0)
        ubuf_remember(vp, src, n, 0);
    return rc;
}

int emu_vp_copy_to_user(struct emu_vp *vp, uint64_t dst, const void *src, size_t n)
{
    if (vp && n && ubuf_covers(vp, dst, n, 1)) {
        memcpy((void *)(uintptr_t)dst, src, n);
        return 0;
    }
    int rc = emu_copy_to_user(dst, src, n);
    if (vp && n && rc == 0)
        ubuf_remember(vp, dst, n, 1);
    return rc;
}

/* vma_lookup(): is there any mapping at addr? mincore() fails with ENOMEM on a hole. */
int emu_vma_present(uint64_t addr)
{
    unsigned char v;
    if (addr >= EMU_TASK_SIZE_MAX)
        return 0;
    return mincore((void *)(uintptr_t)(addr & ~(EMU_PAGE - 1)), EMU_PAGE, &v) == 0;
}

/* What pin_user_pages_fast(FOLL_WRITE) over the range would find. MADV_POPULATE_WRITE faults
 * every page in writable, exactly as pinning does (so holes, PROT_READ and PROT_NONE all fail
 * and RAM gets populated, as the kernel's pinning populates it). Where that advice is unknown
 * (before 5.14) only holes are detected, with mincore(). */
int emu_range_mapped(uint64_t addr, uint64_t size)
{
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
    static int populate = -1; /* does this kernel know MADV_POPULATE_WRITE? */
    if (populate < 0) {
        void *p = mmap(NULL, EMU_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        populate = p != MAP_FAILED && madvise(p, EMU_PAGE, MADV_POPULATE_WRITE) == 0;
        if (p != MAP_FAILED)
            munmap(p, EMU_PAGE);
    }
    if (populate) /* EINVAL now means an unwritable (or I/O) mapping in the range */
        return madvise((void *)(uintptr_t)addr, size, MADV_POPULATE_WRITE) == 0;
    static const uint64_t chunk = 4096 * EMU_PAGE;
    unsigned char *vec = malloc(4096);
    if (!vec)
        return 0;
    int ok = 1;
    for (uint64_t off = 0; off < size && ok; off += chunk) {
        uint64_t len = size - off < chunk ? size - off : chunk;
        ok = mincore((void *)(uintptr_t)(addr + off), len, vec) == 0;
    }
    free(vec);
    return ok;
}

int emu_nonzero(const void *p, size_t n)
{
    /* mshv_field_nonzero(): every byte of a reserved field must be zero. */
    const uint8_t *b = p;
    for (size_t i = 0; i < n; i++)
        if (b[i])
            return 1;
    return 0;
}

/* eventfd_ctx_fdget(): EBADF for a closed number, EINVAL for anything but an eventfd. */
int emu_eventfd_check(int fd)
{
    if (fd < 0 || fcntl(fd, F_GETFD) < 0)
        return -EBADF;
    /* Our own handles are eventfds underneath, but stand for kernel device files. */
    if (emu_fd_is_handle(fd))
        return -EINVAL;
    char path[48], link[64];
    snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
    ssize_t n = readlink(path, link, sizeof(link) - 1);
    if (n >= 0) {
        link[n] = 0;
        return strcmp(link, "anon_inode:[eventfd]") == 0 ? 0 : -EINVAL;
    }
    /* No /proc: accept any anonymous-inode file (no file type bits), reject the rest. */
    struct stat st;
    if (fstat(fd, &st) < 0)
        return -EBADF;
    return (st.st_mode & S_IFMT) == 0 ? 0 : -EINVAL;
}

static long eventfd_id(int fd)
{
    char path[48], line[128];
    long id = -1;
    snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", fd);
    FILE *f = fopen(path, "re");
    if (!f)
        return -1;
    while (fgets(line, sizeof(line), f))
        if (sscanf(line, "eventfd-id: %ld", &id) == 1)
            break;
    fclose(f);
    return id;
}

/* The kernel compares eventfd contexts; two descriptors share one when they share the open
 * file (dup), which kcmp(KCMP_FILE) answers exactly. */
int emu_same_file(int a, int b)
{
    long r = syscall(SYS_kcmp, (long)emu_self(), (long)emu_self(), (long)KCMP_FILE, (long)a, (long)b);
    if (r >= 0)
        return r == 0;
    long ia = eventfd_id(a), ib = eventfd_id(b);
    if (ia >= 0 && ib >= 0)
        return ia == ib;
    return a == b;
}

uint64_t emu_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

int emu_env_flag(const char *name, int dflt)
{
    const char *v = getenv(name);
    if (!v || !*v)
        return dflt;
    return !(strcmp(v, "0") == 0 || strcmp(v, "no") == 0 || strcmp(v, "off") == 0 || strcmp(v, "false") == 0);
}
