/* mshv-libvirt VMM sandbox: no_new_privs, Landlock, per-thread seccomp allow-lists, SIGSYS reporting. */
#ifndef MSHV_LIBVIRT_SANDBOX_H
#define MSHV_LIBVIRT_SANDBOX_H

#include <stddef.h>

/* Thread types, each with its own allow-list (the process list first applies to every thread). */
#define MSHV_SANDBOX_PROCESS 0 /* the main/control thread; installed with TSYNC on every thread */
#define MSHV_SANDBOX_VCPU 1    /* a vCPU thread's run loop */
#define MSHV_SANDBOX_HELPER 2  /* the emulated device's halt monitor */
#define MSHV_SANDBOX_DEVICE 3  /* a device thread (virtio backends) */
#define MSHV_SANDBOX_NET 4     /* a virtio-net I/O thread (abi/vmm/net.c) */
#define MSHV_SANDBOX_BLK 5     /* a virtio-blk relay thread (abi/vmm/svq.c) */

int mshv_sandbox_no_new_privs(void);
int mshv_landlock_abi(void);
int mshv_landlock_restrict(const char *const *read_paths, int n_read, const char *const *write_paths, int n_write);
int mshv_sandbox_install_sigsys(int report_fd);
int mshv_sandbox_register_thread(const char *name);
int mshv_seccomp_install(int kind);
int mshv_sandbox_active(void);
int mshv_sandbox_thread_enter(int kind, const char *name);
int mshv_syscall_number(const char *name);
const char *mshv_syscall_name(int nr);
long mshv_sandbox_test_syscall(int nr);

#endif
