/* mshv-libvirt test-only virtio-blk driver: one split virtqueue a VirtioBlk device handed over (its guest
 * RAM, kick and call eventfds), filled, kicked and reaped in C (benchmarks/blk.py, tests/vmm/test_blk_handover.py). */
#ifndef MSHV_LIBVIRT_BLKQ_H
#define MSHV_LIBVIRT_BLKQ_H

#include <stddef.h>
#include <stdint.h>

/* Guest-physical addresses in the handed-over RAM (which starts at guest-physical 0). */
struct mshv_blkq_layout {
    uint64_t desc;    /* 16 * size bytes */
    uint64_t avail;   /* 6 + 2 * size */
    uint64_t used;    /* 6 + 8 * size */
    uint64_t headers; /* 32 bytes per request slot: the request header, then its status byte */
    uint64_t data;    /* depth * block bytes of buffers */
    uint16_t size;
};

struct mshv_blkq_job {
    uint32_t type;        /* VIRTIO_BLK_T_IN (0) or VIRTIO_BLK_T_OUT (1) */
    uint32_t block;       /* bytes per request, a multiple of 512 */
    uint32_t depth;       /* requests in flight, at most size / 3 */
    uint32_t stride;      /* 0: offsets uniformly random over span; 1: offset += step, modulo span */
    uint64_t seed;        /* random: the generator's seed */
    uint64_t step;        /* stride: bytes between consecutive requests */
    uint64_t span;        /* bytes of the disk addressed, from 0 */
    uint64_t count;       /* requests to complete; 0: as many as fit in duration_ns */
    uint64_t duration_ns;
    uint32_t stamp;       /* writes stamp each 512-byte sector with its number; reads count mismatches */
    uint32_t timeout_ms;  /* the longest wait for one completion */
};

struct mshv_blkq_result {
    uint64_t requests;
    uint64_t bytes;
    uint64_t elapsed_ns;
    uint64_t lat_sum_ns;
    uint64_t lat_min_ns;
    uint64_t lat_max_ns;
    uint64_t errors;     /* completions whose status was not VIRTIO_BLK_S_OK */
    uint64_t mismatches; /* stamped sectors read back wrong */
    uint64_t kicks;
    uint64_t waits;      /* blocking waits on the call eventfd */
};

void *mshv_blkq_new(void *ram, uint64_t ram_size, const struct mshv_blkq_layout *layout, int kick_fd, int call_fd,
                    int event_idx);
int mshv_blkq_run(void *q, const struct mshv_blkq_job *job, struct mshv_blkq_result *out);
int mshv_blkq_error(void *q, char *buf, size_t len);
void mshv_blkq_free(void *q);

#endif
