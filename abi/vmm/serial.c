/* mshv-libvirt 16550A UART (COM1) register model; see serial.h, and vmm/devices/serial.py for the behaviour
 * (instantaneous transmission, THRE re-armed by every THR write and dropped only by an IIR read or by
 * disabling it, a 64-byte receive FIFO, OUT2 gating the interrupt, loopback wiring). */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "serial.h"

#define RBR_THR 0
#define IER 1
#define IIR_FCR 2
#define LCR 3
#define MCR 4
#define LSR 5
#define MSR 6
#define SCR 7

#define IER_RDA 0x01
#define IER_THRE 0x02
#define IER_RLS 0x04
#define IER_MASK 0x0F
#define IIR_NONE 0x01
#define IIR_THRE 0x02
#define IIR_RDA 0x04
#define IIR_RLS 0x06
#define IIR_FIFO_ENABLED 0xC0
#define FCR_ENABLE 0x01
#define FCR_CLEAR_RX 0x02
#define LCR_DLAB 0x80
#define MCR_DTR 0x01
#define MCR_RTS 0x02
#define MCR_OUT1 0x04
#define MCR_OUT2 0x08
#define MCR_LOOP 0x10
#define MCR_MASK 0x1F
#define LSR_DR 0x01
#define LSR_OE 0x02
#define LSR_THRE 0x20
#define LSR_TEMT 0x40
#define MSR_CTS 0x10
#define MSR_DSR 0x20
#define MSR_RI 0x40
#define MSR_DCD 0x80

#define RX_FIFO_SIZE 64
#define OUT_SIZE 4096

struct serial {
    pthread_mutex_t lock;
    uint8_t rx[RX_FIFO_SIZE];
    int rx_head, rx_len;
    uint8_t ier, lcr, mcr, scr, dll, dlm, fcr, lsr_errors;
    int thre_pending, irq_level, host_waiting;
    uint8_t out[OUT_SIZE]; /* bytes for Python: all of them without a sink, the log's overflow with one */
    int out_len;
    int pty_fd, log_fd;
    int64_t log_room, log_written;
};

void *mshv_serial_new(void)
{
    struct serial *s = calloc(1, sizeof(*s));
    if (s == NULL)
        return NULL;
    pthread_mutex_init(&s->lock, NULL);
    s->lcr = 0x03;     /* 8N1 */
    s->mcr = MCR_OUT2; /* firmware leaves OUT2 set so the IRQ reaches the interrupt controller */
    s->dll = 0x0C;     /* 9600 baud */
    s->thre_pending = 1;
    s->pty_fd = s->log_fd = -1;
    return s;
}

void mshv_serial_free(void *s)
{
    if (s != NULL)
        pthread_mutex_destroy(&((struct serial *)s)->lock);
    free(s);
}

static int pending_iir(const struct serial *s)
{
    if ((s->ier & IER_RLS) && s->lsr_errors)
        return IIR_RLS;
    if ((s->ier & IER_RDA) && s->rx_len)
        return IIR_RDA;
    if ((s->ier & IER_THRE) && s->thre_pending)
        return IIR_THRE;
    return IIR_NONE;
}

static void update_irq(struct serial *s, unsigned *events)
{
    /* OUT2 gates the UART's interrupt output on PCs; loopback disconnects it. */
    int level = pending_iir(s) != IIR_NONE && (s->mcr & MCR_OUT2) && !(s->mcr & MCR_LOOP);
    if (level != s->irq_level) {
        s->irq_level = level;
        *events |= MSHV_SERIAL_EV_IRQ;
    }
}

static void rx_push(struct serial *s, uint8_t b)
{
    s->rx[(s->rx_head + s->rx_len) % RX_FIFO_SIZE] = b;
    s->rx_len++;
}

static void write_all(int fd, const uint8_t *p, size_t n, int64_t *counted)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return; /* a full pty (nobody reads) or a full disk: dropped, never a stalled vCPU */
        p += w;
        n -= (size_t)w;
        if (counted != NULL)
            *counted += w;
    }
}

static void transmit(struct serial *s, uint8_t b, unsigned *events)
{
    if (s->pty_fd < 0 && s->log_fd < 0) {
        if (s->out_len < OUT_SIZE)
            s->out[s->out_len++] = b;
        *events |= MSHV_SERIAL_EV_OUTPUT;
        return;
    }
    if (s->pty_fd >= 0)
        write_all(s->pty_fd, &b, 1, NULL);
    if (s->log_fd < 0)
        return;
    if (s->log_room > 0 && s->out_len == 0) {
        int64_t before = s->log_written;
        write_all(s->log_fd, &b, 1, &s->log_written);
        s->log_room -= s->log_written - before;
        return;
    }
    /* The log is at its cap: Python rotates it (vmm/console.py) and writes what waits here. */
    if (s->out_len < OUT_SIZE)
        s->out[s->out_len++] = b;
    *events |= MSHV_SERIAL_EV_OUTPUT;
}

static uint8_t read_byte(struct serial *s, unsigned offset, unsigned *events)
{
    int dlab = s->lcr & LCR_DLAB;
    switch (offset) {
    case RBR_THR: {
        if (dlab)
            return s->dll;
        uint8_t v = 0;
        if (s->rx_len) {
            v = s->rx[s->rx_head];
            s->rx_head = (s->rx_head + 1) % RX_FIFO_SIZE;
            s->rx_len--;
        }
        update_irq(s, events);
        if (s->host_waiting && s->rx_len <= RX_FIFO_SIZE / 2) {
            s->host_waiting = 0;
            *events |= MSHV_SERIAL_EV_RX_ROOM;
        }
        return v;
    }
    case IER:
        return dlab ? s->dlm : s->ier;
    case IIR_FCR: {
        int iir = pending_iir(s);
        if (iir == IIR_THRE) {
            s->thre_pending = 0; /* reading IIR acknowledges THRE */
            update_irq(s, events);
        }
        return (uint8_t)(iir | ((s->fcr & FCR_ENABLE) ? IIR_FIFO_ENABLED : 0));
    }
    case LCR:
        return s->lcr;
    case MCR:
        return s->mcr;
    case LSR: {
        uint8_t lsr = LSR_THRE | LSR_TEMT | s->lsr_errors | (s->rx_len ? LSR_DR : 0);
        s->lsr_errors = 0;
        update_irq(s, events);
        return lsr;
    }
    case MSR:
        if (s->mcr & MCR_LOOP) {
            /* Loopback wires DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD (Linux's autoconfig checks this). */
            uint8_t m = s->mcr;
            return (uint8_t)(((m & MCR_RTS) ? MSR_CTS : 0) | ((m & MCR_DTR) ? MSR_DSR : 0) |
                             ((m & MCR_OUT1) ? MSR_RI : 0) | ((m & MCR_OUT2) ? MSR_DCD : 0));
        }
        return MSR_DCD | MSR_DSR | MSR_CTS;
    case SCR:
        return s->scr;
    }
    return 0xFF;
}

static void write_byte(struct serial *s, unsigned offset, uint8_t value, unsigned *events)
{
    int dlab = s->lcr & LCR_DLAB;
    switch (offset) {
    case RBR_THR:
        if (dlab) {
            s->dll = value;
            return;
        }
        if (s->mcr & MCR_LOOP) {
            if (s->rx_len < RX_FIFO_SIZE)
                rx_push(s, value);
            else
                s->lsr_errors |= LSR_OE;
        } else {
            transmit(s, value, events);
        }
        s->thre_pending = 1;
        update_irq(s, events);
        break;
    case IER: {
        if (dlab) {
            s->dlm = value;
            return;
        }
        int enabling_thre = !(s->ier & IER_THRE) && (value & IER_THRE);
        s->ier = value & IER_MASK;
        if (enabling_thre)
            s->thre_pending = 1; /* THR is empty, so enabling THRE raises it at once */
        update_irq(s, events);
        break;
    }
    case IIR_FCR:
        s->fcr = value & 0xC9;
        if (value & FCR_CLEAR_RX)
            s->rx_head = s->rx_len = 0;
        update_irq(s, events);
        break;
    case LCR:
        s->lcr = value;
        break;
    case MCR:
        s->mcr = value & MCR_MASK;
        update_irq(s, events);
        break;
    case SCR:
        s->scr = value;
        break;
    }
    /* LSR and MSR are read-only */
}

uint8_t mshv_serial_read(void *sp, unsigned offset, unsigned *events)
{
    struct serial *s = sp;
    pthread_mutex_lock(&s->lock);
    uint8_t v = read_byte(s, offset, events);
    pthread_mutex_unlock(&s->lock);
    return v;
}

void mshv_serial_write(void *sp, unsigned offset, uint8_t value, unsigned *events)
{
    struct serial *s = sp;
    pthread_mutex_lock(&s->lock);
    write_byte(s, offset, value, events);
    pthread_mutex_unlock(&s->lock);
}

int mshv_serial_enqueue(void *sp, const uint8_t *data, int n, unsigned *events)
{
    struct serial *s = sp;
    pthread_mutex_lock(&s->lock);
    int taken = 0;
    while (taken < n && s->rx_len < RX_FIFO_SIZE)
        rx_push(s, data[taken++]);
    if (taken < n)
        s->lsr_errors |= LSR_OE;
    update_irq(s, events);
    pthread_mutex_unlock(&s->lock);
    return taken;
}

int mshv_serial_rx_space(void *sp)
{
    struct serial *s = sp;
    pthread_mutex_lock(&s->lock);
    int room = RX_FIFO_SIZE - s->rx_len;
    if (room == 0)
        s->host_waiting = 1;
    pthread_mutex_unlock(&s->lock);
    return room;
}

int mshv_serial_irq_level(void *sp)
{
    struct serial *s = sp;
    pthread_mutex_lock(&s->lock);
    int level = s->irq_level;
    pthread_mutex_unlock(&s->lock);
    return level;
}

int mshv_serial_take_output(void *sp, uint8_t *buf, int len)
{
    struct serial *s = sp;
    pthread_mutex_lock(&s->lock);
    int n = s->out_len < len ? s->out_len : len;
    memcpy(buf, s->out, (size_t)n);
    memmove(s->out, s->out + n, (size_t)(s->out_len - n));
    s->out_len -= n;
    pthread_mutex_unlock(&s->lock);
    return n;
}

void mshv_serial_set_sink(void *sp, int pty_fd, int log_fd, int64_t log_room)
{
    struct serial *s = sp;
    pthread_mutex_lock(&s->lock);
    s->pty_fd = pty_fd;
    s->log_fd = log_fd;
    s->log_room = log_room;
    s->log_written = 0;
    /* What was transmitted before (and not yet taken by Python) goes out now, so that from here on the
     * buffer holds only the log's overflow. */
    int n = s->out_len;
    s->out_len = 0;
    for (int i = 0; i < n; i++) {
        unsigned events = 0;
        transmit(s, s->out[i], &events);
    }
    pthread_mutex_unlock(&s->lock);
}

int64_t mshv_serial_log_sync(void *sp, int64_t new_room)
{
    struct serial *s = sp;
    pthread_mutex_lock(&s->lock);
    int64_t written = s->log_written;
    s->log_written = 0;
    if (new_room >= 0)
        s->log_room = new_room;
    pthread_mutex_unlock(&s->lock);
    return written;
}
