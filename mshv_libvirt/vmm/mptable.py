"""Intel MultiProcessor Specification 1.4 tables: CPUs and the IOAPIC for guests without ACPI.

Written at 0xF0000 (inside the reserved BIOS window, where Linux scans for ``_MP_``) on every
boot; Linux prefers the ACPI MADT when it has one, so this matters for ``acpi: false`` domains
and ``acpi=off`` command lines. ISA IRQs 1-15 (minus the cascade, 2) are wired to the IOAPIC pin
of the same number, edge-triggered, active high -- the same routing the MADT describes.
"""

from __future__ import annotations

import struct

from . import layout
from .acpi import checksum

MP_TABLE_ADDR = 0xF0000
APIC_VERSION = 0x14
IOAPIC_VERSION = 0x20
CPU_ENABLED = 0x01
CPU_BOOTSTRAP = 0x02
INT_TYPE_INT = 0
INT_TYPE_NMI = 1
INT_TYPE_EXTINT = 3


def build_mptable(vcpus: int, ioapic_id: int, base: int = MP_TABLE_ADDR, online: int | None = None) -> bytes:
    """Floating pointer at ``base`` followed by the configuration table. ``vcpus`` processors, the first
    ``online`` (default: all) enabled; Linux counts the disabled ones as hotplug CPUs."""
    online = vcpus if online is None else online
    entries = b""
    for i in range(vcpus):
        flags = (CPU_ENABLED if i < online else 0) | (CPU_BOOTSTRAP if i == 0 else 0)
        entries += struct.pack("<BBBBII8x", 0, i, APIC_VERSION, flags, 0x600, 0x201)
    entries += struct.pack("<BB6s", 1, 0, b"ISA   ")
    entries += struct.pack("<BBBBI", 2, ioapic_id, IOAPIC_VERSION, 1, layout.IOAPIC_ADDR)
    count = vcpus + 2
    for irq in range(1, 16):
        if irq == 2:
            continue
        # flags 0b0101: active high, edge (spelled out rather than "conforms to bus")
        entries += struct.pack("<BBHBBBB", 3, INT_TYPE_INT, 0x5, 0, irq, ioapic_id, irq)
        count += 1
    # LINT0 ExtINT and LINT1 NMI on every LAPIC (dest 0xFF), as firmware describes them.
    entries += struct.pack("<BBHBBBB", 4, INT_TYPE_EXTINT, 0, 0, 0, 0xFF, 0)
    entries += struct.pack("<BBHBBBB", 4, INT_TYPE_NMI, 0, 0, 0, 0xFF, 1)
    count += 2
    header = struct.pack(
        "<4sHBB8s12sIHHIHBx", b"PCMP", 44 + len(entries), 4, 0, b"MSHVLV  ", b"MSHV-LIBVIRT",
        0, 0, count, layout.LAPIC_ADDR, 0, 0,
    )  # fmt: skip
    table = bytearray(header + entries)
    table[7] = checksum(table)
    floating = bytearray(struct.pack("<4sIBBB5x", b"_MP_", base + 16, 1, 4, 0))
    floating[10] = checksum(floating)
    return bytes(floating + table)
