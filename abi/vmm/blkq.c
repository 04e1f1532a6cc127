/* mshv-libvirt test-only virtio-blk driver (see blkq.h): the driver side of one split virtqueue (virtio 1.2
 * section 2.7), so a benchmark measures the backend's data path with no guest and no Python per request.
 * Each request slot s owns descriptors 3s (header), 3s+1 (data) and 3s+2 (status): chains never change,
 * only the available ring carries heads, as a Linux driver without indirect descriptors would. */
#include "blkq.h"

#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define USED_F_NO_NOTIFY 1
#define T_IN 0
#define T_OUT 1
#define SECTOR 512

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

struct req_header {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
};

struct blkq {
    uint8_t *ram;
    uint64_t ram_size;
    struct mshv_blkq_layout l;
    int kick_fd, call_fd, event_idx;
    struct desc *desc;
    uint16_t *avail_idx_p, *avail_ring, *used_event;
    uint16_t *used_flags, *used_idx_p, *avail_event;
    struct used_elem *used_ring;
    uint16_t avail_idx, last_used;
    char err[256];
};

static int fail(struct blkq *q, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(q->err, sizeof q->err, fmt, ap);
    va_end(ap);
    return -1;
}

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static int in_ram(const struct blkq *q, uint64_t gpa, uint64_t len) {
    return gpa <= q->ram_size && len <= q->ram_size - gpa;
}

void *mshv_blkq_new(void *ram, uint64_t ram_size, const struct mshv_blkq_layout *layout, int kick_fd, int call_fd,
                    int event_idx) {
    uint16_t n = layout->size;
    if (n == 0 || (n & (n - 1)))
        return NULL;
    struct blkq *q = calloc(1, sizeof *q);
    if (!q)
        return NULL;
    q->ram = ram;
    q->ram_size = ram_size;
    q->l = *layout;
    if (!in_ram(q, layout->desc, 16ull * n) || !in_ram(q, layout->avail, 6 + 2ull * n) ||
        !in_ram(q, layout->used, 6 + 8ull * n) || !in_ram(q, layout->headers, 32ull * (n / 3))) {
        free(q);
        return NULL;
    }
    q->kick_fd = kick_fd;
    q->call_fd = call_fd;
    q->event_idx = event_idx;
    q->desc = (struct desc *)(q->ram + layout->desc);
    uint16_t *avail = (uint16_t *)(q->ram + layout->avail);
    avail[0] = 0; /* flags: interrupts wanted (without EVENT_IDX) */
    q->avail_idx_p = &avail[1];
    q->avail_ring = &avail[2];
    q->used_event = &avail[2 + n];
    uint16_t *used = (uint16_t *)(q->ram + layout->used);
    q->used_flags = &used[0];
    q->used_idx_p = &used[1];
    q->used_ring = (struct used_elem *)&used[2];
    q->avail_event = (uint16_t *)&q->used_ring[n];
    /* The device starts at index 0 (VirtioBlk.hand_over sets the ring's base to 0). */
    q->avail_idx = __atomic_load_n(q->avail_idx_p, __ATOMIC_ACQUIRE);
    q->last_used = __atomic_load_n(q->used_idx_p, __ATOMIC_ACQUIRE);
    return q;
}

void mshv_blkq_free(void *q) { free(q); }

int mshv_blkq_error(void *qv, char *buf, size_t len) {
    struct blkq *q = qv;
    snprintf(buf, len, "%s", q->err);
    return (int)strlen(q->err);
}

/* virtio 1.2 section 2.7.10: notify when new_idx passed event since old. */
static int need_event(uint16_t event, uint16_t new_idx, uint16_t old) {
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

static uint64_t xorshift(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

int mshv_blkq_run(void *qv, const struct mshv_blkq_job *job, struct mshv_blkq_result *out) {
    struct blkq *q = qv;
    uint16_t size = q->l.size;
    uint32_t depth = job->depth, block = job->block;
    memset(out, 0, sizeof *out);
    if (job->type != T_IN && job->type != T_OUT)
        return fail(q, "request type %u is not IN or OUT", job->type);
    if (block == 0 || block % SECTOR || job->span < block || job->span % SECTOR)
        return fail(q, "block %u and span %llu must be multiples of %d, span >= block", block,
                    (unsigned long long)job->span, SECTOR);
    if (depth == 0 || depth > size / 3u)
        return fail(q, "depth %u is not within 1..%u (3 descriptors a request)", depth, size / 3u);
    if (!in_ram(q, q->l.data, (uint64_t)depth * block))
        return fail(q, "%u buffers of %u bytes at %#llx do not fit in guest RAM", depth, block,
                    (unsigned long long)q->l.data);
    if (!job->count && !job->duration_ns)
        return fail(q, "neither a count nor a duration");
    uint64_t *t0 = calloc(depth, sizeof *t0), *sector_of = calloc(depth, sizeof *sector_of);
    uint32_t *free_slots = calloc(depth, sizeof *free_slots);
    if (!t0 || !sector_of || !free_slots) {
        free(t0), free(sector_of), free(free_slots);
        return fail(q, "out of memory");
    }
    int writing = job->type == T_OUT;
    for (uint32_t s = 0; s < depth; s++) {
        uint64_t hdr = q->l.headers + 32ull * s;
        q->desc[3 * s] = (struct desc){hdr, sizeof(struct req_header), DESC_F_NEXT, (uint16_t)(3 * s + 1)};
        q->desc[3 * s + 1] = (struct desc){q->l.data + (uint64_t)s * block, block,
                                           (uint16_t)(DESC_F_NEXT | (writing ? 0 : DESC_F_WRITE)), (uint16_t)(3 * s + 2)};
        q->desc[3 * s + 2] = (struct desc){hdr + 16, 1, DESC_F_WRITE, 0};
        free_slots[s] = depth - 1 - s;
    }
    uint32_t nfree = depth, inflight = 0;
    uint64_t submitted = 0, next = 0, seed = job->seed ? job->seed : 0x9e3779b97f4a7c15ull;
    uint64_t blocks = job->span / block, start = now_ns(), deadline = start + job->duration_ns, t = start;
    int stopping = 0, rc = 0;
    out->lat_min_ns = UINT64_MAX;
    for (;;) {
        uint16_t old = q->avail_idx;
        while (inflight < depth && (job->count ? submitted < job->count : !stopping)) {
            uint32_t s = free_slots[--nfree];
            uint64_t off;
            if (job->stride) { /* as qemu-img bench 7.2 walks: the next offset is (this + step) % span */
                off = next;
                next = (next + job->step) % job->span;
                if (off + block > job->span)
                    off = 0;
            } else {
                off = (xorshift(&seed) % blocks) * block;
            }
            uint8_t *hdr = q->ram + q->l.headers + 32ull * s, *buf = q->ram + q->l.data + (uint64_t)s * block;
            struct req_header h = {job->type, 0, off / SECTOR};
            memcpy(hdr, &h, sizeof h);
            hdr[16] = 0xff;
            sector_of[s] = off / SECTOR;
            if (job->stamp)
                for (uint32_t k = 0; k < block / SECTOR; k++) {
                    uint64_t v = writing ? off / SECTOR + k : ~0ull;
                    memcpy(buf + (uint64_t)k * SECTOR, &v, sizeof v);
                }
            q->avail_ring[q->avail_idx % size] = (uint16_t)(3 * s);
            q->avail_idx++;
            t0[s] = t;
            submitted++;
            inflight++;
        }
        if (q->avail_idx != old) {
            __atomic_store_n(q->avail_idx_p, q->avail_idx, __ATOMIC_RELEASE);
            __atomic_thread_fence(__ATOMIC_SEQ_CST); /* the index is visible before we read the device's wish */
            int kick = q->event_idx ? need_event(__atomic_load_n(q->avail_event, __ATOMIC_ACQUIRE), q->avail_idx, old)
                                    : !(__atomic_load_n(q->used_flags, __ATOMIC_ACQUIRE) & USED_F_NO_NOTIFY);
            if (kick) {
                uint64_t one = 1;
                if (write(q->kick_fd, &one, sizeof one) != sizeof one) {
                    rc = fail(q, "kick eventfd: %s", strerror(errno));
                    break;
                }
                out->kicks++;
            }
        }
        if (inflight == 0)
            break;
        uint16_t used = __atomic_load_n(q->used_idx_p, __ATOMIC_ACQUIRE);
        if (used == q->last_used) {
            if (q->event_idx) { /* interrupt me at the next completion, then look once more before sleeping */
                __atomic_store_n(q->used_event, q->last_used, __ATOMIC_RELEASE);
                __atomic_thread_fence(__ATOMIC_SEQ_CST);
                used = __atomic_load_n(q->used_idx_p, __ATOMIC_ACQUIRE);
            }
            if (used == q->last_used) {
                struct pollfd p = {q->call_fd, POLLIN, 0};
                int n = poll(&p, 1, (int)job->timeout_ms);
                if (n <= 0) {
                    rc = n == 0 ? fail(q, "no completion within %u ms (%u in flight, call eventfd silent)",
                                       job->timeout_ms, inflight)
                                : fail(q, "poll on the call eventfd: %s", strerror(errno));
                    break;
                }
                uint64_t v;
                if (read(q->call_fd, &v, sizeof v) < 0 && errno != EAGAIN) {
                    rc = fail(q, "call eventfd: %s", strerror(errno));
                    break;
                }
                out->waits++;
                t = now_ns();
                continue;
            }
        }
        t = now_ns();
        while (q->last_used != used) {
            struct used_elem e = q->used_ring[q->last_used % size];
            q->last_used++;
            if (e.id % 3 || e.id / 3 >= depth) {
                rc = fail(q, "the device used descriptor %u, not the head of a request in flight", e.id);
                goto done;
            }
            uint32_t s = e.id / 3;
            uint8_t *hdr = q->ram + q->l.headers + 32ull * s, *buf = q->ram + q->l.data + (uint64_t)s * block;
            if (hdr[16] != 0)
                out->errors++;
            if (job->stamp && !writing)
                for (uint32_t k = 0; k < block / SECTOR; k++) {
                    uint64_t v;
                    memcpy(&v, buf + (uint64_t)k * SECTOR, sizeof v);
                    out->mismatches += v != sector_of[s] + k;
                }
            uint64_t lat = t - t0[s];
            out->lat_sum_ns += lat;
            out->lat_min_ns = lat < out->lat_min_ns ? lat : out->lat_min_ns;
            out->lat_max_ns = lat > out->lat_max_ns ? lat : out->lat_max_ns;
            out->requests++;
            out->bytes += block;
            free_slots[nfree++] = s;
            inflight--;
        }
        if (!job->count && t >= deadline)
            stopping = 1;
    }
done:
    out->elapsed_ns = now_ns() - start;
    if (!out->requests)
        out->lat_min_ns = 0;
    free(t0), free(sector_of), free(free_slots);
    return rc;
}
