"""The modern virtio-pci transport (virtio 1.2 section 4.1): one PCI function per device.

Everything lives in BAR 0, a 64-bit memory BAR:

    0x0000  common configuration (VIRTIO_PCI_CAP_COMMON_CFG)
    0x1000  ISR status (VIRTIO_PCI_CAP_ISR_CFG), read-to-clear
    0x2000  device-specific configuration (VIRTIO_PCI_CAP_DEVICE_CFG, when the device has one)
    0x3000  notifications (VIRTIO_PCI_CAP_NOTIFY_CFG): queue n's doorbell at 0x3000 + 4n
    0x4000  MSI-X table, 0x5000 its PBA (vector 0: configuration changes, vector 1 + n: queue n)

Data-path events bypass Python: each doorbell is an MSHV_IOEVENTFD registration on its own address,
so a kick signals the queue's eventfd in the kernel without a VM exit, and each MSI-X vector is an
irqfd line (``interrupts.IrqfdLine``) whose routing entry the capability keeps in step with the
table. A doorbell write that does reach the VMM (before the BAR is mapped, or of a size the
registration does not cover) signals the same eventfd, and is counted in ``notify_exits``.

The BAR follows the guest: whenever memory decoding or the BAR address changes, the window moves on
the MMIO bus and the doorbells move with it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import threading
from collections.abc import Callable
from typing import Any, Protocol

from ...interrupts import IrqfdLine, MsiRouting
from ..bus import Bus, BusConflictError
from ..pci.config import BAR0, COMMAND, COMMAND_MEMORY, Bar, BarKind, PciConfigSpace
from ..pci.msix import MsixCapability
from .queue import DeviceMemory, QueueError, Virtqueue

log = logging.getLogger(__name__)

VENDOR = 0x1AF4
MODERN_DEVICE_BASE = 0x1040
SUBSYSTEM_ID = 0x40  # modern devices: 0x40 or above
REVISION = 1  # a modern-only device has revision 1 or more

CAP_VENDOR = 0x09
CAP_COMMON = 1
CAP_NOTIFY = 2
CAP_ISR = 3
CAP_DEVICE = 4

BAR_SIZE = 0x8000
COMMON_OFFSET, COMMON_SIZE = 0x0000, 0x40
ISR_OFFSET, ISR_SIZE = 0x1000, 0x4
DEVICE_OFFSET = 0x2000
NOTIFY_OFFSET = 0x3000
NOTIFY_MULTIPLIER = 4
MSIX_TABLE_OFFSET, MSIX_PBA_OFFSET = 0x4000, 0x5000
WINDOW_SIZE = 0x1000

# Transport feature bits (virtio 1.2 section 6), the same for every device type.
F_INDIRECT_DESC = 1 << 28
F_EVENT_IDX = 1 << 29
F_VERSION_1 = 1 << 32
NO_VECTOR = 0xFFFF

STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

ISR_QUEUE = 1
ISR_CONFIG = 2

STATE_VERSION = 1

# Common configuration registers (offset: size).
DEVICE_FEATURE_SELECT = 0
DEVICE_FEATURE = 4
DRIVER_FEATURE_SELECT = 8
DRIVER_FEATURE = 12
CONFIG_MSIX_VECTOR = 16
NUM_QUEUES = 18
DEVICE_STATUS = 20
CONFIG_GENERATION = 21
QUEUE_SELECT = 22
QUEUE_SIZE = 24
QUEUE_MSIX_VECTOR = 26
QUEUE_ENABLE = 28
QUEUE_NOTIFY_OFF = 30
QUEUE_DESC = 32
QUEUE_DRIVER = 40
QUEUE_DEVICE = 48


class VirtioDevice(Protocol):
    """What a device type gives the transport."""

    device_id: int
    class_code: int
    features: int  # device-specific feature bits (the transport adds VIRTIO_F_VERSION_1)
    queue_sizes: tuple[int, ...]
    config_size: int

    def config_read(self, offset: int, size: int) -> int: ...

    def config_write(self, offset: int, size: int, value: int) -> None: ...

    def reset(self) -> None: ...

    def to_dict(self) -> dict[str, Any]: ...

    def load_dict(self, state: dict[str, Any]) -> None: ...


class DoorbellRegistrar(Protocol):
    def ioeventfd(
        self, fd: int, addr: int, length: int, *, datamatch: int | None = ..., pio: bool = ..., deassign: bool = ...
    ) -> None: ...


class VirtioPciFunction:
    """The transport of one device: a ``PciFunction`` plus the BAR's MMIO window (``bar``)."""

    def __init__(
        self,
        device: VirtioDevice,
        memory: DeviceMemory,
        routing: MsiRouting,
        doorbells: DoorbellRegistrar,
        mmio_bus: Bus,
    ) -> None:
        self.device = device
        self.memory = memory
        self._doorbells = doorbells
        self._mmio = mmio_bus
        self.lock = threading.RLock()  # registers vs the device thread
        self.mapped_at: int | None = None
        self.config = PciConfigSpace(
            VENDOR,
            MODERN_DEVICE_BASE + device.device_id,
            device.class_code,
            revision=REVISION,
            subsystem_vendor_id=VENDOR,
            subsystem_id=SUBSYSTEM_ID,
        )
        self.config.add_bar(Bar(0, BAR_SIZE, BarKind.MEM64))
        self.queues = [Virtqueue(size) for size in device.queue_sizes]
        self.kicks: list[int] = []
        self.lines: list[IrqfdLine] = []
        try:
            for _ in self.queues:
                self.kicks.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
            for _ in range(1 + len(self.queues)):
                self.lines.append(IrqfdLine(routing, routing.allocate_gsi()))
        except BaseException:
            self.close()
            raise
        self._add_vendor_cap(CAP_COMMON, COMMON_OFFSET, COMMON_SIZE)
        self._add_vendor_cap(CAP_NOTIFY, NOTIFY_OFFSET, NOTIFY_MULTIPLIER * len(self.queues), NOTIFY_MULTIPLIER)
        self._add_vendor_cap(CAP_ISR, ISR_OFFSET, ISR_SIZE)
        if device.config_size:
            self._add_vendor_cap(CAP_DEVICE, DEVICE_OFFSET, device.config_size)
        self.msix = MsixCapability(
            self.config, list(self.lines), bar=0, table_offset=MSIX_TABLE_OFFSET, pba_offset=MSIX_PBA_OFFSET
        )
        self.bar = _BarWindow(self)
        self.notify_exits = 0  # doorbell writes that reached the VMM instead of an ioeventfd
        self.interrupts = 0
        self.on_error: Callable[[str], None] = lambda why: log.warning("virtio device %#x: %s", device.device_id, why)
        self._reset_registers()
        self.config.write_hooks.append(self._config_written)

    def _add_vendor_cap(self, cfg_type: int, offset: int, length: int, multiplier: int | None = None) -> None:
        # struct virtio_pci_cap after id/next: cap_len, cfg_type, bar, id, padding[2], offset, length
        extra = b"" if multiplier is None else struct.pack("<I", multiplier)
        body = struct.pack("<BBBB2xII", 16 + len(extra), cfg_type, 0, 0, offset, length) + extra
        self.config.add_capability(CAP_VENDOR, body)

    def _reset_registers(self) -> None:
        self.status = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.config_msix_vector = NO_VECTOR
        self.queue_select = 0
        self.isr = 0
        self.config_generation = 0
        for q in self.queues:
            q.reset()

    @property
    def offered_features(self) -> int:
        return self.device.features | F_VERSION_1

    @property
    def driver_ok(self) -> bool:
        return self.status & (STATUS_DRIVER_OK | STATUS_NEEDS_RESET | STATUS_FAILED) == STATUS_DRIVER_OK

    # -- PciFunction -------------------------------------------------------------------------------

    def config_read(self, offset: int, size: int) -> int:
        with self.lock:
            return self.config.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            self.config.write(offset, size, value)

    def _config_written(self, offset: int, size: int) -> None:
        if offset < BAR0 + 8 and offset + size > COMMAND:  # COMMAND or BAR0's two dwords
            self.sync_bar()

    # -- the BAR on the MMIO bus and its doorbells -------------------------------------------------

    def sync_bar(self) -> None:
        """Map the BAR where the guest (or the VMM's placement) put it, when memory decoding is on."""
        with self.lock:
            want: int | None = None
            if self.config.command & COMMAND_MEMORY:
                want = self.config.bar_address(0)
                if want + BAR_SIZE > 1 << 64:
                    want = None
            if want == self.mapped_at:
                return
            if self.mapped_at is not None:
                self._unmap()
            if want is not None:
                try:
                    self._mmio.register(want, BAR_SIZE, self.bar)
                except BusConflictError as err:
                    log.warning("virtio BAR not mapped: %s", err)
                    return
                self.mapped_at = want
                for n, fd in enumerate(self.kicks):
                    self._doorbells.ioeventfd(fd, want + NOTIFY_OFFSET + NOTIFY_MULTIPLIER * n, 0)

    def _unmap(self) -> None:
        at, self.mapped_at = self.mapped_at, None
        if at is None:
            return
        self._mmio.unregister(at)
        for n, fd in enumerate(self.kicks):
            with contextlib.suppress(OSError):
                self._doorbells.ioeventfd(fd, at + NOTIFY_OFFSET + NOTIFY_MULTIPLIER * n, 0, deassign=True)

    # -- BAR accesses ------------------------------------------------------------------------------

    def bar_read(self, offset: int, size: int) -> int:
        with self.lock:
            if COMMON_OFFSET <= offset < COMMON_OFFSET + COMMON_SIZE:
                return self._common_read(offset - COMMON_OFFSET, size)
            if ISR_OFFSET <= offset < ISR_OFFSET + ISR_SIZE:
                value, self.isr = self.isr, 0
                return value if offset == ISR_OFFSET else 0
            if DEVICE_OFFSET <= offset < DEVICE_OFFSET + self.device.config_size:
                return self.device.config_read(offset - DEVICE_OFFSET, size)
            if MSIX_TABLE_OFFSET <= offset < MSIX_TABLE_OFFSET + len(self.msix.table):
                return self.msix.table_read(offset - MSIX_TABLE_OFFSET, size)
            if MSIX_PBA_OFFSET <= offset < MSIX_PBA_OFFSET + len(self.msix.pending):
                return self.msix.pba_read(offset - MSIX_PBA_OFFSET, size)
            return 0

    def bar_write(self, offset: int, size: int, value: int) -> None:
        if NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + NOTIFY_MULTIPLIER * len(self.queues):
            self.notify_exits += 1
            os.eventfd_write(self.kicks[(offset - NOTIFY_OFFSET) // NOTIFY_MULTIPLIER], 1)
            return
        with self.lock:
            if COMMON_OFFSET <= offset < COMMON_OFFSET + COMMON_SIZE:
                self._common_write(offset - COMMON_OFFSET, size, value)
            elif DEVICE_OFFSET <= offset < DEVICE_OFFSET + self.device.config_size:
                self.device.config_write(offset - DEVICE_OFFSET, size, value)
            elif MSIX_TABLE_OFFSET <= offset < MSIX_TABLE_OFFSET + len(self.msix.table):
                self.msix.table_write(offset - MSIX_TABLE_OFFSET, size, value)

    def _queue(self) -> Virtqueue | None:
        return self.queues[self.queue_select] if self.queue_select < len(self.queues) else None

    def _common_image(self) -> bytes:
        q = self._queue()
        features = (self.offered_features >> (32 * self.device_feature_select)) & 0xFFFFFFFF
        driver = (self.driver_features >> (32 * self.driver_feature_select)) & 0xFFFFFFFF
        if self.device_feature_select > 1:
            features = 0
        if self.driver_feature_select > 1:
            driver = 0
        head = struct.pack(
            "<IIIIHHBBH",
            self.device_feature_select,
            features,
            self.driver_feature_select,
            driver,
            self.config_msix_vector,
            len(self.queues),
            self.status,
            self.config_generation,
            self.queue_select,
        )
        if q is None:
            tail = bytes(COMMON_SIZE - len(head))
        else:
            tail = struct.pack(
                "<HHHHQQQ",
                q.size,
                q.msix_vector,
                int(q.ready),
                self.queue_select,  # queue_notify_off: doorbell n at n * multiplier
                q.desc,
                q.driver,
                q.device,
            ).ljust(COMMON_SIZE - len(head), b"\0")
        return head + tail

    def _common_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self._common_image()[offset : offset + size], "little")

    def _vector(self, value: int) -> int:
        """A vector the driver may use reads back; any other becomes NO_VECTOR (how Linux learns of it)."""
        return value if value < self.msix.vectors else NO_VECTOR

    def _common_write(self, offset: int, size: int, value: int) -> None:
        q = self._queue()
        if offset == DEVICE_FEATURE_SELECT and size == 4:
            self.device_feature_select = value
        elif offset == DRIVER_FEATURE_SELECT and size == 4:
            self.driver_feature_select = value
        elif offset == DRIVER_FEATURE and size == 4:
            if self.driver_feature_select <= 1 and not self.status & STATUS_FEATURES_OK:
                shift = 32 * self.driver_feature_select
                self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
        elif offset == CONFIG_MSIX_VECTOR and size == 2:
            self.config_msix_vector = self._vector(value)
        elif offset == DEVICE_STATUS and size == 1:
            self._set_status(value)
        elif offset == QUEUE_SELECT and size == 2:
            self.queue_select = value
        elif q is None or q.ready:
            return  # queue registers of an absent or enabled queue are read-only
        elif offset == QUEUE_SIZE and size == 2:
            if 0 < value <= q.max_size:
                q.size = value
        elif offset == QUEUE_MSIX_VECTOR and size == 2:
            q.msix_vector = self._vector(value)
        elif offset == QUEUE_ENABLE and size == 2:
            q.ready = value == 1
        elif offset in (QUEUE_DESC, QUEUE_DRIVER, QUEUE_DEVICE) and size == 8:
            setattr(q, _QUEUE_ADDRESS[offset], value)
        elif offset - 4 in (QUEUE_DESC, QUEUE_DRIVER, QUEUE_DEVICE) and size == 4:
            name = _QUEUE_ADDRESS[offset - 4]
            setattr(q, name, (getattr(q, name) & 0xFFFFFFFF) | (value << 32))
        elif offset in (QUEUE_DESC, QUEUE_DRIVER, QUEUE_DEVICE) and size == 4:
            name = _QUEUE_ADDRESS[offset]
            setattr(q, name, (getattr(q, name) & ~0xFFFFFFFF) | value)

    def _set_status(self, value: int) -> None:
        if value == 0:
            self.device.reset()
            self._reset_registers()
            return
        # FEATURES_OK only for a subset of what we offer that includes VERSION_1 (legacy drivers fail).
        bad_features = self.driver_features & ~self.offered_features or not self.driver_features & F_VERSION_1
        if value & STATUS_FEATURES_OK and not self.status & STATUS_FEATURES_OK and bad_features:
            value &= ~STATUS_FEATURES_OK
        was_ok = self.driver_ok
        self.status = (self.status & STATUS_NEEDS_RESET) | value
        if self.driver_ok and not was_ok:
            activate = getattr(self.device, "driver_ok", None)  # a device served elsewhere (vhost-user)
            if activate is not None:
                activate(self)
        if self.driver_ok:
            for n in range(len(self.queues)):
                os.eventfd_write(self.kicks[n], 1)  # buffers posted before DRIVER_OK are looked at now

    # -- the device side (any thread) ----------------------------------------------------------------

    def interrupt_queue(self, n: int) -> None:
        """Tell the driver that queue ``n`` has used buffers."""
        vector = self.queues[n].msix_vector
        self.interrupts += 1
        if self.msix.enabled and vector != NO_VECTOR:
            self.msix.fire(vector)
        else:
            self.isr |= ISR_QUEUE  # no INTx pin is wired: a driver without MSI-X polls

    def config_changed(self) -> None:
        """The device configuration changed (a link went up or down): a new generation and a config interrupt."""
        with self.lock:
            self.config_generation = (self.config_generation + 1) & 0xFF
            self.isr |= ISR_CONFIG
            if self.msix.enabled and self.config_msix_vector != NO_VECTOR:
                self.msix.fire(self.config_msix_vector)

    def needs_reset(self, why: str) -> None:
        """The driver broke the queue protocol: stop, and say so (DEVICE_NEEDS_RESET and a config interrupt)."""
        self.on_error(why)
        self.status |= STATUS_NEEDS_RESET
        self.config_generation = (self.config_generation + 1) & 0xFF
        self.isr |= ISR_CONFIG
        if self.msix.enabled and self.config_msix_vector != NO_VECTOR:
            self.msix.fire(self.config_msix_vector)

    def process(self, n: int, serve: Callable[[Virtqueue], bool]) -> None:
        """Run ``serve`` on queue ``n`` when the driver may use it; a QueueError needs a reset."""
        with self.lock:
            if not self.driver_ok or not self.queues[n].ready:
                return
            try:
                if serve(self.queues[n]) and self.queues[n].wants_interrupt(self.memory):
                    self.interrupt_queue(n)
            except QueueError as err:
                self.needs_reset(f"queue {n}: {err}")

    # -- state -------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        with self.lock:
            return {
                "version": STATE_VERSION,
                "config": self.config.to_dict(),
                "msix": self.msix.to_dict(),
                "status": self.status,
                "device_feature_select": self.device_feature_select,
                "driver_feature_select": self.driver_feature_select,
                "driver_features": self.driver_features,
                "config_msix_vector": self.config_msix_vector,
                "queue_select": self.queue_select,
                "isr": self.isr,
                "config_generation": self.config_generation,
                "queues": [q.to_dict() for q in self.queues],
                "device": self.device.to_dict(),
            }

    def load_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"virtio-pci state version {state.get('version')!r} is not {STATE_VERSION}")
        if len(state["queues"]) != len(self.queues):
            raise ValueError(f"virtio-pci state has {len(state['queues'])} queues, the device {len(self.queues)}")
        with self.lock:
            self.config.load_dict(state["config"])
            self.msix.load_dict(state["msix"])
            for q, qs in zip(self.queues, state["queues"], strict=True):
                q.load_dict(qs)
            self.status = int(state["status"]) & 0xFF
            self.device_feature_select = int(state["device_feature_select"])
            self.driver_feature_select = int(state["driver_feature_select"])
            self.driver_features = int(state["driver_features"]) & self.offered_features
            self.config_msix_vector = self._vector(int(state["config_msix_vector"]))
            self.queue_select = int(state["queue_select"]) & 0xFFFF
            self.isr = int(state["isr"]) & 0x3
            self.config_generation = int(state["config_generation"]) & 0xFF
            self.device.load_dict(state["device"])

    def close(self) -> None:
        with self.lock:
            self._unmap()
        for fd in self.kicks:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.kicks = []
        for line in self.lines:
            line.close()


_QUEUE_ADDRESS = {QUEUE_DESC: "desc", QUEUE_DRIVER: "driver", QUEUE_DEVICE: "device"}


class _BarWindow:
    """BAR 0 as a device of the MMIO bus."""

    def __init__(self, function: VirtioPciFunction) -> None:
        self._function = function

    def read(self, offset: int, size: int) -> int:
        return self._function.bar_read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self._function.bar_write(offset, size, value)
