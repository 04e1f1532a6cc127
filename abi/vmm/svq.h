/* mshv-libvirt virtio-blk shadow virtqueue relay: guest rings <-> VMM-owned rings qemu-storage-daemon serves,
 * counting every request on the way (qemu-storage-daemon's vhost-user-blk export counts nothing). */
#ifndef MSHV_LIBVIRT_SVQ_H
#define MSHV_LIBVIRT_SVQ_H

#include <stddef.h>
#include <stdint.h>

#define MSHV_SVQ_MAX_QUEUES 64
#define MSHV_SVQ_MAX_QSIZE 1024

/* What QEMU's query-blockstats gives libvirt, counted as QEMU's block_acct_done/failed do: a request
 * whose status byte is OK counts in *_req, *_bytes and *_total_ns (pop to used), one that is not in *_failed. */
struct mshv_svq_stats {
    uint64_t rd_req;
    uint64_t rd_bytes;
    uint64_t rd_total_ns;
    uint64_t wr_req;
    uint64_t wr_bytes;
    uint64_t wr_total_ns;
    uint64_t flush_req;
    uint64_t flush_total_ns;
    uint64_t rd_failed;
    uint64_t wr_failed;
    uint64_t flush_failed;
    uint64_t other_req;     /* GET_ID, discard and unknown types: relayed, not accounted (as QEMU 7.2) */
    uint64_t guest_kicks;   /* wake-ups on a guest kick eventfd */
    uint64_t backend_kicks; /* kicks written to the backend */
    uint64_t backend_calls; /* wake-ups on a backend call eventfd */
    uint64_t guest_irqs;    /* guest call (irqfd) writes */
    uint64_t polled;        /* batches found while busy-polling, without a wake-up */
};

void *mshv_svq_new(int error_fd, int queues);
int mshv_svq_shadow(void *s, int *fd, uint64_t *size, uint64_t *host);
int mshv_svq_ring(void *s, int q, uint64_t *desc, uint64_t *avail, uint64_t *used, int *backend_kick,
                  int *backend_call);
int mshv_svq_clear_regions(void *s);
int mshv_svq_add_region(void *s, uint64_t gpa, uint64_t size, uint64_t host);
int mshv_svq_set_queue(void *s, int q, uint16_t size, uint64_t desc, uint64_t avail, uint64_t used,
                       int guest_kick, int guest_call, uint16_t last_avail, uint16_t used_idx);
int mshv_svq_start(void *s, int event_idx, uint64_t poll_ns);
int mshv_svq_stop(void *s);
void mshv_svq_get_stats(void *s, struct mshv_svq_stats *out);
int64_t mshv_svq_dirty(void *s, uint64_t *bitmap, size_t words);
int mshv_svq_error(void *s, char *buf, size_t len);
void mshv_svq_free(void *s);

#endif
