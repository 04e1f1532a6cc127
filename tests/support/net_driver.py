"""The compiled module's test-only virtio-net driver, tap peer and bare-tap floor (abi/vmm/netq.c): the
driver runs both queues a VirtioNet device handed over (VirtioNet.hand_over) in a memfd-backed GuestMemory
with eventfds for kicks and calls; the peer is a C thread on an AF_PACKET socket at the tap's other end in a
test namespace; the floor writes and reads the same frames on a bare tap fd. Python sets up and reads one
result per run; every frame is built, moved and checked in C.

Frames (netq.h): ethertype 0x88b5, then an 8-byte tag and an 8-byte sequence number (little endian), then
payload byte k = (seq + k) & 0xff. Out-frames go from the guest's MAC to the broadcast address, in-frames
from the peer's MAC to the guest's."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
from dataclasses import dataclass
from typing import Any

from mshv_libvirt._mshv import ffi, lib

from mshv_libvirt.hv import GuestMemory
from mshv_libvirt.vmm.devices.virtio.net import QUEUE_SIZE, VirtioNet
from mshv_libvirt.vmm.devices.virtio.pci import F_EVENT_IDX
from tests.support.netns import NetNs

SEND, RECV, RTT, ECHO = 0, 1, 2, 3
ETHERTYPE = 0x88B5  # IEEE local experimental: no stack in the namespace answers it
GUEST_MAC = bytes.fromhex("525400aa0001")
PEER_MAC = bytes.fromhex("525400fe0001")
BROADCAST = b"\xff" * 6
HDR = 12
HEAD = 30  # dst, src, ethertype, tag, seq
BUF = 2048  # bytes per buffer slot: the header and a frame up to 1514 bytes (a 1500-byte MTU) fit
# Guest-physical layout of the handed-over RAM: both queues' rings, then SIZE rx and SIZE tx buffers.
RX_DESC, RX_AVAIL, RX_USED = 0x0000, 0x1000, 0x2000
TX_DESC, TX_AVAIL, TX_USED = 0x3000, 0x4000, 0x5000
RX_BUFS = 0x10000
TX_BUFS = RX_BUFS + QUEUE_SIZE * BUF
RAM = 2 << 20
SO_RCVBUFFORCE = 33  # socket(7); root may pass net.core.rmem_max
MANY = 1 << 62  # a receive count never reached: the run ends at its idle gap


def frame(seq: int, length: int, tag: int, *, inbound: bool) -> bytes:
    """The frame netq.c sends with sequence number ``seq``: an in-frame (peer to guest) or out-frame."""
    dst, src = (GUEST_MAC, PEER_MAC) if inbound else (BROADCAST, GUEST_MAC)
    head = dst + src + struct.pack("!H", ETHERTYPE) + struct.pack("<QQ", tag, seq)
    return head + bytes((seq + k) & 0xFF for k in range(HEAD, length))


@dataclass(frozen=True)
class Job:
    mode: int
    frame_len: int
    count: int = 0  # frames; 0 (sending only): as many as fit in seconds
    seconds: float = 0.0
    tag: int = 1
    start_ms: int = 5000  # receiving: the longest wait for the first frame
    idle_ms: int = 1000  # a gap this long after a frame ends a receive; the longest wait for any one event

    def c(self) -> Any:
        return ffi.new(
            "struct mshv_netbench_job *",
            {
                "mode": self.mode,
                "frame_len": self.frame_len,
                "count": self.count,
                "duration_ns": int(self.seconds * 1e9),
                "start_ms": self.start_ms,
                "idle_ms": self.idle_ms,
                "tag": self.tag,
                "guest_mac": list(GUEST_MAC),
                "peer_mac": list(PEER_MAC),
            },
        )


@dataclass(frozen=True)
class Result:
    frames: int
    bytes: int
    mismatches: int
    other: int
    reordered: int
    first_ns: int
    last_ns: int
    kicks: int
    waits: int
    drops: int  # a receiving peer's socket drops (PACKET_STATISTICS)
    chains: int  # the driver receiving: rx used entries its frames took
    samples_ns: tuple[int, ...] = ()  # round trips, in order


class DriverError(RuntimeError):
    pass


def _result(out: Any, samples: Any = None, n: int = 0) -> Result:
    fields = (
        "frames", "bytes", "mismatches", "other", "reordered", "first_ns", "last_ns", "kicks", "waits", "drops",
        "chains",
    )  # fmt: skip
    values = {f: int(getattr(out, f)) for f in fields}
    return Result(**values, samples_ns=tuple(int(samples[i]) for i in range(n)) if samples is not None else ())


def _samples(job: Job) -> Any:
    return ffi.new("uint64_t[]", job.count) if job.mode == RTT else ffi.NULL


class HandedQueues:
    """Both queues of ``device`` handed over to the C driver (every rx buffer posted at once, ``rx_len`` bytes
    each when given, else BUF; MRG_RXBUF negotiated when ``mrg_rxbuf``); close() stops the queues, then frees
    the driver."""

    def __init__(self, device: VirtioNet, mem: GuestMemory, *, rx_len: int = 0, mrg_rxbuf: bool = False) -> None:
        self.mem = mem
        mem.write(0, bytes(RX_BUFS))
        self.kicks = (os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK), os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
        self.calls = (os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK), os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
        self.device = device
        self._handed = False
        self._handle: Any = ffi.NULL
        try:
            rings = ((RX_DESC, RX_AVAIL, RX_USED), (TX_DESC, TX_AVAIL, TX_USED))
            self.features = device.hand_over(QUEUE_SIZE, rings, self.kicks, self.calls, mrg_rxbuf=mrg_rxbuf)
            self._handed = True
            self.event_idx = bool(self.features & F_EVENT_IDX)
            layout = ffi.new(
                "struct mshv_netq_layout *",
                {
                    "rx_desc": RX_DESC,
                    "rx_avail": RX_AVAIL,
                    "rx_used": RX_USED,
                    "rx_bufs": RX_BUFS,
                    "tx_desc": TX_DESC,
                    "tx_avail": TX_AVAIL,
                    "tx_used": TX_USED,
                    "tx_bufs": TX_BUFS,
                    "buf_size": BUF,
                    "size": QUEUE_SIZE,
                    "mrg_rxbuf": int(mrg_rxbuf),
                    "rx_len": rx_len,
                },
            )
            ram = ffi.cast("void *", mem.address)
            rx_kick, tx_kick = self.kicks
            rx_call, tx_call = self.calls
            self._handle = lib.mshv_netq_new(
                ram, mem.size, layout, rx_kick, rx_call, tx_kick, tx_call, int(self.event_idx)
            )
            if self._handle == ffi.NULL:
                raise DriverError("mshv_netq_new refused the layout")
        except BaseException:
            self.close()
            raise

    def run(self, job: Job) -> Result:
        out = ffi.new("struct mshv_netbench_result *")
        samples = _samples(job)
        if lib.mshv_netq_run(self._handle, job.c(), out, samples) != 0:
            buf = ffi.new("char[256]")
            lib.mshv_netq_error(self._handle, buf, 256)
            raise DriverError(ffi.string(buf).decode())
        return _result(out, samples if job.mode == RTT else None, int(out.frames))

    def close(self) -> None:
        if self._handed:
            self.device.release()
            self._handed = False
        if self._handle != ffi.NULL:
            lib.mshv_netq_free(self._handle)
            self._handle = ffi.NULL
        for fd in (*self.kicks, *self.calls):
            if fd >= 0:
                os.close(fd)
        self.kicks = self.calls = (-1, -1)


def tap_run(tap_fd: int, job: Job) -> Result:
    """The floor: ``job`` on a bare tap fd (nonblocking, IFF_VNET_HDR with a 12-byte header) in C."""
    out = ffi.new("struct mshv_netbench_result *")
    samples = _samples(job)
    err = ffi.new("char[256]")
    if lib.mshv_nettap_run(tap_fd, job.c(), out, samples, err, 256) != 0:
        raise DriverError(f"bare tap: {ffi.string(err).decode()}")
    return _result(out, samples if job.mode == RTT else None, int(out.frames))


class Peer:
    """``job`` (SEND in-frames, RECV out-frames, or ECHO them back) on its own C thread on ``sock``;
    ``join()`` waits for it and returns its result."""

    def __init__(self, sock: socket.socket, job: Job) -> None:
        self._job = job.c()  # kept alive while the thread may read it
        self._handle: Any = lib.mshv_netpeer_start(sock.fileno(), self._job)
        if self._handle == ffi.NULL:
            raise DriverError(f"peer refused {job}")

    def join(self) -> Result:
        if self._handle == ffi.NULL:
            raise DriverError("peer already joined")
        out = ffi.new("struct mshv_netbench_result *")
        err = ffi.new("char[256]")
        rc = lib.mshv_netpeer_join(self._handle, out, err, 256)
        self._handle = ffi.NULL
        if rc != 0:
            raise DriverError(f"peer: {ffi.string(err).decode()}")
        return _result(out)


def peer_socket(ns: NetNs, ifname: str, rcvbuf: int = 64 << 20) -> socket.socket:
    """An AF_PACKET socket for frames of ETHERTYPE bound to ``ifname`` in the namespace, with a receive buffer
    large enough that a fast sender's frames queue rather than drop."""

    def create() -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            s.bind((ifname, ETHERTYPE))
        except BaseException:
            s.close()
            raise
        return s

    return ns.call(create)


def tap_drops(ns: NetNs, ifname: str) -> int:
    """What the kernel dropped on its way out to ``ifname``'s fd (``ip -s``: tx dropped; the tap's queue full)."""
    out = subprocess.run(
        ["ip", "-n", ns.name, "-j", "-s", "link", "show", "dev", ifname],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return int(json.loads(out)[0]["stats64"]["tx"]["dropped"])
