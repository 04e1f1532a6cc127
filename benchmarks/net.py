#!/usr/bin/env python3
"""virtio-net data path vs. the same frames on a bare tap fd, both against one peer, in the same run.

Guests cannot measure the network on this host (every guest kernel instruction is emulated), so the data
path itself is driven: a VirtioNet device in its test-only hand-over mode (docs/DESIGN.md) serves both queues
of guest RAM (a memfd) from its compiled I/O thread (abi/vmm/net.c) exactly as after DRIVER_OK, and the
compiled module's C driver (abi/vmm/netq.c) builds frames in the tx buffers, posts rx buffers, kicks the kick
eventfds and reaps the used rings, sleeping on the call eventfds where the guest's MSI-X irqfds would be. The
floor is the same frames written to and read from a bare tap fd by C code of the same file. Both taps are
in a network namespace this script creates (and deletes on every exit it can catch: normal, an exception,
SIGINT, SIGTERM, SIGHUP), with IPv6 off and no address; the peer on either is a C thread on an AF_PACKET
socket there (sendmmsg/recvmmsg in batches of 64). Python sets up and reads one result per run. (A SIGKILL
cannot be caught: it leaves ``/run/netns/mshv-netbench-PID``, taps and all, for ``ip netns del``.)

Cases, at frame lengths 64 and 1514 bytes (a 1500-byte MTU's payload; the tap sees the frame without FCS,
behind a 12-byte virtio_net_hdr on both sides):

* tx (guest to tap): the driver (or the floor) sends for ``--seconds``; the peer receives. frames/s = what
  the peer received / (its last frame - the sender's first), so a frame counts only once it arrived.
* rx (tap to guest): the peer sends for ``--seconds`` as fast as it can; the driver (or the floor) receives.
  frames/s = what arrived / (the receiver's last frame - the peer's first). The tap's queue (500 frames, as
  libvirt leaves it) drops what the receiver cannot take: both sides are measured by what they took.
* rtt: one frame out, the peer echoes it, wait for it to come back, ``--rtt-count`` times (the first
  ``--warmup`` not counted); median and p99.

Each case also reports the data path's CPU time per frame (per round trip): the driver's thread and the
device's I/O thread, or the floor's one thread (``/proc/self/task/TID/schedstat``; softirq work done on those
threads, such as delivering a written frame to the peer's socket, included; the peer's own thread excluded).

Targets (reported, not gated): frames/s >= 0.7x the floor's each way; the median round trip <= the floor's
+ 20 us. Each side runs ``--rounds`` times per case, the two alternating which goes first (a drifting load
then hits both alike), and is pooled: all frames over all time, all round-trip samples.

Run (as root: namespaces): ``.tox/py/bin/python benchmarks/net.py [--seconds S] [--rounds R] [--json]``.
Not run by tox.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import FrameType
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mshv_libvirt.hv import GuestMemory
from mshv_libvirt.vmm.devices.virtio.net import VirtioNet
from mshv_libvirt.vmm.vhost_user import MemRegion
from tests.support.net_driver import (
    ECHO,
    GUEST_MAC,
    MANY,
    RAM,
    RECV,
    RTT,
    SEND,
    HandedQueues,
    Job,
    Peer,
    Result,
    peer_socket,
    tap_drops,
    tap_run,
)
from tests.support.netns import NetNs, netns

T = TypeVar("T")

LENGTHS = (64, 1514)
IDLE_MS = 300  # a receiver's gap after the sender stopped; excluded from its time (its last frame ends it)


@dataclass(frozen=True)
class Rate:
    frames: int
    seconds: float
    lost: int  # sent but never received
    dropped: int  # of those, what the kernel counted: the peer's socket (tx), the tap's queue (rx)
    cpu_ns: int  # the data path's CPU time: the driver's and the I/O thread's, or the floor's thread's

    @property
    def cpu_us_per_frame(self) -> float:
        return self.cpu_ns / self.frames / 1e3 if self.frames else 0.0

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


@contextmanager
def exits_cleanly() -> Iterator[None]:
    """SIGTERM and SIGHUP end the run as SIGINT does (an exception), so every ``finally`` deletes what it made."""

    def stop(signo: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signo)

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


class Bench:
    def __init__(
        self, ns: NetNs, q: HandedQueues, io_tid: int, sock: socket.socket, floor_tap: int, floor_sock: socket.socket
    ) -> None:
        self.ns, self.q, self.sock, self.floor_tap, self.floor_sock = ns, q, sock, floor_tap, floor_sock
        self.tag = int.from_bytes(os.urandom(4), "little") << 16
        # The data path's threads: this one (the driver or the floor) and, for ours, the device's I/O thread.
        self.tids = {True: (threading.get_native_id(), io_tid), False: (threading.get_native_id(),)}

    def cpu_ns(self, ours: bool) -> int:
        """CPU time so far of one side's data-path threads (schedstat: ns on a CPU, softirqs run there included)."""
        return sum(int(Path(f"/proc/self/task/{t}/schedstat").read_text().split()[0]) for t in self.tids[ours])

    def _next_tag(self) -> int:
        self.tag += 1  # each run its own: a frame left from another run is never counted
        return self.tag

    def _side(self, ours: bool) -> tuple[Callable[[Job], Result], socket.socket, str]:
        if ours:
            return self.q.run, self.sock, "nb0"
        return (lambda job: tap_run(self.floor_tap, job)), self.floor_sock, "nb1"

    @staticmethod
    def _checked(*results: Result) -> None:
        for r in results:
            if r.mismatches or r.reordered:
                raise RuntimeError(f"frames arrived wrong: {r}")

    def tx(self, ours: bool, length: int, seconds: float) -> Rate:
        run, sock, _ = self._side(ours)
        tag = self._next_tag()
        peer = Peer(sock, Job(RECV, length, count=MANY, tag=tag, idle_ms=IDLE_MS))
        cpu = self.cpu_ns(ours)
        try:
            sent = run(Job(SEND, length, seconds=seconds, tag=tag))
        finally:
            got = peer.join()  # its thread uses the socket: never left running past the socket's close
        self._checked(got)
        cpu = self.cpu_ns(ours) - cpu
        return Rate(got.frames, (got.last_ns - sent.first_ns) / 1e9, sent.frames - got.frames, got.drops, cpu)

    def rx(self, ours: bool, length: int, seconds: float) -> Rate:
        run, sock, ifname = self._side(ours)
        tag = self._next_tag()
        drops = tap_drops(self.ns, ifname)
        cpu = self.cpu_ns(ours)
        peer = Peer(sock, Job(SEND, length, seconds=seconds, tag=tag))
        try:
            got = run(Job(RECV, length, count=MANY, tag=tag, idle_ms=IDLE_MS))
        finally:
            sent = peer.join()
        self._checked(got)
        cpu = self.cpu_ns(ours) - cpu
        dropped = tap_drops(self.ns, ifname) - drops
        return Rate(got.frames, (got.last_ns - sent.first_ns) / 1e9, sent.frames - got.frames, dropped, cpu)

    def rtt(self, ours: bool, length: int, count: int, warmup: int) -> tuple[list[int], float]:
        """The round trips after the warm-up (ns) and the data path's CPU us per round trip."""
        run, sock, _ = self._side(ours)
        tag = self._next_tag()
        peer = Peer(sock, Job(ECHO, length, count=count + warmup, tag=tag))
        cpu = self.cpu_ns(ours)
        try:
            r = run(Job(RTT, length, count=count + warmup, tag=tag))
        finally:
            peer.join()
        self._checked(r)
        return list(r.samples_ns[warmup:]), (self.cpu_ns(ours) - cpu) / r.frames / 1e3


def pooled(runs: list[Rate]) -> Rate:
    return Rate(*(sum(getattr(r, f) for r in runs) for f in ("frames", "seconds", "lost", "dropped", "cpu_ns")))


def quantile(samples: list[int], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))] / 1e3


def alternate(rounds: int, measure: Callable[[bool], T]) -> dict[bool, list[T]]:
    """``measure(ours)`` for both sides ``rounds`` times, alternating which goes first; results by side."""
    out: dict[bool, list[T]] = {True: [], False: []}
    for n in range(rounds):
        for ours in (True, False) if n % 2 == 0 else (False, True):
            out[ours].append(measure(ours))
    return out


@dataclass(frozen=True)
class Trips:
    samples: list[int]  # ns, every round of one side
    cpu_us: float  # the data path's CPU per round trip, the rounds' mean

    def q(self, quant: float) -> float:
        return quantile(self.samples, quant)


def measure(
    bench: Bench, args: argparse.Namespace
) -> tuple[dict[tuple[str, int], dict[bool, list[Rate]]], dict[int, dict[bool, Trips]]]:
    """Every case, both sides alternating: the rates by (way, length) and the round trips by length."""
    rates: dict[tuple[str, int], dict[bool, list[Rate]]] = {}
    rtts: dict[int, dict[bool, Trips]] = {}
    for length in args.lengths:
        for way, fn in (("tx", bench.tx), ("rx", bench.rx)):
            if way not in args.cases:
                continue
            runs = alternate(args.rounds, partial(fn, length=length, seconds=args.seconds))
            rates[way, length] = runs
            a, b = pooled(runs[True]), pooled(runs[False])
            print(f"{way} {length}: {a.fps:.0f} / {b.fps:.0f} frames/s = {a.fps / b.fps:.3f}", file=sys.stderr)
        if "rtt" not in args.cases:
            continue
        by_round = alternate(args.rounds, partial(bench.rtt, length=length, count=args.rtt_count, warmup=args.warmup))
        trips = {
            side: Trips([s for r, _ in rounds for s in r], sum(c for _, c in rounds) / len(rounds))
            for side, rounds in by_round.items()
        }
        rtts[length] = trips
        print(f"rtt {length}: median {trips[True].q(0.5):.1f} / {trips[False].q(0.5):.1f} us", file=sys.stderr)
    return rates, rtts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="sending time per rate case, side and round")
    ap.add_argument("--rounds", type=int, default=3, help="per case and side, alternating which goes first")
    ap.add_argument("--rtt-count", type=int, default=5000, help="round trips per side and round")
    ap.add_argument("--warmup", type=int, default=200, help="round trips first, not counted")
    ap.add_argument("--lengths", type=lambda v: [int(n) for n in v.split(",")], default=list(LENGTHS))
    ap.add_argument("--cases", type=lambda v: v.split(","), default=["tx", "rx", "rtt"], help="of tx,rx,rtt")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("network namespaces need root", file=sys.stderr)
        return 2
    start_load = load()
    print(f"load average at start: {start_load}", file=sys.stderr)
    with exits_cleanly(), netns("netbench") as ns:
        tap, floor_tap = ns.open_tap("nb0"), ns.open_tap("nb1")  # the same flags: IFF_VNET_HDR, 12-byte header
        try:
            with (
                peer_socket(ns, "nb0") as sock,
                peer_socket(ns, "nb1") as floor_sock,
                GuestMemory(RAM) as mem,
            ):
                before = set(os.listdir("/proc/self/task"))
                device = VirtioNet(tap, GUEST_MAC, [MemRegion(0, mem.size, mem.address, mem.fd)])
                try:
                    (io_tid,) = set(os.listdir("/proc/self/task")) - before  # the I/O thread it started
                    q = HandedQueues(device, mem)
                    try:
                        rates, rtts = measure(Bench(ns, q, int(io_tid), sock, floor_tap, floor_sock), args)
                        stats = device.stats()
                    finally:
                        q.close()
                finally:
                    device.stop()
        finally:
            os.close(tap)
            os.close(floor_tap)
    end_load = load()
    print(f"load average at end: {end_load}", file=sys.stderr)
    rate_rows = []
    for (way, length), runs in rates.items():
        a, b = pooled(runs[True]), pooled(runs[False])
        ratio = a.fps / b.fps
        rate_rows.append((way, length, a, b, ratio, "met" if ratio >= 0.7 else "missed"))
    rtt_rows = []
    for length, trips in rtts.items():
        a_t, b_t = trips[True], trips[False]
        rtt_rows.append((length, a_t, b_t, "met" if a_t.q(0.5) <= b_t.q(0.5) + 20 else "missed"))
    if args.json:
        out = {
            "load": [start_load, end_load],
            "device_stats": stats,
            "rates": [
                {"way": w, "frame_len": n, "ours": a.__dict__, "floor": b.__dict__, "ratio": r, "verdict": v}
                for w, n, a, b, r, v in rate_rows
            ],
            "rtt": [
                {
                    "frame_len": n,
                    "median_us": [a.q(0.5), b.q(0.5)],
                    "p99_us": [a.q(0.99), b.q(0.99)],
                    "cpu_us": [a.cpu_us, b.cpu_us],
                    "verdict": v,
                    "samples": len(a.samples),
                }
                for n, a, b, v in rtt_rows
            ],
        }
        print(json.dumps(out, indent=1))
        return 0
    print("| case | ours | floor (bare tap) | ratio | CPU us/frame ours / floor | lost (drops) ours / floor | target |")
    print("|---|---|---|---|---|---|---|")
    for way, length, a, b, ratio, verdict in rate_rows:
        print(
            f"| {way} {length} B | {a.fps:.0f} frames/s | {b.fps:.0f} frames/s | **{ratio:.2f}** "
            f"| {a.cpu_us_per_frame:.2f} / {b.cpu_us_per_frame:.2f} "
            f"| {a.lost} ({a.dropped}) / {b.lost} ({b.dropped}) | >= 0.7x: {verdict} |"
        )
    for length, a_t, b_t, verdict in rtt_rows:
        print(
            f"| round trip {length} B, median (p99) | {a_t.q(0.5):.1f} ({a_t.q(0.99):.1f}) us "
            f"| {b_t.q(0.5):.1f} ({b_t.q(0.99):.1f}) us | +{a_t.q(0.5) - b_t.q(0.5):.1f} us "
            f"| {a_t.cpu_us:.2f} / {b_t.cpu_us:.2f} | | median <= floor + 20 us: {verdict} |"
        )
    print(f"device: {stats}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
