"""The AML encoder and the DSDT it builds, byte for byte against encodings written out here from the
ACPI 6.5 specification (chapter 20.2 for the grammar, section 6.4 for resource descriptors), then the
DSDT disassembled by ACPICA's iasl (acpica-tools) as an independent reader."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from mshv_libvirt.vmm import acpi, aml, layout


@pytest.mark.parametrize(
    ("body_len", "encoded"),
    [
        (0, "01"),
        (62, "3f"),  # 63 in one byte: the largest one-byte PkgLength
        (63, "4104"),  # 63 + 2 = 65 = 0x041: lead 01 00 0001 (one byte follows, nibble 1), then 0x04
        (0x0FFD, "4fff"),  # 0xFFF: the largest two-byte one
        (0x0FFE, "810001"),  # 0x1001: two bytes follow, nibble 1, then 0x100 little endian
    ],
)
def test_pkg_length(body_len: int, encoded: str) -> None:
    assert aml.pkg_length(body_len).hex() == encoded


@pytest.mark.parametrize(
    ("path", "encoded"),
    [
        ("PCI0", b"PCI0"),
        ("_SB", b"_SB_"),
        ("\\_SB", b"\\_SB_"),
        ("\\_SB.PCI0", b"\\\x2e_SB_PCI0"),  # DualNamePrefix
        ("\\_SB.PCI0.RTC", b"\\\x2f\x03_SB_PCI0RTC_"),  # MultiNamePrefix, SegCount
        ("^PCI0", b"^PCI0"),
    ],
)
def test_name_string(path: str, encoded: bytes) -> None:
    assert aml.name_string(path) == encoded


@pytest.mark.parametrize("bad", ["pci0", "0PCI", "PCI00", "", "A-B"])
def test_name_seg_refuses_what_acpi_cannot_name(bad: str) -> None:
    with pytest.raises(ValueError):
        aml.name_seg(bad)


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, "00"),  # ZeroOp
        (1, "01"),  # OneOp
        (2, "0a02"),  # BytePrefix
        (0x100, "0b0001"),  # WordPrefix
        (0x10000, "0c00000100"),  # DWordPrefix
        (1 << 32, "0e0000000001000000"),  # QWordPrefix
        ((1 << 64) - 1, "ff"),  # OnesOp
    ],
)
def test_integer(value: int, encoded: str) -> None:
    assert aml.integer(value).hex() == encoded


@pytest.mark.parametrize(
    ("text", "encoded"),
    [
        # P=0x10 N=0x0E P=0x10 -> 0 10000 01110 10000 = 0x41D0, then the product number 0x0A08 / 0x0A03
        ("PNP0A08", "0c41d00a08"),
        ("PNP0A03", "0c41d00a03"),
        ("PNP0B00", "0c41d00b00"),
    ],
)
def test_eisa_id(text: str, encoded: str) -> None:
    assert aml.eisa_id(text).hex() == encoded


def test_resource_descriptors() -> None:
    # I/O port descriptor (6.4.2.5): tag 0 1000 111, decode16, min, max, alignment, length
    assert aml.io_port(0xCF8, 0xCF8, 1, 8).hex() == "4701f80cf80c0108"
    # IRQ descriptor without the information byte (6.4.2.1): tag 0 0100 010, mask bit 8
    assert aml.irq_no_flags(8).hex() == "220001"
    # Word address space (6.4.3.5.3): tag 0x88, length 13, type 2 (bus), flags MAF|MIF (producer,
    # positive decode), type flags 0, then granularity, min, max, translation, length
    assert aml.word_bus_number(0, 0).hex() == "880d00020c0000000000000000000100"
    # the same for I/O (type 1), _RNG = 3 (entire range)
    assert aml.word_io(0x1000, 0xF000).hex() == "880d00010c0300000010ffff000000f0"
    # DWord address space (6.4.3.5.2): tag 0x87, length 23, memory (0), type flags _RW=1, _MEM=0
    assert aml.dword_memory(0xC000_0000, 0x2000_0000).hex() == ("871700000c0100000000000000c0ffffffdf0000000000000020")
    # QWord address space (6.4.3.5.1): tag 0x8A, length 43
    assert aml.qword_memory(1 << 32, 64 << 30).hex() == (
        "8a"
        "2b00"
        "00"
        "0c"
        "01" + "0000000000000000" + "0000000001000000" + "ffffffff10000000" + "0000000000000000" + "0000000010000000"
    )
    # ResourceTemplate: BufferOp, PkgLength, BufferSize, the descriptors, end tag 0 1111 001 + checksum
    assert aml.resource_template(aml.irq_no_flags(8)).hex() == "11080a052200017900"


def _expected_dsdt_body(mmio64: tuple[int, int]) -> bytes:
    """The DSDT's AML as a reader of the specification writes it out, term by term."""
    s5 = bytes.fromhex("085f53355f1208040a050a050000")  # Name(_S5_, Package(4){5,5,0,0})
    crs_items = (
        bytes.fromhex("880d00020c0000000000000000000100")  # WordBusNumber 0-0
        + bytes.fromhex("4701f80cf80c0108")  # IO(Decode16, 0xCF8, 0xCF8, 1, 8)
        + bytes.fromhex("880d00010c0300000010ffff000000f0")  # WordIO 0x1000-0xFFFF
        + bytes.fromhex("871700000c0100000000000000c0ffffffdf0000000000000020")  # DWordMemory 32-bit hole
        + bytes.fromhex("8a2b00000c01")
        + struct.pack("<5Q", 0, mmio64[0], mmio64[0] + mmio64[1] - 1, 0, mmio64[1])  # QWordMemory
        + bytes.fromhex("7900")
    )
    assert len(crs_items) == 16 + 8 + 16 + 26 + 46 + 2 == 114
    # Buffer body: BufferSize (0a72) + 114 = 116; PkgLength 116 + 2 = 0x76: lead 01 00 0110, then 0x07
    crs = bytes.fromhex("085f4352531146070a72") + crs_items
    pci0 = (
        b"PCI0"
        + bytes.fromhex("085f4849440c41d00a08")  # Name(_HID, EisaId("PNP0A08"))
        + bytes.fromhex("085f4349440c41d00a03")  # Name(_CID, EisaId("PNP0A03"))
        + bytes.fromhex("085f53454700")  # Name(_SEG, Zero)
        + bytes.fromhex("085f42424e00")  # Name(_BBN, Zero)
        + bytes.fromhex("085f55494400")  # Name(_UID, Zero)
        + crs
    )
    assert len(pci0) == 4 + 10 + 10 + 6 + 6 + 6 + 124 == 166
    device_pci0 = bytes.fromhex("5b82480a") + pci0  # PkgLength 166 + 2 = 0xA8: lead 0100 1000, then 0x0A
    rtc_crs = bytes.fromhex("085f43525311100a0d47017000700001022200017900")
    rtc = b"RTC_" + bytes.fromhex("085f4849440c41d00b00") + rtc_crs
    device_rtc = bytes.fromhex("5b8225") + rtc  # 36 + 1
    sb = b"\\_SB_" + device_pci0 + device_rtc
    assert len(sb) == 5 + 170 + 39 == 214
    return s5 + bytes.fromhex("10480d") + sb  # ScopeOp, PkgLength 214 + 2 = 0xD8


def test_dsdt_byte_exact() -> None:
    windows = acpi.pci_windows(256 << 20)
    assert windows.mmio64 == (1 << 32, 64 << 30)
    table = acpi.dsdt(windows, rtc=True)
    assert table[:4] == b"DSDT" and table[8] == 2  # revision 2: 64-bit integers
    assert struct.unpack_from("<I", table, 4)[0] == len(table)
    assert sum(table) % 256 == 0
    assert table[36:] == _expected_dsdt_body(windows.mmio64)


def test_dsdt_64bit_window_follows_the_ram() -> None:
    windows = acpi.pci_windows(6 << 30)  # 3 GiB low, 3 GiB from 4 GiB: RAM ends at 7 GiB
    assert windows.mmio64 == (7 << 30, layout.PCI_MMIO64_SIZE)
    assert acpi.dsdt(windows, rtc=True)[36:] == _expected_dsdt_body(windows.mmio64)


def test_fadt_says_whether_there_is_a_cmos_rtc() -> None:
    with_rtc, without = acpi.fadt(0, 0, rtc=True), acpi.fadt(0, 0)
    assert with_rtc[108] == 0x32 and not struct.unpack_from("<H", with_rtc, 109)[0] & (1 << 5)
    assert without[108] == 0 and struct.unpack_from("<H", without, 109)[0] & (1 << 5)


def test_dsdt_without_devices_is_only_s5() -> None:
    assert acpi.dsdt()[36:].hex() == "085f53355f1208040a050a050000"


@pytest.mark.needs("iasl")
def test_iasl_disassembles_the_dsdt(tmp_path: Path) -> None:
    """ACPICA's own disassembler reads the table back as the ASL that describes it."""
    iasl = shutil.which("iasl")
    assert iasl is not None
    (tmp_path / "dsdt.dat").write_bytes(acpi.dsdt(acpi.pci_windows(256 << 20), rtc=True))
    done = subprocess.run([iasl, "-d", "dsdt.dat"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    asl = (tmp_path / "dsdt.dsl").read_text()
    body = re.sub(r"\s+", " ", asl[asl.index("DefinitionBlock") :])
    for expected in (
        'DefinitionBlock ("", "DSDT", 2, "MSHVLV", "MSHVLIBV", 0x00000001)',
        "Name (_S5, Package (0x04) // _S5_: S5 System State { 0x05, 0x05, Zero, Zero })",
        "Scope (\\_SB) { Device (PCI0) {",
        'Name (_HID, EisaId ("PNP0A08") /* PCI Express Bus */)',
        'Name (_CID, EisaId ("PNP0A03") /* PCI Bus */)',
        "Name (_SEG, Zero)",
        "Name (_BBN, Zero)",
        "Name (_UID, Zero)",
        "WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0x0000, // Granularity 0x0000, "
        "// Range Minimum 0x0000, // Range Maximum 0x0000, // Translation Offset 0x0001, // Length",
        "IO (Decode16, 0x0CF8, // Range Minimum 0x0CF8, // Range Maximum 0x01, // Alignment 0x08, // Length",
        "WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, 0x0000, // Granularity "
        "0x1000, // Range Minimum 0xFFFF, // Range Maximum",
        "DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite, "
        "0x00000000, // Granularity 0xC0000000, // Range Minimum 0xDFFFFFFF, // Range Maximum",
        "QWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite, "
        "0x0000000000000000, // Granularity 0x0000000100000000, // Range Minimum "
        "0x00000010FFFFFFFF, // Range Maximum",
        'Device (RTC) { Name (_HID, EisaId ("PNP0B00") /* AT Real-Time Clock */)',
        "IO (Decode16, 0x0070, // Range Minimum 0x0070, // Range Maximum 0x01, // Alignment 0x02, // Length",
        "IRQNoFlags () {8}",
    ):
        assert expected in body, f"{expected!r} not in the disassembly:\n{asl}"
    assert "Error" not in done.stdout + done.stderr
