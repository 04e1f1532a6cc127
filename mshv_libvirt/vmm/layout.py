"""Guest-physical memory map and the CPU structures the VMM writes before the first instruction.

Everything here is pure (bytes in, bytes out) so the layout is unit-tested without a hypervisor.

    0x0000_0500  GDT: null, null, 64-bit code (0x10), flat data (0x18) -- the boot protocol's
                 __BOOT_CS/__BOOT_DS selectors
    0x0000_7000  boot_params ("zero page")
    0x0000_8ff0  initial RSP (the kernel switches stacks at once; the tiny guest sets its own)
    0x0000_9000  PML4, 0xA000 PDPT, 0xB000..0xEFFF four PDs: identity map of 0..4 GiB in 2 MiB pages
    0x0002_0000  kernel command line
    0x0009_FC00  EBDA-sized hole, reserved in e820
    0x000E_0000  ACPI tables (RSDP first: the legacy 0xE0000-0xFFFFF scan finds it too)
    0x0010_0000  protected-mode kernel (bzImage) or the ELF segments at their physical addresses
    ...          initrd at the top of low memory, page aligned
    0xC000_0000  32-bit MMIO hole (RAM above 3 GiB continues at 4 GiB): 32-bit PCI BARs up to 0xE000_0000
    0xE000_0000  PCI ECAM of bus 0 (1 MiB, reserved in e820, described by MCFG)
    0xFEC0_0000  IOAPIC (ours), 0xFEE0_0000 LAPIC (the hypervisor's)
    above RAM    64-bit PCI BARs: 64 GiB from the first 1 GiB boundary past the end of RAM (and 4 GiB)
I/O ports 0x1000-0xFFFF are the host bridge's I/O window (its ACPI _CRS); every legacy port the VMM
decodes (serial, i8042, RTC, ACPI PM, 0xCF8) is below 0x1000, outside it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

PAGE_SIZE = 0x1000
GDT_ADDR = 0x500
BOOT_PARAMS_ADDR = 0x7000
BOOT_STACK_TOP = 0x8FF0
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000
EBDA_START = 0x9FC00
ACPI_START = 0xE0000
ACPI_END = 0x100000
KERNEL_LOAD_ADDR = 0x100000
MMIO_HOLE_START = 0xC000_0000
HIGH_MEMORY_START = 0x1_0000_0000
PCI_MMIO32_START = MMIO_HOLE_START
PCI_MMIO32_SIZE = 0x2000_0000
PCI_ECAM_ADDR = 0xE000_0000
PCI_ECAM_SIZE = 0x10_0000  # bus 0 only
PCI_MMIO64_SIZE = 64 << 30
PCI_IO_START = 0x1000
PCI_IO_SIZE = 0x1_0000 - PCI_IO_START
IOAPIC_ADDR = 0xFEC0_0000
LAPIC_ADDR = 0xFEE0_0000

BOOT_CS = 0x10
BOOT_DS = 0x18

# Segment attribute words (x86 descriptor access bits, hv_x64_segment_register.attributes).
CODE64_ATTRIBUTES = 0xA09B  # G, L, P, S, type=execute/read accessed
DATA_ATTRIBUTES = 0xC093  # G, D/B, P, S, type=read/write accessed

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_AM = 1 << 18
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_RESERVED = 1 << 1
RFLAGS_IF = 1 << 9

BOOT_CR0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG
BOOT_CR4 = CR4_PAE
BOOT_EFER = EFER_LME | EFER_LMA


@dataclass(frozen=True)
class RamRange:
    """A guest-physical RAM range backed by one GuestMemory mapping."""

    gpa: int
    size: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


def ram_ranges(memory_bytes: int) -> list[RamRange]:
    """Split guest RAM around the 32-bit MMIO hole (IOAPIC/LAPIC live below 4 GiB)."""
    if memory_bytes <= 0 or memory_bytes % PAGE_SIZE:
        raise ValueError(f"memory size {memory_bytes} is not a positive multiple of 4 KiB")
    low = min(memory_bytes, MMIO_HOLE_START)
    ranges = [RamRange(0, low)]
    if memory_bytes > low:
        ranges.append(RamRange(HIGH_MEMORY_START, memory_bytes - low))
    return ranges


def pci_mmio64_window(memory_bytes: int) -> tuple[int, int]:
    """(base, size) of the 64-bit BAR window: above all RAM, 1 GiB aligned."""
    end = max(r.end for r in ram_ranges(memory_bytes))
    base = max(HIGH_MEMORY_START, -(-end // (1 << 30)) * (1 << 30))
    return base, PCI_MMIO64_SIZE


def gdt_bytes() -> bytes:
    """The four-entry boot GDT: selectors 0x10 (64-bit code) and 0x18 (data), as the boot protocol wants."""
    return struct.pack("<4Q", 0, 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)


def identity_page_tables() -> tuple[int, bytes]:
    """PML4 + PDPT + 4 PDs mapping 0..4 GiB 1:1 with 2 MiB pages; returns (address, bytes).

    4 GiB rather than "all RAM" so the IOAPIC and LAPIC pages are reachable by guests that
    never build their own tables (the tiny test guest); Linux replaces these at once.
    """
    present_rw = 0x3
    large = 0x80
    pml4 = struct.pack("<Q", PDPT_ADDR | present_rw).ljust(PAGE_SIZE, b"\0")
    pdpt = struct.pack("<4Q", *(PD_ADDR + i * PAGE_SIZE | present_rw for i in range(4))).ljust(PAGE_SIZE, b"\0")
    pds = struct.pack("<2048Q", *((i << 21) | present_rw | large for i in range(2048)))
    assert PDPT_ADDR == PML4_ADDR + PAGE_SIZE and PD_ADDR == PDPT_ADDR + PAGE_SIZE
    return PML4_ADDR, pml4 + pdpt + pds
