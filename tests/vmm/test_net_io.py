"""The compiled virtio-net I/O thread (abi/vmm/net.c) driven directly: guest RAM is a buffer of this
process, the driver side of both split queues is written here, the tap lives in a network namespace
the test creates, and its peer there is a raw AF_PACKET socket. Frames are checked byte for byte."""

from __future__ import annotations

import os
import select
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from mshv_libvirt._mshv import ffi, lib

from tests.support.netns import NetNs, netns
from tests.support.waits import wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

GPA = 0x100000
RAM = 1 << 20
QSIZE = 16
ETHERTYPE = 0x88B5  # IEEE local experimental: no stack in the namespace answers it
HDR = 12
BUF = 2048


class Queue:
    def __init__(self, ram: Any, base: int) -> None:
        self.ram, self.base = ram, base
        self.desc, self.avail, self.used = base, base + 0x1000, base + 0x2000
        self.bufs = base + 0x4000
        self.kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.avail_idx = 0
        self.seen_used = 0

    def write(self, gpa: int, data: bytes) -> None:
        off = gpa - GPA
        ffi.buffer(self.ram)[off : off + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes:
        off = gpa - GPA
        return bytes(ffi.buffer(self.ram)[off : off + n])

    def post(self, descs: list[tuple[int, int, int]]) -> int:
        """One chain of (gpa, len, flags) at descriptors 0..; made available and kicked; returns its slot."""
        head = (self.avail_idx * 4) % QSIZE
        for i, (gpa, length, flags) in enumerate(descs):
            nxt = (head + i + 1) % QSIZE
            more = 1 if i + 1 < len(descs) else 0
            self.write(self.desc + 16 * ((head + i) % QSIZE), struct.pack("<QIHH", gpa, length, flags | more, nxt))
        self.write(self.avail + 4 + 2 * (self.avail_idx % QSIZE), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.write(self.avail + 2, struct.pack("<H", self.avail_idx))
        os.eventfd_write(self.kick, 1)
        return head

    def used_idx(self) -> int:
        return int(struct.unpack("<H", self.read(self.used + 2, 2))[0])

    def wait_used(self) -> tuple[int, int]:
        r, _, _ = select.select([self.call], [], [], 10)
        assert r, "no interrupt (call eventfd) within 10 s"
        os.eventfd_read(self.call)
        idx = self.used_idx()
        assert idx != self.seen_used
        slot = self.used + 4 + 8 * (self.seen_used % QSIZE)
        self.seen_used = (self.seen_used + 1) & 0xFFFF
        head, length = struct.unpack("<II", self.read(slot, 8))
        return head, length

    def close(self) -> None:
        os.close(self.kick)
        os.close(self.call)


@dataclass
class Rig:
    ns: NetNs
    tap: int
    peer: socket.socket
    net: Any
    err: int
    ram: Any
    rx: Queue
    tx: Queue

    def stats(self) -> dict[str, int]:
        st = ffi.new("struct mshv_net_stats *")
        lib.mshv_net_get_stats(self.net, st)
        return {
            f: int(getattr(st, f)) for f in ("rx_packets", "rx_bytes", "rx_drops", "tx_packets", "tx_bytes", "tx_drops")
        }

    def start(self) -> None:
        for n, q in enumerate((self.rx, self.tx)):
            assert lib.mshv_net_set_queue(self.net, n, QSIZE, q.desc, q.avail, q.used, q.kick, q.call, 0, 0) == 0
        assert lib.mshv_net_start(self.net, 0) == 0

    def error(self) -> str:
        buf = ffi.new("char[]", 160)
        lib.mshv_net_error(self.net, buf, 160)
        return str(ffi.string(buf).decode())


@pytest.fixture
def rig() -> Iterator[Rig]:
    with netns("netio") as ns:
        tap = ns.open_tap("vt0")
        peer = ns.packet_socket("vt0")
        err = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        net = lib.mshv_net_new(tap, err)
        assert net != ffi.NULL
        ram = ffi.new("uint8_t[]", RAM)
        assert lib.mshv_net_add_region(net, GPA, RAM, int(ffi.cast("uintptr_t", ram))) == 0
        r = Rig(ns, tap, peer, net, err, ram, Queue(ram, GPA), Queue(ram, GPA + 0x40000))
        try:
            yield r
        finally:
            lib.mshv_net_free(net)
            r.rx.close()
            r.tx.close()
            peer.close()
            os.close(tap)
            os.close(err)


def frame(payload: bytes) -> bytes:
    return b"\xff" * 6 + bytes.fromhex("525400123456") + struct.pack("!H", ETHERTYPE) + payload


def test_frames_both_ways_byte_for_byte(rig: Rig) -> None:
    rig.start()
    # tap -> guest: a posted rx buffer receives header + frame
    rig.rx.post([(rig.rx.bufs, BUF, 2)])
    sent = frame(bytes(range(256)) * 2)
    rig.peer.send(sent)
    head, length = rig.rx.wait_used()
    assert head == 0
    got = rig.rx.read(rig.rx.bufs, length)
    assert length == HDR + len(sent), got[:32].hex()
    assert got[:HDR] == bytes(HDR)  # no offloads: flags 0, GSO none
    assert got[HDR:] == sent
    # guest -> tap: header + frame split over two descriptors, seen by the peer as the frame
    out = frame(b"from-the-guest" * 20)
    rig.tx.write(rig.tx.bufs, bytes(HDR))
    rig.tx.write(rig.tx.bufs + 0x100, out)
    rig.tx.post([(rig.tx.bufs, HDR, 0), (rig.tx.bufs + 0x100, len(out), 0)])
    rig.tx.wait_used()
    rig.peer.settimeout(5)
    while True:
        data = rig.peer.recv(4096)
        if data[12:14] == struct.pack("!H", ETHERTYPE):
            break
    assert data == out
    st = rig.stats()
    assert st["rx_packets"] == 1 and st["rx_bytes"] == len(sent)
    assert st["tx_packets"] == 1 and st["tx_bytes"] == len(out)
    assert st["rx_drops"] == st["tx_drops"] == 0


def test_batch_of_frames_one_wakeup_each_way(rig: Rig) -> None:
    rig.start()
    frames = [frame(bytes([i]) * (60 + i)) for i in range(8)]
    for f in frames:  # queued in the tap before any buffer exists
        rig.peer.send(f)
    for i in range(8):
        rig.rx.write(rig.rx.bufs + i * BUF, bytes(BUF))
    # eight chains made available with one kick
    for i in range(8):
        rig.rx.write(rig.rx.desc + 16 * i, struct.pack("<QIHH", rig.rx.bufs + i * BUF, BUF, 2, 0))
        rig.rx.write(rig.rx.avail + 4 + 2 * i, struct.pack("<H", i))
    rig.rx.write(rig.rx.avail + 2, struct.pack("<H", 8))
    os.eventfd_write(rig.rx.kick, 1)
    wait_for(lambda: rig.rx.used_idx() == 8, timeout=10, what="eight rx buffers used")
    for i in range(8):
        head, length = struct.unpack("<II", rig.rx.read(rig.rx.used + 4 + 8 * i, 8))
        assert rig.rx.read(rig.rx.bufs + head * BUF + HDR, length - HDR) == frames[head]


def test_link_down_drops_tx_and_stops_rx(rig: Rig) -> None:
    rig.start()
    assert lib.mshv_net_set_link(rig.net, 0) == 0
    out = frame(b"x" * 50)
    rig.tx.write(rig.tx.bufs, bytes(HDR) + out)
    rig.tx.post([(rig.tx.bufs, HDR + len(out), 0)])
    rig.tx.wait_used()
    assert rig.stats()["tx_drops"] == 1 and rig.stats()["tx_packets"] == 0
    rig.rx.post([(rig.rx.bufs, BUF, 2)])
    rig.peer.send(frame(b"y" * 50))
    assert rig.rx.used_idx() == 0
    assert lib.mshv_net_set_link(rig.net, 1) == 0
    _, length = rig.rx.wait_used()
    assert rig.rx.read(rig.rx.bufs + HDR, length - HDR) == frame(b"y" * 50)


@pytest.mark.parametrize(
    "desc, why",
    [
        ((GPA + RAM - 8, 64, 2), "buffer outside guest RAM"),
        ((0xFFFF_FFFF_FFFF_F000, 0x2000, 2), "buffer outside guest RAM"),
        ((GPA + 0x8000, 64, 0), "device-readable buffer in the rx queue"),
        ((GPA + 0x8000, 64, 4 | 2), "indirect descriptor"),
    ],
)
def test_hostile_descriptor_stops_the_device(rig: Rig, desc: tuple[int, int, int], why: str) -> None:
    rig.start()
    rig.rx.post([desc])
    rig.peer.send(frame(b"z" * 60))
    r, _, _ = select.select([rig.err], [], [], 10)
    assert r, "the error eventfd stayed silent"
    assert why in rig.error()
    assert rig.rx.used_idx() == 0
    assert rig.stats()["rx_packets"] == 0


def test_ring_outside_guest_ram_is_refused(rig: Rig) -> None:
    q = rig.rx
    assert lib.mshv_net_set_queue(rig.net, 0, QSIZE, GPA + RAM - 16, q.avail, q.used, q.kick, q.call, 0, 0) == 0
    assert (
        lib.mshv_net_set_queue(
            rig.net, 1, QSIZE, rig.tx.desc, rig.tx.avail, rig.tx.used, rig.tx.kick, rig.tx.call, 0, 0
        )
        == 0
    )
    assert lib.mshv_net_start(rig.net, 0) != 0
    assert "ring outside guest RAM" in rig.error()


def test_event_index_suppresses_interrupts(rig: Rig) -> None:
    for n, q in enumerate((rig.rx, rig.tx)):
        assert lib.mshv_net_set_queue(rig.net, n, QSIZE, q.desc, q.avail, q.used, q.kick, q.call, 0, 0) == 0
    assert lib.mshv_net_start(rig.net, 1) == 0
    tx = rig.tx
    tx.write(tx.avail + 4 + 2 * QSIZE, struct.pack("<H", 1))  # used_event: interrupt after the 2nd buffer
    out = frame(b"e" * 40)
    tx.write(tx.bufs, bytes(HDR) + out)
    tx.post([(tx.bufs, HDR + len(out), 0)])
    wait_for(lambda: tx.used_idx() == 1, timeout=10, what="first tx buffer used")
    assert not select.select([tx.call], [], [], 0.2)[0], "interrupt despite used_event"
    # the device asked to be kicked at the next index (avail_event)
    assert struct.unpack("<H", tx.read(tx.used + 4 + 8 * QSIZE, 2))[0] == 1
    tx.post([(tx.bufs, HDR + len(out), 0)])
    assert select.select([tx.call], [], [], 10)[0], "no interrupt once used passed used_event"
