/* mshv-libvirt: the entry points Python calls instead of open/ioctl/mmap on /dev/mshv. */
#ifndef MSHV_LIBVIRT_SHIM_H
#define MSHV_LIBVIRT_SHIM_H

#include <stddef.h>

int mshv_dev_open(int mode);
int mshv_dev_is_emulated(int fd);
long mshv_dev_ioctl(int fd, unsigned long request, void *arg);
int mshv_dev_close(int fd);
void *mshv_dev_mmap(void *addr, size_t len, int prot, int flags, int fd, long offset);
int mshv_emu_kvm_available(void);
void *mshv_alloc_pages(size_t len);
void *mshv_alloc_memfd_pages(size_t len, int *fd_out);
int mshv_free_pages(void *addr, size_t len);
int mshv_spawn_helper(const char *path, char *const argv[], const int *keep, int nkeep, int *lifeline_out,
                      int *reaper_out, int *reaper_pidfd_out);
int mshv_install_kick_handler(int signo);
int mshv_dev_use_fd(int kind, int fd);
void mshv_emu_prestart(void);

#endif
