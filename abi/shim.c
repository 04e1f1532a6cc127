/* mshv-libvirt ioctl shim: one door for every /dev/mshv call.
 *
 * Python never calls ioctl(2) itself. Routing every call through here is what lets the
 * same Python and VMM code drive the kernel's /dev/mshv or the emulated device: the
 * decision is made once, when /dev/mshv is opened (probing, not configuration), and
 * afterwards follows the descriptor.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "emu.h"
#include "shim.h"

int mshv_emu_kvm_available(void);

/* Descriptors opened by whoever started us (the daemon: a sandboxed VMM may open no device itself).
 * Probing is unchanged, it just happened in the daemon: a handed /dev/mshv means the kernel device,
 * a handed /dev/kvm (or none at all) means the emulated device over it. */
static int handed_mshv = -1, handed_any;

int mshv_dev_use_fd(int kind, int fd)
{
    if (fd < 0 || (kind != 1 && kind != 2))
        return -EINVAL;
    if (kind == 1)
        handed_mshv = fd;
    else
        emu_kvm_use_fd(fd);
    handed_any = 1;
    return 0;
}

int mshv_dev_open(int mode)
{
    if (mode == 2)
        return emu_open();
    if (handed_mshv >= 0)
        return fcntl(handed_mshv, F_DUPFD_CLOEXEC, 0); /* each MshvSystem owns (and closes) its own fd */
    if (handed_any) {
        if (mode == 1) {
            errno = ENOENT;
            return -1;
        }
        return emu_open();
    }
    int fd = open("/dev/mshv", O_RDWR | O_CLOEXEC);
    if (fd >= 0 || mode == 1)
        return fd;
    /* Auto mode falls back only when the device does not exist; a permission or driver
     * error on a real /dev/mshv must reach the user instead of being papered over. */
    if (errno != ENOENT && errno != ENODEV && errno != ENXIO)
        return -1;
    return emu_open();
}

int mshv_dev_is_emulated(int fd)
{
    return emu_owns(fd);
}

long mshv_dev_ioctl(int fd, unsigned long request, void *arg)
{
    if (emu_owns(fd))
        return emu_ioctl(fd, request, arg);
    return ioctl(fd, request, arg);
}

int mshv_dev_close(int fd)
{
    if (emu_owns(fd))
        return emu_close(fd);
    return close(fd);
}

void *mshv_dev_mmap(void *addr, size_t len, int prot, int flags, int fd, long offset)
{
    if (emu_owns(fd))
        return emu_mmap(addr, len, prot, flags, fd, offset);
    return mmap(addr, len, prot, flags, fd, offset);
}

/* Guest RAM: anonymous shared pages, so a mapping survives fork of helpers and is page aligned. */
void *mshv_alloc_pages(size_t len)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

/* Guest RAM proper: a memfd (sealed at its size) mapped shared, so a vhost-user backend can map the same
 * pages from the descriptor (SET_MEM_TABLE) while the partition maps them from this address. The seals
 * keep the file from shrinking under either mapping (SIGBUS) or growing. Returns the fd in *fd_out. */
void *mshv_alloc_memfd_pages(size_t len, int *fd_out)
{
    *fd_out = -1;
    int fd = memfd_create("mshv-guest-ram", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0)
        return NULL;
    if (ftruncate(fd, (off_t)len) < 0 || fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0) {
        int err = errno;
        close(fd);
        errno = err;
        return NULL;
    }
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0);
    if (p == MAP_FAILED) {
        int err = errno;
        close(fd);
        errno = err;
        return NULL;
    }
    *fd_out = fd;
    return p;
}

int mshv_free_pages(void *addr, size_t len)
{
    return munmap(addr, len);
}

static void default_signals(void)
{
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    for (int sig = 1; sig < 32; sig++)
        if (sig != SIGKILL && sig != SIGSTOP)
            signal(sig, SIG_DFL);
}

/* The reaper: waits for EOF on the lifeline (every copy of its write end is the caller's, so EOF means
 * the caller closed it or died, however it died) or for the helper's end. On EOF it SIGKILLs the helper.
 * It exits with the helper's status, so the caller learns it by reaping the reaper. */
static void reap(pid_t child)
{
    int pidfd = (int)syscall(SYS_pidfd_open, child, 0);
    for (;;) {
        struct pollfd p[2] = {{3, POLLIN, 0}, {pidfd, POLLIN, 0}};
        int n = poll(p, pidfd >= 0 ? 2 : 1, pidfd >= 0 ? -1 : 100);
        int status;
        if (n < 0 && errno != EINTR)
            break;
        if (p[0].revents) {
            kill(child, SIGKILL);
            waitpid(child, &status, 0);
            _exit(137);
        }
        if (waitpid(child, &status, WNOHANG) == child)
            _exit(WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
    }
    kill(child, SIGKILL);
    _exit(137);
}

/* A helper process that dies with us (a vhost-user backend), however we die. PR_SET_PDEATHSIG alone
 * is not enough: Landlock's signal scoping (ABI 6+) also refuses the kernel's parent-death signal from
 * a sandboxed parent to a process outside its domain (measured). So a reaper process sits between us
 * and the helper, outside the sandbox: it holds only the read end of a lifeline pipe and SIGKILLs the
 * helper when the lifeline breaks. The helper gets PR_SET_PDEATHSIG from the reaper (unsandboxed, so it
 * is delivered), the reaper from us (covers a death before any sandbox). In the forked children only
 * async-signal-safe calls (the caller has threads). Call from the main thread: PR_SET_PDEATHSIG fires
 * when the forking *thread* ends.
 * Returns the helper's pid, the lifeline's write end (*lifeline_out) and the reaper's pid and pidfd
 * (-1 where pidfd_open is missing); or -errno. */
int mshv_spawn_helper(const char *path, char *const argv[], const int *keep, int nkeep, int *lifeline_out,
                      int *reaper_out, int *reaper_pidfd_out)
{
    int life[2], info[2];
    *lifeline_out = *reaper_out = *reaper_pidfd_out = -1;
    if (pipe2(life, O_CLOEXEC) < 0)
        return -errno;
    if (pipe2(info, O_CLOEXEC) < 0) {
        int err = errno;
        close(life[0]);
        close(life[1]);
        return -err;
    }
    pid_t parent = getpid();
    pid_t reaper = fork();
    if (reaper < 0) {
        int err = errno;
        close(life[0]);
        close(life[1]);
        close(info[0]);
        close(info[1]);
        return -err;
    }
    if (reaper == 0) {
        if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0 || getppid() != parent)
            _exit(127);
        default_signals();
        pid_t self = getpid();
        pid_t child = fork();
        if (child == 0) {
            if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0 || getppid() != self)
                _exit(127);
            syscall(SYS_close_range, 3, ~0U, 4 /* CLOSE_RANGE_CLOEXEC: the pipes too */);
            for (int i = 0; i < nkeep; i++)
                if (fcntl(keep[i], F_SETFD, 0) < 0)
                    _exit(127);
            execv(path, argv);
            _exit(127);
        }
        int answer = child < 0 ? -errno : child;
        ssize_t ignored = write(info[1], &answer, sizeof(answer));
        (void)ignored;
        if (child < 0)
            _exit(127);
        if (dup2(life[0], 3) < 0)
            kill(child, SIGKILL);
        syscall(SYS_close_range, 4, ~0U, 0); /* nothing else: no image, no socket stays open here */
        reap(child);
    }
    close(life[0]);
    close(info[1]);
    int answer = -EIO;
    ssize_t got;
    do
        got = read(info[0], &answer, sizeof(answer));
    while (got < 0 && errno == EINTR);
    close(info[0]);
    if (got != (ssize_t)sizeof(answer) || answer < 0) {
        close(life[1]); /* the reaper, if it runs, ends */
        waitpid(reaper, NULL, 0);
        return answer < 0 ? answer : -EIO;
    }
    *lifeline_out = life[1];
    *reaper_out = reaper;
    *reaper_pidfd_out = (int)syscall(SYS_pidfd_open, reaper, 0);
    return answer;
}

static void kick_handler(int signo)
{
    (void)signo; /* only here so a blocking MSHV_RUN_VP returns EINTR */
}

/* Installed without SA_RESTART: a signal aimed at a VP thread must interrupt MSHV_RUN_VP. */
int mshv_install_kick_handler(int signo)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = kick_handler;
    sigemptyset(&sa.sa_mask);
    return sigaction(signo, &sa, NULL);
}

/* The emulated device's helper thread, started now from the calling (main) thread so that vCPU threads
 * never need to create threads or install signal handlers. */
void mshv_emu_prestart(void)
{
    emu_kvm_prestart();
}
