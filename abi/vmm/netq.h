/* mshv-libvirt test-only virtio-net driver, tap peer and bare-tap floor (benchmarks/net.py,
 * tests/vmm/test_net_handover.py): both split virtqueues a VirtioNet device handed over (its guest RAM, kick
 * and call eventfds) filled, kicked and reaped in C; a peer thread on an AF_PACKET socket at the tap's other
 * end; and the same frames written to and read from a bare tap fd. No Python per frame on any side. */
#ifndef MSHV_LIBVIRT_NETQ_H
#define MSHV_LIBVIRT_NETQ_H

#include <stddef.h>
#include <stdint.h>

/* Guest-physical addresses in the handed-over RAM (which starts at guest-physical 0). */
struct mshv_netq_layout {
    uint64_t rx_desc, rx_avail, rx_used, rx_bufs; /* rings of size entries; size buffers of buf_size bytes */
    uint64_t tx_desc, tx_avail, tx_used, tx_bufs;
    uint32_t buf_size;                            /* the 12-byte virtio_net_hdr, then the frame */
    uint16_t size;
    uint16_t mrg_rxbuf;                           /* MRG_RXBUF negotiated: a frame spans num_buffers chains */
    uint32_t rx_len;                              /* the rx descriptors' length (0: buf_size) */
};

/* Frames: dst, src, ethertype 0x88b5, tag (8 bytes LE), seq (8 bytes LE), then payload byte k = seq + k.
 * "Out" frames (driver or floor to the peer) go to the broadcast address from guest_mac; "in" frames
 * (peer to driver or floor) go to guest_mac from peer_mac. A frame with another ethertype or tag is
 * counted as other, one with the right tag and wrong bytes as a mismatch. */
struct mshv_netbench_job {
    uint32_t mode;        /* 0 send out-frames, 1 receive in-frames, 2 round trips (send one, await its echo),
                             3 echo (the peer only: each out-frame back as an in-frame) */
    uint32_t frame_len;   /* 60 .. buf_size - 12 */
    uint64_t count;       /* frames; 0 (send only): as many as fit in duration_ns */
    uint64_t duration_ns;
    uint32_t start_ms;    /* receive/echo: the longest wait for the first frame */
    uint32_t idle_ms;     /* a gap this long after a frame ends a receive; the longest wait for any one event */
    uint64_t tag;
    uint8_t guest_mac[6];
    uint8_t peer_mac[6];
};

struct mshv_netbench_result {
    uint64_t frames;      /* sent, received or echoed (each checked) */
    uint64_t bytes;
    uint64_t mismatches;
    uint64_t other;
    uint64_t reordered;   /* received with a sequence number not above the previous one */
    uint64_t first_ns;    /* CLOCK_MONOTONIC of the first frame sent or received, and of the last */
    uint64_t last_ns;
    uint64_t kicks;       /* driver: kick eventfd writes; floor and peer: 0 */
    uint64_t waits;       /* blocking waits (call eventfd, tap or socket poll) */
    uint64_t drops;       /* peer receiving: what its socket dropped meanwhile (PACKET_STATISTICS tp_drops) */
    uint64_t chains;      /* driver receiving: rx used entries the frames took (num_buffers each, merged) */
};

uint64_t mshv_netbench_now_ns(void);

void *mshv_netq_new(void *ram, uint64_t ram_size, const struct mshv_netq_layout *layout, int rx_kick, int rx_call,
                    int tx_kick, int tx_call, int event_idx);
int mshv_netq_run(void *q, const struct mshv_netbench_job *job, struct mshv_netbench_result *out,
                  uint64_t *samples);
int mshv_netq_error(void *q, char *buf, size_t len);
void mshv_netq_free(void *q);

int mshv_nettap_run(int tap_fd, const struct mshv_netbench_job *job, struct mshv_netbench_result *out,
                    uint64_t *samples, char *err, size_t errlen);

void *mshv_netpeer_start(int sock_fd, const struct mshv_netbench_job *job);
int mshv_netpeer_join(void *p, struct mshv_netbench_result *out, char *err, size_t errlen);

#endif
