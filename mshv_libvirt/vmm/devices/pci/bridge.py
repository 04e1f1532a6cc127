"""The PCI root bus behind a host bridge: configuration mechanism #1 (ports 0xCF8/0xCFC), ECAM (PCIe
enhanced configuration, one MMIO window described by the ACPI MCFG table) and BAR placement.
Mechanism #1's reads are served by the compiled run loop from the same state (CONFIG_ADDRESS and the
config images in C memory); its writes and ECAM come here.

There is no firmware, so the VMM assigns every BAR before the guest starts (``BarAllocator``), as
firmware would: 64-bit BARs in the MMIO window above RAM, 32-bit ones in the hole below 4 GiB. One bus
(0), one function per slot; the host bridge itself is 00:00.0 (Red Hat's QEMU PCIe host bridge id,
1b36:0008, class 06.00: what guests expect of a virtual PCIe root complex). Accesses to absent
functions read all ones, which is how a guest's scan finds the slot empty.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from mshv_libvirt._mshv import ffi, lib

from ..bus import BusDevice
from .config import COMMAND_MEMORY, BarKind, PciConfigSpace

SLOTS = 32
ECAM_BUS_SIZE = SLOTS * 8 * 0x1000  # 1 MiB: bus 0 only
CONFIG_ADDRESS_PORT = 0xCF8
CONFIG_PORTS_LENGTH = 8  # 0xCF8 address, 0xCFC data (0xCF9 is the reset control register)
CONFIG_ENABLE = 1 << 31

HOST_BRIDGE_VENDOR = 0x1B36  # Red Hat, Inc. (QEMU's virtual devices)
HOST_BRIDGE_DEVICE = 0x0008  # QEMU PCIe host bridge
CLASS_HOST_BRIDGE = 0x060000

STATE_VERSION = 1


class PciFunction(Protocol):
    """A device on the bus: config accesses go to it (it may intercept its own registers)."""

    config: PciConfigSpace

    def config_read(self, offset: int, size: int) -> int: ...

    def config_write(self, offset: int, size: int, value: int) -> None: ...


class PlainFunction:
    """A function whose config space is all there is (the host bridge)."""

    def __init__(self, config: PciConfigSpace) -> None:
        self.config = config

    def config_read(self, offset: int, size: int) -> int:
        return self.config.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.config.write(offset, size, value)


def host_bridge() -> PlainFunction:
    return PlainFunction(PciConfigSpace(HOST_BRIDGE_VENDOR, HOST_BRIDGE_DEVICE, CLASS_HOST_BRIDGE))


class PciRootBus:
    def __init__(self) -> None:
        # CONFIG_ADDRESS and each slot's config image, as the compiled run loop reads them (vmm/runloop.py).
        handle = lib.mshv_pci_new()
        if handle == ffi.NULL:
            raise MemoryError("mshv_pci_new")
        self._c: Any = ffi.gc(handle, lib.mshv_pci_free)
        self._slots: dict[int, PciFunction] = {}
        self._plug(0, host_bridge())

    @property
    def handle(self) -> int:
        """The C side's address, for the run loop's port table (it lives as long as this object)."""
        return int(ffi.cast("uintptr_t", self._c))

    @property
    def config_address(self) -> int:
        return int(lib.mshv_pci_address(self._c))

    @config_address.setter
    def config_address(self, value: int) -> None:
        lib.mshv_pci_set_address(self._c, value)

    def _plug(self, slot: int, function: PciFunction) -> None:
        self._slots[slot] = function
        lib.mshv_pci_set_slot(self._c, slot, function.config.image)

    def add(self, function: PciFunction, slot: int | None = None) -> int:
        """Plug ``function`` into ``slot`` (the first free one by default); returns the slot."""
        if slot is None:
            free = [s for s in range(SLOTS) if s not in self._slots]
            if not free:
                raise ValueError("PCI bus 0 has no free slot")
            slot = free[0]
        if not 0 < slot < SLOTS:
            raise ValueError(f"PCI slot {slot:#x} is not on bus 0 (slots 0x01-0x1f)")
        if slot in self._slots:
            raise ValueError(f"PCI slot {slot:#x} is already in use")
        self._plug(slot, function)
        return slot

    def function(self, slot: int) -> PciFunction | None:
        return self._slots.get(slot)

    @property
    def slots(self) -> dict[int, PciFunction]:
        return dict(sorted(self._slots.items()))

    def config_read(self, bus: int, slot: int, function: int, offset: int, size: int) -> int:
        dev = self._slots.get(slot) if bus == 0 and function == 0 else None
        if dev is None:
            return (1 << (8 * size)) - 1
        return dev.config_read(offset, size)

    def config_write(self, bus: int, slot: int, function: int, offset: int, size: int, value: int) -> None:
        dev = self._slots.get(slot) if bus == 0 and function == 0 else None
        if dev is not None:
            dev.config_write(offset, size, value)

    def to_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "slots": {f"{s:02x}": f.config.to_dict() for s, f in self.slots.items()}}

    def load_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"PCI bus state version {state.get('version')!r} is not {STATE_VERSION}")
        slots = {int(k, 16): v for k, v in state["slots"].items()}
        if set(slots) != set(self._slots):
            raise ValueError(f"PCI bus state has slots {sorted(slots)}, the bus has {sorted(self._slots)}")
        for slot, config in slots.items():
            self._slots[slot].config.load_dict(config)


class ConfigPorts:
    """Ports 0xCF8-0xCFF: CONFIG_ADDRESS (dword at 0xCF8), CONFIG_DATA (0xCFC-0xCFF, any size). A byte
    at 0xCF9 is the reset control register (``reset``) as on PC chipsets; other partial accesses to
    CONFIG_ADDRESS are not configuration cycles (Linux's type 1 probe relies on that) and are ignored."""

    def __init__(self, bus: PciRootBus, reset: BusDevice | None = None) -> None:
        self._bus = bus
        self._reset = reset

    @property
    def address(self) -> int:
        """CONFIG_ADDRESS: one register for every vCPU, kept by the bus's C side (the run loop writes it)."""
        return self._bus.config_address

    def _target(self, offset: int) -> tuple[int, int, int, int] | None:
        a = self.address
        if not a & CONFIG_ENABLE:
            return None
        return (a >> 16) & 0xFF, (a >> 11) & 0x1F, (a >> 8) & 0x7, (a & 0xFC) + (offset - 4)

    def read(self, offset: int, size: int) -> int:
        if offset == 0 and size == 4:
            return self.address
        if offset == 1 and size == 1 and self._reset is not None:
            return self._reset.read(0, 1)
        target = self._target(offset) if offset >= 4 else None
        if target is None:
            return (1 << (8 * size)) - 1
        return self._bus.config_read(*target, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and size == 4:
            self._bus.config_address = value & 0x80FFFFFC
        elif offset == 1 and size == 1 and self._reset is not None:
            self._reset.write(0, 1, value)
        elif offset >= 4 and (target := self._target(offset)) is not None:
            self._bus.config_write(*target, size, value)


class Ecam:
    """The ECAM window of bus 0: offset = device << 15 | function << 12 | register."""

    def __init__(self, bus: PciRootBus) -> None:
        self._bus = bus

    @staticmethod
    def _split(offset: int) -> tuple[int, int, int, int]:
        return (offset >> 20) & 0xFF, (offset >> 15) & 0x1F, (offset >> 12) & 0x7, offset & 0xFFF

    def read(self, offset: int, size: int) -> int:
        bus, slot, function, register = self._split(offset)
        return self._bus.config_read(bus, slot, function, register, size)

    def write(self, offset: int, size: int, value: int) -> None:
        bus, slot, function, register = self._split(offset)
        self._bus.config_write(bus, slot, function, register, size, value)


class BarSpaceExhaustedError(ValueError):
    """The BARs do not fit in the MMIO windows."""


class BarAllocator:
    """Bump allocation with natural alignment in the 32-bit and 64-bit MMIO windows."""

    def __init__(self, window32: tuple[int, int], window64: tuple[int, int]) -> None:
        self._windows = {BarKind.MEM32: window32, BarKind.MEM64: window64}
        self._next = {BarKind.MEM32: window32[0], BarKind.MEM64: window64[0]}

    def place(self, config: PciConfigSpace, on_placed: Callable[[int, int, int], None] | None = None) -> None:
        """Assign every BAR of ``config`` and enable memory decoding; ``on_placed(index, address, size)``."""
        for bar in config.bars:
            if bar is None:
                continue
            base, size = self._windows[bar.kind]
            address = -(-self._next[bar.kind] // bar.size) * bar.size
            if address + bar.size > base + size:
                raise BarSpaceExhaustedError(
                    f"BAR {bar.index} ({bar.size:#x} bytes, {bar.kind.value}) does not fit in {base:#x}+{size:#x}"
                )
            self._next[bar.kind] = address + bar.size
            config.set_bar_address(bar.index, address)
            if on_placed is not None:
                on_placed(bar.index, address, bar.size)
        if any(bar is not None for bar in config.bars):
            config.set_command(config.command | COMMAND_MEMORY)
