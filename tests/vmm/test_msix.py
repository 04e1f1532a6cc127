"""The MSI-X capability: table and PBA accesses, per-vector and function masking, pending bits, state."""

from __future__ import annotations

import struct

import pytest

from mshv_libvirt.vmm.devices.ioapic import MsiMessage
from mshv_libvirt.vmm.devices.pci import config as cfg
from mshv_libvirt.vmm.devices.pci import msix


class Line:
    """Records what the capability asks of a vector's interrupt line."""

    def __init__(self) -> None:
        self.routes: list[MsiMessage | None] = []
        self.fired = 0

    @property
    def route_now(self) -> MsiMessage | None:
        return self.routes[-1] if self.routes else None

    def route(self, msi: MsiMessage | None) -> None:
        self.routes.append(msi)

    def fire(self) -> None:
        assert self.route_now is not None, "fired while not deliverable"
        self.fired += 1


def _device(vectors: int = 3) -> tuple[cfg.PciConfigSpace, msix.MsixCapability, list[Line]]:
    space = cfg.PciConfigSpace(0x1AF4, 0x1044, 0xFF0000)
    space.add_bar(cfg.Bar(0, 0x8000, cfg.BarKind.MEM64))
    lines = [Line() for _ in range(vectors)]
    cap = msix.MsixCapability(space, list(lines), bar=0, table_offset=0x4000, pba_offset=0x5000)
    return space, cap, lines


def _program(cap: msix.MsixCapability, vector: int, *, apic: int, irq: int, masked: bool = False) -> None:
    base = vector * msix.ENTRY_SIZE
    cap.table_write(base, 4, 0xFEE00000 | apic << 12)
    cap.table_write(base + 4, 4, 0)
    cap.table_write(base + 8, 4, irq)
    cap.table_write(base + 12, 4, 1 if masked else 0)


def _control(space: cfg.PciConfigSpace, cap: msix.MsixCapability, value: int) -> None:
    space.write(cap.offset + 2, 2, value)


def test_capability_layout_as_a_guest_reads_it() -> None:
    space, cap, _ = _device(vectors=3)
    assert space.read(cfg.CAPABILITIES_POINTER, 1) == cap.offset
    assert space.read(cap.offset, 1) == msix.CAP_ID
    assert space.read(cap.offset + 2, 2) == 2  # table size N-1, disabled, function unmasked
    assert space.read(cap.offset + 4, 4) == 0x4000  # table offset | BIR 0
    assert space.read(cap.offset + 8, 4) == 0x5000  # PBA offset | BIR 0
    space.write(cap.offset + 2, 2, 0xFFFF)  # only enable and function mask are writable
    assert space.read(cap.offset + 2, 2) == 0xC002
    space.write(cap.offset + 4, 4, 0)
    assert space.read(cap.offset + 4, 4) == 0x4000
    for v in range(3):  # every vector is masked at reset
        assert cap.table_read(v * 16 + 12, 4) == msix.VECTOR_MASKED
    assert msix.MsixCapability.pba_size(64) == 8 and msix.MsixCapability.pba_size(65) == 16
    with pytest.raises(ValueError, match="1 to 2048"):
        msix.MsixCapability(space, [], bar=0, table_offset=0, pba_offset=0x800)
    with pytest.raises(ValueError, match="aligned"):
        msix.MsixCapability(space, [Line()], bar=0, table_offset=4, pba_offset=0x800)


def test_a_vector_is_routed_only_while_deliverable() -> None:
    space, cap, lines = _device()
    _program(cap, 1, apic=2, irq=0x41)
    assert lines[1].routes == []  # MSI-X is still disabled
    _control(space, cap, msix.CONTROL_ENABLE)
    want = MsiMessage(0xFEE02000, 0, 0x41)
    assert lines[1].routes == [want] and lines[0].routes == [] and lines[2].routes == []
    cap.fire(1)
    assert lines[1].fired == 1
    _control(space, cap, msix.CONTROL_ENABLE | msix.CONTROL_FUNCTION_MASK)  # function mask: all withdrawn
    assert lines[1].route_now is None
    _control(space, cap, msix.CONTROL_ENABLE)
    assert lines[1].route_now == want
    cap.table_write(1 * 16 + 12, 4, 1)  # per-vector mask
    assert lines[1].route_now is None
    cap.table_write(1 * 16 + 12, 4, 0xFFFFFFFE)  # reserved bits of vector control stay zero
    assert cap.table_read(1 * 16 + 12, 4) == 0 and lines[1].route_now == want
    cap.table_write(1 * 16 + 8, 4, 0x42)  # a new message while unmasked is re-routed
    assert lines[1].route_now == MsiMessage(0xFEE02000, 0, 0x42)
    cap.table_write(1 * 16, 8, 0xFEE00003)  # a qword write of address low+high; the low bits are dword alignment
    assert cap.table_read(1 * 16, 8) == 0xFEE00000
    assert lines[1].route_now == MsiMessage(0xFEE00000, 0, 0x42)
    cap.table_write(1 * 16 + 4, 4, 1)  # an upper address: mshv refuses address_hi, so not deliverable
    assert lines[1].route_now is None
    n = len(lines[1].routes)
    cap.table_write(1 * 16 + 8, 4, 0x43)
    assert len(lines[1].routes) == n  # no route change while not deliverable


def test_a_masked_vector_sets_its_pending_bit_and_fires_on_unmask() -> None:
    space, cap, lines = _device(vectors=3)
    _program(cap, 2, apic=0, irq=0x50, masked=True)
    _control(space, cap, msix.CONTROL_ENABLE)
    cap.fire(2)
    assert lines[2].fired == 0 and cap.pba_read(0, 8) == 1 << 2
    cap.fire(2)  # pending is one bit: still one interrupt owed
    cap.table_write(2 * 16 + 12, 4, 0)
    assert lines[2].fired == 1 and cap.pba_read(0, 8) == 0
    # The function mask pends too, and unmasking the function delivers.
    _control(space, cap, msix.CONTROL_ENABLE | msix.CONTROL_FUNCTION_MASK)
    cap.fire(2)
    assert lines[2].fired == 1 and cap.pba_read(0, 4) == 1 << 2
    _control(space, cap, msix.CONTROL_ENABLE)
    assert lines[2].fired == 2 and cap.pba_read(0, 4) == 0


def test_odd_accesses_are_ignored_not_fatal() -> None:
    _, cap, _ = _device(vectors=2)
    before = bytes(cap.table)
    cap.table_write(2, 2, 0xFFFF)  # the specification leaves these undefined
    cap.table_write(30, 4, 0xFFFF)  # unaligned
    cap.table_write(32, 4, 0xFFFF)  # past the table
    assert bytes(cap.table) == before
    assert cap.table_read(1, 4) == 0 and cap.table_read(32, 4) == 0 and cap.pba_read(8, 4) == 0


def test_state_round_trip() -> None:
    space, cap, lines = _device()
    _program(cap, 0, apic=1, irq=0x30)
    _program(cap, 2, apic=3, irq=0x31, masked=True)
    _control(space, cap, msix.CONTROL_ENABLE)
    cap.fire(2)
    config_state, msix_state = space.to_dict(), cap.to_dict()
    assert msix_state["version"] == msix.STATE_VERSION

    space2, cap2, lines2 = _device()
    space2.load_dict(config_state)
    cap2.load_dict(msix_state)
    assert bytes(cap2.table) == bytes(cap.table) and cap2.pba_read(0, 8) == 1 << 2
    assert lines2[0].route_now == MsiMessage(0xFEE01000, 0, 0x30) and lines2[2].route_now is None
    cap2.table_write(2 * 16 + 12, 4, 0)  # the restored pending interrupt is still owed
    assert lines2[2].fired == 1 and lines[2].fired == 0
    with pytest.raises(ValueError, match="version"):
        cap2.load_dict({**msix_state, "version": 99})
    _, cap_small, _ = _device(vectors=1)
    with pytest.raises(ValueError, match="for 3 vectors, not 1"):
        cap_small.load_dict(msix_state)
    assert struct.unpack_from("<I", bytes.fromhex(msix_state["table"]), 8)[0] == 0x30
