/* mshv-libvirt compiled vCPU run loop: MSHV_RUN_VP in C, the hot exits completed without Python.
 *
 * Python (vmm/runloop.py) builds one port table per VM before any vCPU runs (then it is read-only),
 * and one loop per vCPU over that VP's fd and its struct mshv_run_vp. mshv_vcpu_loop_run() returns
 * only for what Python must see: an intercept it completes itself (MSHV_LOOP_EXIT, the message in
 * the run buffer), a kick (MSHV_LOOP_KICKED: EINTR or mshv_vcpu_loop_interrupt), or a failed call
 * (MSHV_LOOP_ERROR, errno from mshv_vcpu_loop_errno). */
#ifndef MSHV_LIBVIRT_RUNLOOP_H
#define MSHV_LIBVIRT_RUNLOOP_H

#include <stdint.h>

/* Port kinds a table entry can have. */
#define MSHV_PORT_SINK 1     /* writes dropped, reads all ones: a port nobody claims (0x80 POST codes) */
#define MSHV_PORT_PM_TIMER 2 /* ACPI PM_TMR: 3.579545 MHz since arg (CLOCK_MONOTONIC ns), 32 bits */

#define MSHV_LOOP_EXIT 0
#define MSHV_LOOP_KICKED 1
#define MSHV_LOOP_ERROR 2

struct mshv_loop_stats {
    uint64_t runs;      /* MSHV_RUN_VP calls that returned a message */
    uint64_t fast_io;   /* port accesses completed here */
    uint64_t halts;     /* HLTs with interrupts enabled, run again here */
    uint64_t to_python; /* MSHV_LOOP_EXIT returns */
};

void *mshv_port_table_new(void);
int mshv_port_table_add(void *table, uint16_t base, uint16_t len, int kind, uint64_t arg);
void mshv_port_table_free(void *table);

void *mshv_vcpu_loop_new(const void *table, int vp_fd, uint32_t vp_index, void *run_buf);
int mshv_vcpu_loop_run(void *loop);
int mshv_vcpu_loop_errno(const void *loop);
void mshv_vcpu_loop_interrupt(void *loop);
void mshv_vcpu_loop_stats(const void *loop, struct mshv_loop_stats *out);
void mshv_vcpu_loop_free(void *loop);

#endif
