/* mshv-libvirt VMM sandbox (docs/SECURITY.md): what a VMM may still do once it runs guest code.
 *
 * - PR_SET_NO_NEW_PRIVS and PR_SET_DUMPABLE 0 (no ptrace or /proc/PID/mem by other VMMs of the same user).
 * - Landlock: read-only access beneath the given paths (the interpreter's library and the installed
 *   package), write access nowhere unless a path is given; TCP bind/connect, abstract UNIX sockets and
 *   signals to processes outside the sandbox denied where the running kernel's ABI knows them.
 * - seccomp allow-lists per thread type. The process list is installed with TSYNC on every thread; each
 *   vCPU (and the emulated device's helper) thread stacks its own, narrower list before it runs guest
 *   code (filters are per thread without TSYNC; the kernel applies the strictest verdict of the stack).
 * - A denied call raises SIGSYS (SECCOMP_RET_TRAP): the handler below names the call and the thread on
 *   stderr (the VMM log) and in the exit report, with write(2)/pwrite(2) only, then _exit()s. Python
 *   signal handlers run later on the main thread and could never see it.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "sandbox.h"

/* Generated from the kernel headers by abi/build_mshv.py (index = system call number). */
extern const char *const mshv_syscall_names[];
extern const int mshv_syscall_names_len;

/* ------------------------------------------------------------------------------------------ */
/* names                                                                                        */

const char *mshv_syscall_name(int nr)
{
    if (nr < 0 || nr >= mshv_syscall_names_len || !mshv_syscall_names[nr])
        return NULL;
    return mshv_syscall_names[nr];
}

int mshv_syscall_number(const char *name)
{
    for (int i = 0; i < mshv_syscall_names_len; i++)
        if (mshv_syscall_names[i] && strcmp(mshv_syscall_names[i], name) == 0)
            return i;
    return -1;
}

#define MAX_THREADS 512
static struct {
    pid_t tid;
    int kind;
    char name[16];
} threads[MAX_THREADS];
static int active;                  /* the process filter is installed */
static int report_fd = -1;          /* the exit file: a denied call is reported there too */
static const char *const kind_names[] = {"main", "vCPU", "helper", "device", "net", "blk"};

static pid_t self_tid(void)
{
    return (pid_t)syscall(SYS_gettid);
}

static unsigned int next_slot;

/* Names are only for reports: when every slot was used (threads of earlier VM builds never unregister),
 * the oldest entries are reused round-robin instead of failing the thread. */
int mshv_sandbox_register_thread(const char *name)
{
    pid_t tid = self_tid();
    int slot = -1;
    for (int i = 0; i < MAX_THREADS && slot < 0; i++)
        if (__atomic_load_n(&threads[i].tid, __ATOMIC_ACQUIRE) == tid)
            slot = i;
    if (slot < 0)
        slot = (int)(__atomic_fetch_add(&next_slot, 1, __ATOMIC_ACQ_REL) % MAX_THREADS);
    __atomic_store_n(&threads[slot].tid, -1, __ATOMIC_RELEASE); /* no reader matches it while it changes */
    threads[slot].kind = -1;
    strncpy(threads[slot].name, name, sizeof(threads[slot].name) - 1);
    threads[slot].name[sizeof(threads[slot].name) - 1] = 0;
    __atomic_store_n(&threads[slot].tid, tid, __ATOMIC_RELEASE);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* SIGSYS: async-signal-safe reporting                                                          */

struct buf {
    char b[512];
    size_t n;
};

static void put(struct buf *o, const char *s)
{
    while (*s && o->n < sizeof(o->b) - 1)
        o->b[o->n++] = *s++;
}

static void put_num(struct buf *o, long v)
{
    char t[24];
    int i = 0;
    unsigned long u = v < 0 ? (unsigned long)-v : (unsigned long)v;
    do
        t[i++] = (char)('0' + u % 10);
    while ((u /= 10) && i < 23);
    if (v < 0)
        put(o, "-");
    while (i)
        o->b[o->n < sizeof(o->b) - 1 ? o->n++ : o->n] = t[--i];
}

static void describe(struct buf *o, int nr, pid_t tid)
{
    const char *thread = NULL;
    int kind = -1;
    for (int i = 0; i < MAX_THREADS; i++)
        if (__atomic_load_n(&threads[i].tid, __ATOMIC_ACQUIRE) == tid) {
            thread = threads[i].name;
            kind = threads[i].kind;
            break;
        }
    put(o, "seccomp: thread ");
    put(o, thread ? thread : "?");
    put(o, " (tid ");
    put_num(o, tid);
    if (kind >= 0 && kind <= MSHV_SANDBOX_BLK) {
        put(o, ", ");
        put(o, kind_names[kind]);
        put(o, " filter");
    }
    put(o, ") made the forbidden system call ");
    const char *name = mshv_syscall_name(nr);
    put(o, name ? name : "unknown");
    put(o, " (");
    put_num(o, nr);
    put(o, ")");
}

static void sigsys_handler(int sig, siginfo_t *info, void *ctx)
{
    (void)sig;
    (void)ctx;
    int nr = info->si_syscall;
    pid_t tid = self_tid();
    struct buf line = {.n = 0};
    put(&line, "mshv-vmm[");
    put_num(&line, (long)syscall(SYS_getpid));
    put(&line, "]: ");
    describe(&line, nr, tid);
    put(&line, "; the VMM exits\n");
    ssize_t ignored = write(2, line.b, line.n);
    if (report_fd >= 0) {
        struct buf rep = {.n = 0};
        put(&rep, "{\"reason\": \"error\", \"detail\": \"");
        describe(&rep, nr, tid);
        put(&rep, "\"}");
        ignored = pwrite(report_fd, rep.b, rep.n, 0);
        if (ignored >= 0)
            ignored = ftruncate(report_fd, (off_t)rep.n);
    }
    (void)ignored;
    _exit(128 + SIGSYS);
}

int mshv_sandbox_install_sigsys(int fd)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = sigsys_handler;
    sa.sa_flags = SA_SIGINFO;
    sigfillset(&sa.sa_mask); /* nothing else runs in this thread while it reports */
    if (sigaction(SIGSYS, &sa, NULL) < 0)
        return -errno;
    report_fd = fd;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* no_new_privs                                                                                 */

int mshv_sandbox_no_new_privs(void)
{
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        return -errno;
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0)
        return -errno;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Landlock (our own declarations: Debian 12's headers stop at ABI 2)                          */

#ifndef SYS_landlock_create_ruleset
#define SYS_landlock_create_ruleset 444
#define SYS_landlock_add_rule 445
#define SYS_landlock_restrict_self 446
#endif
#define LL_CREATE_RULESET_VERSION (1U << 0)
#define LL_RULE_PATH_BENEATH 1
#define LL_FS_EXECUTE (1ULL << 0)
#define LL_FS_WRITE_FILE (1ULL << 1)
#define LL_FS_READ_FILE (1ULL << 2)
#define LL_FS_READ_DIR (1ULL << 3)
#define LL_FS_REMOVE_DIR (1ULL << 4)
#define LL_FS_REMOVE_FILE (1ULL << 5)
#define LL_FS_MAKE_CHAR (1ULL << 6)
#define LL_FS_MAKE_DIR (1ULL << 7)
#define LL_FS_MAKE_REG (1ULL << 8)
#define LL_FS_MAKE_SOCK (1ULL << 9)
#define LL_FS_MAKE_FIFO (1ULL << 10)
#define LL_FS_MAKE_BLOCK (1ULL << 11)
#define LL_FS_MAKE_SYM (1ULL << 12)
#define LL_FS_REFER (1ULL << 13)    /* ABI 2 */
#define LL_FS_TRUNCATE (1ULL << 14) /* ABI 3 */
#define LL_FS_IOCTL_DEV (1ULL << 15) /* ABI 5 */
#define LL_NET_BIND_TCP (1ULL << 0)  /* ABI 4 */
#define LL_NET_CONNECT_TCP (1ULL << 1)
#define LL_SCOPE_ABSTRACT_UNIX (1ULL << 0) /* ABI 6 */
#define LL_SCOPE_SIGNAL (1ULL << 1)

struct ll_ruleset_attr {
    uint64_t handled_access_fs;
    uint64_t handled_access_net;
    uint64_t scoped;
};

struct ll_path_beneath_attr {
    uint64_t allowed_access;
    int32_t parent_fd;
} __attribute__((packed));

int mshv_landlock_abi(void)
{
    long v = syscall(SYS_landlock_create_ruleset, NULL, 0, LL_CREATE_RULESET_VERSION);
    return v < 0 ? -errno : (int)v;
}

static int add_path(int ruleset, const char *path, uint64_t dir_access, uint64_t file_access)
{
    int fd = open(path, O_PATH | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT ? 0 : -errno; /* nothing to allow there */
    struct stat st;
    int rc = 0;
    if (fstat(fd, &st) < 0) {
        rc = -errno;
    } else {
        /* A rule on a file may only carry rights that apply to files. */
        struct ll_path_beneath_attr pb = {S_ISDIR(st.st_mode) ? dir_access : file_access, fd};
        if (syscall(SYS_landlock_add_rule, ruleset, LL_RULE_PATH_BENEATH, &pb, 0) < 0)
            rc = -errno;
    }
    close(fd);
    return rc;
}

/* Returns the ABI version enforced, or -errno (-EOPNOTSUPP/-ENOSYS: Landlock is off or absent). */
int mshv_landlock_restrict(const char *const *read_paths, int n_read, const char *const *write_paths, int n_write)
{
    int abi = mshv_landlock_abi();
    if (abi < 0)
        return abi;
    struct ll_ruleset_attr attr = {0, 0, 0};
    size_t size = sizeof(uint64_t);
    attr.handled_access_fs = (LL_FS_MAKE_SYM << 1) - 1; /* every ABI 1 right */
    if (abi >= 2)
        attr.handled_access_fs |= LL_FS_REFER;
    if (abi >= 3)
        attr.handled_access_fs |= LL_FS_TRUNCATE;
    if (abi >= 4) {
        attr.handled_access_net = LL_NET_BIND_TCP | LL_NET_CONNECT_TCP;
        size = 2 * sizeof(uint64_t);
    }
    if (abi >= 5)
        attr.handled_access_fs |= LL_FS_IOCTL_DEV;
    if (abi >= 6) {
        attr.scoped = LL_SCOPE_ABSTRACT_UNIX | LL_SCOPE_SIGNAL;
        size = sizeof(attr);
    }
    int ruleset = (int)syscall(SYS_landlock_create_ruleset, &attr, size, 0);
    if (ruleset < 0)
        return -errno;
    const uint64_t read_file = LL_FS_READ_FILE;
    const uint64_t read_dir = LL_FS_READ_FILE | LL_FS_READ_DIR;
    const uint64_t write_file = (LL_FS_READ_FILE | LL_FS_WRITE_FILE | (abi >= 3 ? LL_FS_TRUNCATE : 0));
    const uint64_t write_dir = write_file | LL_FS_READ_DIR | LL_FS_REMOVE_FILE | LL_FS_MAKE_REG | LL_FS_MAKE_SOCK;
    int rc = 0;
    for (int i = 0; i < n_read && rc == 0; i++)
        rc = add_path(ruleset, read_paths[i], read_dir, read_file);
    for (int i = 0; i < n_write && rc == 0; i++)
        rc = add_path(ruleset, write_paths[i], write_dir, write_file);
    if (rc == 0 && syscall(SYS_landlock_restrict_self, ruleset, 0) < 0)
        rc = -errno;
    close(ruleset);
    return rc < 0 ? rc : abi;
}

/* ------------------------------------------------------------------------------------------ */
/* seccomp                                                                                      */

enum cond_op { C_NONE, C_EQ, C_NOT_SET, C_SET, C_EQ_PID };

struct cond {
    unsigned char arg;
    unsigned char op;
    uint32_t value;
};

struct rule {
    int nr;
    uint32_t action;
    struct cond c[2];
};

#define ALLOW(n) {SYS_##n, SECCOMP_RET_ALLOW, {{0, C_NONE, 0}, {0, C_NONE, 0}}}
#define ALLOW_IF(n, a, op, v) {SYS_##n, SECCOMP_RET_ALLOW, {{a, op, v}, {0, C_NONE, 0}}}
#define ALLOW_IF2(n, a, op, v, b, op2, w) {SYS_##n, SECCOMP_RET_ALLOW, {{a, op, v}, {b, op2, w}}}
#define ERRNO(n, e) {SYS_##n, SECCOMP_RET_ERRNO | (e), {{0, C_NONE, 0}, {0, C_NONE, 0}}}

/* What a vCPU run loop needs (measured with strace on the tiny guest and Linux under the emulated
 * device): the run ioctl and register access, guest memory copies within this process, the kick
 * signal, Python's allocator and locks, console output (including log rotation) and the exit report;
 * restart_syscall in every list: the kernel issues it to resume an interrupted sleep after a stop and
 * continue (SIGSTOP/SIGCONT, a debugger), which must never end the VM. The emulated device's
 * MSHV_IOEVENTFD, which a vCPU issues when the guest moves a BAR or toggles its decoding (Linux does
 * both while sizing BARs), checks the eventfd (fcntl F_GETFD, readlink of /proc/self/fd/N), keeps a
 * duplicate of it (F_DUPFD_CLOEXEC) and closes that on deassign; the kernel's /dev/mshv needs none. */
#define VCPU_RULES                                                                                     \
    ALLOW(ioctl), ALLOW(write), ALLOW(pwrite64), ALLOW(ftruncate), ALLOW(copy_file_range), ALLOW(futex), \
        ALLOW(gettid), ALLOW(getpid), ALLOW(sched_yield), ALLOW(clock_gettime), ALLOW(munmap), ALLOW(madvise), \
        ALLOW(mremap), ALLOW(brk), ALLOW_IF(mmap, 2, C_NOT_SET, PROT_EXEC), ALLOW_IF(mprotect, 2, C_NOT_SET, PROT_EXEC), \
        ALLOW_IF(process_vm_readv, 0, C_EQ_PID, 0), ALLOW_IF(process_vm_writev, 0, C_EQ_PID, 0),       \
        ALLOW_IF2(kcmp, 0, C_EQ_PID, 0, 1, C_EQ_PID, 0), ALLOW(rt_sigprocmask), ALLOW(rt_sigreturn),    \
        ALLOW(rt_sigpending), ALLOW(rt_sigtimedwait), ALLOW(restart_syscall), ALLOW(exit), ALLOW(exit_group), \
        ALLOW_IF(fcntl, 1, C_EQ, F_GETFD), ALLOW_IF(fcntl, 1, C_EQ, F_DUPFD_CLOEXEC), ALLOW(readlink), ALLOW(close)

static const struct rule vcpu_rules[] = {VCPU_RULES};

static const struct rule helper_rules[] = {
    ALLOW(futex),         ALLOW(clock_nanosleep), ALLOW(nanosleep),    ALLOW(clock_gettime),
    ALLOW(pread64),       ALLOW(getpid),          ALLOW(gettid),       ALLOW_IF(tgkill, 0, C_EQ_PID, 0),
    ALLOW(rt_sigprocmask), ALLOW(rt_sigreturn),   ALLOW(write),        ALLOW(pwrite64),
    ALLOW(ftruncate),     ALLOW(exit),            ALLOW(exit_group),   ALLOW(madvise),
    ALLOW(restart_syscall),
};

#define TUNSETQUEUE_REQUEST 0x400454D9 /* _IOW('T', 217, int) of linux/if_tun.h */

/* A device thread (virtio-rng, vhost-blk, virtio-net's control queue): sleeps in poll(2) on its kick and
 * stop eventfds, reads its backend fd and eventfds, copies into guest memory (no system call), signals irqfd
 * eventfds, and runs Python (locks, the allocator, the monotonic clock). No open, and no ioctl but
 * TUNSETQUEUE: everything it touches was opened before. */
static const struct rule device_rules[] = {
    ALLOW(read),          ALLOW(write),          ALLOW(poll),           ALLOW(ppoll),
    ALLOW(futex),         ALLOW(clock_gettime),  ALLOW(gettid),         ALLOW(getpid),
    ALLOW(sched_yield),   ALLOW(munmap),         ALLOW(madvise),        ALLOW(mremap),
    ALLOW(brk),           ALLOW_IF(mmap, 2, C_NOT_SET, PROT_EXEC),      ALLOW_IF(mprotect, 2, C_NOT_SET, PROT_EXEC),
    ALLOW(rt_sigprocmask), ALLOW(rt_sigreturn),  ALLOW(restart_syscall), ALLOW(exit),
    ALLOW(exit_group),
    /* vhost-blk: setup messages on its connected vhost-user socket (descriptors as SCM_RIGHTS) */
    ALLOW(sendmsg),       ALLOW(recvfrom),
    /* virtio-net's control queue: VQ_PAIRS_SET attaches and detaches a multiqueue tap's queues, nothing else */
    ALLOW_IF(ioctl, 1, C_EQ, TUNSETQUEUE_REQUEST),
};

/* A virtio-net I/O thread (abi/vmm/net.c): epoll on its eventfds and tap, readv/writev between the tap
 * and guest RAM, eventfd reads and writes, its mutex and condition variable. Pure C: no allocator. */
static const struct rule net_rules[] = {
    ALLOW(epoll_wait),    ALLOW(epoll_pwait),    ALLOW(epoll_ctl),      ALLOW(read),
    ALLOW(write),         ALLOW(readv),          ALLOW(writev),         ALLOW(futex),
    ALLOW(gettid),        ALLOW(getpid),         ALLOW(rt_sigprocmask), ALLOW(rt_sigreturn),
    ALLOW(restart_syscall), ALLOW(madvise),      ALLOW(munmap),         ALLOW(exit),
    ALLOW(exit_group),
};

/* A virtio-blk relay thread (abi/vmm/svq.c): epoll on its eventfds, eventfd reads and writes, its mutex and
 * condition variable, the monotonic clock (a vDSO call, unless the clock source forces the system call).
 * Guest and shadow rings are copied in memory. Pure C: no allocator. */
static const struct rule blk_rules[] = {
    ALLOW(epoll_wait),    ALLOW(epoll_pwait),    ALLOW(epoll_ctl),      ALLOW(read),
    ALLOW(write),         ALLOW(futex),          ALLOW(clock_gettime),  ALLOW(gettid),
    ALLOW(getpid),        ALLOW(rt_sigprocmask), ALLOW(rt_sigreturn),   ALLOW(restart_syscall),
    ALLOW(madvise),       ALLOW(munmap),         ALLOW(exit),           ALLOW(exit_group),
};

/* The main thread: the selector loop, control clients, VM (re)builds, logging and lazy imports (files
 * are opened read-only where Landlock allows), thread creation (threads only), core dumps. Every call a
 * vCPU or helper thread may make is here too: their lists stack on this one. */
static const struct rule process_rules[] = {
    VCPU_RULES,
    ALLOW(read),
    ALLOW(readv),
    ALLOW(writev),
    ALLOW(pread64),
    ALLOW(close),
    ALLOW(fstat),
    ALLOW(newfstatat),
    ALLOW(statx),
    ALLOW(lseek),
    ALLOW(openat),
    ALLOW(getdents64),
    ALLOW(rename), /* path operations: Landlock decides where (nowhere for a VMM given only fds) */
    ALLOW(renameat),
    ALLOW(renameat2),
    ALLOW(unlink),
    ALLOW(unlinkat),
    ALLOW(readlink),
    ALLOW(readlinkat),
    ALLOW(getcwd),
    ALLOW(fcntl),
    ALLOW(dup),
    ALLOW(fsync),
    ALLOW(fdatasync),
    ALLOW(mmap),
    ALLOW(mprotect),
    ALLOW(mincore),
    ALLOW(set_robust_list),
    ALLOW(rseq),
    ALLOW_IF(clone, 0, C_SET, CLONE_THREAD),
    ERRNO(clone3, ENOSYS), /* glibc then falls back to clone(2), whose flags can be checked */
    ALLOW_IF(tgkill, 0, C_EQ_PID, 0),
    ALLOW(rt_sigaction),
    ALLOW(sigaltstack),
    ALLOW(epoll_create1),
    ALLOW(epoll_ctl),
    ALLOW(epoll_wait),
    ALLOW(epoll_pwait),
    ALLOW(poll),
    ALLOW(ppoll),
    ALLOW(accept4),
    ALLOW(recvfrom),
    ALLOW(sendto),
    ALLOW(sendmsg), /* vhost-user setup: descriptors to a backend started before the sandbox */
    ALLOW(wait4),   /* reaping that backend's reaper (the VMM's own child) */
    ALLOW(getsockname),
    ALLOW(shutdown),
    ALLOW(eventfd2),
    ALLOW(pipe2),
    ALLOW(memfd_create),
    ALLOW(clock_nanosleep),
    ALLOW(nanosleep),
    ALLOW(getrandom),
    ALLOW(sysinfo),
    ALLOW(sched_getaffinity),
    ALLOW(uname),
    ALLOW(getuid),
    ALLOW(geteuid),
    ALLOW(getgid),
    ALLOW(getegid),
    ALLOW_IF(prctl, 0, C_EQ, PR_SET_NAME),
    ALLOW_IF(prctl, 0, C_EQ, PR_GET_NAME),
    ALLOW_IF(seccomp, 0, C_EQ, SECCOMP_SET_MODE_FILTER), /* threads stack their own, stricter lists */
};

#define OFF_NR offsetof(struct seccomp_data, nr)
#define OFF_ARCH offsetof(struct seccomp_data, arch)
#define OFF_ARG(i) (offsetof(struct seccomp_data, args) + 8 * (i)) /* low 32 bits (little endian) */
#define X32_SYSCALL_BIT 0x40000000u
#define MAX_PROG 1024

static int compile(const struct rule *rules, size_t n, struct sock_filter *prog, size_t cap)
{
    size_t k = 0;
    uint32_t pid = (uint32_t)syscall(SYS_getpid);
#define EMIT(code, jt, jf, val)                                                                  \
    do {                                                                                         \
        if (k >= cap)                                                                            \
            return -E2BIG;                                                                       \
        prog[k++] = (struct sock_filter){(unsigned short)(code), (unsigned char)(jt), (unsigned char)(jf), (uint32_t)(val)}; \
    } while (0)
    EMIT(BPF_LD | BPF_W | BPF_ABS, 0, 0, OFF_ARCH);
    EMIT(BPF_JMP | BPF_JEQ | BPF_K, 1, 0, AUDIT_ARCH_X86_64);
    EMIT(BPF_RET | BPF_K, 0, 0, SECCOMP_RET_KILL_PROCESS);
    EMIT(BPF_LD | BPF_W | BPF_ABS, 0, 0, OFF_NR);
    EMIT(BPF_JMP | BPF_JGE | BPF_K, 0, 1, X32_SYSCALL_BIT);
    EMIT(BPF_RET | BPF_K, 0, 0, SECCOMP_RET_TRAP);
    for (size_t i = 0; i < n; i++) {
        const struct rule *r = &rules[i];
        int conds = (r->c[0].op != C_NONE) + (r->c[1].op != C_NONE);
        /* Block: LD nr; JEQ nr; (LD arg; test)*conds; RET action. Misses jump past the RET. */
        EMIT(BPF_LD | BPF_W | BPF_ABS, 0, 0, OFF_NR);
        EMIT(BPF_JMP | BPF_JEQ | BPF_K, 0, 2 * conds + 1, r->nr);
        for (int c = 0; c < conds; c++) {
            const struct cond *cd = &r->c[c];
            int miss = 2 * (conds - c - 1) + 1;
            uint32_t v = cd->op == C_EQ_PID ? pid : cd->value;
            EMIT(BPF_LD | BPF_W | BPF_ABS, 0, 0, OFF_ARG(cd->arg));
            if (cd->op == C_EQ || cd->op == C_EQ_PID)
                EMIT(BPF_JMP | BPF_JEQ | BPF_K, 0, miss, v);
            else if (cd->op == C_SET)
                EMIT(BPF_JMP | BPF_JSET | BPF_K, 0, miss, v);
            else
                EMIT(BPF_JMP | BPF_JSET | BPF_K, miss, 0, v);
        }
        EMIT(BPF_RET | BPF_K, 0, 0, r->action);
    }
    EMIT(BPF_RET | BPF_K, 0, 0, SECCOMP_RET_TRAP);
#undef EMIT
    return (int)k;
}

static const char *const default_names[] = {"main", "vcpu", "helper", "device", "net", "blk", "?", "?"};
_Static_assert(MSHV_SANDBOX_HELPER == 2, "abi/emu/emu_kvm.c calls the helper kind EMU_SANDBOX_HELPER (2)");

int mshv_seccomp_install(int kind)
{
    static struct sock_filter prog[MAX_PROG]; /* built under the GIL or before threads exist */
    struct sock_filter local[MAX_PROG / 4];
    const struct rule *rules;
    size_t n;
    struct sock_filter *buf = local;
    size_t cap = sizeof(local) / sizeof(local[0]);
    unsigned int flags = 0;
    switch (kind) {
    case MSHV_SANDBOX_PROCESS:
        rules = process_rules;
        n = sizeof(process_rules) / sizeof(process_rules[0]);
        buf = prog;
        cap = MAX_PROG;
        flags = SECCOMP_FILTER_FLAG_TSYNC; /* every thread, also any the runtime already started */
        break;
    case MSHV_SANDBOX_VCPU:
        rules = vcpu_rules;
        n = sizeof(vcpu_rules) / sizeof(vcpu_rules[0]);
        break;
    case MSHV_SANDBOX_HELPER:
        rules = helper_rules;
        n = sizeof(helper_rules) / sizeof(helper_rules[0]);
        break;
    case MSHV_SANDBOX_DEVICE:
        rules = device_rules;
        n = sizeof(device_rules) / sizeof(device_rules[0]);
        break;
    case MSHV_SANDBOX_NET:
        rules = net_rules;
        n = sizeof(net_rules) / sizeof(net_rules[0]);
        break;
    case MSHV_SANDBOX_BLK:
        rules = blk_rules;
        n = sizeof(blk_rules) / sizeof(blk_rules[0]);
        break;
    default:
        return -EINVAL;
    }
    int len = compile(rules, n, buf, cap);
    if (len < 0)
        return len;
    struct sock_fprog fprog = {(unsigned short)len, buf};
    long rc = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &fprog);
    if (rc != 0)
        return rc > 0 ? -ESRCH : -errno; /* TSYNC: a thread could not be synchronised */
    for (int i = 0; i < MAX_THREADS; i++)
        if (__atomic_load_n(&threads[i].tid, __ATOMIC_ACQUIRE) == self_tid()) {
            threads[i].kind = kind;
            break;
        }
    if (kind == MSHV_SANDBOX_PROCESS)
        __atomic_store_n(&active, 1, __ATOMIC_RELEASE);
    return 0;
}

int mshv_sandbox_active(void)
{
    return __atomic_load_n(&active, __ATOMIC_ACQUIRE);
}

/* A thread's first act under an active sandbox: name itself for reports, then narrow its filter. */
int mshv_sandbox_thread_enter(int kind, const char *name)
{
    if (!mshv_sandbox_active())
        return 0;
    const char *n = name ? name : default_names[kind & 7];
    prctl(PR_SET_NAME, n, 0, 0, 0); /* top -H, /proc/PID/task/TID/comm; the process list allows it */
    int rc = mshv_sandbox_register_thread(n);
    if (rc < 0)
        return rc;
    return mshv_seccomp_install(kind);
}

/* Test hook (docs/SECURITY.md): issue system call ``nr`` with zero arguments from the calling thread. */
long mshv_sandbox_test_syscall(int nr)
{
    long r = syscall(nr, 0, 0, 0, 0, 0, 0);
    return r < 0 ? -errno : r;
}
