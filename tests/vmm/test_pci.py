"""The PCI root bus: config space masks and BAR sizing, mechanism #1 ports, ECAM, BAR placement, state."""

from __future__ import annotations

import struct

import pytest

from mshv_libvirt.vmm import acpi, layout, loader
from mshv_libvirt.vmm.devices.bus import Bus
from mshv_libvirt.vmm.devices.pci import config as cfg
from mshv_libvirt.vmm.devices.pci.bridge import (
    CONFIG_ADDRESS_PORT,
    BarAllocator,
    BarSpaceExhaustedError,
    ConfigPorts,
    Ecam,
    PciRootBus,
    PlainFunction,
)


def _device(vendor: int = 0x1AF4, device: int = 0x1044) -> PlainFunction:
    space = cfg.PciConfigSpace(vendor, device, 0xFF0000, revision=1, subsystem_vendor_id=0x1AF4, subsystem_id=0x40)
    space.add_bar(cfg.Bar(0, 0x4000, cfg.BarKind.MEM64, prefetchable=True))
    space.add_bar(cfg.Bar(2, 0x1000, cfg.BarKind.MEM32))
    return PlainFunction(space)


def test_header_fields_and_read_only_bits() -> None:
    space = _device().config
    assert space.read(0, 4) == 0x1044_1AF4
    assert space.read(cfg.CLASS_CODE - 1, 4) == 0xFF00_0001  # class ff, subclass 00, prog-if 00, rev 1
    space.write(0, 4, 0)  # vendor/device are read-only
    assert space.read(0, 4) == 0x1044_1AF4
    space.write(cfg.COMMAND, 2, 0xFFFF)
    assert space.read(cfg.COMMAND, 2) == cfg.COMMAND_WRITABLE
    space.write(cfg.INTERRUPT_LINE, 1, 0x0B)
    assert space.read(cfg.INTERRUPT_LINE, 1) == 0x0B
    assert space.read(0xFFE, 2) == 0 and space.read(0x1000, 4) == 0xFFFFFFFF


def test_bar_sizing_as_a_guest_does_it() -> None:
    space = _device().config
    # 64-bit prefetchable BAR0 of 16 KiB: all ones in both halves reads back the size mask and type bits.
    space.write(cfg.BAR0, 4, 0xFFFFFFFF)
    space.write(cfg.BAR0 + 4, 4, 0xFFFFFFFF)
    low, high = space.read(cfg.BAR0, 4), space.read(cfg.BAR0 + 4, 4)
    assert low == 0xFFFFC000 | cfg.BAR_MEM64 | cfg.BAR_PREFETCHABLE and high == 0xFFFFFFFF
    assert ((~((high << 32) | (low & ~0xF))) & (2**64 - 1)) + 1 == 0x4000
    space.write(cfg.BAR0 + 8, 4, 0xFFFFFFFF)  # 32-bit BAR2 of 4 KiB
    assert space.read(cfg.BAR0 + 8, 4) == 0xFFFFF000
    space.write(cfg.BAR0 + 12, 4, 0xFFFFFFFF)  # BAR3..5 are not implemented: read zero
    assert space.read(cfg.BAR0 + 12, 4) == 0
    with pytest.raises(ValueError, match="already taken"):
        space.add_bar(cfg.Bar(1, 0x1000, cfg.BarKind.MEM32))
    with pytest.raises(ValueError, match="power of two"):
        space.add_bar(cfg.Bar(4, 0x3000, cfg.BarKind.MEM32))
    with pytest.raises(ValueError, match="does not fit"):
        space.add_bar(cfg.Bar(5, 0x1000, cfg.BarKind.MEM64))


def test_capabilities_are_chained() -> None:
    space = _device().config
    assert not space.read(cfg.STATUS, 2) & cfg.STATUS_CAPABILITIES
    first = space.add_capability(0x09, b"\x10" + bytes(13))
    second = space.add_capability(0x11, bytes(10), writable=b"\x00\xc0")
    assert space.read(cfg.STATUS, 2) & cfg.STATUS_CAPABILITIES
    assert space.read(cfg.CAPABILITIES_POINTER, 1) == first == 0x40
    assert space.read(first, 2) == (second << 8) | 0x09 and second == 0x50
    assert space.read(second + 1, 1) == 0  # end of the list
    space.write(second + 2, 2, 0xFFFF)  # only the writable bits of the body change
    assert space.read(second + 2, 2) == 0xC000


def test_config_mechanism_1_through_the_port_bus() -> None:
    bus = PciRootBus()
    assert bus.add(_device()) == 1
    reset: list[tuple[int, int]] = []

    class Reset:
        def read(self, offset: int, size: int) -> int:
            return 0x02

        def write(self, offset: int, size: int, value: int) -> None:
            reset.append((offset, value))

    pio = Bus("pio")
    pio.register(CONFIG_ADDRESS_PORT, 8, ConfigPorts(bus, reset=Reset()))

    def select(slot: int, register: int, function: int = 0, bus_no: int = 0) -> None:
        pio.write(0xCF8, 4, 0x8000_0000 | bus_no << 16 | slot << 11 | function << 8 | register)

    select(0, 0)
    assert pio.read(0xCF8, 4) == 0x8000_0000
    assert pio.read(0xCFC, 4) == 0x0008_1B36  # the host bridge, 00:00.0
    assert pio.read(0xCFE, 2) == 0x0008  # data port sub-dword offsets select bytes of the dword
    select(0, 8)
    assert pio.read(0xCFC, 4) >> 8 == 0x060000
    select(1, 0)
    assert pio.read(0xCFC, 4) == 0x1044_1AF4
    for absent in ((2, 0, 0), (1, 1, 0), (1, 0, 1)):
        select(absent[0], 0, function=absent[1], bus_no=absent[2])
        assert pio.read(0xCFC, 4) == 0xFFFFFFFF
    pio.write(0xCF8, 4, 1 << 11)  # enable bit clear: no configuration cycle
    assert pio.read(0xCFC, 4) == 0xFFFFFFFF
    # Linux's type 1 probe: a byte write to 0xCFB is not an address write.
    pio.write(0xCF8, 4, 0x8000_0800)
    pio.write(0xCFB, 1, 0x01)
    assert pio.read(0xCF8, 4) == 0x8000_0800
    # 0xCF9 stays the reset control register.
    pio.write(0xCF9, 1, 0x06)
    assert reset == [(0, 0x06)] and pio.read(0xCF9, 1) == 0x02
    select(1, cfg.COMMAND)
    pio.write(0xCFC, 2, cfg.COMMAND_MEMORY | cfg.COMMAND_BUS_MASTER)
    assert bus.slots[1].config.command == cfg.COMMAND_MEMORY | cfg.COMMAND_BUS_MASTER


def test_ecam_reaches_the_same_config_space() -> None:
    bus = PciRootBus()
    bus.add(_device(), slot=3)
    mmio = Bus("mmio")
    mmio.register(layout.PCI_ECAM_ADDR, layout.PCI_ECAM_SIZE, Ecam(bus))
    assert mmio.read(layout.PCI_ECAM_ADDR, 4) == 0x0008_1B36
    dev3 = layout.PCI_ECAM_ADDR + (3 << 15)
    assert mmio.read(dev3, 4) == 0x1044_1AF4
    assert mmio.read(dev3 + (1 << 12), 4) == 0xFFFFFFFF  # function 1
    assert mmio.read(layout.PCI_ECAM_ADDR + (4 << 15), 4) == 0xFFFFFFFF
    mmio.write(dev3 + cfg.INTERRUPT_LINE, 1, 0x0A)
    assert bus.slots[3].config.read(cfg.INTERRUPT_LINE, 1) == 0x0A
    assert mmio.read(dev3 + 0x100, 4) == 0  # extended space exists (PCIe), empty


def test_bus_slots() -> None:
    bus = PciRootBus()
    with pytest.raises(ValueError, match="not on bus 0"):
        bus.add(_device(), slot=0)  # the host bridge's
    with pytest.raises(ValueError, match="not on bus 0"):
        bus.add(_device(), slot=32)
    bus.add(_device(), slot=5)
    with pytest.raises(ValueError, match="already in use"):
        bus.add(_device(), slot=5)
    for _ in range(30):
        bus.add(_device())
    with pytest.raises(ValueError, match="no free slot"):
        bus.add(_device())


def test_bars_are_placed_naturally_aligned_in_their_windows() -> None:
    assert layout.pci_mmio64_window(6 << 30) == (7 << 30, 64 << 30)  # RAM: 3 GiB low + 3 GiB from 4 GiB
    window64 = layout.pci_mmio64_window((6 << 30) + (512 << 20))
    assert window64 == (8 << 30, 64 << 30)  # RAM ends at 7.5 GiB
    assert layout.pci_mmio64_window(64 << 20) == (4 << 30, 64 << 30)
    bars = BarAllocator((layout.PCI_MMIO32_START, layout.PCI_MMIO32_SIZE), window64)
    placed: list[tuple[int, int, int]] = []
    first, second = _device().config, _device().config
    bars.place(first, lambda *p: placed.append(p))
    bars.place(second, lambda *p: placed.append(p))
    assert placed == [
        (0, 8 << 30, 0x4000),
        (2, 0xC000_0000, 0x1000),
        (0, (8 << 30) + 0x4000, 0x4000),
        (2, 0xC000_1000, 0x1000),
    ]
    assert second.bar_address(0) == (8 << 30) + 0x4000 and second.bar_address(2) == 0xC000_1000
    assert second.read(cfg.BAR0, 4) == 0x4000 | cfg.BAR_MEM64 | cfg.BAR_PREFETCHABLE
    assert second.read(cfg.BAR0 + 4, 4) == 2
    assert second.command & cfg.COMMAND_MEMORY
    assert layout.PCI_MMIO32_START + layout.PCI_MMIO32_SIZE <= layout.PCI_ECAM_ADDR
    tiny = BarAllocator((0xC000_0000, 0x800), window64)
    tiny.place(cfg.PciConfigSpace(1, 1, 0))  # no BARs: nothing to place
    with pytest.raises(BarSpaceExhaustedError, match="does not fit"):
        tiny.place(_device().config)


def test_state_round_trip() -> None:
    bus = PciRootBus()
    bus.add(_device(), slot=2)
    BarAllocator((0xC000_0000, 1 << 20), (4 << 30, 1 << 30)).place(bus.slots[2].config)
    bus.slots[2].config_write(cfg.INTERRUPT_LINE, 1, 5)
    state = bus.to_dict()
    assert state["version"] == 1 and set(state["slots"]) == {"00", "02"}
    other = PciRootBus()
    other.add(_device(), slot=2)
    other.load_dict(state)
    assert other.to_dict() == state
    assert other.slots[2].config.bar_address(0) == 4 << 30
    assert other.slots[2].config.read(cfg.INTERRUPT_LINE, 1) == 5
    wrong = PciRootBus()
    wrong.add(_device(device=0x1041), slot=2)
    with pytest.raises(ValueError, match="is for device f41a4410, not f41a4110"):
        wrong.load_dict(state)
    with pytest.raises(ValueError, match="slots"):
        PciRootBus().load_dict(state)
    with pytest.raises(ValueError, match="version"):
        other.load_dict({**state, "version": 2})


def test_e820_reserves_ecam_and_mcfg_describes_it() -> None:
    e820 = loader.e820_map(layout.ram_ranges(4 << 30))
    assert loader.E820Entry(layout.PCI_ECAM_ADDR, layout.PCI_ECAM_SIZE, loader.E820Type.RESERVED) in e820
    assert [e.addr for e in e820] == sorted(e.addr for e in e820)
    table = acpi.mcfg()
    assert table[:4] == b"MCFG" and len(table) == 60 and sum(table) % 256 == 0
    assert struct.unpack_from("<QHBB", table, 44) == (layout.PCI_ECAM_ADDR, 0, 0, 0)
