"""PCI addresses of a domain's devices: one assignment shared by every PCI device kind.

The guest has one root bus (0000:00) with one function per slot. Slots 0 and 1 are the ones
libvirt's QEMU driver keeps for the host bridge and the PIIX3 on a pc machine, so automatic
assignment starts at slot 2 and, like virDomainPCIAddressReserveNextAddr, gives each device
without an address the lowest free slot, in document order, after every explicit address has
been reserved (qemuDomainAssignPCIAddresses reserves the explicit ones first). The result is
written into the stored XML, so the addresses stay what they were across daemon and guest
restarts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mshv_libvirt.errors import ErrorCode, ErrorDomain, VirtError

__all__ = ["PCI_AUTO_FIRST_SLOT", "PCI_SLOTS", "PciAddress", "assign_pci"]

PCI_AUTO_FIRST_SLOT = 2  # libvirt's QEMU driver: 0 is the host bridge, 1 the PIIX3
PCI_SLOTS = 32  # slots 0x00..0x1f on a conventional PCI bus


@dataclass(frozen=True)
class PciAddress:
    """``<address type='pci'>`` on the root bus (domain 0, bus 0, function 0 here)."""

    slot: int
    domain: int = 0
    bus: int = 0
    function: int = 0

    def xml(self) -> str:
        # virPCIDeviceAddressFormat's spelling
        return (
            f"<address type='pci' domain='0x{self.domain:04x}' bus='0x{self.bus:02x}' "
            f"slot='0x{self.slot:02x}' function='0x{self.function:x}'/>"
        )

    def __str__(self) -> str:
        # virPCIDeviceAddressAsString
        return f"{self.domain:04x}:{self.bus:02x}:{self.slot:02x}.{self.function:x}"


def assign_pci(requested: Sequence[PciAddress | None]) -> tuple[PciAddress, ...]:
    """The address of each device, in the order given: an explicit one kept (a slot asked for twice
    is libvirt's XML error from virDomainPCIAddressReserveAddrInternal for a config), None given the
    lowest slot from :data:`PCI_AUTO_FIRST_SLOT` up that no device holds."""
    taken: set[int] = set()
    for address in requested:
        if address is None:
            continue
        if address.slot in taken:
            raise VirtError(ErrorCode.XML_ERROR, f"Attempted double use of PCI Address {address}", ErrorDomain.DOMAIN)
        taken.add(address.slot)
    assigned: list[PciAddress] = []
    for address in requested:
        if address is None:
            slot = next((s for s in range(PCI_AUTO_FIRST_SLOT, PCI_SLOTS) if s not in taken), None)
            if slot is None:
                # virDomainPCIAddressGetNextAddr
                raise VirtError(ErrorCode.INTERNAL_ERROR, "No more available PCI slots", ErrorDomain.DOMAIN)
            taken.add(slot)
            address = PciAddress(slot)
        assigned.append(address)
    return tuple(assigned)
