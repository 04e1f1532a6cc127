/* mshv-libvirt compiled vCPU run loop: MSHV_RUN_VP in C, the hot exits completed without Python.
 *
 * Python (vmm/runloop.py) builds one port table per VM before any vCPU runs (then it is read-only),
 * and one loop per vCPU over that VP's fd and its struct mshv_run_vp. mshv_vcpu_loop_run() returns
 * only for what Python must see: an intercept it completes itself (MSHV_LOOP_EXIT, the message in
 * the run buffer), a device's events after an access it completed (MSHV_LOOP_DEVICE), a kick (MSHV_LOOP_KICKED: EINTR or mshv_vcpu_loop_interrupt), or a failed call
 * (MSHV_LOOP_ERROR, errno from mshv_vcpu_loop_errno). */
#ifndef MSHV_LIBVIRT_RUNLOOP_H
#define MSHV_LIBVIRT_RUNLOOP_H

#include <stdint.h>

/* Port kinds a table entry can have. */
#define MSHV_PORT_SINK 1     /* writes dropped, reads all ones: a port nobody claims (0x80 POST codes) */
#define MSHV_PORT_PM_TIMER 2 /* ACPI PM_TMR: 3.579545 MHz since arg (CLOCK_MONOTONIC ns), 32 bits */
#define MSHV_PORT_SERIAL 3   /* a 16550A whose model (serial.h) is at address arg */
/* MSHV_PORT_PCI: 0xCF8-0xCFF over the mshv_pci_new() object at address arg: CONFIG_ADDRESS and CONFIG_DATA
 * reads here; CONFIG_DATA writes (BARs, command, MSI-X enable) and the rest (0xCF9's reset register, partial
 * CONFIG_ADDRESS accesses) go to Python. */
#define MSHV_PORT_PCI 4
/* MSHV_PORT_RTC: 0x70-0x71 over the mshv_rtc_new() object at address arg: the index register (0x70, with the
 * NMI mask bit) and reads of CMOS RAM (0x0E-0x7F but the century) here; the clock's registers and every data
 * write go to Python (vmm/devices/rtc.py). */
#define MSHV_PORT_RTC 5
/* MSHV_PORT_STATUS: a one-byte read-only register that Python publishes at address arg after every change
 * of its device (the i8042's status, whose reads change nothing); reads here, writes to Python. */
#define MSHV_PORT_STATUS 6

#define MSHV_LOOP_EXIT 0
#define MSHV_LOOP_KICKED 1
#define MSHV_LOOP_ERROR 2
#define MSHV_LOOP_DEVICE 3 /* an access was completed, and left events for Python: mshv_vcpu_loop_events */

struct mshv_loop_stats {
    uint64_t runs;      /* MSHV_RUN_VP calls that returned a message */
    uint64_t fast_io;   /* port accesses completed here */
    uint64_t halts;     /* HLTs with interrupts enabled, run again here */
    uint64_t to_python; /* MSHV_LOOP_EXIT returns */
    uint64_t device_events; /* MSHV_LOOP_DEVICE returns */
};

void *mshv_port_table_new(void);
int mshv_port_table_add(void *table, uint16_t base, uint16_t len, int kind, uint64_t arg);
void mshv_port_table_free(void *table);

/* PCI bus 0's configuration mechanism #1: the address register, and each slot's function-0 config image
 * (4 KiB, owned by Python's PciConfigSpace, which writes it; NULL: no function). */
void *mshv_pci_new(void);
void mshv_pci_free(void *pci);
int mshv_pci_set_slot(void *pci, int slot, const uint8_t *image);
uint32_t mshv_pci_address(void *pci);
void mshv_pci_set_address(void *pci, uint32_t value);

/* The CMOS RTC's index register (bits 6-0, bit 7 the NMI mask) and its 128 bytes, which Python writes. */
void *mshv_rtc_new(void);
void mshv_rtc_free(void *rtc);
uint8_t *mshv_rtc_cmos(void *rtc);
uint8_t mshv_rtc_index(void *rtc);
void mshv_rtc_set_index(void *rtc, uint8_t value);

void *mshv_vcpu_loop_new(const void *table, int vp_fd, uint32_t vp_index, void *run_buf);
int mshv_vcpu_loop_run(void *loop);
int mshv_vcpu_loop_errno(const void *loop);
void mshv_vcpu_loop_interrupt(void *loop);
unsigned mshv_vcpu_loop_events(void *loop); /* the serial model's MSHV_SERIAL_EV_* bits, then cleared */
void mshv_vcpu_loop_stats(const void *loop, struct mshv_loop_stats *out);
void mshv_vcpu_loop_free(void *loop);

#endif
