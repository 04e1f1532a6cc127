/* mshv-libvirt test-only virtio-net driver, tap peer and bare-tap floor (see netq.h).
 *
 * The driver is the guest side of both split virtqueues (virtio 1.2 section 2.7) of a handed-over VirtioNet:
 * rx descriptor i always points at rx buffer i (device-writable, all posted at the start and re-posted as
 * they are reaped), tx descriptor i at tx buffer i (one descriptor: header + frame, as Linux sends a linear
 * frame). It kicks when the event index asks and sleeps on a call eventfd only after re-arming used_event
 * and looking once more, as a guest driver would. The floor is the same frames through a bare tap fd, the
 * peer the other end of either tap: an AF_PACKET socket in the namespace, batched with sendmmsg/recvmmsg. */
#include "netq.h"

#include <errno.h>
#include <linux/if_packet.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define DESC_F_WRITE 2
#define HDR 12
#define ETHERTYPE_HI 0x88
#define ETHERTYPE_LO 0xb5
#define HEAD 30 /* dst, src, ethertype, tag, seq */
#define MODE_SEND 0
#define MODE_RECV 1
#define MODE_RTT 2
#define MODE_ECHO 3
#define PEER_BATCH 64
#define MAX_FRAME 2048

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct used_elem {
    uint32_t id;
    uint32_t len;
};

uint64_t mshv_netbench_now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* Writes the reason into err; returns -1. */
static int say(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return -1;
}

static const uint8_t BROADCAST[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};

static void frame_fill(uint8_t *f, uint32_t len, const uint8_t *dst, const uint8_t *src, uint64_t tag, uint64_t seq)
{
    memcpy(f, dst, 6);
    memcpy(f + 6, src, 6);
    f[12] = ETHERTYPE_HI;
    f[13] = ETHERTYPE_LO;
    memcpy(f + 14, &tag, 8);
    memcpy(f + 22, &seq, 8);
    for (uint32_t k = HEAD; k < len; k++)
        f[k] = (uint8_t)(seq + k);
}

enum { FRAME_OURS, FRAME_OTHER, FRAME_BAD };

/* Classifies a received frame against what the job sends that way; *seq is its sequence number. */
static int frame_check(const uint8_t *f, size_t len, const struct mshv_netbench_job *job, const uint8_t *dst,
                       const uint8_t *src, uint64_t *seq)
{
    uint64_t tag;
    if (len < HEAD || f[12] != ETHERTYPE_HI || f[13] != ETHERTYPE_LO)
        return FRAME_OTHER;
    memcpy(&tag, f + 14, 8);
    if (tag != job->tag)
        return FRAME_OTHER;
    memcpy(seq, f + 22, 8);
    if (len != job->frame_len || memcmp(f, dst, 6) || memcmp(f + 6, src, 6))
        return FRAME_BAD;
    for (size_t k = HEAD; k < len; k++)
        if (f[k] != (uint8_t)(*seq + k))
            return FRAME_BAD;
    return FRAME_OURS;
}

/* Counts one received frame into out; returns 1 when it is the job's (checked), else 0. */
static int account(struct mshv_netbench_result *out, const uint8_t *f, size_t len, const struct mshv_netbench_job *job,
                   const uint8_t *dst, const uint8_t *src, uint64_t t, uint64_t *last_seq, uint64_t *seq)
{
    switch (frame_check(f, len, job, dst, src, seq)) {
    case FRAME_OTHER:
        out->other++;
        return 0;
    case FRAME_BAD:
        out->mismatches++;
        return 0;
    }
    if (out->frames && *seq <= *last_seq)
        out->reordered++;
    *last_seq = *seq;
    if (!out->frames)
        out->first_ns = t;
    out->last_ns = t;
    out->frames++;
    out->bytes += len;
    return 1;
}

static int job_valid(const struct mshv_netbench_job *job, uint32_t max_len, char *err, size_t errlen)
{
    if (job->frame_len < 60 || job->frame_len > max_len) {
        snprintf(err, errlen, "frame length %u is not within 60..%u", job->frame_len, max_len);
        return 0;
    }
    if (job->mode > MODE_ECHO) {
        snprintf(err, errlen, "mode %u is not send, receive, round trip or echo", job->mode);
        return 0;
    }
    if (!job->count && (job->mode != MODE_SEND || !job->duration_ns)) {
        snprintf(err, errlen, "neither a count nor (sending) a duration");
        return 0;
    }
    if (!job->idle_ms) {
        snprintf(err, errlen, "idle_ms is 0");
        return 0;
    }
    return 1;
}

static int more_to_send(const struct mshv_netbench_job *job, uint64_t sent, uint64_t start)
{
    return job->count ? sent < job->count : mshv_netbench_now_ns() - start < job->duration_ns;
}

/* -- the driver --------------------------------------------------------------------------------------- */

struct ring {
    struct desc *desc;
    uint16_t *avail_idx_p, *avail_ring, *used_event;
    uint16_t *used_idx_p, *avail_event;
    struct used_elem *used_ring;
    uint16_t avail_idx, last_used;
    int kick, call;
};

struct netq {
    uint8_t *ram;
    uint64_t ram_size;
    struct mshv_netq_layout l;
    struct ring rx, tx;
    int event_idx;
    uint16_t *tx_free;
    uint32_t ntx_free;
    uint8_t frame[MAX_FRAME + HDR]; /* a merged frame put back together */
    char err[256];
};

static int fail(struct netq *q, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(q->err, sizeof q->err, fmt, ap);
    va_end(ap);
    return -1;
}

static int in_ram(const struct netq *q, uint64_t gpa, uint64_t len)
{
    return gpa <= q->ram_size && len <= q->ram_size - gpa;
}

static void ring_init(struct netq *q, struct ring *r, uint64_t desc, uint64_t avail, uint64_t used, int kick, int call)
{
    uint16_t n = q->l.size;
    r->desc = (struct desc *)(q->ram + desc);
    uint16_t *a = (uint16_t *)(q->ram + avail);
    a[0] = 0; /* flags: interrupts wanted (without EVENT_IDX) */
    r->avail_idx_p = &a[1];
    r->avail_ring = &a[2];
    r->used_event = &a[2 + n];
    uint16_t *u = (uint16_t *)(q->ram + used);
    r->used_idx_p = &u[1];
    r->used_ring = (struct used_elem *)&u[2];
    r->avail_event = (uint16_t *)&r->used_ring[n];
    r->avail_idx = __atomic_load_n(r->avail_idx_p, __ATOMIC_ACQUIRE);
    r->last_used = __atomic_load_n(r->used_idx_p, __ATOMIC_ACQUIRE);
    r->kick = kick;
    r->call = call;
}

/* virtio 1.2 section 2.7.10: notify when new_idx passed event since old. */
static int need_event(uint16_t event, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

/* Publishes what was added since old and kicks if the device asked for it. */
static int publish(struct netq *q, struct ring *r, uint16_t old, struct mshv_netbench_result *out)
{
    if (r->avail_idx == old)
        return 0;
    __atomic_store_n(r->avail_idx_p, r->avail_idx, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* the index is visible before we read the device's wish */
    int kick = q->event_idx ? need_event(__atomic_load_n(r->avail_event, __ATOMIC_ACQUIRE), r->avail_idx, old) : 1;
    if (kick) {
        uint64_t one = 1;
        if (write(r->kick, &one, sizeof one) != sizeof one)
            return fail(q, "kick eventfd: %s", strerror(errno));
        out->kicks++;
    }
    return 0;
}

/* Sleeps until the device used something on r (interrupt re-armed, then one more look); 1 used, 0 timeout. */
static int wait_used(struct netq *q, struct ring *r, uint32_t ms, struct mshv_netbench_result *out)
{
    if (__atomic_load_n(r->used_idx_p, __ATOMIC_ACQUIRE) != r->last_used)
        return 1;
    if (q->event_idx) {
        __atomic_store_n(r->used_event, r->last_used, __ATOMIC_RELEASE);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (__atomic_load_n(r->used_idx_p, __ATOMIC_ACQUIRE) != r->last_used)
            return 1;
    }
    struct pollfd p = {r->call, POLLIN, 0};
    int n = poll(&p, 1, (int)ms);
    if (n < 0)
        return fail(q, "poll on a call eventfd: %s", strerror(errno));
    if (n == 0)
        return 0;
    uint64_t v;
    if (read(r->call, &v, sizeof v) < 0 && errno != EAGAIN)
        return fail(q, "call eventfd: %s", strerror(errno));
    out->waits++;
    return 1;
}

/* Takes back the device's finished tx buffers. */
static int reap_tx(struct netq *q)
{
    uint16_t used = __atomic_load_n(q->tx.used_idx_p, __ATOMIC_ACQUIRE);
    while (q->tx.last_used != used) {
        struct used_elem e = q->tx.used_ring[q->tx.last_used % q->l.size];
        q->tx.last_used++;
        if (e.id >= q->l.size)
            return fail(q, "the device used tx descriptor %u, outside the ring", e.id);
        q->tx_free[q->ntx_free++] = (uint16_t)e.id;
    }
    return 0;
}

static void post_rx(struct netq *q, uint16_t id)
{
    q->rx.avail_ring[q->rx.avail_idx % q->l.size] = id;
    q->rx.avail_idx++;
}

void *mshv_netq_new(void *ram, uint64_t ram_size, const struct mshv_netq_layout *l, int rx_kick, int rx_call,
                    int tx_kick, int tx_call, int event_idx)
{
    uint16_t n = l->size;
    if (n == 0 || (n & (n - 1)) || l->buf_size < HDR + 60 || l->rx_len > l->buf_size ||
        (l->rx_len && l->rx_len < (l->mrg_rxbuf ? HDR : HDR + 60)))
        return NULL;
    struct netq *q = calloc(1, sizeof *q);
    if (!q)
        return NULL;
    q->ram = ram;
    q->ram_size = ram_size;
    q->l = *l;
    uint64_t bufs = (uint64_t)n * l->buf_size;
    if (!in_ram(q, l->rx_desc, 16ull * n) || !in_ram(q, l->rx_avail, 6 + 2ull * n) ||
        !in_ram(q, l->rx_used, 6 + 8ull * n) || !in_ram(q, l->tx_desc, 16ull * n) ||
        !in_ram(q, l->tx_avail, 6 + 2ull * n) || !in_ram(q, l->tx_used, 6 + 8ull * n) || !in_ram(q, l->rx_bufs, bufs) ||
        !in_ram(q, l->tx_bufs, bufs) || !(q->tx_free = calloc(n, sizeof *q->tx_free))) {
        free(q);
        return NULL;
    }
    q->event_idx = event_idx;
    ring_init(q, &q->rx, l->rx_desc, l->rx_avail, l->rx_used, rx_kick, rx_call);
    ring_init(q, &q->tx, l->tx_desc, l->tx_avail, l->tx_used, tx_kick, tx_call);
    for (uint16_t i = 0; i < n; i++) {
        q->rx.desc[i] = (struct desc){l->rx_bufs + (uint64_t)i * l->buf_size, l->rx_len ? l->rx_len : l->buf_size,
                                      DESC_F_WRITE, 0};
        q->tx.desc[i] = (struct desc){l->tx_bufs + (uint64_t)i * l->buf_size, 0, 0, 0};
        q->tx_free[i] = (uint16_t)(n - 1 - i);
    }
    q->ntx_free = n;
    /* Every rx buffer is the device's from the start, as a guest fills its receive queue at probe. */
    uint16_t old = q->rx.avail_idx;
    for (uint16_t i = 0; i < n; i++)
        post_rx(q, i);
    struct mshv_netbench_result scratch;
    if (publish(q, &q->rx, old, &scratch) != 0) {
        free(q->tx_free);
        free(q);
        return NULL;
    }
    return q;
}

void mshv_netq_free(void *qv)
{
    struct netq *q = qv;
    if (q)
        free(q->tx_free);
    free(q);
}

int mshv_netq_error(void *qv, char *buf, size_t len)
{
    struct netq *q = qv;
    snprintf(buf, len, "%s", q->err);
    return (int)strlen(q->err);
}

/* Queues one out-frame in a free tx slot (the caller made sure there is one). */
static void queue_tx(struct netq *q, const struct mshv_netbench_job *job, uint64_t seq)
{
    uint16_t id = q->tx_free[--q->ntx_free];
    uint8_t *buf = q->ram + q->l.tx_bufs + (uint64_t)id * q->l.buf_size;
    memset(buf, 0, HDR); /* no offload: flags 0, GSO_NONE */
    frame_fill(buf + HDR, job->frame_len, BROADCAST, job->guest_mac, job->tag, seq);
    q->tx.desc[id].len = HDR + job->frame_len;
    q->tx.avail_ring[q->tx.avail_idx % q->l.size] = id;
    q->tx.avail_idx++;
}

/* Reaps the rx used ring: each frame checked and counted, its buffer posted again (published, kicked if asked).
 * *got is set when the frame with sequence number want arrived (round trips). */
static int reap_rx(struct netq *q, const struct mshv_netbench_job *job, struct mshv_netbench_result *out,
                   uint64_t *last_seq, uint64_t want, int *got)
{
    uint16_t used = __atomic_load_n(q->rx.used_idx_p, __ATOMIC_ACQUIRE), old = q->rx.avail_idx;
    if (used == q->rx.last_used)
        return 0;
    uint64_t t = mshv_netbench_now_ns();
    uint32_t rx_len = q->l.rx_len ? q->l.rx_len : q->l.buf_size;
    while (q->rx.last_used != used) {
        struct used_elem e = q->rx.used_ring[q->rx.last_used % q->l.size];
        q->rx.last_used++;
        if (e.id >= q->l.size || e.len < HDR || e.len > rx_len)
            return fail(q, "the device used rx descriptor %u with length %u", e.id, e.len);
        const uint8_t *buf = q->ram + q->l.rx_bufs + (uint64_t)e.id * q->l.buf_size;
        const uint8_t *f = buf + HDR;
        size_t len = e.len - HDR;
        out->chains++;
        post_rx(q, (uint16_t)e.id);
        if (q->l.mrg_rxbuf) {
            /* virtio 1.2 5.1.6.4: num_buffers chains, the first with the header, published together */
            uint16_t nb = (uint16_t)(buf[10] | buf[11] << 8);
            if (nb == 0 || (uint16_t)(used - q->rx.last_used) < nb - 1)
                return fail(q, "num_buffers %u with %u used entries published", nb, (uint16_t)(used - q->rx.last_used) + 1);
            memcpy(q->frame, f, len);
            for (uint16_t k = 1; k < nb; k++) {
                struct used_elem c = q->rx.used_ring[q->rx.last_used % q->l.size];
                q->rx.last_used++;
                if (c.id >= q->l.size || c.len > rx_len || len + c.len > sizeof q->frame)
                    return fail(q, "the device used rx descriptor %u with length %u in a merged frame", c.id, c.len);
                memcpy(q->frame + len, q->ram + q->l.rx_bufs + (uint64_t)c.id * q->l.buf_size, c.len);
                len += c.len;
                out->chains++;
                post_rx(q, (uint16_t)c.id);
            }
            f = q->frame;
        }
        uint64_t seq;
        if (account(out, f, len, job, job->guest_mac, job->peer_mac, t, last_seq, &seq) && seq == want)
            *got = 1;
    }
    return publish(q, &q->rx, old, out);
}

static int drive_send(struct netq *q, const struct mshv_netbench_job *job, struct mshv_netbench_result *out)
{
    uint64_t start = mshv_netbench_now_ns();
    while (more_to_send(job, out->frames, start)) {
        if (reap_tx(q) != 0)
            return -1;
        if (!q->ntx_free) {
            int r = wait_used(q, &q->tx, job->idle_ms, out);
            if (r <= 0)
                return r < 0 ? -1 : fail(q, "no tx buffer back within %u ms (ring full)", job->idle_ms);
            continue;
        }
        uint16_t old = q->tx.avail_idx;
        if (!out->frames)
            out->first_ns = mshv_netbench_now_ns();
        while (q->ntx_free && more_to_send(job, out->frames, start)) {
            queue_tx(q, job, out->frames);
            out->frames++;
            out->bytes += job->frame_len;
        }
        if (publish(q, &q->tx, old, out) != 0)
            return -1;
    }
    /* Done when the device has written every frame to the tap. */
    while (reap_tx(q) == 0 && q->ntx_free < q->l.size) {
        int r = wait_used(q, &q->tx, job->idle_ms, out);
        if (r <= 0)
            return r < 0 ? -1 : fail(q, "%u tx buffers not back within %u ms", q->l.size - q->ntx_free, job->idle_ms);
    }
    out->last_ns = mshv_netbench_now_ns();
    return q->err[0] ? -1 : 0;
}

static int drive_recv(struct netq *q, const struct mshv_netbench_job *job, struct mshv_netbench_result *out)
{
    uint64_t last_seq = 0;
    int got = 0;
    while (out->frames < job->count) {
        if (reap_rx(q, job, out, &last_seq, UINT64_MAX, &got) != 0)
            return -1;
        if (out->frames >= job->count)
            break;
        int r = wait_used(q, &q->rx, out->frames ? job->idle_ms : job->start_ms, out);
        if (r < 0)
            return -1;
        if (r == 0) {
            if (!out->frames)
                return fail(q, "no frame within %u ms", job->start_ms);
            break; /* the sender is done (what it sent beyond is lost): the caller compares counts */
        }
    }
    return 0;
}

static int drive_rtt(struct netq *q, const struct mshv_netbench_job *job, struct mshv_netbench_result *out,
                     uint64_t *samples)
{
    uint64_t last_seq = 0;
    struct mshv_netbench_result rx = {0};
    for (uint64_t i = 0; i < job->count; i++) {
        if (reap_tx(q) != 0)
            return -1;
        if (!q->ntx_free)
            return fail(q, "no tx buffer free for round trip %llu", (unsigned long long)i);
        /* From before the frame is built, as the floor's clock starts before its write. */
        uint64_t t0 = mshv_netbench_now_ns();
        uint16_t old = q->tx.avail_idx;
        queue_tx(q, job, i);
        if (publish(q, &q->tx, old, out) != 0)
            return -1;
        int got = 0;
        for (;;) {
            if (reap_rx(q, job, &rx, &last_seq, i, &got) != 0)
                return -1;
            if (got)
                break;
            int r = wait_used(q, &q->rx, job->idle_ms, out);
            if (r < 0)
                return -1;
            if (r == 0)
                return fail(q, "round trip %llu: no echo within %u ms", (unsigned long long)i, job->idle_ms);
        }
        uint64_t t1 = rx.last_ns;
        if (samples)
            samples[i] = t1 - t0;
        if (!i)
            out->first_ns = t0;
        out->last_ns = t1;
        out->frames++;
        out->bytes += job->frame_len;
    }
    out->mismatches = rx.mismatches;
    out->other = rx.other;
    out->reordered = rx.reordered;
    out->kicks += rx.kicks;
    /* The tx buffers come back before the next run reuses the ring. */
    while (reap_tx(q) == 0 && q->ntx_free < q->l.size) {
        int r = wait_used(q, &q->tx, job->idle_ms, out);
        if (r <= 0)
            return r < 0 ? -1 : fail(q, "tx buffers not back within %u ms", job->idle_ms);
    }
    return q->err[0] ? -1 : 0;
}

int mshv_netq_run(void *qv, const struct mshv_netbench_job *job, struct mshv_netbench_result *out, uint64_t *samples)
{
    struct netq *q = qv;
    memset(out, 0, sizeof *out);
    q->err[0] = 0;
    if (!job_valid(job, q->l.buf_size - HDR, q->err, sizeof q->err))
        return -1;
    switch (job->mode) {
    case MODE_SEND:
        return drive_send(q, job, out);
    case MODE_RECV:
        return drive_recv(q, job, out);
    case MODE_RTT:
        return drive_rtt(q, job, out, samples);
    }
    return fail(q, "mode %u is the peer's", job->mode);
}

/* -- the floor: the same frames through a bare tap fd (nonblocking, IFF_VNET_HDR with a 12-byte header) ---- */

/* Waits for the tap to be readable; 1 readable, 0 timeout, -1 error. */
static int tap_wait(int fd, uint32_t ms, struct mshv_netbench_result *out)
{
    struct pollfd p = {fd, POLLIN, 0};
    int n = poll(&p, 1, (int)ms);
    if (n > 0)
        out->waits++;
    return n;
}

/* Reads every frame waiting on the tap into out; *got when the frame numbered want was among them. */
static int tap_drain(int fd, const struct mshv_netbench_job *job, struct mshv_netbench_result *out,
                     uint64_t *last_seq, uint64_t want, int *got, uint8_t *buf)
{
    for (;;) {
        ssize_t r = read(fd, buf, MAX_FRAME + HDR);
        if (r < 0)
            return errno == EAGAIN ? 0 : -1;
        uint64_t seq;
        if (r >= HDR && account(out, buf + HDR, (size_t)r - HDR, job, job->guest_mac, job->peer_mac,
                                mshv_netbench_now_ns(), last_seq, &seq) &&
            seq == want)
            *got = 1;
        if (out->frames >= job->count && job->mode == MODE_RECV)
            return 0;
    }
}

static int tap_send(int fd, const struct mshv_netbench_job *job, uint8_t *buf, uint64_t seq)
{
    memset(buf, 0, HDR);
    frame_fill(buf + HDR, job->frame_len, BROADCAST, job->guest_mac, job->tag, seq);
    for (;;) {
        ssize_t w = write(fd, buf, HDR + job->frame_len);
        if (w == (ssize_t)(HDR + job->frame_len))
            return 0;
        if (w >= 0 || errno != EAGAIN)
            return -1;
    }
}

int mshv_nettap_run(int fd, const struct mshv_netbench_job *job, struct mshv_netbench_result *out, uint64_t *samples,
                    char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    if (!job_valid(job, MAX_FRAME, err, errlen))
        return -1;
    uint8_t *buf = malloc(MAX_FRAME + HDR);
    if (!buf) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    int rc = 0, got = 0;
    uint64_t last_seq = 0, start = mshv_netbench_now_ns();
    struct mshv_netbench_result rx = {0};
    switch (job->mode) {
    case MODE_SEND:
        out->first_ns = start;
        for (; more_to_send(job, out->frames, start); out->frames++) {
            if (tap_send(fd, job, buf, out->frames) != 0) {
                rc = say(err, errlen, "tap write: %s", strerror(errno));
                break;
            }
            out->bytes += job->frame_len;
        }
        out->last_ns = mshv_netbench_now_ns();
        break;
    case MODE_RECV:
        while (out->frames < job->count) {
            if (tap_drain(fd, job, out, &last_seq, UINT64_MAX, &got, buf) != 0) {
                rc = say(err, errlen, "tap read: %s", strerror(errno));
                break;
            }
            if (out->frames >= job->count)
                break;
            int n = tap_wait(fd, out->frames ? job->idle_ms : job->start_ms, out);
            if (n < 0) {
                rc = say(err, errlen, "poll on the tap: %s", strerror(errno));
                break;
            }
            if (n == 0) {
                if (!out->frames)
                    rc = say(err, errlen, "no frame within %u ms", job->start_ms);
                break;
            }
        }
        break;
    case MODE_RTT:
        for (uint64_t i = 0; i < job->count && rc == 0; i++) {
            /* Before the write: the echo can be back before write(2) returns (the frame's receive path,
             * the peer's wake-up among it, runs in the writer's softirq). */
            uint64_t t0 = mshv_netbench_now_ns();
            if (tap_send(fd, job, buf, i) != 0) {
                rc = say(err, errlen, "tap write: %s", strerror(errno));
                break;
            }
            got = 0;
            while (!got) {
                if (tap_drain(fd, job, &rx, &last_seq, i, &got, buf) != 0) {
                    rc = say(err, errlen, "tap read: %s", strerror(errno));
                    break;
                }
                if (got)
                    break;
                int n = tap_wait(fd, job->idle_ms, out);
                if (n <= 0) {
                    rc = say(err, errlen, "round trip %llu: %s", (unsigned long long)i,
                                  n < 0 ? strerror(errno) : "no echo in time");
                    break;
                }
            }
            if (rc)
                break;
            if (samples)
                samples[i] = rx.last_ns - t0;
            if (!i)
                out->first_ns = t0;
            out->last_ns = rx.last_ns;
            out->frames++;
            out->bytes += job->frame_len;
        }
        out->mismatches = rx.mismatches;
        out->other = rx.other;
        out->reordered = rx.reordered;
        break;
    default:
        rc = say(err, errlen, "mode %u is the peer's", job->mode);
    }
    free(buf);
    return rc;
}

/* -- the peer: an AF_PACKET socket bound to the tap's interface in the namespace, on its own thread ------- */

struct netpeer {
    int fd;
    struct mshv_netbench_job job;
    struct mshv_netbench_result out;
    pthread_t thread;
    int rc;
    char err[160];
    uint8_t bufs[PEER_BATCH][MAX_FRAME];
    struct mmsghdr msgs[PEER_BATCH];
    struct iovec iov[PEER_BATCH];
    struct sockaddr_ll from[PEER_BATCH];
};

static int peer_fail(struct netpeer *p, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->err, sizeof p->err, fmt, ap);
    va_end(ap);
    return -1;
}

static void peer_msgs(struct netpeer *p, unsigned n, uint32_t len, int names)
{
    for (unsigned i = 0; i < n; i++) {
        p->iov[i] = (struct iovec){p->bufs[i], len};
        memset(&p->msgs[i], 0, sizeof p->msgs[i]);
        p->msgs[i].msg_hdr.msg_iov = &p->iov[i];
        p->msgs[i].msg_hdr.msg_iovlen = 1;
        if (names) {
            p->msgs[i].msg_hdr.msg_name = &p->from[i];
            p->msgs[i].msg_hdr.msg_namelen = sizeof p->from[i];
        }
    }
}

static int peer_sendall(struct netpeer *p, unsigned n)
{
    unsigned done = 0;
    while (done < n) {
        int k = sendmmsg(p->fd, p->msgs + done, n - done, 0);
        if (k < 0) {
            if (errno == EINTR || errno == ENOBUFS || errno == EAGAIN)
                continue;
            return peer_fail(p, "sendmmsg: %s", strerror(errno));
        }
        done += (unsigned)k;
    }
    return 0;
}

static int peer_source(struct netpeer *p)
{
    const struct mshv_netbench_job *job = &p->job;
    uint64_t start = mshv_netbench_now_ns();
    p->out.first_ns = start;
    while (more_to_send(job, p->out.frames, start)) {
        unsigned n = 0;
        for (; n < PEER_BATCH && more_to_send(job, p->out.frames + n, start); n++)
            frame_fill(p->bufs[n], job->frame_len, job->guest_mac, job->peer_mac, job->tag, p->out.frames + n);
        peer_msgs(p, n, job->frame_len, 0);
        if (peer_sendall(p, n) != 0)
            return -1;
        p->out.frames += n;
        p->out.bytes += (uint64_t)n * job->frame_len;
    }
    p->out.last_ns = mshv_netbench_now_ns();
    return 0;
}

/* Sink and echo: receive out-frames (checked); echo sends each back as an in-frame at once. */
static int peer_receive(struct netpeer *p)
{
    const struct mshv_netbench_job *job = &p->job;
    uint64_t last_seq = 0, seq;
    while (p->out.frames < job->count) {
        struct pollfd pf = {p->fd, POLLIN, 0};
        int n = poll(&pf, 1, (int)(p->out.frames ? job->idle_ms : job->start_ms));
        if (n < 0)
            return peer_fail(p, "poll: %s", strerror(errno));
        if (n == 0) {
            if (!p->out.frames)
                return peer_fail(p, "no frame within %u ms", job->start_ms);
            if (job->mode == MODE_ECHO)
                return peer_fail(p, "echo: nothing for %u ms after %llu frames", job->idle_ms,
                                 (unsigned long long)p->out.frames);
            return 0; /* the sender is done: the caller compares counts */
        }
        p->out.waits++;
        peer_msgs(p, PEER_BATCH, MAX_FRAME, 1);
        int k = recvmmsg(p->fd, p->msgs, PEER_BATCH, MSG_DONTWAIT, NULL);
        if (k < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue;
            return peer_fail(p, "recvmmsg: %s", strerror(errno));
        }
        uint64_t t = mshv_netbench_now_ns();
        unsigned echo = 0;
        for (int i = 0; i < k; i++) {
            if (p->from[i].sll_pkttype == PACKET_OUTGOING) {
                p->out.other++;
                continue;
            }
            uint8_t *f = p->bufs[i];
            size_t len = p->msgs[i].msg_len;
            if (!account(&p->out, f, len, job, BROADCAST, job->guest_mac, t, &last_seq, &seq))
                continue;
            if (job->mode == MODE_ECHO) {
                memcpy(f, job->guest_mac, 6);
                memcpy(f + 6, job->peer_mac, 6);
                if (echo != (unsigned)i)
                    memcpy(p->bufs[echo], f, len);
                p->iov[echo].iov_len = len;
                echo++;
            }
        }
        if (echo) {
            for (unsigned i = 0; i < echo; i++) {
                p->iov[i].iov_base = p->bufs[i];
                p->msgs[i].msg_hdr.msg_name = NULL;
                p->msgs[i].msg_hdr.msg_namelen = 0;
            }
            if (peer_sendall(p, echo) != 0)
                return -1;
        }
    }
    return 0;
}

/* The socket's drop count since the last call (reading PACKET_STATISTICS resets it). */
static uint64_t socket_drops(int fd)
{
    struct tpacket_stats st = {0};
    socklen_t len = sizeof st;
    return getsockopt(fd, SOL_PACKET, PACKET_STATISTICS, &st, &len) == 0 ? st.tp_drops : 0;
}

static void *peer_main(void *arg)
{
    struct netpeer *p = arg;
    if (p->job.mode == MODE_SEND) {
        p->rc = peer_source(p);
    } else {
        socket_drops(p->fd);
        p->rc = peer_receive(p);
        p->out.drops = socket_drops(p->fd);
    }
    return NULL;
}

void *mshv_netpeer_start(int sock_fd, const struct mshv_netbench_job *job)
{
    struct netpeer *p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    p->fd = sock_fd;
    p->job = *job;
    /* The peer sends in-frames, receives out-frames, or echoes them: never round trips of its own. */
    if (!job_valid(job, MAX_FRAME, p->err, sizeof p->err) || job->mode == MODE_RTT ||
        pthread_create(&p->thread, NULL, peer_main, p) != 0) {
        free(p);
        return NULL;
    }
    return p;
}

int mshv_netpeer_join(void *pv, struct mshv_netbench_result *out, char *err, size_t errlen)
{
    struct netpeer *p = pv;
    pthread_join(p->thread, NULL);
    *out = p->out;
    snprintf(err, errlen, "%s", p->err);
    int rc = p->rc;
    free(p);
    return rc;
}
