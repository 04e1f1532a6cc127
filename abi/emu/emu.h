/* mshv-libvirt emulated /dev/mshv: the entry points abi/shim.c routes to.
 *
 * Every handle the emulator returns is a real file descriptor (an eventfd used as a
 * handle), so numbers never collide with other descriptors and close-on-exec works.
 * Calls follow ioctl(2)'s contract: on failure they return -1 and set errno to the value
 * the kernel driver would return for the same arguments.
 */
#ifndef MSHV_LIBVIRT_EMU_H
#define MSHV_LIBVIRT_EMU_H

#include <stddef.h>

int emu_open(void);                                 /* a new emulated /dev/mshv handle */
int emu_owns(int fd);                               /* 1 if fd is an emulator handle */
long emu_ioctl(int fd, unsigned long request, void *arg);
int emu_close(int fd);                              /* releases like the kernel's last close */
void *emu_mmap(void *addr, size_t len, int prot, int flags, int fd, long offset);
/* The kernel generation an emulated /dev/mshv handle reproduces (major * 100 + minor: 615 for
 * 6.15-6.18, 619, 700), fixed by MSHV_LIBVIRT_EMU_KERNEL when it was opened; -1 if fd is none. */
int mshv_emu_kernel(int fd);
void emu_kvm_use_fd(int fd);                        /* use this open /dev/kvm instead of opening it */
void emu_kvm_prestart(void);                        /* choose the kick signal, start the halt monitor */

#endif
