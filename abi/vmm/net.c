/* mshv-libvirt virtio-net data path (virtio 1.2 section 5.1): one I/O thread per device.
 *
 * The thread lives from the device's creation to its end. It sleeps in epoll_wait(2) on a control
 * eventfd and, while the driver has the device running (DRIVER_OK), on the rx and tx queues' doorbell
 * eventfds (MSHV_IOEVENTFD: a guest kick never reaches the VMM) and the tap fd. It walks the split
 * virtqueues in the guest RAM mapping the VMM registered, moves frames with their 12-byte
 * virtio_net_hdr (the tap is IFF_VNET_HDR with TUNSETVNETHDRSZ 12, so the header passes through as it
 * is) by readv/writev straight between the tap and guest buffers, several frames per wake-up, and
 * signals the guest by writing the queue's irqfd eventfd, honouring EVENT_IDX or the NO_INTERRUPT flag.
 *
 * Every guest address is checked to lie wholly inside one registered region before it is touched;
 * a malformed queue (descriptor index outside the table, a chain longer than the table, an indirect
 * descriptor, a buffer of the wrong direction, an available index too far ahead) stops the device,
 * records why, and signals the error eventfd: the VMM then sets DEVICE_NEEDS_RESET.
 *
 * Start/stop/link changes are requests under a mutex, acknowledged through a condition variable, so a
 * vCPU thread (whose seccomp list has futex and write) can make them and knows the thread has let go
 * of the rings when the call returns.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include "net.h"
#include "sandbox.h"

#define MAX_REGIONS 8
#define MAX_IOV 64
#define MRG_IOV 1024 /* UIO_MAXIOV: one readv over as many rx chains as a merged frame may take */
#define BATCH 64
#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4
#define AVAIL_F_NO_INTERRUPT 1
#define RXQ 0
#define TXQ 1

enum { CMD_NONE, CMD_START, CMD_STOP, CMD_LINK, CMD_QUIT };

struct region {
    uint64_t gpa, size;
    uint8_t *host;
};

struct vq {
    uint16_t size;
    uint64_t desc, avail, used;
    int kick, call;
    uint16_t last_avail, used_idx;
    uint16_t signalled_idx; /* used index at the last interrupt (EVENT_IDX) */
    /* host pointers, valid while running */
    uint8_t *hdesc, *havail, *hused;
};

struct mshv_net {
    int tap, err_fd, ctl, ep;
    struct region regions[MAX_REGIONS];
    int nregions;
    struct vq q[2];
    int event_idx;
    uint32_t mrg_max; /* MRG_RXBUF: the chains' room gathered before a read (header + largest frame); 0 off */
    int running, link_up, rx_waiting, tap_polled, kicks_polled;
    pthread_t thread;
    int have_thread;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int cmd, cmd_arg;
    unsigned long req_gen, ack_gen;
    char error[160];
    struct mshv_net_stats st;
};

static void *translate(struct mshv_net *n, uint64_t gpa, uint64_t len)
{
    for (int i = 0; i < n->nregions; i++) {
        struct region *r = &n->regions[i];
        if (gpa >= r->gpa && len <= r->size && gpa - r->gpa <= r->size - len)
            return r->host + (gpa - r->gpa);
    }
    return NULL;
}

static void fail(struct mshv_net *n, int q, const char *what, unsigned long v)
{
    if (!n->error[0])
        snprintf(n->error, sizeof(n->error), "%s queue: %s (%lu)", q == RXQ ? "rx" : "tx", what, v);
    n->running = 0;
    uint64_t one = 1;
    ssize_t ignored = write(n->err_fd, &one, sizeof(one));
    (void)ignored;
}

static void stat_add(uint64_t *c, uint64_t v)
{
    __atomic_fetch_add(c, v, __ATOMIC_RELAXED);
}

static uint16_t avail_idx(struct vq *v)
{
    return __atomic_load_n((uint16_t *)(v->havail + 2), __ATOMIC_ACQUIRE);
}

/* Pops the next chain into iov (host pointers); returns the iov count, 0 when none, -1 on a broken queue. */
static int pop(struct mshv_net *n, int qi, int want_write, struct iovec *iov, uint16_t *head_out, size_t *total)
{
    struct vq *v = &n->q[qi];
    uint16_t avail = avail_idx(v);
    if (avail == v->last_avail)
        return 0;
    if ((uint16_t)(avail - v->last_avail) > v->size) {
        fail(n, qi, "available index too far ahead", (uint16_t)(avail - v->last_avail));
        return -1;
    }
    uint16_t head = ((uint16_t *)(v->havail + 4))[v->last_avail % v->size];
    uint16_t idx = head;
    int cnt = 0;
    *total = 0;
    for (unsigned hops = 0;; hops++) {
        if (idx >= v->size) {
            fail(n, qi, "descriptor index outside the table", idx);
            return -1;
        }
        if (hops >= v->size) {
            fail(n, qi, "descriptor chain loops from", head);
            return -1;
        }
        const uint8_t *d = v->hdesc + 16 * (size_t)idx;
        uint64_t addr;
        uint32_t len;
        uint16_t flags, next;
        memcpy(&addr, d, 8);
        memcpy(&len, d + 8, 4);
        memcpy(&flags, d + 12, 2);
        memcpy(&next, d + 14, 2);
        if (flags & DESC_F_INDIRECT) {
            fail(n, qi, "indirect descriptor (not negotiated) at", idx);
            return -1;
        }
        if (!!(flags & DESC_F_WRITE) != want_write) {
            fail(n, qi, want_write ? "device-readable buffer in the rx queue at" : "device-writable buffer in the tx queue at", idx);
            return -1;
        }
        void *p = translate(n, addr, len);
        if (!p) {
            fail(n, qi, "buffer outside guest RAM at descriptor", idx);
            return -1;
        }
        if (cnt >= MAX_IOV) {
            fail(n, qi, "chain longer than the device takes from", head);
            return -1;
        }
        iov[cnt].iov_base = p;
        iov[cnt].iov_len = len;
        cnt++;
        *total += len;
        if (!(flags & DESC_F_NEXT))
            break;
        idx = next;
    }
    v->last_avail++;
    *head_out = head;
    return cnt;
}

/* Writes a used element; the driver sees it at the next publish_used. */
static void put_used(struct vq *v, uint16_t head, uint32_t len)
{
    uint8_t *elem = v->hused + 4 + 8 * (size_t)(v->used_idx % v->size);
    uint32_t id = head;
    memcpy(elem, &id, 4);
    memcpy(elem + 4, &len, 4);
    v->used_idx++;
}

static void publish_used(struct vq *v)
{
    __atomic_store_n((uint16_t *)(v->hused + 2), v->used_idx, __ATOMIC_RELEASE);
}

static void push(struct vq *v, uint16_t head, uint32_t len)
{
    put_used(v, head, len);
    publish_used(v);
}

/* After a batch: tell the driver when to kick next, and whether anything arrived since (full fence between). */
static int arm_kick(struct mshv_net *n, struct vq *v)
{
    if (n->event_idx)
        __atomic_store_n((uint16_t *)(v->hused + 4 + 8 * (size_t)v->size), v->last_avail, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return avail_idx(v) != v->last_avail;
}

static void maybe_interrupt(struct mshv_net *n, struct vq *v)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    int fire;
    if (n->event_idx) {
        uint16_t used_event = *(volatile uint16_t *)(v->havail + 4 + 2 * (size_t)v->size);
        uint16_t new_idx = v->used_idx, old = v->signalled_idx;
        fire = (uint16_t)(new_idx - used_event - 1) < (uint16_t)(new_idx - old);
    } else {
        uint16_t flags = *(volatile uint16_t *)v->havail;
        fire = !(flags & AVAIL_F_NO_INTERRUPT);
    }
    v->signalled_idx = v->used_idx;
    if (fire && v->call >= 0) {
        uint64_t one = 1;
        ssize_t ignored = write(v->call, &one, sizeof(one));
        (void)ignored;
        stat_add(&n->st.irqs, 1);
    }
}

static void poll_tap(struct mshv_net *n, int on)
{
    if (n->tap_polled == on)
        return;
    struct epoll_event ev = {.events = on ? EPOLLIN : 0, .data.u32 = 3};
    epoll_ctl(n->ep, EPOLL_CTL_MOD, n->tap, &ev);
    n->tap_polled = on;
}

static void do_tx(struct mshv_net *n)
{
    struct vq *v = &n->q[TXQ];
    struct iovec iov[MAX_IOV];
    int used = 0;
    for (;;) {
        for (int b = 0; b < BATCH * 4 && n->running; b++) {
            uint16_t head;
            size_t total;
            int cnt = pop(n, TXQ, 0, iov, &head, &total);
            if (cnt <= 0)
                break;
            if (!n->link_up || total < 12) {
                stat_add(&n->st.tx_drops, 1);
            } else {
                ssize_t w = writev(n->tap, iov, cnt);
                if (w < 0) {
                    stat_add(&n->st.tx_drops, 1);
                } else {
                    stat_add(&n->st.tx_packets, 1);
                    stat_add(&n->st.tx_bytes, total - 12);
                }
            }
            push(v, head, 0);
            used++;
        }
        if (!n->running || !arm_kick(n, v))
            break;
    }
    if (used && n->running)
        maybe_interrupt(n, v);
}

/* Stores num_buffers (le16, bytes 10..11 of virtio_net_hdr) wherever the header's iovecs put it. */
static void set_num_buffers(const struct iovec *iov, int cnt, uint16_t num)
{
    uint8_t b[2] = {(uint8_t)num, (uint8_t)(num >> 8)};
    size_t off = 10;
    for (int i = 0, k = 0; i < cnt && k < 2; i++) {
        size_t len = iov[i].iov_len;
        while (off < len && k < 2)
            ((uint8_t *)iov[i].iov_base)[off++] = b[k++];
        off = off >= len ? off - len : 0;
    }
}

/* MRG_RXBUF (virtio 1.2 5.1.6.4): chains are popped until their room holds the largest frame the tap may
 * deliver (the tap reports no frame's length before the read, and a short read loses the frame), then one
 * readv fills as many as the frame needs. The chains it did not reach stay gathered for the next frame of the
 * batch (each chain is popped once) and go back to the available ring, untouched, when the batch ends. No
 * bounce copy; a frame waits in the tap while the ring has too little room, unless all of the ring (or
 * MRG_IOV) is too little: then it is read, and dropped if it did not fit. */
static void do_rx_merge(struct mshv_net *n)
{
    struct vq *v = &n->q[RXQ];
    struct iovec iov[MRG_IOV + 1];
    uint16_t heads[MRG_IOV];
    size_t room[MRG_IOV];
    int ncnt[MRG_IOV];
    int used = 0, niov = 0, nch = 0;
    size_t cap = 0;
    uint8_t spill;
    for (int b = 0; b < BATCH && n->running; b++) {
        int cnt = 1;
        while (cap < n->mrg_max && nch < v->size && niov + MAX_IOV <= MRG_IOV) {
            cnt = pop(n, RXQ, 1, iov + niov, &heads[nch], &room[nch]);
            if (cnt <= 0)
                break;
            ncnt[nch] = cnt;
            niov += cnt;
            cap += room[nch++];
        }
        if (cnt < 0)
            break;
        if (cnt == 0 && cap < n->mrg_max) {
            if (arm_kick(n, v)) /* armed past what is gathered: buffers beyond it arrived */
                continue;
            n->rx_waiting = 1;
            poll_tap(n, 0); /* until the driver kicks with more buffers */
            break;
        }
        /* A short read returns what fit and loses the rest: one spill byte tells a cut frame from a full fit. */
        iov[niov] = (struct iovec){&spill, 1};
        ssize_t r = readv(n->tap, iov, niov + 1);
        if (r < 0)
            break; /* nothing to read */
        if (r < 12 || (size_t)r > cap) {
            stat_add(&n->st.rx_drops, 1);
            continue;
        }
        int k = 0, kio = 0;
        size_t left = (size_t)r;
        while (left) {
            uint32_t len = (uint32_t)(left < room[k] ? left : room[k]);
            put_used(v, heads[k], len);
            left -= len;
            cap -= room[k];
            kio += ncnt[k++];
        }
        set_num_buffers(iov, ncnt[0], (uint16_t)k);
        publish_used(v); /* the frame's chains appear together */
        stat_add(&n->st.rx_packets, 1);
        stat_add(&n->st.rx_bytes, (uint64_t)r - 12);
        used++;
        nch -= k;
        niov -= kio;
        memmove(iov, iov + kio, (size_t)niov * sizeof(*iov));
        memmove(heads, heads + k, (size_t)nch * sizeof(*heads));
        memmove(room, room + k, (size_t)nch * sizeof(*room));
        memmove(ncnt, ncnt + k, (size_t)nch * sizeof(*ncnt));
    }
    v->last_avail -= (uint16_t)nch; /* gathered, not used: the chains stay available */
    if (used && n->running)
        maybe_interrupt(n, v);
}

static void do_rx(struct mshv_net *n)
{
    struct vq *v = &n->q[RXQ];
    struct iovec iov[MAX_IOV + 1];
    uint8_t spill;
    int used = 0;
    if (!n->link_up) {
        poll_tap(n, 0);
        return;
    }
    if (n->mrg_max) {
        do_rx_merge(n);
        return;
    }
    for (int b = 0; b < BATCH && n->running; b++) {
        uint16_t head;
        size_t total;
        int cnt = pop(n, RXQ, 1, iov, &head, &total);
        if (cnt < 0)
            break;
        if (cnt == 0) {
            if (arm_kick(n, v))
                continue; /* buffers arrived while arming */
            n->rx_waiting = 1;
            poll_tap(n, 0); /* until the driver kicks with new buffers */
            break;
        }
        iov[cnt] = (struct iovec){&spill, 1}; /* a short read returns what fit: the spill byte tells it was cut */
        ssize_t r = readv(n->tap, iov, cnt + 1);
        if (r < 0) {
            v->last_avail--; /* nothing to read: the chain stays available */
            break;
        }
        if (r < 12 || (size_t)r > total) {
            v->last_avail--;
            stat_add(&n->st.rx_drops, 1);
            continue;
        }
        stat_add(&n->st.rx_packets, 1);
        stat_add(&n->st.rx_bytes, (uint64_t)r - 12);
        push(v, head, (uint32_t)r);
        used++;
    }
    if (used && n->running)
        maybe_interrupt(n, v);
}

static int map_queue(struct mshv_net *n, int qi)
{
    struct vq *v = &n->q[qi];
    if (v->size == 0 || (v->size & (v->size - 1)) || v->desc % 16 || v->avail % 2 || v->used % 4) {
        fail(n, qi, "size or ring alignment invalid, size", v->size);
        return -1;
    }
    v->hdesc = translate(n, v->desc, 16ULL * v->size);
    v->havail = translate(n, v->avail, 6ULL + 2ULL * v->size);
    v->hused = translate(n, v->used, 6ULL + 8ULL * v->size);
    if (!v->hdesc || !v->havail || !v->hused) {
        fail(n, qi, "ring outside guest RAM, size", v->size);
        return -1;
    }
    v->signalled_idx = v->used_idx;
    return 0;
}

static void watch_kicks(struct mshv_net *n, int on)
{
    if (n->kicks_polled == on)
        return;
    for (int i = 0; i < 2; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = 1 + (uint32_t)i};
        epoll_ctl(n->ep, on ? EPOLL_CTL_ADD : EPOLL_CTL_DEL, n->q[i].kick, &ev);
    }
    n->kicks_polled = on;
}

static int handle_cmd(struct mshv_net *n)
{
    int quit = 0;
    pthread_mutex_lock(&n->lock);
    if (n->req_gen != n->ack_gen) {
        switch (n->cmd) {
        case CMD_START:
            n->error[0] = 0;
            n->event_idx = n->cmd_arg;
            n->running = map_queue(n, RXQ) == 0 && map_queue(n, TXQ) == 0;
            if (n->running) {
                watch_kicks(n, 1);
                n->rx_waiting = 0;
                poll_tap(n, n->link_up);
            }
            break;
        case CMD_STOP:
            n->running = 0;
            break;
        case CMD_LINK:
            n->link_up = n->cmd_arg;
            break;
        case CMD_QUIT:
            n->running = 0;
            quit = 1;
            break;
        }
        if (!n->running) {
            watch_kicks(n, 0);
            poll_tap(n, 0);
        } else if (n->cmd == CMD_LINK) {
            poll_tap(n, n->link_up);
        }
        n->ack_gen = n->req_gen;
        pthread_cond_broadcast(&n->cond);
    }
    pthread_mutex_unlock(&n->lock);
    return quit;
}

static void *net_main(void *arg)
{
    struct mshv_net *n = arg;
    mshv_sandbox_thread_enter(MSHV_SANDBOX_NET, "virtio-net");
    struct epoll_event evs[8];
    for (;;) {
        int k = epoll_wait(n->ep, evs, 8, -1);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        stat_add(&n->st.wakeups, 1);
        int tx = 0, rx = 0;
        for (int i = 0; i < k; i++) {
            uint64_t junk;
            uint32_t what = evs[i].data.u32;
            if (what == 0) {
                ssize_t ignored = read(n->ctl, &junk, sizeof(junk));
                (void)ignored;
                if (handle_cmd(n))
                    return NULL;
                tx = rx = 1; /* look at both rings after a start or link change */
            } else if (what == 1 || what == 2) {
                ssize_t ignored = read(n->q[what - 1].kick, &junk, sizeof(junk));
                (void)ignored;
                if (what == 1) {
                    rx = 1;
                    if (n->rx_waiting && n->running) {
                        n->rx_waiting = 0;
                        poll_tap(n, n->link_up);
                    }
                } else {
                    tx = 1;
                }
            } else {
                rx = 1;
            }
        }
        if (n->running && tx)
            do_tx(n);
        if (n->running && rx && n->tap_polled)
            do_rx(n);
    }
    return NULL;
}

void *mshv_net_new(int tap_fd, int error_fd)
{
    struct mshv_net *n = calloc(1, sizeof(*n));
    if (!n)
        return NULL;
    n->tap = tap_fd;
    n->err_fd = error_fd;
    n->link_up = 1;
    n->q[0].kick = n->q[1].kick = n->q[0].call = n->q[1].call = -1;
    pthread_mutex_init(&n->lock, NULL);
    pthread_cond_init(&n->cond, NULL);
    n->ctl = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    n->ep = epoll_create1(EPOLL_CLOEXEC);
    if (n->ctl < 0 || n->ep < 0)
        goto fail;
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = 0};
    if (epoll_ctl(n->ep, EPOLL_CTL_ADD, n->ctl, &ev) < 0)
        goto fail;
    ev.events = 0;
    ev.data.u32 = 3;
    if (epoll_ctl(n->ep, EPOLL_CTL_ADD, n->tap, &ev) < 0)
        goto fail;
    if (pthread_create(&n->thread, NULL, net_main, n) != 0)
        goto fail;
    n->have_thread = 1;
    return n;
fail:
    mshv_net_free(n);
    return NULL;
}

int mshv_net_add_region(void *h, uint64_t gpa, uint64_t size, uint64_t host)
{
    struct mshv_net *n = h;
    pthread_mutex_lock(&n->lock);
    int rc = -ENOSPC;
    if (n->running)
        rc = -EBUSY;
    else if (n->nregions < MAX_REGIONS) {
        n->regions[n->nregions++] = (struct region){gpa, size, (uint8_t *)(uintptr_t)host};
        rc = 0;
    }
    pthread_mutex_unlock(&n->lock);
    return rc;
}

int mshv_net_set_queue(void *h, int q, uint16_t size, uint64_t desc, uint64_t avail, uint64_t used,
                       int kick_fd, int call_fd, uint16_t last_avail, uint16_t used_idx)
{
    struct mshv_net *n = h;
    if (q < 0 || q > 1)
        return -EINVAL;
    pthread_mutex_lock(&n->lock);
    int rc = -EBUSY;
    if (!n->running) {
        if (n->kicks_polled) /* never: kicks are unwatched while stopped */
            watch_kicks(n, 0);
        n->q[q] = (struct vq){size, desc, avail, used, kick_fd, call_fd, last_avail, used_idx, used_idx, 0, 0, 0};
        rc = 0;
    }
    pthread_mutex_unlock(&n->lock);
    return rc;
}

int mshv_net_set_rx_merge(void *h, uint32_t max_len)
{
    struct mshv_net *n = h;
    pthread_mutex_lock(&n->lock);
    int rc = n->running ? -EBUSY : 0;
    if (!rc)
        n->mrg_max = max_len;
    pthread_mutex_unlock(&n->lock);
    return rc;
}

static int request(struct mshv_net *n, int cmd, int arg)
{
    pthread_mutex_lock(&n->lock);
    n->cmd = cmd;
    n->cmd_arg = arg;
    unsigned long gen = ++n->req_gen;
    uint64_t one = 1;
    ssize_t ignored = write(n->ctl, &one, sizeof(one));
    (void)ignored;
    while (n->ack_gen != gen && n->have_thread)
        pthread_cond_wait(&n->cond, &n->lock);
    pthread_mutex_unlock(&n->lock);
    return 0;
}

int mshv_net_start(void *h, int event_idx)
{
    struct mshv_net *n = h;
    request(n, CMD_START, event_idx);
    return n->running ? 0 : -EINVAL;
}

int mshv_net_stop(void *h)
{
    struct mshv_net *n = h;
    return request(n, CMD_STOP, 0);
}

int mshv_net_set_link(void *h, int up)
{
    struct mshv_net *n = h;
    return request(n, CMD_LINK, !!up);
}

int mshv_net_queue_state(void *h, int q, uint16_t *last_avail, uint16_t *used_idx)
{
    struct mshv_net *n = h;
    if (q < 0 || q > 1)
        return -EINVAL;
    pthread_mutex_lock(&n->lock);
    *last_avail = n->q[q].last_avail;
    *used_idx = n->q[q].used_idx;
    pthread_mutex_unlock(&n->lock);
    return 0;
}

void mshv_net_get_stats(void *h, struct mshv_net_stats *out)
{
    struct mshv_net *n = h;
    uint64_t *src = (uint64_t *)&n->st, *dst = (uint64_t *)out;
    for (size_t i = 0; i < sizeof(*out) / sizeof(uint64_t); i++)
        dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
}

int mshv_net_error(void *h, char *buf, size_t len)
{
    struct mshv_net *n = h;
    pthread_mutex_lock(&n->lock);
    int has = n->error[0] != 0;
    if (len) {
        strncpy(buf, n->error, len - 1);
        buf[len - 1] = 0;
    }
    pthread_mutex_unlock(&n->lock);
    return has;
}

void mshv_net_free(void *h)
{
    struct mshv_net *n = h;
    if (!n)
        return;
    if (n->have_thread) {
        request(n, CMD_QUIT, 0);
        pthread_join(n->thread, NULL);
    }
    if (n->ep >= 0)
        close(n->ep);
    if (n->ctl >= 0)
        close(n->ctl);
    pthread_mutex_destroy(&n->lock);
    pthread_cond_destroy(&n->cond);
    free(n);
}

void mshv_net_fence(void)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}
