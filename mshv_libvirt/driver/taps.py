"""The tap devices of a domain's interfaces, created by the daemon at start as libvirt's QEMU driver creates
them (virNetDevTapCreateInBridgePort): IFF_TAP|IFF_NO_PI|IFF_VNET_HDR, the host side's MAC the guest's with
its first byte 0xFE (so a bridge never takes it as its own), the MTU asked for or else the bridge's, a port
of the bridge, up. With ``<driver queues='N'/>`` (N > 1) the tap is opened N times with IFF_MULTI_QUEUE, one
descriptor per queue pair, as virNetDevTapCreate loops over tapfdSize.

A tap is not persistent: it lives as long as a descriptor of it is open. The daemon hands its descriptor
to the VMM and closes its own copy, so the tap goes with the VMM however that ends (destroy, a crash,
SIGKILL) and outlives a daemon restart with the VMM. Nothing here runs per packet.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from mshv_libvirt.errors import ErrorCode, ErrorDomain, VirtError

__all__ = ["IFNAMSIZ", "Tap", "TapBusy", "create_tap", "interface_exists"]

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
IFF_UP = 0x1
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCGIFMTU = 0x8921
SIOCSIFMTU = 0x8922
SIOCSIFHWADDR = 0x8924
SIOCBRADDIF = 0x89A2
ARPHRD_ETHER = 1
IFNAMSIZ = 16  # with its NUL
_IFREQ = 40  # sizeof(struct ifreq) on Linux (64-bit)


class TapBusy(VirtError):
    """TUNSETIFF found a tap of that name in use (another daemon's VM took a generated name meanwhile)."""


def _system_error(detail: str, err: OSError) -> VirtError:
    # virReportSystemError: "<detail>: <strerror>", VIR_ERR_SYSTEM_ERROR from util (no error domain)
    return VirtError(ErrorCode.SYSTEM_ERROR, f"{detail}: {os.strerror(err.errno or errno.EIO)}", ErrorDomain.NONE)


def _ifreq(name: str, tail: bytes = b"") -> bytes:
    return struct.pack(f"{IFNAMSIZ}s", name.encode()) + tail.ljust(_IFREQ - IFNAMSIZ, b"\0")


def interface_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


@dataclass
class Tap:
    name: str
    fd: int  # the daemon's descriptor until the VMM has its own; closing it (with no other) removes the tap
    queue_fds: tuple[int, ...] = ()  # a multiqueue tap's descriptors of queues 2..N

    @property
    def fds(self) -> tuple[int, ...]:
        return (self.fd, *self.queue_fds)

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _ctl(sock: socket.socket, request: int, req: bytes) -> bytes:
    return fcntl.ioctl(sock.fileno(), request, req)


def _open_queue(name: str, flags: int) -> int:
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as err:
        raise _system_error(f"Unable to open {TUN_PATH}, is tun module loaded?", err) from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, struct.pack("H", flags)))
    except OSError as err:
        os.close(fd)
        e = _system_error(f"Unable to create tap device {name}", err)
        if err.errno == errno.EBUSY:
            raise TapBusy(e.code, e.detail, e.domain) from None
        raise e from None
    return fd


def create_tap(name: str, mac: str, *, mtu: int | None, bridge: str | None, queues: int = 1) -> Tap:
    """A tap named ``name`` for a guest with MAC ``mac``, a port of ``bridge`` when given, up, with ``queues``
    descriptors (IFF_MULTI_QUEUE above one); the VirtError libvirt reports where a step fails (nothing is left
    behind then). The kernel takes at most 256 queues a tap (MAX_TAP_QUEUES): past that TUNSETIFF fails with
    E2BIG, reported as libvirt reports it."""
    if len(name.encode()) >= IFNAMSIZ:
        raise _system_error(f"Network interface name '{name}' is too long", OSError(errno.ERANGE, ""))
    flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if queues > 1 else 0)
    tap = Tap(name, _open_queue(name, flags))
    try:
        more: list[int] = []
        try:
            for _ in range(queues - 1):
                more.append(_open_queue(name, flags))
        finally:
            tap.queue_fds = tuple(more)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            host_mac = bytes([0xFE, *bytes.fromhex(mac.replace(":", ""))[1:]])
            try:
                _ctl(sock, SIOCSIFHWADDR, _ifreq(name, struct.pack("H6s", ARPHRD_ETHER, host_mac)))
            except OSError as err:
                raise _system_error(f"Cannot set interface MAC on '{name}'", err) from None
            if mtu is None and bridge is not None:
                try:
                    mtu = struct.unpack_from("i", _ctl(sock, SIOCGIFMTU, _ifreq(bridge)), IFNAMSIZ)[0]
                except OSError as err:
                    raise _system_error(f"Cannot get interface MTU on '{bridge}'", err) from None
            if mtu is not None:
                try:
                    _ctl(sock, SIOCSIFMTU, _ifreq(name, struct.pack("i", mtu)))
                except OSError as err:
                    raise _system_error(f"Cannot set interface MTU on '{name}'", err) from None
            if bridge is not None:
                try:
                    _ctl(sock, SIOCBRADDIF, _ifreq(bridge, struct.pack("i", socket.if_nametoindex(name))))
                except OSError as err:
                    raise _system_error(f"Unable to add bridge {bridge} port {name}", err) from None
            try:
                flags = struct.unpack_from("H", _ctl(sock, SIOCGIFFLAGS, _ifreq(name)), IFNAMSIZ)[0]
                _ctl(sock, SIOCSIFFLAGS, _ifreq(name, struct.pack("H", flags | IFF_UP)))
            except OSError as err:
                raise _system_error(f"Cannot set interface flags on '{name}'", err) from None
    except BaseException:
        tap.close()
        raise
    return tap
