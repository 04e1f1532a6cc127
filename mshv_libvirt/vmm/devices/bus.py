"""Address-range dispatch for I/O ports and MMIO.

A device sees offsets relative to the base it was registered at. Reads nobody claims float high
(all ones), as on a PC bus, which is how Linux learns that a legacy device (PIC, PIT, RTC) is absent.
"""

from __future__ import annotations

import bisect
from typing import Protocol


class BusDevice(Protocol):
    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class BusConflictError(ValueError):
    """Two devices claim overlapping address ranges."""


class Bus:
    def __init__(self, name: str) -> None:
        self.name = name
        self._starts: list[int] = []
        self._entries: list[tuple[int, int, BusDevice]] = []

    def register(self, base: int, length: int, device: BusDevice) -> None:
        if length <= 0:
            raise ValueError("bus range must not be empty")
        i = bisect.bisect_left(self._starts, base)
        if i < len(self._entries) and self._entries[i][0] < base + length:
            raise BusConflictError(f"{self.name} range {base:#x}+{length:#x} overlaps {self._entries[i][0]:#x}")
        if i > 0 and self._entries[i - 1][0] + self._entries[i - 1][1] > base:
            raise BusConflictError(f"{self.name} range {base:#x}+{length:#x} overlaps {self._entries[i - 1][0]:#x}")
        self._starts.insert(i, base)
        self._entries.insert(i, (base, length, device))

    def unregister(self, base: int) -> None:
        """Remove the range registered at ``base`` (a PCI BAR the guest moves)."""
        i = bisect.bisect_left(self._starts, base)
        if i == len(self._starts) or self._starts[i] != base:
            raise ValueError(f"{self.name} has no range at {base:#x}")
        del self._starts[i]
        del self._entries[i]

    def lookup(self, addr: int, size: int) -> tuple[BusDevice, int] | None:
        """The device owning [addr, addr+size) and the offset into it, or None."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            return None
        base, length, device = self._entries[i]
        if addr + size > base + length:
            return None
        return device, addr - base

    def read(self, addr: int, size: int) -> int:
        hit = self.lookup(addr, size)
        if hit is None:
            return (1 << (8 * size)) - 1
        device, offset = hit
        return device.read(offset, size) & ((1 << (8 * size)) - 1)

    def write(self, addr: int, size: int, value: int) -> None:
        hit = self.lookup(addr, size)
        if hit is not None:
            device, offset = hit
            device.write(offset, size, value & ((1 << (8 * size)) - 1))
