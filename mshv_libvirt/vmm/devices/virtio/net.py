"""virtio-net (virtio 1.2 section 5.1) on a tap, with its data path in the compiled module.

The VMM owns the transport and the configuration (MAC, link status, MTU); frames never pass through
Python. At DRIVER_OK the device hands the compiled I/O thread (abi/vmm/net.c) the guest RAM mapping,
both queues' ring addresses and positions, their doorbell eventfds (MSHV_IOEVENTFD) and the irqfd
eventfds of their MSI-X vectors; the thread then moves frames between the rings and the tap (opened
by the daemon with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR; the 12-byte header is set here) on its own. A
device reset or the VM's teardown stops the thread's use of the rings before the call returns.

Offloads: CSUM and HOST_TSO4/6 (the guest sends partial checksums and large segments: the tap takes
them with the header) are offered with the vnet header; GUEST_CSUM and GUEST_TSO4/6 only when the tap
accepts TUNSETOFFLOAD with them, and the tap is set to what the driver negotiated.

Link state (``set_link``, for ``domif-setlink``): STATUS's S_LINK_UP in the configuration plus a
configuration-change interrupt; while down the thread drops what the guest sends and leaves the tap
unread.

A queue the driver corrupts (the thread checks every descriptor against guest RAM) is reported on an
eventfd that a small watcher thread turns into DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import struct
import threading
from typing import Any

from mshv_libvirt._mshv import ffi, lib

from ... import sandbox
from ...vhost_user import MemRegion
from .pci import F_EVENT_IDX, NO_VECTOR, VirtioPciFunction

DEVICE_ID = 1
CLASS_NETWORK_ETHERNET = 0x020000
QUEUE_SIZE = 256
CONFIG_SIZE = 12  # mac[6], status, max_virtqueue_pairs, mtu
STATE_VERSION = 1
VNET_HDR_LEN = 12

F_CSUM = 1 << 0
F_GUEST_CSUM = 1 << 1
F_MTU = 1 << 3
F_MAC = 1 << 5
F_GUEST_TSO4 = 1 << 7
F_GUEST_TSO6 = 1 << 8
F_HOST_TSO4 = 1 << 11
F_HOST_TSO6 = 1 << 12
F_STATUS = 1 << 16
S_LINK_UP = 1

TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"MAC address {text!r} is not six colon-separated hex bytes")
    mac = bytes(int(p, 16) for p in parts)
    if mac[0] & 1:
        raise ValueError(f"MAC address {text!r} is a multicast address")
    return mac


def tap_offloads(tap_fd: int) -> int:
    """The guest-receive features the tap can deliver (TUNSETOFFLOAD accepted), the tap left without any."""
    features = 0
    with contextlib.suppress(OSError):
        fcntl.ioctl(tap_fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
        features = F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6
    with contextlib.suppress(OSError):
        fcntl.ioctl(tap_fd, TUNSETOFFLOAD, 0)
    return features


def _offload_flags(driver_features: int) -> int:
    flags = 0
    if driver_features & F_GUEST_CSUM:
        flags |= TUN_F_CSUM
        if driver_features & F_GUEST_TSO4:
            flags |= TUN_F_TSO4
        if driver_features & F_GUEST_TSO6:
            flags |= TUN_F_TSO6
    return flags


class VirtioNet:
    device_id = DEVICE_ID
    class_code = CLASS_NETWORK_ETHERNET
    queue_sizes: tuple[int, ...] = (QUEUE_SIZE, QUEUE_SIZE)  # receiveq1, transmitq1
    config_size = CONFIG_SIZE

    def __init__(
        self, tap_fd: int, mac: bytes, regions: list[MemRegion], *, mtu: int | None = None, link_up: bool = True
    ) -> None:
        self._ffi, self._lib = ffi, lib
        self.tap = tap_fd
        self.mac = mac
        self.mtu = mtu
        self.link_up = link_up
        fcntl.ioctl(tap_fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
        self.features = F_MAC | F_STATUS | F_EVENT_IDX | F_CSUM | F_HOST_TSO4 | F_HOST_TSO6 | tap_offloads(tap_fd)
        if mtu is not None:
            self.features |= F_MTU
        self._transport: VirtioPciFunction | None = None
        self._err = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stop = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._handle: Any = lib.mshv_net_new(tap_fd, self._err)
        if self._handle == ffi.NULL:
            os.close(self._err)
            os.close(self._stop)
            raise OSError("cannot start the virtio-net I/O thread")
        for r in regions:
            lib.mshv_net_add_region(self._handle, r.gpa, r.size, r.address)
        if not link_up:
            lib.mshv_net_set_link(self._handle, 0)
        self._thread: threading.Thread | None = None
        self.activations = 0
        self.error: str | None = None

    # -- VirtioDevice ------------------------------------------------------------------------------

    def _config(self) -> bytes:
        status = S_LINK_UP if self.link_up else 0
        return self.mac + struct.pack("<HHH", status, 1, self.mtu or 0)

    def config_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self._config()[offset : offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        pass  # the MAC is only writable with CTRL_MAC_ADDR / legacy drivers: neither is offered

    def reset(self) -> None:
        if self._handle is not None:
            self._lib.mshv_net_stop(self._handle)

    def driver_ok(self, transport: VirtioPciFunction) -> None:
        """DRIVER_OK (under the transport's lock): the I/O thread takes both rings."""
        lib = self._lib
        features = transport.driver_features
        with contextlib.suppress(OSError):
            fcntl.ioctl(self.tap, TUNSETOFFLOAD, _offload_flags(features))
        for n, q in enumerate(transport.queues):
            call = -1
            if transport.msix.enabled and q.msix_vector != NO_VECTOR:
                line = transport.lines[q.msix_vector]
                line.fire_when_routed = True  # what the thread signals while the vector is masked has no route
                call = line.fd
            lib.mshv_net_set_queue(
                self._handle, n, q.size if q.ready else 0, q.desc, q.driver, q.device,
                transport.kicks[n], call, q.last_avail, q.used_idx,
            )  # fmt: skip
        if lib.mshv_net_start(self._handle, 1 if features & F_EVENT_IDX else 0) != 0:
            transport.needs_reset(self.thread_error() or "virtio-net: queues refused")
            return
        self.activations += 1

    def to_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "link_up": self.link_up, "activations": self.activations}

    def load_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"virtio-net state version {state.get('version')!r} is not {STATE_VERSION}")
        self.activations = int(state["activations"])
        self.set_link(bool(state["link_up"]), notify=False)

    # -- control -----------------------------------------------------------------------------------

    def set_link(self, up: bool, *, notify: bool = True) -> None:
        """domif-setlink: S_LINK_UP follows, the thread stops or resumes, and the driver is told."""
        self.link_up = up
        self._lib.mshv_net_set_link(self._handle, 1 if up else 0)
        if notify and self._transport is not None:
            self._transport.config_changed()

    def stats(self) -> dict[str, int]:
        st = self._ffi.new("struct mshv_net_stats *")
        self._lib.mshv_net_get_stats(self._handle, st)
        names = ("rx_packets", "rx_bytes", "rx_drops", "tx_packets", "tx_bytes", "tx_drops", "wakeups", "irqs")
        return {name: int(getattr(st, name)) for name in names}

    def thread_error(self) -> str | None:
        buf = self._ffi.new("char[]", 160)
        if not self._lib.mshv_net_error(self._handle, buf, 160):
            return None
        return str(self._ffi.string(buf).decode(errors="replace"))

    # -- the watcher thread ------------------------------------------------------------------------

    def start(self, transport: VirtioPciFunction) -> None:
        self._transport = transport
        self._thread = threading.Thread(target=self._watch, name="virtio-net-err", daemon=True)
        self._thread.start()

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def _watch(self) -> None:
        transport = self._transport
        assert transport is not None
        sandbox.enter_thread(sandbox.DEVICE, "virtio-net-err")
        poller = select.poll()
        poller.register(self._err, select.POLLIN)
        poller.register(self._stop, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._stop in ready:
                return
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._err)
            self.error = self.thread_error()
            with transport.lock:
                transport.needs_reset(f"virtio-net {self.error}")

    def stop(self) -> None:
        """The VM is torn down: the I/O thread ends (the tap stays the daemon's)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            os.eventfd_write(self._stop, 1)
            thread.join(5)
        if self._handle is not None:
            self._lib.mshv_net_free(self._handle)
            self._handle = None
        for fd in (self._err, self._stop):
            with contextlib.suppress(OSError):
                os.close(fd)
