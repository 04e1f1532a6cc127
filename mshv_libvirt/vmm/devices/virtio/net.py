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

Multiqueue (``<driver queues='N'/>``, virtio 1.2 5.1.6.5.5): the daemon hands over one descriptor per queue
of an IFF_MULTI_QUEUE tap, and each queue pair gets its own compiled I/O thread (abi/vmm/net.c unchanged:
one handle per pair, as vhost-net has one worker per pair), so pairs run on as many host CPUs as there are
and a busy pair never delays another. Queues: receiveq1, transmitq1, ..., receiveqN, transmitqN, controlq
(queue 2N with MQ negotiated, else queue 2). Only pair 1 runs until the driver sends VQ_PAIRS_SET; pairs
beyond the number asked for are stopped and their tap queues detached (TUNSETQUEUE), so the kernel steers
no frame to a queue nobody reads.

The control queue (CTRL_VQ: RX mode, MAC address and table, MQ) is served by a Python thread of its own:
its commands are rare and never wait for a frame, and nothing of the packet path waits for it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import struct
import threading
from collections.abc import Sequence
from typing import Any

from mshv_libvirt._mshv import ffi, lib

from ... import sandbox
from ...vhost_user import MemRegion
from .pci import F_EVENT_IDX, F_VERSION_1, NO_VECTOR, VirtioPciFunction
from .queue import Chain, Virtqueue

log = logging.getLogger(__name__)

DEVICE_ID = 1
CLASS_NETWORK_ETHERNET = 0x020000
QUEUE_SIZE = 256
CTRL_QUEUE_SIZE = 64
MAX_QUEUE_PAIRS = 127  # BAR 0's MSI-X window (pci.py) holds 256 vectors: one per queue, one for config changes
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
F_MRG_RXBUF = 1 << 15
F_STATUS = 1 << 16
F_CTRL_VQ = 1 << 17
F_CTRL_RX = 1 << 18
F_MQ = 1 << 22
F_CTRL_MAC_ADDR = 1 << 23
S_LINK_UP = 1
GSO_MAX = 65536  # the largest frame a GSO skb hands the tap with guest TSO on
ETH_VLAN_HLEN = 18  # dst, src, an 802.1Q tag, ethertype

# Control queue commands (virtio 1.2 5.1.6.5): class, command; the ack byte the driver reads back.
CTRL_RX, CTRL_RX_PROMISC, CTRL_RX_ALLMULTI = 0, 0, 1
CTRL_MAC, CTRL_MAC_TABLE_SET, CTRL_MAC_ADDR_SET = 1, 0, 1
CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET = 4, 0
CTRL_OK, CTRL_ERR = 0, 1
CTRL_MAX_COMMAND = 4 + 6 * 256 + 4 + 6 * 256  # the largest MAC table set read (256 entries each)

TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUNSETQUEUE = 0x400454D9
IFF_ATTACH_QUEUE, IFF_DETACH_QUEUE = 0x0200, 0x0400
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
_IFREQ = 40


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


def _tap_queue(fd: int, attach: bool) -> None:
    """Attach or detach one queue of a multiqueue tap (the kernel then steers frames to attached ones only).
    EINVAL is the kernel's answer for a queue already so (tun_set_queue): a device rebuilt on the same tap
    (a reset) finds the queues as the previous one left them."""
    flags = IFF_ATTACH_QUEUE if attach else IFF_DETACH_QUEUE
    try:
        fcntl.ioctl(fd, TUNSETQUEUE, struct.pack("16xH", flags).ljust(_IFREQ, b"\0"))
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise


class VirtioNet:
    device_id = DEVICE_ID
    class_code = CLASS_NETWORK_ETHERNET
    config_size = CONFIG_SIZE

    def __init__(
        self,
        tap_fd: int,
        mac: bytes,
        regions: list[MemRegion],
        *,
        mtu: int | None = None,
        link_up: bool = True,
        queue_fds: Sequence[int] = (),
    ) -> None:
        self._ffi, self._lib = ffi, lib
        self.taps = (tap_fd, *queue_fds)
        self.tap = tap_fd
        self.max_pairs = len(self.taps)
        if self.max_pairs > MAX_QUEUE_PAIRS:
            raise ValueError(f"virtio-net takes at most {MAX_QUEUE_PAIRS} queue pairs, not {self.max_pairs}")
        # receiveq1, transmitq1, ..., receiveqN, transmitqN, controlq
        self.queue_sizes: tuple[int, ...] = (QUEUE_SIZE, QUEUE_SIZE) * self.max_pairs + (CTRL_QUEUE_SIZE,)
        self.mac = mac  # the configured MAC (set-link finds the device by it)
        self.config_mac = mac  # what the driver reads: CTRL_MAC_ADDR_SET changes it until a reset
        self.mtu = mtu
        self.link_up = link_up
        fcntl.ioctl(tap_fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))  # per tap, not per queue
        self.features = (
            F_MAC | F_STATUS | F_EVENT_IDX | F_CSUM | F_HOST_TSO4 | F_HOST_TSO6 | F_MRG_RXBUF | tap_offloads(tap_fd)
            | F_CTRL_VQ | F_CTRL_RX | F_CTRL_MAC_ADDR
        )  # fmt: skip
        if self.max_pairs > 1:
            self.features |= F_MQ
        if mtu is not None:
            self.features |= F_MTU
        self._transport: VirtioPciFunction | None = None
        self._err = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stop = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._rearm = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)  # the control thread re-reads _ctrl
        self._handles: list[Any] = []
        for fd in self.taps:
            handle = lib.mshv_net_new(fd, self._err)
            if handle == ffi.NULL:
                self._free()
                raise OSError("cannot start the virtio-net I/O thread")
            self._handles.append(handle)
            for r in regions:
                lib.mshv_net_add_region(handle, r.gpa, r.size, r.address)
            if not link_up:
                lib.mshv_net_set_link(handle, 0)
        for fd in self.taps[1:]:
            _tap_queue(fd, False)  # only pair 1 until VQ_PAIRS_SET
        self._thread: threading.Thread | None = None
        self._ctrl_thread: threading.Thread | None = None
        self._ctrl: int | None = None  # the control queue's index while the driver runs it
        self.pairs = 0  # pairs running: 1 from DRIVER_OK, what VQ_PAIRS_SET asked for after
        self.rx_mode = {"promisc": True, "allmulti": False}  # acknowledged; the tap path filters nothing
        self.mac_table: tuple[list[str], list[str]] = ([], [])
        self.ctrl_commands = 0
        self.activations = 0
        self.error: str | None = None

    # -- VirtioDevice ------------------------------------------------------------------------------

    def _config(self) -> bytes:
        status = S_LINK_UP if self.link_up else 0
        return self.config_mac + struct.pack("<HHH", status, self.max_pairs, self.mtu or 0)

    def config_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self._config()[offset : offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        pass  # a modern driver sets the MAC with CTRL_MAC_ADDR_SET, not by writing the config

    def _lock(self) -> contextlib.AbstractContextManager[Any]:
        return self._transport.lock if self._transport is not None else contextlib.nullcontext()

    def reset(self) -> None:
        with self._lock():
            self._ctrl = None
            for k in range(self.max_pairs):
                if self._handles:
                    self._lib.mshv_net_stop(self._handles[k])
                if k > 0 and k < self.pairs:
                    with contextlib.suppress(OSError):
                        _tap_queue(self.taps[k], False)
            self.pairs = 0
            self.config_mac = self.mac
            self.rx_mode = {"promisc": True, "allmulti": False}
            self.mac_table = ([], [])
        with contextlib.suppress(OSError):
            os.eventfd_write(self._rearm, 1)

    def _rx_merge(self, features: int) -> int:
        """What mshv_net_set_rx_merge takes: 0 without MRG_RXBUF, else the header and the largest frame."""
        if not features & F_MRG_RXBUF:
            return 0
        frame = GSO_MAX if features & (F_GUEST_TSO4 | F_GUEST_TSO6) else (self.mtu or 1500) + ETH_VLAN_HLEN
        return VNET_HDR_LEN + frame

    def _start_pair(self, transport: VirtioPciFunction, k: int) -> bool:
        lib = self._lib
        lib.mshv_net_set_rx_merge(self._handles[k], self._rx_merge(transport.driver_features))
        for side in (0, 1):
            n = 2 * k + side
            q = transport.queues[n]
            call = -1
            if transport.msix.enabled and q.msix_vector != NO_VECTOR:
                line = transport.lines[q.msix_vector]
                line.fire_when_routed = True  # what the thread signals while the vector is masked has no route
                call = line.fd
            lib.mshv_net_set_queue(
                self._handles[k], side, q.size if q.ready else 0, q.desc, q.driver, q.device,
                transport.kicks[n], call, q.last_avail, q.used_idx,
            )  # fmt: skip
        return bool(lib.mshv_net_start(self._handles[k], 1 if transport.driver_features & F_EVENT_IDX else 0) == 0)

    def _stop_pair(self, transport: VirtioPciFunction, k: int) -> None:
        """Pair ``k`` idles: its thread lets go of the rings, their positions kept for a later start."""
        lib = self._lib
        lib.mshv_net_stop(self._handles[k])
        last, used = self._ffi.new("uint16_t *"), self._ffi.new("uint16_t *")
        for side in (0, 1):
            lib.mshv_net_queue_state(self._handles[k], side, last, used)
            q = transport.queues[2 * k + side]
            q.last_avail, q.used_idx = int(last[0]), int(used[0])

    def driver_ok(self, transport: VirtioPciFunction) -> None:
        """DRIVER_OK (under the transport's lock): pair 1's I/O thread takes its rings."""
        features = transport.driver_features
        with contextlib.suppress(OSError):
            fcntl.ioctl(self.tap, TUNSETOFFLOAD, _offload_flags(features))
        if not self._start_pair(transport, 0):
            transport.needs_reset(self.thread_error() or "virtio-net: queues refused")
            return
        self.pairs = 1
        if features & F_CTRL_VQ:
            self._ctrl = 2 * self.max_pairs if features & F_MQ else 2
            os.eventfd_write(self._rearm, 1)
        self.activations += 1

    def set_pairs(self, transport: VirtioPciFunction, want: int) -> bool:
        """VQ_PAIRS_SET (under the transport's lock): exactly ``want`` pairs run, the rest idle; False when a
        pair's queues could not be started (its thread then reports why, and the device needs a reset)."""
        for k in range(self.pairs, want):
            try:
                _tap_queue(self.taps[k], True)
            except OSError as err:
                log.warning("virtio-net: cannot attach tap queue %d: %s", k + 1, err)
                return False
            if not self._start_pair(transport, k):
                with contextlib.suppress(OSError):
                    _tap_queue(self.taps[k], False)
                return False
            self.pairs = k + 1
        for k in reversed(range(want, self.pairs)):
            with contextlib.suppress(OSError):
                _tap_queue(self.taps[k], False)  # first: the kernel steers nothing more to it
            self._stop_pair(transport, k)
            self.pairs = k
        return True

    def to_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "link_up": self.link_up, "activations": self.activations}

    def load_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"virtio-net state version {state.get('version')!r} is not {STATE_VERSION}")
        self.activations = int(state["activations"])
        self.set_link(bool(state["link_up"]), notify=False)

    # -- test-only: the hand-over mode -------------------------------------------------------------

    def hand_over(
        self,
        size: int,
        rings: tuple[tuple[int, int, int], tuple[int, int, int]],
        kicks: tuple[int, int],
        calls: tuple[int, int],
        *,
        mrg_rxbuf: bool = False,
    ) -> int:
        """Test-only (benchmarks/net.py, tests/vmm/test_net_handover.py; never reached from a VM's config):
        pair 1's I/O thread serves its queues (receiveq1, transmitq1: ``rings`` of (desc, avail, used) guest
        addresses, ``size`` entries each, from index 0) to a driver outside any guest, as DRIVER_OK would,
        with ``kicks`` where the doorbells' ioeventfds would be and ``calls`` (eventfds the caller reads)
        where the vectors' irqfds would be. The driver takes VERSION_1, MAC, STATUS, EVENT_IDX (and MTU when
        offered), MRG_RXBUF when ``mrg_rxbuf``, no offload: its frames are whole (or, merged, spread over
        chains) and the tap is left with none. Returns those features.
        A multiqueue device's other pairs stay idle, their tap queues detached. ``release()`` stops the
        queues."""
        features = F_VERSION_1 | (self.features & (F_MAC | F_STATUS | F_EVENT_IDX | F_MTU))
        if mrg_rxbuf:
            features |= F_MRG_RXBUF
        with contextlib.suppress(OSError):
            fcntl.ioctl(self.tap, TUNSETOFFLOAD, _offload_flags(features))
        pair1 = self._handles[0]
        self._lib.mshv_net_set_rx_merge(pair1, self._rx_merge(features))
        for n, (desc, avail, used) in enumerate(rings):
            rc = self._lib.mshv_net_set_queue(pair1, n, size, desc, avail, used, kicks[n], calls[n], 0, 0)
            if rc != 0:
                raise OSError(-rc, f"virtio-net hand-over: queue {n} refused")
        if self._lib.mshv_net_start(pair1, 1 if features & F_EVENT_IDX else 0) != 0:
            raise OSError(f"virtio-net hand-over: {self.thread_error()}")
        self.pairs = 1
        return features

    def release(self) -> None:
        """Test-only: pair 1's I/O thread has let go of the handed-over queues when this returns."""
        self.reset()

    # -- the control queue -------------------------------------------------------------------------

    def _serve_ctrl(self, queue: Virtqueue) -> bool:
        transport = self._transport
        assert transport is not None
        mem = transport.memory
        used = False
        while True:
            while (chain := queue.pop(mem)) is not None:
                ack = self._command(transport, self._read_command(chain))
                writable = chain.writable
                if writable and writable[0].length:
                    mem.write(writable[0].gpa, bytes([ack]))
                    queue.push(mem, chain.head, 1)
                else:
                    queue.push(mem, chain.head, 0)  # nowhere to put the ack: the driver learns nothing
                self.ctrl_commands += 1
                used = True
            if not transport.driver_features & F_EVENT_IDX:
                return used
            # EVENT_IDX: the driver kicks only when its new index passes avail_event (the used ring's last
            # field), so ask for the very next one (Linux busy-waits on each command: a missed kick hangs it),
            # then look again for what it published before reading the new value (a full fence between).
            mem.write(queue.device + 4 + 8 * queue.size, struct.pack("<H", queue.last_avail))
            self._lib.mshv_net_fence()
            if not queue.pending(mem):
                return used

    def _read_command(self, chain: Chain) -> bytes:
        assert self._transport is not None
        parts: list[bytes] = []
        left = CTRL_MAX_COMMAND
        for buf in chain.buffers:
            if buf.writable or left <= 0:
                continue
            take = min(buf.length, left)
            parts.append(self._transport.memory.read(buf.gpa, take))
            left -= take
        return b"".join(parts)

    def _command(self, transport: VirtioPciFunction, cmd: bytes) -> int:
        if len(cmd) < 2:
            return CTRL_ERR
        features = transport.driver_features
        cls, op, data = cmd[0], cmd[1], cmd[2:]
        if cls == CTRL_RX and features & F_CTRL_RX and op in (CTRL_RX_PROMISC, CTRL_RX_ALLMULTI) and len(data) == 1:
            self.rx_mode["promisc" if op == CTRL_RX_PROMISC else "allmulti"] = bool(data[0])
            return CTRL_OK
        if cls == CTRL_MAC and op == CTRL_MAC_ADDR_SET and features & F_CTRL_MAC_ADDR and len(data) == 6:
            self.config_mac = bytes(data)
            return CTRL_OK
        if cls == CTRL_MAC and op == CTRL_MAC_TABLE_SET and features & F_CTRL_RX:
            tables = _mac_tables(data)
            if tables is None:
                return CTRL_ERR
            self.mac_table = tables
            return CTRL_OK
        if cls == CTRL_MQ and op == CTRL_MQ_VQ_PAIRS_SET and features & F_MQ and len(data) == 2:
            (want,) = struct.unpack("<H", data)
            if not 1 <= want <= self.max_pairs:
                return CTRL_ERR
            return CTRL_OK if self.set_pairs(transport, want) else CTRL_ERR
        return CTRL_ERR

    def _control_main(self) -> None:
        transport = self._transport
        assert transport is not None
        try:
            sandbox.enter_thread(sandbox.DEVICE, "virtio-net-ctl")
            while True:
                ctrl = self._ctrl
                watched = [self._stop, self._rearm] + ([transport.kicks[ctrl]] if ctrl is not None else [])
                poller = select.poll()
                for fd in watched:
                    poller.register(fd, select.POLLIN)
                ready = {fd for fd, _ in poller.poll()}
                if self._stop in ready:
                    return
                if self._rearm in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(self._rearm)
                    continue  # which queue is the control queue may have changed
                if ctrl is not None:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(transport.kicks[ctrl])
                    transport.process(ctrl, self._serve_ctrl)
        except BaseException as err:  # the VM keeps running; the device is dead and says so
            self.error = f"control queue thread failed: {err}"
            with transport.lock:
                transport.needs_reset(f"virtio-net {self.error}")

    # -- control -----------------------------------------------------------------------------------

    def set_link(self, up: bool, *, notify: bool = True) -> None:
        """domif-setlink: S_LINK_UP follows, the threads stop or resume, and the driver is told."""
        self.link_up = up
        for handle in self._handles:
            self._lib.mshv_net_set_link(handle, 1 if up else 0)
        if notify and self._transport is not None:
            self._transport.config_changed()

    def pair_stats(self) -> list[dict[str, int]]:
        """Each queue pair's counters (its I/O thread's), pair 1 first."""
        names = ("rx_packets", "rx_bytes", "rx_drops", "tx_packets", "tx_bytes", "tx_drops", "wakeups", "irqs")
        out = []
        for handle in self._handles:
            st = self._ffi.new("struct mshv_net_stats *")
            self._lib.mshv_net_get_stats(handle, st)
            out.append({name: int(getattr(st, name)) for name in names})
        return out

    def stats(self) -> dict[str, int]:
        """The device's counters: every pair's summed (what domifstat reports)."""
        total: dict[str, int] = {}
        for pair in self.pair_stats():
            for name, value in pair.items():
                total[name] = total.get(name, 0) + value
        return total

    def thread_error(self) -> str | None:
        buf = self._ffi.new("char[]", 160)
        for k, handle in enumerate(self._handles):
            if self._lib.mshv_net_error(handle, buf, 160):
                text = str(self._ffi.string(buf).decode(errors="replace"))
                return text if k == 0 else f"pair {k + 1} {text}"
        return None

    # -- the watcher and control threads -----------------------------------------------------------

    def start(self, transport: VirtioPciFunction) -> None:
        self._transport = transport
        self._thread = threading.Thread(target=self._watch, name="virtio-net-err", daemon=True)
        self._thread.start()
        self._ctrl_thread = threading.Thread(target=self._control_main, name="virtio-net-ctl", daemon=True)
        self._ctrl_thread.start()

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

    def _free(self) -> None:
        for handle in self._handles:
            self._lib.mshv_net_free(handle)
        self._handles = []
        for fd in (self._err, self._stop, self._rearm):
            with contextlib.suppress(OSError):
                os.close(fd)

    def stop(self) -> None:
        """The VM is torn down: the I/O threads end (the tap stays the daemon's)."""
        threads = [t for t in (self._thread, self._ctrl_thread) if t is not None]
        self._thread = self._ctrl_thread = None
        if threads:
            os.eventfd_write(self._stop, 1)  # never read: both threads see it
            for thread in threads:
                thread.join(5)
        self._free()


def _mac_tables(data: bytes) -> tuple[list[str], list[str]] | None:
    """VIRTIO_NET_CTRL_MAC_TABLE_SET's two tables (unicast, multicast): le32 entries, then 6 bytes each."""
    tables: list[list[str]] = []
    at = 0
    for _ in range(2):
        if len(data) < at + 4:
            return None
        (n,) = struct.unpack_from("<I", data, at)
        at += 4
        if len(data) < at + 6 * n:
            return None
        tables.append([":".join(f"{b:02x}" for b in data[at + 6 * i : at + 6 * i + 6]) for i in range(n)])
        at += 6 * n
    if at != len(data):
        return None
    return tables[0], tables[1]
