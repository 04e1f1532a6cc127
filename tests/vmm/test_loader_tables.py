"""Boot protocol loader, memory layout and ACPI tables (pure byte builders)."""

from __future__ import annotations

import gzip
import lzma
import struct
from pathlib import Path

import pytest

from mshv_libvirt.vmm import acpi, layout, loader
from tests.support.guests import bzimage_with_payload, fake_elf, wrap_bzimage


def test_setup_header_is_validated() -> None:
    good = wrap_bzimage(b"\xf4" * 0x300, init_size=0x4000)
    header = loader.parse_setup_header(good)
    assert (header.setup_sects, header.version, header.protected_mode_offset) == (1, 0x20F, 1024)
    assert header.raw[:1] == b"\x01" and len(header.raw) == 0x268 - 0x1F1
    with pytest.raises(loader.LoaderError, match="setup header"):
        loader.parse_setup_header(bytes(4096))
    old = bytearray(good)
    struct.pack_into("<H", old, 0x206, 0x020A)
    with pytest.raises(loader.LoaderError, match="too old"):
        loader.parse_setup_header(bytes(old))
    no64 = bytearray(good)
    struct.pack_into("<H", no64, 0x236, 0)
    with pytest.raises(loader.LoaderError, match="64-bit"):
        loader.parse_setup_header(bytes(no64))


def test_plain_bzimage_enters_at_0x200_of_the_protected_mode_part() -> None:
    body = b"\xf4" * 0x300
    image = loader.load_kernel_image(wrap_bzimage(body, init_size=0x4000))
    assert not image.host_decompressed
    assert image.entry == 0x100200
    assert image.segments == (loader.Segment(0x100000, body, len(body)),)
    assert image.end >= 0x100000 + 0x4000


@pytest.mark.parametrize("compress", [lzma.compress, gzip.compress])
def test_host_decompression_loads_elf_segments(compress: object) -> None:
    elf = fake_elf(0x1000000, [(0x1000000, b"\xfa\xf4", 0x3000), (0x1200000, b"data", 4)])
    image = loader.load_kernel_image(bzimage_with_payload(compress(elf)))  # type: ignore[operator]
    assert image.host_decompressed and image.entry == 0x1000000
    assert [(s.gpa, s.data, s.mem_size) for s in image.segments] == [
        (0x1000000, b"\xf2\xf4"[:0] + b"\xfa\xf4", 0x3000),
        (0x1200000, b"data", 4),
    ]
    assert image.end == 0x1200004
    plain = loader.load_kernel_image(bzimage_with_payload(compress(elf)), host_decompress=False)  # type: ignore[operator]
    assert not plain.host_decompressed and plain.entry == 0x100200


def test_a_cached_payload_is_used_only_for_the_image_it_was_made_from() -> None:
    """The daemon's cache entry (loader.cached_payload) replaces the decompression when its digest is this
    image's compressed payload's; another image's entry, or bytes that are not one, mean a decompression."""
    elf = fake_elf(0x1000000, [(0x1000000, b"\xfa\xf4", 0x10)])
    other = fake_elf(0x1000000, [(0x1000000, b"\x90\xf4", 0x10)])
    image, other_image = bzimage_with_payload(lzma.compress(elf)), bzimage_with_payload(lzma.compress(other))
    entry = loader.cached_payload(image)
    assert entry is not None and entry.endswith(elf)  # what the daemon keeps: ends with the ELF itself
    hit = loader.load_kernel_image(image, cached=entry)
    assert hit.payload_cached and hit.segments[0].data == b"\xfa\xf4"
    # An entry with this image's digest but other contents is believed: the digest is what ties them.
    forged = entry[: -len(elf)] + other
    assert loader.load_kernel_image(image, cached=forged).segments[0].data == b"\x90\xf4"
    for stale in (loader.cached_payload(other_image), b"not an entry", entry[:-1][:40]):
        miss = loader.load_kernel_image(image, cached=stale)
        assert not miss.payload_cached and miss.host_decompressed and miss.segments[0].data == b"\xfa\xf4"
    assert loader.cached_payload(wrap_bzimage(b"\xf4" * 0x300, init_size=0x4000)) is None  # nothing to decompress


def test_unknown_payload_falls_back_to_the_decompressor() -> None:
    image = loader.load_kernel_image(bzimage_with_payload(b"\x28\xb5\x2f\xfd" + b"zstd?" * 10))
    assert not image.host_decompressed


def test_boot_params_fields() -> None:
    header = loader.parse_setup_header(wrap_bzimage(b"\xf4" * 0x300, init_size=0x4000))
    ram = layout.ram_ranges(256 << 20)
    e820 = loader.e820_map(ram)
    bp = loader.build_boot_params(
        header, cmdline_addr=0x20000, e820=e820, initrd=(0x0FF00000, 0x1234), rsdp_addr=0xE0000
    )
    assert len(bp) == 4096
    assert bp[0x202:0x206] == b"HdrS" and bp[0x210] == 0xFF
    assert struct.unpack_from("<I", bp, 0x228)[0] == 0x20000
    assert struct.unpack_from("<II", bp, 0x218) == (0x0FF00000, 0x1234)
    assert struct.unpack_from("<Q", bp, 0x70)[0] == 0xE0000
    assert bp[0x1E8] == len(e820) == 5
    table = [struct.unpack_from("<QQI", bp, 0x2D0 + 20 * i) for i in range(bp[0x1E8])]
    assert table[0] == (0, 0x9FC00, 1)
    assert table[-2] == (0x100000, (256 << 20) - 0x100000, 1)
    assert table[-1] == (layout.PCI_ECAM_ADDR, layout.PCI_ECAM_SIZE, 2)
    assert all(t[2] == 2 for t in table[1:3])


def test_memory_above_3g_is_split_around_the_hole() -> None:
    ranges = layout.ram_ranges(4 << 30)
    assert ranges == [layout.RamRange(0, 3 << 30), layout.RamRange(4 << 30, 1 << 30)]
    e820 = loader.e820_map(ranges)
    assert e820[-1] == loader.E820Entry(4 << 30, 1 << 30, loader.E820Type.RAM)
    with pytest.raises(ValueError):
        layout.ram_ranges(12345)


def test_initrd_goes_high_and_must_not_hit_the_kernel() -> None:
    header = loader.parse_setup_header(wrap_bzimage(b"\xf4" * 0x300, init_size=0x4000))
    ram = layout.ram_ranges(64 << 20)
    addr = loader.place_initrd(header, ram, 0x12345, kernel_end=0x200000)
    assert addr % 4096 == 0 and addr + 0x12345 <= 64 << 20 and addr > (60 << 20)
    with pytest.raises(loader.LoaderError, match="does not fit"):
        loader.place_initrd(header, ram, 63 << 20, kernel_end=0x200000)


def test_cmdline_limits() -> None:
    header = loader.parse_setup_header(wrap_bzimage(b"\xf4" * 0x300, init_size=0x4000))
    assert loader.encode_cmdline(header, "console=ttyS0") == b"console=ttyS0\0"
    with pytest.raises(loader.LoaderError, match="at most 2047"):
        loader.encode_cmdline(header, "x" * 3000)
    with pytest.raises(loader.LoaderError, match="NUL"):
        loader.encode_cmdline(header, "a\0b")


def test_page_tables_and_gdt() -> None:
    addr, tables = layout.identity_page_tables()
    assert addr == 0x9000 and len(tables) == 6 * 4096
    pml4 = struct.unpack_from("<Q", tables, 0)[0]
    assert pml4 == 0xA003
    pd0 = struct.unpack_from("<Q", tables, 2 * 4096)[0]
    assert pd0 == 0x83
    last = struct.unpack_from("<Q", tables, 6 * 4096 - 8)[0]
    assert last == (4 << 30) - (2 << 20) | 0x83  # the LAPIC/IOAPIC page is mapped
    gdt = layout.gdt_bytes()
    assert struct.unpack_from("<Q", gdt, 0x10)[0] >> 40 & 0xFF == 0x9B  # code, selector 0x10
    assert struct.unpack_from("<Q", gdt, 0x18)[0] >> 40 & 0xFF == 0x93  # data, selector 0x18


def _tables_by_signature(t: acpi.AcpiTables) -> dict[bytes, bytes]:
    def at(addr: int, size: int) -> bytes:
        return t.blob[addr - t.rsdp_addr : addr - t.rsdp_addr + size]

    rsdp = at(t.rsdp_addr, 36)
    assert rsdp[:8] == b"RSD PTR " and sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    xsdt_addr = struct.unpack_from("<Q", rsdp, 24)[0]
    found: dict[bytes, bytes] = {}

    def table(addr: int) -> bytes:
        length = struct.unpack_from("<I", at(addr, 8), 4)[0]
        data = at(addr, length)
        assert sum(data) % 256 == 0, data[:4]
        found[data[:4]] = data
        return data

    xsdt = table(xsdt_addr)
    for i in range((len(xsdt) - 36) // 8):
        table(struct.unpack_from("<Q", xsdt, 36 + 8 * i)[0])
    fadt = found[b"FACP"]
    table(struct.unpack_from("<Q", fadt, 140)[0])
    facs = at(struct.unpack_from("<Q", fadt, 132)[0], 64)
    assert facs[:4] == b"FACS" and struct.unpack_from("<Q", fadt, 132)[0] % 64 == 0
    return found


def test_acpi_tables_are_consistent() -> None:
    t = acpi.build_tables(2, ioapic_id=2)
    assert t.rsdp_addr == layout.ACPI_START and t.rsdp_addr + len(t.blob) <= layout.ACPI_END
    found = _tables_by_signature(t)
    assert set(found) == {b"XSDT", b"FACP", b"APIC", b"DSDT", b"MCFG"}
    fadt = found[b"FACP"]
    assert struct.unpack_from("<H", fadt, 46)[0] == acpi.SCI_IRQ
    assert struct.unpack_from("<II", fadt, 56)[0] == acpi.PM1A_EVT_PORT
    assert struct.unpack_from("<I", fadt, 64)[0] == acpi.PM1A_CNT_PORT
    assert fadt[88:92] == bytes([4, 2, 0, 4])
    assert not struct.unpack_from("<I", fadt, 112)[0] & (1 << 4)  # fixed power button present
    assert fadt[116] == 1 and struct.unpack_from("<Q", fadt, 120)[0] == acpi.RESET_PORT and fadt[128] == 6
    assert b"_S5_" in found[b"DSDT"]
    madt = found[b"APIC"]
    assert struct.unpack_from("<II", madt, 36) == (layout.LAPIC_ADDR, 0)
    entries = []
    pos = 44
    while pos < len(madt):
        entries.append((madt[pos], madt[pos : pos + madt[pos + 1]]))
        pos += madt[pos + 1]
    assert [e[0] for e in entries] == [0, 0, 1, 2]
    assert [e[1][3] for e in entries[:2]] == [0, 1]  # APIC ids
    assert struct.unpack_from("<I", entries[2][1], 4)[0] == layout.IOAPIC_ADDR
    assert struct.unpack_from("<BIH", entries[3][1], 3) == (9, 9, 5)  # SCI: edge, active high


def test_tiny_guest_is_a_valid_bzimage(tmp_path: Path) -> None:
    from tests.support.guests import GuestUnavailable, build_tiny_guest

    try:
        path = build_tiny_guest(tmp_path)
    except GuestUnavailable as err:
        pytest.skip(str(err))
    image = loader.load_kernel_image(path.read_bytes())
    assert image.entry == 0x100200 and not image.host_decompressed
    assert image.header.version >= 0x020C


def test_mp_table_structure() -> None:
    from mshv_libvirt.vmm import mptable

    blob = mptable.build_mptable(2, ioapic_id=2)
    floating, table = blob[:16], blob[16:]
    assert floating[:4] == b"_MP_" and sum(floating) % 256 == 0 and floating[8] == 1 and floating[9] == 4
    assert struct.unpack_from("<I", floating, 4)[0] == mptable.MP_TABLE_ADDR + 16
    length, count = struct.unpack_from("<H", table, 4)[0], struct.unpack_from("<H", table, 34)[0]
    assert table[:4] == b"PCMP" and length == len(table) and sum(table) % 256 == 0
    pos, kinds = 44, []
    for _ in range(count):
        kinds.append(table[pos])
        pos += 20 if table[pos] == 0 else 8
    assert pos == len(table)
    assert kinds == [0, 0, 1, 2] + [3] * 14 + [4, 4]
    assert table[44 + 3] == 3 and table[64 + 3] == 1  # BSP flag only on the first CPU
