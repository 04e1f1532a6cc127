"""Network namespaces a test creates and deletes: nothing here touches the host's own interfaces,
routes or firewall. A tap is created inside the namespace (the creating thread enters it first), so
the host never has the interface; its fd works from any namespace."""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import re
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from tests.support.guests import TINY_NET_ETHERTYPE, TINY_NET_FRAMES, tiny_net_frame

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
ETH_P_ALL = 0x0003
VNET_HDR_LEN = 12
PACKET_OUTGOING = 4  # sll_pkttype of what was sent on the interface, not received
PEER_MAC = bytes.fromhex("525400fe0001")

_libc = ctypes.CDLL(None, use_errno=True)


def _in_netns(name: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a fresh thread that entered namespace ``name`` (setns is per thread)."""
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err))
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


class NetNs:
    def __init__(self, name: str) -> None:
        self.name = name

    def call(self, fn: Callable[[], T]) -> T:
        """``fn``'s result, run on a thread inside the namespace (what it creates lives there)."""
        return _in_netns(self.name, fn)

    def run(self, *argv: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.name, *argv], check=True, capture_output=True)

    def open_tap(self, ifname: str) -> int:
        """A tap (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR, 12-byte header) inside the namespace, up; its fd."""
        (fd,) = self.open_tap_queues(ifname, 1)
        return fd

    def open_tap_queues(self, ifname: str, queues: int) -> list[int]:
        """The same tap with ``queues`` descriptors (IFF_MULTI_QUEUE when more than one), up."""
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if queues > 1 else 0)

        def create() -> list[int]:
            fds: list[int] = []
            try:
                for _ in range(queues):
                    fds.append(os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK))
                    fcntl.ioctl(fds[-1], TUNSETIFF, struct.pack("16sH22x", ifname.encode(), flags))
                fcntl.ioctl(fds[0], TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
            except BaseException:
                for fd in fds:
                    os.close(fd)
                raise
            return fds

        fds = _in_netns(self.name, create)
        self.run("ip", "link", "set", ifname, "up")
        return fds

    def tun_queues(self, ifname: str) -> tuple[bool, int, int]:
        """The kernel's view of a tap's queues (``ip -d link``): multi_queue or not, attached and detached."""
        out = subprocess.run(
            ["ip", "-n", self.name, "-d", "link", "show", "dev", ifname], check=True, capture_output=True, text=True
        ).stdout
        m = re.search(r" tun type tap .*?(?: numqueues (\d+) numdisabled (\d+))?(?: persist)", out)
        assert m is not None, out
        multi = " multi_queue " in out
        return multi, int(m.group(1) or 1), int(m.group(2) or 0)

    def packet_socket(self, ifname: str) -> socket.socket:
        """A raw AF_PACKET socket bound to ``ifname`` in the namespace (the peer)."""

        def create() -> socket.socket:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            s.bind((ifname, 0))
            return s

        return _in_netns(self.name, create)

    def link_stats(self, ifname: str) -> dict[str, int]:
        """The kernel's counters of ``ifname`` (``ip -s``): rx_/tx_ packets and bytes as the host sees them."""
        out = subprocess.run(
            ["ip", "-n", self.name, "-j", "-s", "link", "show", "dev", ifname],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        stats = json.loads(out)[0]["stats64"]
        return {f"{way}_{k}": int(stats[way][k]) for way in ("rx", "tx") for k in ("packets", "bytes")}

    def link_exists(self, ifname: str) -> bool:
        r = subprocess.run(["ip", "-n", self.name, "link", "show", ifname], capture_output=True)
        return r.returncode == 0


@contextmanager
def netns(tag: str) -> Iterator[NetNs]:
    """A namespace named after the test and this process, IPv6 off (no autoconfiguration chatter), deleted after."""
    name = f"mshv-{tag}-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        ns = NetNs(name)
        ns.run("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
        ns.run("sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True, capture_output=True)


def tiny_net_reply(guest_mac: bytes, press: int, number: int) -> bytes:
    """The peer's answer to frame ``number`` of press ``press``: to the guest, lengths 60, 64, 68, ..."""
    head = (
        guest_mac + PEER_MAC + struct.pack(">H", TINY_NET_ETHERTYPE) + b"HOST-NET" + struct.pack("<II", press, number)
    )
    return head.ljust(60 + 4 * number, bytes([number + 1]))


def answer_tiny_net(sock: socket.socket, guest_mac: bytes, press: int, *, timeout: float) -> list[bytes]:
    """The peer of one ``u`` press of the tiny guest: read its TINY_NET_FRAMES frames from ``sock`` (the
    ones received on the interface, not what this socket sends), check their bytes, answer each at once;
    the replies, in the order sent."""
    sock.settimeout(timeout)
    replies = []
    for number in range(TINY_NET_FRAMES):
        while True:
            data, addr = sock.recvfrom(65536)
            if addr[2] != PACKET_OUTGOING:
                break
        assert data == tiny_net_frame(guest_mac, press, number), (number, data.hex())
        reply = tiny_net_reply(guest_mac, press, number)
        sock.send(reply)
        replies.append(reply)
    return replies
