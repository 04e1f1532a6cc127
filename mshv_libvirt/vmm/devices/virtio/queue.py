"""Split virtqueues (virtio 1.2 section 2.7) over guest memory, as a device consumes them.

The driver owns the descriptor table and the available ring; the device reads them, writes into the
buffers the descriptors mark writable and publishes completions in the used ring. Every guest-memory
write goes through :class:`DeviceMemory`, whose dirty-log hook sees each written range (for live
migration's dirty tracking later). A malformed queue (a descriptor index outside the table, a looping
chain, an indirect descriptor that was not negotiated, an available index too far ahead, a buffer
outside guest RAM) raises :class:`QueueError`: the transport then sets DEVICE_NEEDS_RESET and stops
instead of guessing.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

DESC_SIZE = 16
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
MAX_QUEUE_SIZE = 32768
STATE_VERSION = 1


class QueueError(ValueError):
    """The driver's descriptors are malformed."""


class Memory(Protocol):
    def read(self, gpa: int, size: int) -> bytes: ...

    def write(self, gpa: int, data: bytes) -> None: ...


class DeviceMemory:
    """Guest RAM as a device backend sees it: reads, and writes reported to ``dirty_log(gpa, length)``."""

    def __init__(self, ram: Memory, dirty_log: Callable[[int, int], None] | None = None) -> None:
        self._ram = ram
        self.dirty_log = dirty_log

    def read(self, gpa: int, size: int) -> bytes:
        try:
            return self._ram.read(gpa, size)
        except ValueError as err:
            raise QueueError(str(err)) from err

    def write(self, gpa: int, data: bytes) -> None:
        try:
            self._ram.write(gpa, data)
        except ValueError as err:
            raise QueueError(str(err)) from err
        if self.dirty_log is not None and data:
            self.dirty_log(gpa, len(data))


@dataclass(frozen=True)
class Buffer:
    gpa: int
    length: int
    writable: bool


@dataclass(frozen=True)
class Chain:
    head: int
    buffers: list[Buffer]

    @property
    def writable(self) -> list[Buffer]:
        return [b for b in self.buffers if b.writable]


class Virtqueue:
    """One queue's driver-set registers (common configuration) and the device's position in it."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.msix_vector = 0xFFFF  # VIRTIO_MSI_NO_VECTOR
        self.desc = 0
        self.driver = 0
        self.device = 0
        self.last_avail = 0
        self.used_idx = 0

    # -- device side -------------------------------------------------------------------------------

    def _avail_idx(self, mem: DeviceMemory) -> int:
        return int(struct.unpack("<H", mem.read(self.driver + 2, 2))[0])

    def pending(self, mem: DeviceMemory) -> bool:
        return self.ready and self._avail_idx(mem) != self.last_avail

    def pop(self, mem: DeviceMemory) -> Chain | None:
        """The next available chain, or None."""
        if not self.ready:
            return None
        avail = self._avail_idx(mem)
        if avail == self.last_avail:
            return None
        if (avail - self.last_avail) & 0xFFFF > self.size:
            raise QueueError(f"available index {avail} is {(avail - self.last_avail) & 0xFFFF} ahead of {self.size}")
        slot = self.driver + 4 + 2 * (self.last_avail % self.size)
        (head,) = struct.unpack("<H", mem.read(slot, 2))
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return Chain(head, self._walk(mem, head))

    def _walk(self, mem: DeviceMemory, head: int) -> list[Buffer]:
        buffers: list[Buffer] = []
        index, table, count = head, self.desc, self.size
        for _ in range(count + 1):
            if index >= count:
                raise QueueError(f"descriptor {index} is outside a table of {count}")
            addr, length, flags, nxt = struct.unpack("<QIHH", mem.read(table + DESC_SIZE * index, DESC_SIZE))
            if flags & DESC_F_INDIRECT:
                raise QueueError("indirect descriptors were not negotiated")
            buffers.append(Buffer(addr, length, bool(flags & DESC_F_WRITE)))
            if not flags & DESC_F_NEXT:
                return buffers
            index = nxt
        raise QueueError(f"descriptor chain from {head} loops")

    def push(self, mem: DeviceMemory, head: int, written: int) -> None:
        """Publish ``head`` as used with ``written`` bytes (the element first, then the index)."""
        slot = self.device + 4 + 8 * (self.used_idx % self.size)
        mem.write(slot, struct.pack("<II", head, written))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        mem.write(self.device + 2, struct.pack("<H", self.used_idx))

    def wants_interrupt(self, mem: DeviceMemory) -> bool:
        """No EVENT_IDX: the driver's NO_INTERRUPT flag is the whole suppression protocol."""
        (flags,) = struct.unpack("<H", mem.read(self.driver, 2))
        return not flags & AVAIL_F_NO_INTERRUPT

    # -- state -------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "ready": self.ready,
            "msix_vector": self.msix_vector,
            "desc": self.desc,
            "driver": self.driver,
            "device": self.device,
            "last_avail": self.last_avail,
            "used_idx": self.used_idx,
        }

    def load_dict(self, state: dict[str, Any]) -> None:
        size = int(state["size"])
        if not 0 < size <= self.max_size:
            raise ValueError(f"queue size {size} is not within 1..{self.max_size}")
        self.size = size
        self.ready = bool(state["ready"])
        self.msix_vector = int(state["msix_vector"]) & 0xFFFF
        self.desc, self.driver, self.device = int(state["desc"]), int(state["driver"]), int(state["device"])
        self.last_avail, self.used_idx = int(state["last_avail"]) & 0xFFFF, int(state["used_idx"]) & 0xFFFF
