"""The partition's interrupt lines: one MSI routing table, irqfd-bound eventfds that fire its entries.

MSHV_SET_MSI_ROUTING replaces the whole table, so every producer of MSIs -- the IOAPIC's pins (GSIs
0-23, GSI = pin) and the MSI-X vectors of PCI devices (GSIs from 24 up, allocated here) -- routes
through the one :class:`MsiRouting`, which rebuilds the table from all of them. A line is an eventfd
bound with MSHV_IRQFD to its GSI; firing it is one eventfd write from any thread (the hypervisor, or
KVM behind the emulated device, injects the MSI), never a call into the VMM per interrupt.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Protocol

from mshv_libvirt.hv import MsiRoute

from .devices.ioapic import MsiMessage

IOAPIC_GSIS = 24
MAX_GSIS = 4096  # MSHV_MAX_GUEST_IRQS: the routing table holds gsi 0..4095


class RoutingPartition(Protocol):
    def set_msi_routing(self, routes: list[MsiRoute]) -> None: ...

    def irqfd(self, fd: int, gsi: int, *, resamplefd: int = ..., deassign: bool = ...) -> None: ...


class MsiRouting:
    """The one routing table of the partition; ``set`` rewrites it whole, under a lock (any thread)."""

    def __init__(self, partition: RoutingPartition) -> None:
        self.partition = partition
        self._lock = threading.Lock()
        self._routes: dict[int, MsiRoute] = {}
        self._next_gsi = IOAPIC_GSIS
        partition.set_msi_routing([])

    def allocate_gsi(self) -> int:
        """A GSI of its own for a device's MSI-X vector."""
        with self._lock:
            if self._next_gsi >= MAX_GSIS:
                raise ValueError(f"the MSI routing table is full ({MAX_GSIS} GSIs)")
            gsi, self._next_gsi = self._next_gsi, self._next_gsi + 1
            return gsi

    def set(self, gsi: int, msi: MsiMessage | None) -> None:
        with self._lock:
            old = self._routes.get(gsi)
            if msi is None:
                self._routes.pop(gsi, None)
            else:
                self._routes[gsi] = MsiRoute(gsi, msi.address_lo, msi.address_hi, msi.data)
            try:
                self.partition.set_msi_routing(self.table())
            except BaseException:
                # A refused table leaves the partition's old one in place: keep ours equal to it.
                if old is None:
                    self._routes.pop(gsi, None)
                else:
                    self._routes[gsi] = old
                raise

    def table(self) -> list[MsiRoute]:
        return [self._routes[g] for g in sorted(self._routes)]

    def route(self, gsi: int) -> MsiRoute | None:
        with self._lock:
            return self._routes.get(gsi)


class IrqfdLine:
    """One interrupt line: an eventfd bound to ``gsi``; ``route`` sets the GSI's entry, ``fire`` signals it."""

    def __init__(self, routing: MsiRouting, gsi: int) -> None:
        self._routing = routing
        self.gsi = gsi
        self.fired = 0  # eventfd writes made (status and tests)
        self._routed = False
        # Set for a line another process signals (a vhost-user backend's call): its interrupts while the
        # vector is masked are lost (no route), so one is sent when it is routed again, as if pending.
        self.fire_when_routed = False
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            routing.partition.irqfd(self.fd, gsi)
        except BaseException:
            os.close(self.fd)
            raise

    def route(self, msi: MsiMessage | None) -> None:
        self._routing.set(self.gsi, msi)
        was, self._routed = self._routed, msi is not None
        if self._routed and not was and self.fire_when_routed:
            self.fire()

    def fire(self) -> None:
        if self._routed and self.fd >= 0:
            os.eventfd_write(self.fd, 1)
            self.fired += 1

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)


class IrqfdSink:
    """IOAPIC pins -> MSIs: pin n is the line of GSI n; the routing table follows the redirection
    entries (an :class:`~.devices.ioapic.InterruptSink`)."""

    def __init__(self, routing: MsiRouting, pins: int = IOAPIC_GSIS) -> None:
        self.lines: list[IrqfdLine] = []
        try:
            for pin in range(pins):
                self.lines.append(IrqfdLine(routing, pin))
        except BaseException:
            self.close()
            raise

    def route(self, pin: int, msi: MsiMessage | None) -> None:
        self.lines[pin].route(msi)

    def fire(self, pin: int) -> None:
        self.lines[pin].fire()

    def close(self) -> None:
        for line in self.lines:
            line.close()
