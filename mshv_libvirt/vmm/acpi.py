"""The minimal ACPI table set a Linux guest needs on this machine, built as bytes.

    RSDP (rev 2) -> XSDT -> FADT -> DSDT (``\\_S5``, the PCI host bridge, the CMOS RTC) and FACS
                         -> MADT (one LAPIC per vCPU, one IOAPIC, SCI override)
                         -> MCFG (the PCI ECAM window of bus 0)

What Linux takes from each:
* MADT: CPUs to bring up (and those present but disabled) and where the IOAPIC is. ``PCAT_COMPAT``
  is clear because there is no 8259 pair, so Linux never routes anything through a legacy PIC.
* FADT: the PM1a event/control blocks and PM timer on I/O ports (our ``acpi_pm`` device), the SCI
  line, the reset register (0xCF9, value 6), the fixed power button (``PWR_BUTTON`` flag clear),
  "8042 present" boot-architecture flag ("no CMOS RTC" only when there is none), the RTC's century
  register. ``SMI_CMD`` is 0: ACPI mode is always on.
* DSDT: ``\\_S5 = Package {5, 5, 0, 0}``; Linux's poweroff writes ``SLP_TYP=5 | SLP_EN`` to PM1a_CNT.
  ``\\_SB_.PCI0``, the PCI host bridge (PNP0A08, compatible PNP0A03): with no firmware to ask, Linux
  takes the bus range and the I/O and MMIO windows its BARs live in from its ``_CRS``, and finds no
  root bus without it. ``\\_SB_.RTC_`` (PNP0B00): what rtc_cmos binds to, ports 0x70-0x71 and IRQ 8.
* MCFG: where PCIe enhanced configuration space is (segment 0, bus 0 only).
The SCI is declared edge-triggered, active high (interrupt source override) so it never depends on
the IOAPIC seeing EOIs.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import aml, layout

OEM_ID = b"MSHVLV"
OEM_TABLE_ID = b"MSHVLIBV"
CREATOR_ID = b"MSHV"

SCI_IRQ = 9
PM1A_EVT_PORT = 0x600
PM1_EVT_LEN = 4
PM1A_CNT_PORT = 0x604
PM1_CNT_LEN = 2
PM_TMR_PORT = 0x608
PM_TMR_LEN = 4
RESET_PORT = 0xCF9
RESET_VALUE = 0x06
SLP_TYP_S5 = 5

# FADT flags
FADT_WBINVD = 1 << 0
FADT_C1_SUPPORTED = 1 << 2
FADT_SLP_BUTTON = 1 << 5  # set = no fixed-feature sleep button
FADT_TMR_VAL_EXT = 1 << 8  # 32-bit PM timer
FADT_RESET_REG_SUP = 1 << 10
# IA-PC boot architecture flags
BOOT_ARCH_8042 = 1 << 1
BOOT_ARCH_NO_VGA = 1 << 2
BOOT_ARCH_NO_CMOS_RTC = 1 << 5

GAS_SYSTEM_IO = 1

RTC_PORT = 0x70
RTC_PORTS_LENGTH = 2
RTC_IRQ = 8
RTC_CENTURY_REGISTER = 0x32  # the FADT's CENTURY field: the CMOS index Linux reads the century from


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes ``data`` sum to zero mod 256."""
    return (-sum(data)) & 0xFF


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    length = 36 + len(body)
    header = struct.pack("<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID, OEM_TABLE_ID, 1, CREATOR_ID, 1)
    table = bytearray(header + body)
    table[9] = checksum(table)
    return bytes(table)


def _gas(port: int, width_bits: int, access_size: int) -> bytes:
    return struct.pack("<BBBBQ", GAS_SYSTEM_IO, width_bits, 0, access_size, port)


@dataclass(frozen=True)
class PciWindows:
    """What the host bridge decodes for its bus: the bus range, then (base, size) of each BAR window."""

    buses: tuple[int, int]
    io: tuple[int, int]
    mmio32: tuple[int, int]
    mmio64: tuple[int, int]


def pci_windows(memory_bytes: int) -> PciWindows:
    """The windows of the layout (layout.py), for a guest of ``memory_bytes``."""
    return PciWindows(
        buses=(0, layout.PCI_ECAM_SIZE // (1 << 20) - 1),
        io=(layout.PCI_IO_START, layout.PCI_IO_SIZE),
        mmio32=(layout.PCI_MMIO32_START, layout.PCI_MMIO32_SIZE),
        mmio64=layout.pci_mmio64_window(memory_bytes),
    )


def pci_host_bridge(windows: PciWindows) -> bytes:
    """Device (PCI0): the root bridge of segment 0, its config ports consumed, its windows produced."""
    crs = aml.resource_template(
        aml.word_bus_number(*windows.buses),
        aml.io_port(0xCF8, 0xCF8, 1, 8),
        aml.word_io(*windows.io),
        aml.dword_memory(*windows.mmio32),
        aml.qword_memory(*windows.mmio64),
    )
    return aml.device(
        "PCI0",
        aml.name("_HID", aml.eisa_id("PNP0A08")),
        aml.name("_CID", aml.eisa_id("PNP0A03")),
        aml.name("_SEG", aml.integer(0)),
        aml.name("_BBN", aml.integer(windows.buses[0])),
        aml.name("_UID", aml.integer(0)),
        aml.name("_CRS", crs),
    )


def cmos_rtc() -> bytes:
    crs = aml.resource_template(
        aml.io_port(RTC_PORT, RTC_PORT, 1, RTC_PORTS_LENGTH),
        aml.irq_no_flags(RTC_IRQ),
    )
    return aml.device("RTC", aml.name("_HID", aml.eisa_id("PNP0B00")), aml.name("_CRS", crs))


def dsdt(pci: PciWindows | None = None, *, rtc: bool = False) -> bytes:
    # Name (_S5_, Package (4) {5, 5, 0, 0}): Linux's poweroff takes SLP_TYPa/b from the first two.
    s5 = aml.name("_S5", aml.package(*(aml.integer(v) for v in (SLP_TYP_S5, SLP_TYP_S5, 0, 0))))
    devices = ([pci_host_bridge(pci)] if pci is not None else []) + ([cmos_rtc()] if rtc else [])
    return _table(b"DSDT", 2, s5 + (aml.scope("\\_SB", *devices) if devices else b""))


def facs() -> bytes:
    # signature, length, hardware signature, waking vector, global lock, flags, x waking vector, version
    return struct.pack("<4sIIIIIQB", b"FACS", 64, 0, 0, 0, 0, 0, 2).ljust(64, b"\0")


def fadt(dsdt_addr: int, facs_addr: int, *, rtc: bool = False) -> bytes:
    body = bytearray(276 - 36)

    def put(offset: int, fmt: str, *values: int) -> None:
        struct.pack_into(fmt, body, offset - 36, *values)

    def put_bytes(offset: int, data: bytes) -> None:
        body[offset - 36 : offset - 36 + len(data)] = data

    put(36, "<II", facs_addr, dsdt_addr)
    put(45, "<BH", 0, SCI_IRQ)  # preferred PM profile: unspecified; SCI_INT
    put(56, "<II", PM1A_EVT_PORT, 0)
    put(64, "<II", PM1A_CNT_PORT, 0)
    put(76, "<I", PM_TMR_PORT)
    put(88, "<BBBB", PM1_EVT_LEN, PM1_CNT_LEN, 0, PM_TMR_LEN)
    put(96, "<HH", 101, 1001)  # C2/C3 latencies above the limits: "not supported"
    put(108, "<B", RTC_CENTURY_REGISTER if rtc else 0)
    put(109, "<H", BOOT_ARCH_8042 | BOOT_ARCH_NO_VGA | (0 if rtc else BOOT_ARCH_NO_CMOS_RTC))
    put(112, "<I", FADT_WBINVD | FADT_C1_SUPPORTED | FADT_SLP_BUTTON | FADT_TMR_VAL_EXT | FADT_RESET_REG_SUP)
    put_bytes(116, _gas(RESET_PORT, 8, 1))
    put(128, "<B", RESET_VALUE)
    put(131, "<B", 1)  # FADT minor version (6.1)
    put(132, "<QQ", facs_addr, dsdt_addr)
    put_bytes(148, _gas(PM1A_EVT_PORT, PM1_EVT_LEN * 8, 2))
    put_bytes(172, _gas(PM1A_CNT_PORT, PM1_CNT_LEN * 8, 2))
    put_bytes(208, _gas(PM_TMR_PORT, PM_TMR_LEN * 8, 3))
    return _table(b"FACP", 6, bytes(body))


# Local APIC flags (ACPI 6.5 table 5.37). A CPU that is present but not enabled carries Online Capable, as
# QEMU marks its hot-pluggable CPUs: Linux counts it as a hotplug CPU ("Allowing N CPUs, K hotplug CPUs")
# and never starts it; kernels that honour the bit (MADT revision >= 5) skip entries without it.
LAPIC_ENABLED = 1 << 0
LAPIC_ONLINE_CAPABLE = 1 << 1


def madt(vcpus: int, ioapic_id: int, online: int | None = None) -> bytes:
    """``vcpus`` local APICs (ids 0..vcpus-1), the first ``online`` of them enabled (default: all)."""
    online = vcpus if online is None else online
    body = struct.pack("<II", layout.LAPIC_ADDR, 0)  # flags: no PCAT_COMPAT (no 8259s)
    for i in range(vcpus):
        flags = LAPIC_ENABLED if i < online else LAPIC_ONLINE_CAPABLE
        body += struct.pack("<BBBBI", 0, 8, i, i, flags)  # processor local APIC
    body += struct.pack("<BBBBII", 1, 12, ioapic_id, 0, layout.IOAPIC_ADDR, 0)
    # SCI: ISA IRQ 9 -> GSI 9, active high (01), edge (01 << 2).
    body += struct.pack("<BBBBIH", 2, 10, 0, SCI_IRQ, SCI_IRQ, 0x5)
    return _table(b"APIC", 5, body)


def mcfg(ecam_addr: int = layout.PCI_ECAM_ADDR, last_bus: int = 0) -> bytes:
    # 8 reserved bytes, then one allocation: base, PCI segment 0, start bus 0, end bus, reserved.
    return _table(b"MCFG", 1, bytes(8) + struct.pack("<QHBBI", ecam_addr, 0, 0, last_bus, 0))


@dataclass(frozen=True)
class AcpiTables:
    rsdp_addr: int
    blob: bytes  # to be written at rsdp_addr


def build_tables(
    vcpus: int,
    *,
    base: int = layout.ACPI_START,
    ioapic_id: int | None = None,
    online: int | None = None,
    pci: PciWindows | None = None,
    rtc: bool = False,
) -> AcpiTables:
    """Lay the tables out back to back from ``base`` (16-byte aligned; FACS 64-byte aligned). ``vcpus``
    CPUs are described, the first ``online`` (default: all) enabled; the DSDT describes the PCI host
    bridge with ``pci``'s windows and the CMOS RTC when asked."""
    if vcpus < 1 or vcpus > 254:
        raise ValueError("vcpus must be between 1 and 254")
    if online is not None and not 1 <= online <= vcpus:
        raise ValueError("online vcpus must be between 1 and vcpus")
    apic_id = vcpus if ioapic_id is None else ioapic_id  # distinct from every LAPIC id
    blob = bytearray()

    def place(data: bytes, align: int = 16) -> int:
        blob.extend(b"\0" * (-len(blob) % align))
        addr = base + len(blob)
        blob.extend(data)
        return addr

    rsdp_len = 36
    place(b"\0" * rsdp_len)  # patched below once the XSDT address is known
    facs_addr = place(facs(), 64)
    dsdt_addr = place(dsdt(pci, rtc=rtc))
    fadt_addr = place(fadt(dsdt_addr, facs_addr, rtc=rtc))
    madt_addr = place(madt(vcpus, apic_id, online))
    mcfg_addr = place(mcfg())
    xsdt_addr = place(_table(b"XSDT", 1, struct.pack("<QQQ", fadt_addr, madt_addr, mcfg_addr)))
    rsdp = bytearray(struct.pack("<8sB6sBIIQBxxx", b"RSD PTR ", 0, OEM_ID, 2, 0, rsdp_len, xsdt_addr, 0))
    rsdp[8] = checksum(rsdp[:20])
    rsdp[32] = checksum(rsdp)
    blob[0:rsdp_len] = rsdp
    if base + len(blob) > layout.ACPI_END:
        raise ValueError("ACPI tables do not fit below 1 MiB")
    return AcpiTables(base, bytes(blob))
