/* mshv-libvirt 16550A UART register model in C: the one state both the compiled run loop (runloop.c) and
 * Python (vmm/devices/serial.py, for accesses the loop hands over and for console input) work on. */
#ifndef MSHV_LIBVIRT_SERIAL_H
#define MSHV_LIBVIRT_SERIAL_H

#include <stdint.h>

/* What an access left for Python (bits of *events). */
#define MSHV_SERIAL_EV_IRQ 1     /* the interrupt line changed: read mshv_serial_irq_level */
#define MSHV_SERIAL_EV_OUTPUT 2  /* transmitted bytes wait in the model: mshv_serial_take_output */
#define MSHV_SERIAL_EV_RX_ROOM 4 /* the host found the FIFO full and the guest drained half of it */

void *mshv_serial_new(void);
void mshv_serial_free(void *s);
uint8_t mshv_serial_read(void *s, unsigned offset, unsigned *events);
void mshv_serial_write(void *s, unsigned offset, uint8_t value, unsigned *events);
int mshv_serial_enqueue(void *s, const uint8_t *data, int n, unsigned *events);
int mshv_serial_rx_space(void *s);
int mshv_serial_irq_level(void *s);
int mshv_serial_take_output(void *s, uint8_t *buf, int len);
/* Transmitted bytes go to these descriptors from the thread that transmitted them (a non-blocking pty
 * master: dropped when full; the log: at most log_room bytes, the rest left for EV_OUTPUT). -1: none. */
void mshv_serial_set_sink(void *s, int pty_fd, int log_fd, int64_t log_room);
/* Bytes written to the log since the last call; log_room is set again to new_room when >= 0. */
int64_t mshv_serial_log_sync(void *s, int64_t new_room);

#endif
