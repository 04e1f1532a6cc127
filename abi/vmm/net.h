/* mshv-libvirt virtio-net I/O thread: split virtqueues in guest RAM <-> a tap fd, no Python per frame. */
#ifndef MSHV_LIBVIRT_NET_H
#define MSHV_LIBVIRT_NET_H

#include <stddef.h>
#include <stdint.h>

/* A device is an opaque handle (void *): the module exports no layout for it. */
struct mshv_net_stats {
    uint64_t rx_packets;
    uint64_t rx_bytes;
    uint64_t rx_drops;
    uint64_t tx_packets;
    uint64_t tx_bytes;
    uint64_t tx_drops;
    uint64_t wakeups;
    uint64_t irqs;
};

void *mshv_net_new(int tap_fd, int error_fd);
int mshv_net_add_region(void *n, uint64_t gpa, uint64_t size, uint64_t host);
int mshv_net_set_queue(void *n, int q, uint16_t size, uint64_t desc, uint64_t avail, uint64_t used,
                       int kick_fd, int call_fd, uint16_t last_avail, uint16_t used_idx);
int mshv_net_start(void *n, int event_idx);
int mshv_net_stop(void *n);
/* While stopped: MRG_RXBUF on (max_len: the 12-byte header + the largest frame the tap may deliver) or 0 off. */
int mshv_net_set_rx_merge(void *n, uint32_t max_len);
int mshv_net_set_link(void *n, int up);
int mshv_net_queue_state(void *n, int q, uint16_t *last_avail, uint16_t *used_idx);
void mshv_net_get_stats(void *n, struct mshv_net_stats *out);
int mshv_net_error(void *n, char *buf, size_t len);
void mshv_net_free(void *n);
/* A full memory fence, for Python code that must order a store to guest RAM before a load (EVENT_IDX). */
void mshv_net_fence(void);

#endif
