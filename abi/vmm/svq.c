/* mshv-libvirt virtio-blk shadow virtqueue relay (virtio 1.2 section 2.7, split rings; vDPA's SVQ idea).
 *
 * qemu-storage-daemon's vhost-user-blk export keeps no block accounting, so the counters libvirt reads
 * (rd/wr/flush requests, bytes, total times) are made here, on the data path, in C. The backend is not given
 * the guest's rings but VMM-owned ones of the same size in a memfd it maps through the vhost-user memory
 * table. One thread per disk sleeps in epoll on each queue's guest kick eventfd (MSHV_IOEVENTFD) and backend
 * call eventfd, and:
 *   - copies each new guest chain's descriptors into the shadow table at the same indices (addresses stay
 *     guest-physical: the backend maps guest RAM; an indirect descriptor is copied as it is, its table is
 *     read in guest RAM), parses the request header (type) and the chain's lengths (data bytes) and stamps
 *     the request; publishes the head on the shadow available ring and kicks the backend as its ring asks;
 *   - takes each shadow used entry (same id: the indices never change), reads the request's status byte,
 *     accounts it, marks every guest page the device wrote (device-writable buffers, the used ring) in a
 *     dirty bitmap, publishes it on the guest's used ring and fires the guest's irqfd as its ring asks.
 * EVENT_IDX (or the NO_NOTIFY / NO_INTERRUPT flags) is honoured on both sides, the relay playing the device
 * to the guest and the driver to the backend. With poll_ns > 0 the thread busy-polls both sides, their
 * notifications off, for a window after its last work before sleeping again: the window adapts as QEMU's
 * (poll-max-ns = poll_ns, doubled while wake-ups come sooner than that, halved while they come later).
 *
 * Every guest address is checked to lie wholly inside one guest RAM region; a malformed queue (index
 * outside the table, a loop, a head already in flight, an available index too far ahead) stops the relay,
 * records why and signals the error eventfd (the VMM then sets DEVICE_NEEDS_RESET). A used id from the
 * backend that is not in flight does the same.
 *
 * Start/stop are requests under a mutex acknowledged through a condition variable, so the caller knows the
 * thread has let go of the rings when the call returns (a device thread may call them: futex and write). The
 * thread, its eventfds and request tables are made by mshv_svq_new, on the VMM's main thread (whose seccomp
 * list has eventfd2, clone and the allocator); made after the sandbox, it narrows its own (MSHV_SANDBOX_BLK). */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "sandbox.h"
#include "svq.h"

#define MAX_REGIONS 8
#define MAX_QUEUES MSHV_SVQ_MAX_QUEUES
#define MAX_QSIZE MSHV_SVQ_MAX_QSIZE
#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4
#define F_NO_NOTIFY 1 /* VIRTQ_USED_F_NO_NOTIFY and VIRTQ_AVAIL_F_NO_INTERRUPT alike */
#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_WRITE_ZEROES 13
#define HDR 16u /* struct virtio_blk_outhdr: type, reserved, sector */
#define S_OK 0
#define PAGE 4096u
/* Each queue's shadow rings in the memfd: table, available and used ring page-aligned within one stride. */
#define OFF_DESC 0
#define OFF_AVAIL (16u * MAX_QSIZE)
#define OFF_USED (OFF_AVAIL + PAGE)
#define STRIDE (OFF_USED + 3u * PAGE)
#define SHADOW_SIZE ((size_t)STRIDE * MAX_QUEUES)

enum { CMD_NONE, CMD_START, CMD_STOP, CMD_QUIT };
enum { K_NONE, K_READ, K_WRITE, K_FLUSH, K_OTHER };

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct region {
    uint64_t gpa, size;
    uint8_t *host;
};

struct req {
    uint64_t t0;
    uint8_t *status; /* the chain's last device-writable byte, in guest RAM */
    uint64_t bytes;
    uint8_t kind; /* K_NONE: not in flight */
};

struct vq {
    uint16_t size;
    uint64_t desc, avail, used; /* guest-physical */
    int guest_kick, guest_call, backend_kick, backend_call;
    uint16_t last_avail, used_idx, signalled; /* guest side: next avail to read, used index, at last irq */
    uint16_t s_avail, s_last_used, s_kicked;  /* shadow side: avail index, next used to read, at last kick */
    uint8_t *g_desc, *g_avail, *g_used;       /* host pointers while running */
    struct desc *s_desc;
    uint8_t *s_avail_p, *s_used_p;
    struct req *reqs; /* by head */
};

struct mshv_svq {
    int err_fd, ctl, ep, shadow_fd;
    uint8_t *shadow;
    struct region regions[MAX_REGIONS];
    int nregions;
    uint64_t *dirty; /* one bit a 4 KiB guest page, up to dirty_pages */
    uint64_t dirty_pages;
    struct vq q[MAX_QUEUES];
    int event_idx, running, watching;
    uint64_t poll_ns;
    pthread_t thread;
    int have_thread;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int cmd, cmd_arg;
    uint64_t cmd_poll;
    unsigned long req_gen, ack_gen;
    char error[160];
    struct mshv_svq_stats st;
};

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void stat_add(uint64_t *c, uint64_t v)
{
    __atomic_fetch_add(c, v, __ATOMIC_RELAXED);
}

static void *translate(struct mshv_svq *s, uint64_t gpa, uint64_t len)
{
    for (int i = 0; i < s->nregions; i++) {
        struct region *r = &s->regions[i];
        if (gpa >= r->gpa && len <= r->size && gpa - r->gpa <= r->size - len)
            return r->host + (gpa - r->gpa);
    }
    return NULL;
}

static void mark_dirty(struct mshv_svq *s, uint64_t gpa, uint64_t len)
{
    if (!len)
        return;
    uint64_t first = gpa / PAGE, last = (gpa + len - 1) / PAGE;
    for (uint64_t p = first; p <= last && p < s->dirty_pages; p++)
        __atomic_fetch_or(&s->dirty[p / 64], 1ull << (p % 64), __ATOMIC_RELAXED);
}

static void fail(struct mshv_svq *s, int qi, const char *what, unsigned long v)
{
    if (!s->error[0])
        snprintf(s->error, sizeof(s->error), "queue %d: %s (%lu)", qi, what, v);
    s->running = 0;
    uint64_t one = 1;
    ssize_t ignored = write(s->err_fd, &one, sizeof(one));
    (void)ignored;
}

static uint16_t load16(const uint8_t *p)
{
    return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE);
}

static void store16(uint8_t *p, uint16_t v)
{
    __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE);
}

/* virtio 1.2 section 2.7.10: notify when new_idx passed event since old. */
static int need_event(uint16_t event, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

struct walk {
    uint8_t hdr[2 * HDR]; /* the request header, then a write-zeroes request's first segment */
    uint32_t hdr_len;
    uint64_t readable, writable;
    uint64_t last_w_gpa; /* the last device-writable buffer: its last byte is the status */
    uint32_t last_w_len;
};

static void walk_one(struct walk *w, const uint8_t *host, const struct desc *d)
{
    if (d->flags & DESC_F_WRITE) {
        w->writable += d->len;
        w->last_w_gpa = d->addr;
        w->last_w_len = d->len;
    } else {
        if (w->hdr_len < sizeof(w->hdr)) {
            uint32_t take = sizeof(w->hdr) - w->hdr_len;
            take = take < d->len ? take : d->len;
            memcpy(w->hdr + w->hdr_len, host, take);
            w->hdr_len += take;
        }
        w->readable += d->len;
    }
}

/* An indirect table (guest RAM): every entry checked and walked, nothing copied. */
static int walk_indirect(struct mshv_svq *s, int qi, const struct desc *ind, struct walk *w)
{
    if (ind->len % 16 || ind->len == 0 || ind->len / 16 > 0x10000u) {
        fail(s, qi, "indirect table of a bad length", ind->len);
        return -1;
    }
    const uint8_t *table = translate(s, ind->addr, ind->len);
    if (!table) {
        fail(s, qi, "indirect table outside guest RAM, length", ind->len);
        return -1;
    }
    uint32_t n = ind->len / 16, i = 0;
    for (uint32_t hops = 0;; hops++) {
        if (i >= n || hops >= n) {
            fail(s, qi, i >= n ? "indirect index outside its table" : "indirect chain loops", i);
            return -1;
        }
        struct desc d;
        memcpy(&d, table + 16 * (size_t)i, sizeof d);
        if (d.flags & DESC_F_INDIRECT) {
            fail(s, qi, "indirect descriptor inside an indirect table at", i);
            return -1;
        }
        const uint8_t *host = translate(s, d.addr, d.len);
        if (!host) {
            fail(s, qi, "indirect buffer outside guest RAM at", i);
            return -1;
        }
        walk_one(w, host, &d);
        if (!(d.flags & DESC_F_NEXT))
            return 0;
        i = d.next;
    }
}

/* Guest -> shadow: one chain copied; returns 1 when one was relayed, 0 when none is available, -1 on failure. */
static int relay_avail(struct mshv_svq *s, int qi, uint64_t t)
{
    struct vq *v = &s->q[qi];
    uint16_t avail = load16(v->g_avail + 2);
    if (avail == v->last_avail)
        return 0;
    if ((uint16_t)(avail - v->last_avail) > v->size) {
        fail(s, qi, "available index too far ahead", (uint16_t)(avail - v->last_avail));
        return -1;
    }
    uint16_t head = load16(v->g_avail + 4 + 2 * (size_t)(v->last_avail % v->size));
    if (head >= v->size) {
        fail(s, qi, "head outside the descriptor table", head);
        return -1;
    }
    if (v->reqs[head].kind != K_NONE) {
        fail(s, qi, "head made available while in flight", head);
        return -1;
    }
    struct walk w = {0};
    uint16_t idx = head;
    for (unsigned hops = 0;; hops++) {
        if (idx >= v->size || hops >= v->size) {
            fail(s, qi, idx >= v->size ? "descriptor index outside the table" : "descriptor chain loops from", idx);
            return -1;
        }
        struct desc d;
        memcpy(&d, v->g_desc + 16 * (size_t)idx, sizeof d);
        v->s_desc[idx] = d; /* what the backend serves is this copy, as counted */
        if (d.flags & DESC_F_INDIRECT) {
            if (walk_indirect(s, qi, &d, &w) < 0)
                return -1;
        } else {
            const uint8_t *host = translate(s, d.addr, d.len);
            if (!host) {
                fail(s, qi, "buffer outside guest RAM at descriptor", idx);
                return -1;
            }
            walk_one(&w, host, &d);
        }
        if (!(d.flags & DESC_F_NEXT))
            break;
        idx = d.next;
    }
    struct req *r = &v->reqs[head];
    uint32_t type;
    memcpy(&type, w.hdr, 4);
    r->kind = K_OTHER;
    r->bytes = 0;
    if (w.hdr_len >= HDR && w.writable >= 1) {
        if (type == T_IN) {
            r->kind = K_READ;
            r->bytes = w.writable - 1;
        } else if (type == T_OUT) {
            r->kind = K_WRITE;
            r->bytes = w.readable - HDR;
        } else if (type == T_FLUSH) {
            r->kind = K_FLUSH;
        } else if (type == T_WRITE_ZEROES && w.hdr_len == 2 * HDR) {
            /* QEMU's virtio-blk accounts a write-zeroes request as a write of its (one) segment's
             * num_sectors * 512 bytes (struct virtio_blk_discard_write_zeroes: le64 sector, le32
             * num_sectors, le32 flags); a discard it does not account, so it stays "other". */
            uint32_t sectors;
            memcpy(&sectors, w.hdr + HDR + 8, 4);
            r->kind = K_WRITE;
            r->bytes = (uint64_t)sectors * 512;
        }
    }
    r->status = w.writable ? translate(s, w.last_w_gpa + w.last_w_len - 1, 1) : NULL;
    r->t0 = t;
    store16(v->s_avail_p + 4 + 2 * (size_t)(v->s_avail % v->size), head);
    v->s_avail++;
    v->last_avail++;
    return 1;
}

/* The device-writable buffers of a completed chain are dirty guest pages (walked in the shadow copy). */
static void log_writes(struct mshv_svq *s, struct vq *v, uint16_t head)
{
    uint16_t idx = head;
    for (unsigned hops = 0; hops < v->size && idx < v->size; hops++) {
        struct desc d = v->s_desc[idx];
        if (d.flags & DESC_F_INDIRECT) {
            const uint8_t *table = translate(s, d.addr, d.len);
            for (uint32_t i = 0; table && i < d.len / 16; i++) {
                struct desc e;
                memcpy(&e, table + 16 * (size_t)i, sizeof e);
                if (e.flags & DESC_F_WRITE)
                    mark_dirty(s, e.addr, e.len);
            }
        } else if (d.flags & DESC_F_WRITE) {
            mark_dirty(s, d.addr, d.len);
        }
        if (!(d.flags & DESC_F_NEXT))
            break;
        idx = d.next;
    }
}

static void account(struct mshv_svq *s, struct req *r, uint64_t t)
{
    int ok = r->status && *(volatile uint8_t *)r->status == S_OK;
    uint64_t dt = t - r->t0;
    switch (r->kind) {
    case K_READ:
        if (ok) {
            stat_add(&s->st.rd_req, 1);
            stat_add(&s->st.rd_bytes, r->bytes);
            stat_add(&s->st.rd_total_ns, dt);
        } else {
            stat_add(&s->st.rd_failed, 1);
        }
        break;
    case K_WRITE:
        if (ok) {
            stat_add(&s->st.wr_req, 1);
            stat_add(&s->st.wr_bytes, r->bytes);
            stat_add(&s->st.wr_total_ns, dt);
        } else {
            stat_add(&s->st.wr_failed, 1);
        }
        break;
    case K_FLUSH:
        if (ok) {
            stat_add(&s->st.flush_req, 1);
            stat_add(&s->st.flush_total_ns, dt);
        } else {
            stat_add(&s->st.flush_failed, 1);
        }
        break;
    default:
        stat_add(&s->st.other_req, 1);
    }
    r->kind = K_NONE;
}

/* Shadow -> guest: one used entry; 1 when one was relayed, 0 when none, -1 on failure. */
static int relay_used(struct mshv_svq *s, int qi, uint64_t t)
{
    struct vq *v = &s->q[qi];
    uint16_t used = load16(v->s_used_p + 2);
    if (used == v->s_last_used)
        return 0;
    const uint8_t *e = v->s_used_p + 4 + 8 * (size_t)(v->s_last_used % v->size);
    uint32_t id, len;
    memcpy(&id, e, 4);
    memcpy(&len, e + 4, 4);
    if (id >= v->size || v->reqs[id].kind == K_NONE) {
        fail(s, qi, "the backend used a descriptor not in flight", id);
        return -1;
    }
    v->s_last_used++;
    log_writes(s, v, (uint16_t)id);
    account(s, &v->reqs[id], t);
    size_t slot = 4 + 8 * (size_t)(v->used_idx % v->size);
    memcpy(v->g_used + slot, &id, 4);
    memcpy(v->g_used + slot + 4, &len, 4);
    v->used_idx++;
    store16(v->g_used + 2, v->used_idx);
    return 1;
}

static void kick_backend(struct mshv_svq *s, struct vq *v)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* the index is visible before the backend's wish is read */
    int kick = s->event_idx ? need_event(load16(v->s_used_p + 4 + 8 * (size_t)v->size), v->s_avail, v->s_kicked)
                            : !(load16(v->s_used_p) & F_NO_NOTIFY);
    v->s_kicked = v->s_avail;
    if (kick) {
        uint64_t one = 1;
        ssize_t ignored = write(v->backend_kick, &one, sizeof(one));
        (void)ignored;
        stat_add(&s->st.backend_kicks, 1);
    }
}

static void interrupt_guest(struct mshv_svq *s, struct vq *v)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    int fire = s->event_idx ? need_event(load16(v->g_avail + 4 + 2 * (size_t)v->size), v->used_idx, v->signalled)
                            : !(load16(v->g_avail) & F_NO_NOTIFY);
    v->signalled = v->used_idx;
    if (fire && v->guest_call >= 0) {
        uint64_t one = 1;
        ssize_t ignored = write(v->guest_call, &one, sizeof(one));
        (void)ignored;
        stat_add(&s->st.guest_irqs, 1);
    }
}

/* Notifications from both sides of a queue, wanted (on) or not (off: the thread is polling). With EVENT_IDX an
 * index left behind asks for nothing more (as QEMU's virtio_queue_set_notification), else the flags say so. */
static void notifications(struct mshv_svq *s, struct vq *v, int on)
{
    if (s->event_idx) {
        if (on) {
            store16(v->g_used + 4 + 8 * (size_t)v->size, v->last_avail);  /* avail_event */
            store16(v->s_avail_p + 4 + 2 * (size_t)v->size, v->s_last_used); /* used_event */
        }
    } else {
        store16(v->g_used, on ? 0 : F_NO_NOTIFY);    /* the guest's kicks */
        store16(v->s_avail_p, on ? 0 : F_NO_NOTIFY); /* the backend's calls */
    }
}

/* Both directions of one queue until neither has work; ``armed``: notifications re-armed and both rings
 * looked at once more after a full fence before returning (else one pass, for polling). Returns whether any moved. */
static int serve(struct mshv_svq *s, int qi, int armed)
{
    struct vq *v = &s->q[qi];
    int any = 0;
    for (;;) {
        uint64_t t = now_ns();
        int avails = 0, useds = 0;
        while (s->running && relay_avail(s, qi, t) > 0)
            avails++;
        if (avails) {
            store16(v->s_avail_p + 2, v->s_avail);
            kick_backend(s, v);
        }
        while (s->running && relay_used(s, qi, t) > 0)
            useds++;
        if (useds) {
            mark_dirty(s, v->used, 6 + 8 * (uint64_t)v->size); /* the used ring is the device's write too */
            interrupt_guest(s, v);
        }
        if (!s->running)
            return any;
        any |= avails | useds;
        if (!armed)
            return any;
        notifications(s, v, 1);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (load16(v->g_avail + 2) == v->last_avail && load16(v->s_used_p + 2) == v->s_last_used)
            return any;
    }
}

static int map_queue(struct mshv_svq *s, int qi)
{
    struct vq *v = &s->q[qi];
    if (v->size > MAX_QSIZE || (v->size & (v->size - 1)) || v->desc % 16 || v->avail % 2 || v->used % 4) {
        fail(s, qi, "size or ring alignment invalid, size", v->size);
        return -1;
    }
    v->g_desc = translate(s, v->desc, 16ULL * v->size);
    v->g_avail = translate(s, v->avail, 6ULL + 2ULL * v->size);
    v->g_used = translate(s, v->used, 6ULL + 8ULL * v->size);
    if (!v->g_desc || !v->g_avail || !v->g_used) {
        fail(s, qi, "ring outside guest RAM, size", v->size);
        return -1;
    }
    uint8_t *base = s->shadow + (size_t)STRIDE * qi;
    memset(base, 0, STRIDE); /* the backend starts at index 0 (SET_VRING_BASE 0) */
    v->s_desc = (struct desc *)(base + OFF_DESC);
    v->s_avail_p = base + OFF_AVAIL;
    v->s_used_p = base + OFF_USED;
    v->s_avail = v->s_last_used = v->s_kicked = 0;
    v->signalled = v->used_idx;
    memset(v->reqs, 0, MAX_QSIZE * sizeof(*v->reqs));
    notifications(s, v, 1);
    return 0;
}

static void watch(struct mshv_svq *s, int on)
{
    if (s->watching == on) /* a relay stopped by a fault still watches until its stop request */
        return;
    s->watching = on;
    for (int i = 0; i < MAX_QUEUES; i++) {
        struct vq *v = &s->q[i];
        if (!v->size)
            continue;
        struct epoll_event k = {.events = EPOLLIN, .data.u32 = 1 + 2 * (uint32_t)i};
        struct epoll_event c = {.events = EPOLLIN, .data.u32 = 2 + 2 * (uint32_t)i};
        epoll_ctl(s->ep, on ? EPOLL_CTL_ADD : EPOLL_CTL_DEL, v->guest_kick, &k);
        epoll_ctl(s->ep, on ? EPOLL_CTL_ADD : EPOLL_CTL_DEL, v->backend_call, &c);
    }
}

static int handle_cmd(struct mshv_svq *s)
{
    int quit = 0;
    pthread_mutex_lock(&s->lock);
    if (s->req_gen != s->ack_gen) {
        switch (s->cmd) {
        case CMD_START:
            s->error[0] = 0;
            s->event_idx = s->cmd_arg;
            s->poll_ns = s->cmd_poll;
            s->running = 1;
            for (int i = 0; i < MAX_QUEUES && s->running; i++)
                if (s->q[i].size && map_queue(s, i) < 0)
                    s->running = 0;
            if (s->running)
                watch(s, 1);
            break;
        case CMD_STOP:
        case CMD_QUIT:
            s->running = 0;
            quit = s->cmd == CMD_QUIT;
            break;
        }
        if (!s->running)
            watch(s, 0);
        s->ack_gen = s->req_gen;
        pthread_cond_broadcast(&s->cond);
    }
    pthread_mutex_unlock(&s->lock);
    return quit;
}

static int serve_all(struct mshv_svq *s, int armed)
{
    int any = 0;
    for (int i = 0; i < MAX_QUEUES && s->running; i++)
        if (s->q[i].size)
            any |= serve(s, i, armed);
    return any;
}

static int command_waiting(struct mshv_svq *s)
{
    uint64_t pending;
    if (read(s->ctl, &pending, sizeof(pending)) != sizeof(pending))
        return 0;
    uint64_t one = 1; /* put back for epoll */
    ssize_t ignored = write(s->ctl, &one, sizeof(one));
    (void)ignored;
    return 1;
}

/* Busy-poll both sides with their notifications off for up to ``window`` ns after the last work (QEMU's
 * aio polling); then re-armed, and looked at once more, before the thread sleeps again. */
static void poll_rings(struct mshv_svq *s, uint64_t window)
{
    for (int i = 0; i < MAX_QUEUES; i++)
        if (s->q[i].size)
            notifications(s, &s->q[i], 0);
    uint64_t until = now_ns() + window;
    unsigned spins = 0;
    while (s->running && now_ns() < until) {
        if (serve_all(s, 0)) {
            stat_add(&s->st.polled, 1);
            until = now_ns() + window;
        } else {
            __builtin_ia32_pause();
        }
        if (++spins % 64 == 0 && command_waiting(s))
            break;
    }
    if (s->running)
        serve_all(s, 1);
}

static void *svq_main(void *arg)
{
    struct mshv_svq *s = arg;
    mshv_sandbox_thread_enter(MSHV_SANDBOX_BLK, "blk-relay");
    struct epoll_event evs[16];
    uint64_t window = 0; /* adaptive, within 0..poll_ns: grows while wake-ups come sooner than poll_ns */
    for (;;) {
        uint64_t slept = now_ns();
        int k = epoll_wait(s->ep, evs, 16, -1);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        slept = now_ns() - slept;
        int work = 0;
        for (int i = 0; i < k; i++) {
            uint64_t junk;
            uint32_t what = evs[i].data.u32;
            if (what == 0) {
                ssize_t ignored = read(s->ctl, &junk, sizeof(junk));
                (void)ignored;
                if (handle_cmd(s))
                    return NULL;
                window = 0;
            } else {
                struct vq *v = &s->q[(what - 1) / 2];
                int fd = what % 2 ? v->guest_kick : v->backend_call;
                ssize_t ignored = read(fd, &junk, sizeof(junk));
                (void)ignored;
                stat_add(what % 2 ? &s->st.guest_kicks : &s->st.backend_calls, 1);
                work = 1;
            }
        }
        if (!s->running || !serve_all(s, 1) || !s->poll_ns)
            continue;
        if (work) { /* QEMU's poll-grow/poll-shrink, by 2: a sleep shorter than poll_ns would have been caught */
            if (slept <= s->poll_ns)
                window = window ? (window * 2 < s->poll_ns ? window * 2 : s->poll_ns) : (s->poll_ns < 4000 ? s->poll_ns : 4000);
            else
                window = window / 2 < 1000 ? 0 : window / 2;
        }
        if (window)
            poll_rings(s, window);
    }
    return NULL;
}

void *mshv_svq_new(int error_fd, int queues)
{
    if (queues < 1 || queues > MAX_QUEUES)
        return NULL;
    struct mshv_svq *s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    s->err_fd = error_fd;
    s->shadow_fd = -1;
    s->shadow = MAP_FAILED;
    for (int i = 0; i < MAX_QUEUES; i++)
        s->q[i].guest_kick = s->q[i].guest_call = s->q[i].backend_kick = s->q[i].backend_call = -1;
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->cond, NULL);
    s->ctl = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    s->ep = epoll_create1(EPOLL_CLOEXEC);
    s->shadow_fd = memfd_create("mshv-blk-shadow", MFD_CLOEXEC);
    if (s->ctl < 0 || s->ep < 0 || s->shadow_fd < 0 || ftruncate(s->shadow_fd, SHADOW_SIZE) < 0)
        goto fail;
    s->shadow = mmap(NULL, SHADOW_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, s->shadow_fd, 0);
    if (s->shadow == MAP_FAILED)
        goto fail;
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = 0};
    if (epoll_ctl(s->ep, EPOLL_CTL_ADD, s->ctl, &ev) < 0)
        goto fail;
    for (int i = 0; i < queues; i++) {
        struct vq *v = &s->q[i];
        v->backend_kick = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        v->backend_call = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        v->reqs = calloc(MAX_QSIZE, sizeof(*v->reqs));
        if (v->backend_kick < 0 || v->backend_call < 0 || !v->reqs)
            goto fail;
    }
    if (pthread_create(&s->thread, NULL, svq_main, s) != 0)
        goto fail;
    s->have_thread = 1;
    return s;
fail:
    mshv_svq_free(s);
    return NULL;
}

int mshv_svq_shadow(void *h, int *fd, uint64_t *size, uint64_t *host)
{
    struct mshv_svq *s = h;
    *fd = s->shadow_fd;
    *size = SHADOW_SIZE;
    *host = (uint64_t)(uintptr_t)s->shadow;
    return 0;
}

int mshv_svq_ring(void *h, int q, uint64_t *desc, uint64_t *avail, uint64_t *used, int *backend_kick,
                  int *backend_call)
{
    struct mshv_svq *s = h;
    if (q < 0 || q >= MAX_QUEUES)
        return -EINVAL;
    struct vq *v = &s->q[q];
    if (v->backend_kick < 0)
        return -ERANGE; /* more queues than the relay was made for */
    uint64_t base = (uint64_t)(uintptr_t)s->shadow + (uint64_t)STRIDE * q;
    *desc = base + OFF_DESC;
    *avail = base + OFF_AVAIL;
    *used = base + OFF_USED;
    *backend_kick = v->backend_kick;
    *backend_call = v->backend_call;
    return 0;
}

int mshv_svq_clear_regions(void *h)
{
    struct mshv_svq *s = h;
    pthread_mutex_lock(&s->lock);
    int rc = -EBUSY;
    if (!s->running) {
        s->nregions = 0;
        rc = 0;
    }
    pthread_mutex_unlock(&s->lock);
    return rc;
}

int mshv_svq_add_region(void *h, uint64_t gpa, uint64_t size, uint64_t host)
{
    struct mshv_svq *s = h;
    pthread_mutex_lock(&s->lock);
    int rc = -ENOSPC;
    if (s->running) {
        rc = -EBUSY;
    } else if (s->nregions < MAX_REGIONS) {
        s->regions[s->nregions++] = (struct region){gpa, size, (uint8_t *)(uintptr_t)host};
        uint64_t pages = (gpa + size + PAGE - 1) / PAGE;
        rc = 0;
        if (pages > s->dirty_pages) { /* grown, never shrunk: a VM rebuilt with less RAM keeps the bits */
            uint64_t *bits = calloc((pages + 63) / 64, sizeof(uint64_t));
            if (!bits) {
                rc = -ENOMEM;
            } else {
                if (s->dirty)
                    memcpy(bits, s->dirty, (s->dirty_pages + 63) / 64 * sizeof(uint64_t));
                free(s->dirty);
                s->dirty = bits;
                s->dirty_pages = pages;
            }
        }
    }
    pthread_mutex_unlock(&s->lock);
    return rc;
}

int mshv_svq_set_queue(void *h, int q, uint16_t size, uint64_t desc, uint64_t avail, uint64_t used,
                       int guest_kick, int guest_call, uint16_t last_avail, uint16_t used_idx)
{
    struct mshv_svq *s = h;
    if (q < 0 || q >= MAX_QUEUES)
        return -EINVAL;
    pthread_mutex_lock(&s->lock);
    int rc = -EBUSY;
    struct vq *v = &s->q[q];
    if (!s->running && !s->watching) { /* stopped, its fds no longer watched (mshv_svq_stop first) */
        if (size && v->backend_kick < 0) {
            rc = -ERANGE;
        } else {
            v->size = size;
            v->desc = desc;
            v->avail = avail;
            v->used = used;
            v->guest_kick = guest_kick;
            v->guest_call = guest_call;
            v->last_avail = last_avail;
            v->used_idx = used_idx;
            rc = 0;
        }
    }
    pthread_mutex_unlock(&s->lock);
    return rc;
}

static void request(struct mshv_svq *s, int cmd, int arg, uint64_t poll_ns)
{
    pthread_mutex_lock(&s->lock);
    s->cmd = cmd;
    s->cmd_arg = arg;
    s->cmd_poll = poll_ns;
    unsigned long gen = ++s->req_gen;
    uint64_t one = 1;
    ssize_t ignored = write(s->ctl, &one, sizeof(one));
    (void)ignored;
    while (s->ack_gen != gen && s->have_thread)
        pthread_cond_wait(&s->cond, &s->lock);
    pthread_mutex_unlock(&s->lock);
}

int mshv_svq_start(void *h, int event_idx, uint64_t poll_ns)
{
    struct mshv_svq *s = h;
    request(s, CMD_START, event_idx, poll_ns);
    return s->running ? 0 : -EINVAL;
}

int mshv_svq_stop(void *h)
{
    struct mshv_svq *s = h;
    if (s->have_thread)
        request(s, CMD_STOP, 0, 0);
    return 0;
}

void mshv_svq_get_stats(void *h, struct mshv_svq_stats *out)
{
    struct mshv_svq *s = h;
    uint64_t *src = (uint64_t *)&s->st, *dst = (uint64_t *)out;
    for (size_t i = 0; i < sizeof(*out) / sizeof(uint64_t); i++)
        dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
}

/* The dirty log, read and cleared word by word (a page written meanwhile is in this answer or the next);
 * returns the words the log has (copies at most ``words``). */
int64_t mshv_svq_dirty(void *h, uint64_t *bitmap, size_t words)
{
    struct mshv_svq *s = h;
    pthread_mutex_lock(&s->lock);
    size_t have = (s->dirty_pages + 63) / 64;
    for (size_t i = 0; i < have && i < words; i++)
        bitmap[i] = __atomic_exchange_n(&s->dirty[i], 0, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&s->lock);
    return (int64_t)have;
}

int mshv_svq_error(void *h, char *buf, size_t len)
{
    struct mshv_svq *s = h;
    pthread_mutex_lock(&s->lock);
    int has = s->error[0] != 0;
    if (len) {
        strncpy(buf, s->error, len - 1);
        buf[len - 1] = 0;
    }
    pthread_mutex_unlock(&s->lock);
    return has;
}

void mshv_svq_free(void *h)
{
    struct mshv_svq *s = h;
    if (!s)
        return;
    if (s->have_thread) {
        request(s, CMD_QUIT, 0, 0);
        pthread_join(s->thread, NULL);
    }
    for (int i = 0; i < MAX_QUEUES; i++) {
        free(s->q[i].reqs);
        if (s->q[i].backend_kick >= 0)
            close(s->q[i].backend_kick);
        if (s->q[i].backend_call >= 0)
            close(s->q[i].backend_call);
    }
    if (s->shadow != MAP_FAILED)
        munmap(s->shadow, SHADOW_SIZE);
    if (s->shadow_fd >= 0)
        close(s->shadow_fd);
    if (s->ep >= 0)
        close(s->ep);
    if (s->ctl >= 0)
        close(s->ctl);
    free(s->dirty);
    pthread_mutex_destroy(&s->lock);
    pthread_cond_destroy(&s->cond);
    free(s);
}
