"""A PCI function's configuration space (type 0 header) with the write masks that make BAR sizing work.

The space is 4 KiB (PCIe extended space reads as zero beyond the header and capabilities, as on a
device without extended capabilities). Registers are bytes with per-byte write masks, so an access of
any size at any offset behaves as hardware does: read-only bits keep their value, a BAR written with
all ones reads back its size mask and type bits.

The registers are a 4 KiB image in memory of the compiled module, which the vCPU run loop reads for
configuration-mechanism-#1 reads (vmm/runloop.py); all writes stay here.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mshv_libvirt._mshv import ffi

CONFIG_SIZE = 0x1000
LEGACY_CONFIG_SIZE = 0x100

VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_CODE = 0x09  # 3 bytes: programming interface, subclass, class
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
CAPABILITIES_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D

COMMAND_IO = 1 << 0
COMMAND_MEMORY = 1 << 1
COMMAND_BUS_MASTER = 1 << 2
COMMAND_INTX_DISABLE = 1 << 10
# I/O, memory, bus master, parity error response, SERR#, INTx disable: what a guest may set.
COMMAND_WRITABLE = COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | (1 << 6) | (1 << 8) | COMMAND_INTX_DISABLE
STATUS_CAPABILITIES = 1 << 4

BAR_COUNT = 6
BAR_IO = 0x1
BAR_MEM64 = 0x4
BAR_PREFETCHABLE = 0x8

STATE_VERSION = 1


class BarKind(enum.Enum):
    MEM32 = "mem32"
    MEM64 = "mem64"


@dataclass(frozen=True)
class Bar:
    index: int
    size: int  # a power of two, at least 16 bytes (4 KiB is what we use: a page per BAR)
    kind: BarKind
    prefetchable: bool = False

    @property
    def type_bits(self) -> int:
        return (BAR_MEM64 if self.kind is BarKind.MEM64 else 0) | (BAR_PREFETCHABLE if self.prefetchable else 0)


class PciConfigSpace:
    def __init__(
        self,
        vendor_id: int,
        device_id: int,
        class_code: int,
        *,
        revision: int = 0,
        subsystem_vendor_id: int = 0,
        subsystem_id: int = 0,
        interrupt_pin: int = 0,
    ) -> None:
        self._image: Any = ffi.new("uint8_t[]", CONFIG_SIZE)  # zeroed; freed with this object
        self._data = memoryview(ffi.buffer(self._image))
        self._wmask = bytearray(CONFIG_SIZE)
        self.bars: list[Bar | None] = [None] * BAR_COUNT
        self._set(VENDOR_ID, 2, vendor_id)
        self._set(DEVICE_ID, 2, device_id)
        self._set(REVISION_ID, 1, revision)
        self._set(CLASS_CODE, 3, class_code)
        self._set(SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self._set(SUBSYSTEM_ID, 2, subsystem_id)
        self._set(INTERRUPT_PIN, 1, interrupt_pin)
        self._set_wmask(COMMAND, 2, COMMAND_WRITABLE)
        self._set_wmask(INTERRUPT_LINE, 1, 0xFF)
        self._last_capability: int | None = None
        # Called after every guest write with (offset, size): capabilities that act on writes (MSI-X).
        self.write_hooks: list[Callable[[int, int], None]] = []
        self._capabilities_end = 0x40

    @property
    def image(self) -> Any:
        """The registers as C sees them (``uint8_t[4096]``): the run loop's PCI bus reads them."""
        return self._image

    # -- construction ------------------------------------------------------------------------------

    def _set(self, offset: int, size: int, value: int) -> None:
        self._data[offset : offset + size] = value.to_bytes(size, "little")

    def _set_wmask(self, offset: int, size: int, mask: int) -> None:
        self._wmask[offset : offset + size] = mask.to_bytes(size, "little")

    def _get(self, offset: int, size: int) -> int:
        return int.from_bytes(self._data[offset : offset + size], "little")

    def add_bar(self, bar: Bar) -> None:
        if not 0 <= bar.index < BAR_COUNT or (bar.kind is BarKind.MEM64 and bar.index == BAR_COUNT - 1):
            raise ValueError(f"BAR {bar.index} does not fit the header")
        if bar.size < 16 or bar.size & (bar.size - 1) or (bar.kind is BarKind.MEM32 and bar.size > 1 << 31):
            raise ValueError(f"BAR size {bar.size:#x} is not a power of two the BAR can hold")
        slots = [bar.index, bar.index + 1] if bar.kind is BarKind.MEM64 else [bar.index]
        if any(self.bars[i] is not None for i in slots) or (bar.index > 0 and self._is_upper_half(bar.index)):
            raise ValueError(f"BAR {bar.index} is already taken")
        self.bars[bar.index] = bar
        mask = ~(bar.size - 1) & ((1 << 64) - 1)
        offset = BAR0 + 4 * bar.index
        self._set(offset, 4, bar.type_bits)
        self._set_wmask(offset, 4, mask & 0xFFFFFFF0)
        if bar.kind is BarKind.MEM64:
            self._set_wmask(offset + 4, 4, mask >> 32)

    def _is_upper_half(self, index: int) -> bool:
        below = self.bars[index - 1]
        return below is not None and below.kind is BarKind.MEM64

    def add_capability(self, cap_id: int, body: bytes, writable: bytes | None = None) -> int:
        """Append a capability (id, next pointer, then ``body``) to the list; returns its offset.
        ``writable`` holds the write masks of the body's first bytes."""
        offset = self._capabilities_end
        size = 2 + len(body)
        if offset + size > LEGACY_CONFIG_SIZE:
            raise ValueError("capabilities do not fit in the legacy config space")
        self._data[offset] = cap_id
        self._data[offset + 2 : offset + size] = body
        if writable is not None:
            self._wmask[offset + 2 : offset + 2 + len(writable)] = writable
        link = CAPABILITIES_POINTER if self._last_capability is None else self._last_capability + 1
        self._data[link] = offset
        self._last_capability = offset
        self._capabilities_end = (offset + size + 3) & ~3
        self._set(STATUS, 2, self._get(STATUS, 2) | STATUS_CAPABILITIES)
        return offset

    # -- guest access ------------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > CONFIG_SIZE:
            return (1 << (8 * size)) - 1
        return self._get(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < 0 or offset + size > CONFIG_SIZE:
            return
        for i in range(size):
            mask = self._wmask[offset + i]
            byte = (value >> (8 * i)) & 0xFF
            self._data[offset + i] = (self._data[offset + i] & ~mask) | (byte & mask)
        for hook in self.write_hooks:
            hook(offset, size)

    # -- the VMM's view ----------------------------------------------------------------------------

    @property
    def vendor_id(self) -> int:
        return self._get(VENDOR_ID, 2)

    @property
    def device_id(self) -> int:
        return self._get(DEVICE_ID, 2)

    @property
    def command(self) -> int:
        return self._get(COMMAND, 2)

    def bar_address(self, index: int) -> int:
        bar = self.bars[index]
        if bar is None:
            raise ValueError(f"BAR {index} is not implemented")
        low = self._get(BAR0 + 4 * index, 4) & ~0xF
        high = self._get(BAR0 + 4 * index + 4, 4) if bar.kind is BarKind.MEM64 else 0
        return high << 32 | low

    def set_bar_address(self, index: int, address: int) -> None:
        """What firmware does: place the BAR (the guest may move it later; the masks still apply)."""
        bar = self.bars[index]
        if bar is None:
            raise ValueError(f"BAR {index} is not implemented")
        if address % bar.size or (bar.kind is BarKind.MEM32 and address + bar.size > 1 << 32):
            raise ValueError(f"BAR {index} cannot be placed at {address:#x}")
        offset = BAR0 + 4 * index
        self._set(offset, 4, (address & 0xFFFFFFF0) | bar.type_bits)
        if bar.kind is BarKind.MEM64:
            self._set(offset + 4, 4, address >> 32)

    def set_command(self, value: int) -> None:
        self._set(COMMAND, 2, value & COMMAND_WRITABLE)

    # -- state -------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The guest-visible registers (the layout -- BARs, capabilities -- is the device's, not state)."""
        return {"version": STATE_VERSION, "config": self._data.hex()}

    def load_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"PCI config state version {state.get('version')!r} is not {STATE_VERSION}")
        data = bytes.fromhex(state["config"])
        if len(data) != CONFIG_SIZE:
            raise ValueError(f"PCI config state holds {len(data)} bytes, not {CONFIG_SIZE}")
        ids = data[VENDOR_ID : DEVICE_ID + 2]
        if ids != self._data[VENDOR_ID : DEVICE_ID + 2]:
            raise ValueError(
                f"PCI config state is for device {ids.hex()}, not {self._data[VENDOR_ID : DEVICE_ID + 2].hex()}"
            )
        self._data[:] = data
        for hook in self.write_hooks:
            hook(0, CONFIG_SIZE)
