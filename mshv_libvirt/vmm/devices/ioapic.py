"""82093AA-style I/O APIC (MMIO 0xFEC00000, 24 pins, version 0x20 with a directed-EOI register).

The LAPIC lives in the hypervisor, so a pin firing becomes an MSI towards it: every redirection
entry is translated into an MSI (address, data) pair and handed to an injected
:class:`InterruptSink`, which programs the partition's MSI routing and signals the pin's GSI
(irqfd) -- or records calls in tests.

Edge pins fire on a rising line. Level pins fire while the line is high and Remote IRR is clear;
Remote IRR is set on delivery and cleared by an EOI for the vector (broadcast from the LAPIC, or
the EOI register), after which a still-high line fires again.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

NUM_PINS = 24
VERSION = 0x20
IOREGSEL = 0x00
IOWIN = 0x10
EOI = 0x40
MMIO_SIZE = 0x1000

REG_ID = 0x00
REG_VER = 0x01
REG_ARB = 0x02
REG_REDTBL = 0x10

RTE_VECTOR = 0xFF
RTE_DELIVERY_MODE_SHIFT = 8
RTE_DEST_LOGICAL = 1 << 11
RTE_DELIVERY_STATUS = 1 << 12
RTE_POLARITY_LOW = 1 << 13
RTE_REMOTE_IRR = 1 << 14
RTE_LEVEL = 1 << 15
RTE_MASKED = 1 << 16
RTE_RO_BITS = RTE_DELIVERY_STATUS | RTE_REMOTE_IRR

MSI_ADDRESS_BASE = 0xFEE00000


@dataclass(frozen=True)
class MsiMessage:
    address_lo: int
    address_hi: int
    data: int


class InterruptSink(Protocol):
    def route(self, pin: int, msi: MsiMessage | None) -> None:
        """Pin ``pin`` now maps to ``msi`` (None: masked)."""

    def fire(self, pin: int) -> None:
        """Deliver the pin's current MSI once."""


def rte_to_msi(rte: int) -> MsiMessage:
    """Translate a redirection entry into the MSI the LAPIC bus would carry."""
    dest = (rte >> 56) & 0xFF
    address = MSI_ADDRESS_BASE | (dest << 12) | (4 if rte & RTE_DEST_LOGICAL else 0)
    delivery_mode = (rte >> RTE_DELIVERY_MODE_SHIFT) & 0x7
    data = (rte & RTE_VECTOR) | (delivery_mode << 8)
    if rte & RTE_LEVEL:
        data |= (1 << 15) | (1 << 14)  # level-triggered, asserted
    return MsiMessage(address, 0, data)


class IoApic:
    def __init__(self, sink: InterruptSink, ioapic_id: int = 0) -> None:
        self._sink = sink
        self._lock = threading.RLock()
        self._id = ioapic_id
        self._select = 0
        self._rte = [RTE_MASKED] * NUM_PINS
        self._lines = [False] * NUM_PINS
        self.delivered = [0] * NUM_PINS  # per-pin delivery counters (status / tests)

    def redirection_entry(self, pin: int) -> int:
        with self._lock:
            return self._rte[pin]

    # -- MMIO -----------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset == IOREGSEL:
                return self._select
            if offset == IOWIN:
                return self._read_register(self._select)
            return 0

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            if offset == IOREGSEL:
                self._select = value & 0xFF
            elif offset == IOWIN:
                self._write_register(self._select, value & 0xFFFFFFFF)
            elif offset == EOI:
                self.end_of_interrupt(value & 0xFF)

    def _read_register(self, reg: int) -> int:
        if reg == REG_ID:
            return (self._id & 0xF) << 24
        if reg == REG_VER:
            return ((NUM_PINS - 1) << 16) | VERSION
        if reg == REG_ARB:
            return (self._id & 0xF) << 24
        pin, high = self._rte_index(reg)
        if pin is None:
            return 0xFFFFFFFF
        rte = self._rte[pin]
        return (rte >> 32) & 0xFFFFFFFF if high else rte & 0xFFFFFFFF

    def _write_register(self, reg: int, value: int) -> None:
        if reg == REG_ID:
            self._id = (value >> 24) & 0xF
            return
        pin, high = self._rte_index(reg)
        if pin is None:
            return
        old = self._rte[pin]
        if high:
            new = (old & 0xFFFFFFFF) | (value << 32)
        else:
            new = (old & 0xFFFFFFFF_00000000) | (value & ~RTE_RO_BITS & 0xFFFFFFFF) | (old & RTE_RO_BITS)
        if not new & RTE_LEVEL:
            new &= ~RTE_REMOTE_IRR
        self._rte[pin] = new
        if new != old:
            self._sink.route(pin, None if new & RTE_MASKED else rte_to_msi(new))
            # Unmasking a level pin whose line is still high delivers it now.
            if old & RTE_MASKED and not new & RTE_MASKED and new & RTE_LEVEL and self._lines[pin]:
                self._deliver(pin)

    @staticmethod
    def _rte_index(reg: int) -> tuple[int | None, bool]:
        if REG_REDTBL <= reg < REG_REDTBL + 2 * NUM_PINS:
            return (reg - REG_REDTBL) // 2, bool((reg - REG_REDTBL) & 1)
        return None, False

    # -- device side ----------------------------------------------------------------------------
    def set_irq(self, pin: int, asserted: bool) -> None:
        """A device asserts or deasserts pin ``pin``.

        Devices report logical assertion; the polarity bit only describes the wire, and every
        line here is wired the way the MADT tells the guest, so it is not applied again.
        """
        with self._lock:
            rising = asserted and not self._lines[pin]
            self._lines[pin] = asserted
            rte = self._rte[pin]
            if rte & RTE_LEVEL:
                if asserted and not rte & RTE_REMOTE_IRR:
                    self._deliver(pin)
            elif rising:
                self._deliver(pin)

    def pulse(self, pin: int) -> None:
        """One edge: assert then deassert."""
        with self._lock:
            self.set_irq(pin, True)
            self.set_irq(pin, False)

    def end_of_interrupt(self, vector: int) -> None:
        """EOI for ``vector``: clear Remote IRR and re-deliver level pins whose line is still high."""
        with self._lock:
            for pin, rte in enumerate(self._rte):
                if rte & RTE_LEVEL and rte & RTE_REMOTE_IRR and rte & RTE_VECTOR == vector:
                    self._rte[pin] = rte & ~RTE_REMOTE_IRR
                    if self._lines[pin]:
                        self._deliver(pin)

    def _deliver(self, pin: int) -> None:
        rte = self._rte[pin]
        if rte & RTE_MASKED:
            return
        if rte & RTE_LEVEL:
            self._rte[pin] = rte | RTE_REMOTE_IRR
        self.delivered[pin] += 1
        self._sink.fire(pin)
