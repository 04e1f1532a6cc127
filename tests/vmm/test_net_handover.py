"""The test-only hand-over mode (VirtioNet.hand_over) and the compiled module's driver, peer and floor
(abi/vmm/netq.c) that benchmarks/net.py measures with: frames built and checked in C move both ways between
the handed-over queues and a tap in a test namespace; this test's own AF_PACKET socket and the kernel's tap
counters check them, so the benchmark cannot rot."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mshv_libvirt.hv import GuestMemory
from mshv_libvirt.vmm.devices.virtio.net import F_MRG_RXBUF, VirtioNet
from mshv_libvirt.vmm.vhost_user import MemRegion
from tests.support.net_driver import (
    BUF,
    ECHO,
    GUEST_MAC,
    HDR,
    MANY,
    RAM,
    RECV,
    RTT,
    RX_BUFS,
    RX_USED,
    SEND,
    DriverError,
    HandedQueues,
    Job,
    Peer,
    Result,
    frame,
    peer_socket,
    tap_run,
)
from tests.support.netns import NetNs, netns
from tests.support.waits import wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

QUEUE_SIZE = 256
LENGTHS = (64, 1514)


@dataclass
class Rig:
    ns: NetNs
    device: VirtioNet
    mem: GuestMemory
    q: HandedQueues
    sock: socket.socket  # this test's own peer on the device's tap
    floor_tap: int  # a second tap, as bare as the floor uses it
    floor_sock: socket.socket


@pytest.fixture
def rig() -> Iterator[Rig]:
    with netns("nbho") as ns:
        tap, floor_tap = ns.open_tap("nh0"), ns.open_tap("nh1")
        try:
            sock, floor_sock = peer_socket(ns, "nh0"), peer_socket(ns, "nh1")
            try:
                with GuestMemory(RAM) as mem:
                    device = VirtioNet(tap, GUEST_MAC, [MemRegion(0, mem.size, mem.address, mem.fd)])
                    try:
                        q = HandedQueues(device, mem)
                        try:
                            yield Rig(ns, device, mem, q, sock, floor_tap, floor_sock)
                        finally:
                            q.close()
                    finally:
                        device.stop()
            finally:
                sock.close()
                floor_sock.close()
        finally:
            os.close(tap)
            os.close(floor_tap)


def test_the_drivers_frames_reach_the_peer_byte_for_byte(rig: Rig) -> None:
    before = rig.ns.link_stats("nh0")
    rig.sock.settimeout(10)
    for tag, length in enumerate(LENGTHS, 1):
        sent = rig.q.run(Job(SEND, length, count=300, tag=tag))
        assert (sent.frames, sent.bytes) == (300, 300 * length)
        assert sent.kicks >= 1  # through the kick eventfd, as the device's arm_kick asked
        for seq in range(300):
            assert rig.sock.recv(4096) == frame(seq, length, tag, inbound=False), (length, seq)
    grew = {k: v - before[k] for k, v in rig.ns.link_stats("nh0").items()}
    assert (grew["rx_packets"], grew["rx_bytes"]) == (600, 300 * sum(LENGTHS))  # the kernel's view of the tap
    st = rig.device.stats()
    assert (st["tx_packets"], st["tx_bytes"], st["tx_drops"]) == (600, 300 * sum(LENGTHS), 0)


def test_the_peers_frames_reach_the_driver_and_a_wrong_byte_is_counted(rig: Rig) -> None:
    for tag, length in enumerate(LENGTHS, 1):
        good = [frame(seq, length, tag, inbound=True) for seq in range(200)]
        bad = bytearray(frame(200, length, tag, inbound=True))
        bad[-1] ^= 0x40
        foreign = frame(0, length, tag + 100, inbound=True)
        for f in (*good, bytes(bad), foreign):  # fewer than the tap queues (500): none can be dropped
            rig.sock.send(f)
        got = rig.q.run(Job(RECV, length, count=MANY, tag=tag, idle_ms=300))
        assert (got.frames, got.mismatches, got.other, got.reordered) == (200, 1, 1, 0), (length, got)
        # The device's own write, read from guest RAM here: the last used buffer holds the foreign frame.
        idx = struct.unpack("<H", rig.mem.read(RX_USED + 2, 2))[0]
        head, used_len = struct.unpack("<II", rig.mem.read(RX_USED + 4 + 8 * ((idx - 1) % QUEUE_SIZE), 8))
        assert used_len == HDR + length
        assert rig.mem.read(RX_BUFS + head * BUF, used_len) == bytes(HDR) + foreign
    assert idx == 2 * 202  # every frame took one buffer, re-posted buffers included
    st = rig.device.stats()
    assert (st["rx_packets"], st["rx_drops"]) == (404, 0)


def test_round_trips_and_both_directions_with_the_c_peer_and_on_the_bare_tap(rig: Rig) -> None:
    before = {tap: rig.ns.link_stats(tap) for tap in ("nh0", "nh1")}
    for side, sock in (("ours", rig.sock), ("floor", rig.floor_sock)):

        def run(job: Job, side: str = side) -> Result:
            return rig.q.run(job) if side == "ours" else tap_run(rig.floor_tap, job)

        sink = Peer(sock, Job(RECV, 1514, count=MANY, tag=10, idle_ms=300))
        run(Job(SEND, 1514, count=400, tag=10))
        sunk = sink.join()
        assert (sunk.frames, sunk.drops) == (400, 0)  # PACKET_STATISTICS: the socket dropped none
        source = Peer(sock, Job(SEND, 64, count=300, tag=11))  # fewer than the tap queues: none dropped
        got = run(Job(RECV, 64, count=MANY, tag=11, idle_ms=300))
        assert source.join().frames == 300
        assert (got.frames, got.mismatches) == (300, 0)
        echo = Peer(sock, Job(ECHO, 64, count=50, tag=12))
        rtt = run(Job(RTT, 64, count=50, tag=12))
        assert echo.join().frames == 50
        samples = rtt.samples_ns
        assert len(samples) == 50 and all(0 < s < 10**9 for s in samples)
    for tap in ("nh0", "nh1"):
        after = rig.ns.link_stats(tap)
        # written to the tap: 400 sent, 50 round trips; read from it: 300 received, 50 echoes
        assert after["rx_packets"] - before[tap]["rx_packets"] == 450, tap
        assert after["tx_packets"] - before[tap]["tx_packets"] == 350, tap


def test_a_job_the_driver_cannot_do_is_refused(rig: Rig) -> None:
    with pytest.raises(DriverError, match=r"frame length 2040 is not within 60\.\.2036"):
        rig.q.run(Job(SEND, 2040, count=1))
    with pytest.raises(DriverError, match="no frame within 100 ms"):
        rig.q.run(Job(RECV, 64, count=1, start_ms=100))
    with pytest.raises(DriverError, match="mode 3 is the peer's"):
        rig.q.run(Job(ECHO, 64, count=1))


def test_a_multiqueue_devices_hand_over_runs_pair_1_alone() -> None:
    """The hand-over is pair 1's handle (receiveq1/transmitq1 on the tap's first queue); pair 2 stays idle and
    its tap queue detached, as before VQ_PAIRS_SET."""
    with netns("nbmq") as ns:
        fds = ns.open_tap_queues("nq0", 2)
        try:
            sock = peer_socket(ns, "nq0")
            try:
                with GuestMemory(RAM) as mem:
                    regions = [MemRegion(0, mem.size, mem.address, mem.fd)]
                    device = VirtioNet(fds[0], GUEST_MAC, regions, queue_fds=fds[1:])
                    try:
                        q = HandedQueues(device, mem)
                        try:
                            assert (device.pairs, ns.tun_queues("nq0")) == (1, (True, 1, 1))
                            sock.settimeout(10)
                            assert q.run(Job(SEND, 64, count=100, tag=20)).frames == 100
                            for seq in range(100):
                                assert sock.recv(4096) == frame(seq, 64, 20, inbound=False), seq
                            for seq in range(50):  # fewer than the tap queue holds: none dropped
                                sock.send(frame(seq, 1514, 21, inbound=True))
                            got = q.run(Job(RECV, 1514, count=MANY, tag=21, idle_ms=300))
                            assert (got.frames, got.mismatches, got.other) == (50, 0, 0)
                            pair1, pair2 = device.pair_stats()
                            assert (pair1["tx_packets"], pair1["rx_packets"]) == (100, 50)
                            assert pair2 == dict.fromkeys(pair2, 0)  # not even woken (release's stop would)
                        finally:
                            q.close()
                        assert (device.pairs, ns.tun_queues("nq0")) == (0, (True, 1, 1))
                    finally:
                        device.stop()
            finally:
                sock.close()
        finally:
            for fd in fds:
                os.close(fd)


SMALL = 256  # rx buffers a MRG_RXBUF driver posts: a 1514-byte frame and its header take ceil(1526 / 256) = 6


@pytest.mark.parametrize("mrg_rxbuf", [True, False])
def test_merged_rx_buffers_spread_a_frame_over_num_buffers_chains(mrg_rxbuf: bool) -> None:
    """MRG_RXBUF (virtio 1.2 5.1.6.4) with 256-byte rx buffers: each 1514-byte frame arrives over 6 chains,
    num_buffers 6 in the first one's header, the bytes put back together and checked in C; 100 frames take
    600 chains of a 256-entry ring, so the device also waits for re-posted buffers rather than dropping.
    Without MRG_RXBUF (2048-byte buffers) every frame is whole in one chain, as before."""
    with netns("nbmr") as ns:
        tap = ns.open_tap("nm0")
        try:
            sock = peer_socket(ns, "nm0")
            try:
                with GuestMemory(RAM) as mem:
                    device = VirtioNet(tap, GUEST_MAC, [MemRegion(0, mem.size, mem.address, mem.fd)])
                    try:
                        q = HandedQueues(device, mem, rx_len=SMALL if mrg_rxbuf else 0, mrg_rxbuf=mrg_rxbuf)
                        try:
                            assert bool(q.features & F_MRG_RXBUF) == mrg_rxbuf
                            for seq in range(100):  # fewer than the tap queue holds (500): none dropped there
                                sock.send(frame(seq, 1514, 30, inbound=True))
                            got = q.run(Job(RECV, 1514, count=MANY, tag=30, idle_ms=300))
                            per_frame = -(-(HDR + 1514) // SMALL) if mrg_rxbuf else 1
                            assert (got.frames, got.mismatches, got.other, got.reordered) == (100, 0, 0, 0), got
                            assert got.chains == 100 * per_frame
                            st = device.stats()
                            assert (st["rx_packets"], st["rx_bytes"], st["rx_drops"]) == (100, 100 * 1514, 0)
                            # The device's own writes, read from guest RAM: the last frame's used entries.
                            idx = struct.unpack("<H", mem.read(RX_USED + 2, 2))[0]
                            assert idx == 100 * per_frame
                            entries = [
                                struct.unpack("<II", mem.read(RX_USED + 4 + 8 * (i % QUEUE_SIZE), 8))
                                for i in range(idx - per_frame, idx)
                            ]
                            room = SMALL if mrg_rxbuf else BUF
                            lens = [n for _, n in entries]
                            assert lens == [room] * (per_frame - 1) + [HDR + 1514 - room * (per_frame - 1)]
                            data = b"".join(mem.read(RX_BUFS + head * BUF, n) for head, n in entries)
                            assert data[HDR:] == frame(99, 1514, 30, inbound=True)
                            if mrg_rxbuf:
                                assert struct.unpack("<H", data[10:12])[0] == per_frame  # num_buffers
                        finally:
                            q.close()
                    finally:
                        device.stop()
            finally:
                sock.close()
        finally:
            os.close(tap)


def test_without_merged_rx_buffers_a_frame_larger_than_its_chain_is_a_drop_not_a_cut_frame() -> None:
    """A 1514-byte frame for a 256-byte rx chain (no MRG_RXBUF): the tap's short read would hand the guest the
    first 244 bytes as a frame; the device counts it in rx_drops instead, and the frames after it arrive."""
    with netns("nbcut") as ns:
        tap = ns.open_tap("nc0")
        try:
            sock = peer_socket(ns, "nc0")
            try:
                with GuestMemory(RAM) as mem:
                    device = VirtioNet(tap, GUEST_MAC, [MemRegion(0, mem.size, mem.address, mem.fd)])
                    try:
                        q = HandedQueues(device, mem, rx_len=SMALL)
                        try:
                            for seq in range(3):
                                sock.send(frame(seq, 1514, 41, inbound=True))
                            for seq in range(5):
                                sock.send(frame(seq, 200, 42, inbound=True))
                            got = q.run(Job(RECV, 200, count=MANY, tag=42, idle_ms=300))
                            assert (got.frames, got.mismatches, got.other) == (5, 0, 0), got
                            st = device.stats()
                            assert (st["rx_packets"], st["rx_bytes"], st["rx_drops"]) == (5, 5 * 200, 3)
                        finally:
                            q.close()
                    finally:
                        device.stop()
            finally:
                sock.close()
        finally:
            os.close(tap)


BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "net.py"


def bench_netns(pid: int) -> Path:
    return Path(f"/run/netns/mshv-netbench-{pid}")  # the name tests/support/netns.py gives it


def test_the_benchmark_runs_every_case_and_deletes_its_namespace() -> None:
    argv = [sys.executable, str(BENCH), "--seconds", "0.05", "--rounds", "1", "--rtt-count", "20", "--warmup", "5"]
    proc = subprocess.Popen([*argv, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, stderr
    report = json.loads(stdout)
    cases = {(r["way"], r["frame_len"]) for r in report["rates"]}
    assert cases == {(way, n) for way in ("tx", "rx") for n in LENGTHS}
    assert all(r["ours"]["frames"] > 0 and r["floor"]["frames"] > 0 for r in report["rates"])
    assert [(r["frame_len"], r["samples"]) for r in report["rtt"]] == [(n, 20) for n in LENGTHS]
    assert not bench_netns(proc.pid).exists(), stderr


def test_a_sigterm_mid_run_still_deletes_the_benchmarks_namespace() -> None:
    proc = subprocess.Popen(
        [sys.executable, str(BENCH), "--seconds", "2", "--rounds", "3"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ns = NetNs(bench_netns(proc.pid).name)
    try:

        def moving() -> bool:
            """Frames reach the tap (the kernel's count): the driver and the peer run in C."""
            return bench_netns(proc.pid).exists() and ns.link_exists("nb0") and ns.link_stats("nb0")["rx_packets"] > 0

        wait_for(moving, 60, what=f"frames on nb0 in {ns.name}")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 128 + signal.SIGTERM
        assert not bench_netns(proc.pid).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if bench_netns(proc.pid).exists():  # only when the test failed: not left for the next run
            subprocess.run(["ip", "netns", "del", ns.name], check=False, capture_output=True)
