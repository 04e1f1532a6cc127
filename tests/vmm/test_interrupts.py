"""One MSI routing table for the VM: the IOAPIC's pins and the MSI-X vectors share it, against the real
emulated /dev/mshv (which validates every table as upstream mshv does)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest

from mshv_libvirt.hv import MshvError, MsiRoute, PartitionFd
from mshv_libvirt.vmm import builder
from mshv_libvirt.vmm.devices.ioapic import MsiMessage
from mshv_libvirt.vmm.devices.pci import config as cfg
from mshv_libvirt.vmm.devices.pci import msix
from mshv_libvirt.vmm.interrupts import IOAPIC_GSIS, IrqfdLine, IrqfdSink, MsiRouting


class Recording:
    """The real partition, with every routing table it accepted kept (the emulator is the judge)."""

    def __init__(self, partition: PartitionFd) -> None:
        self._partition = partition
        self.tables: list[list[MsiRoute]] = []

    def set_msi_routing(self, routes: list[MsiRoute]) -> None:
        self._partition.set_msi_routing(routes)
        self.tables.append(list(routes))

    def irqfd(self, fd: int, gsi: int, *, resamplefd: int = -1, deassign: bool = False) -> None:
        self._partition.irqfd(fd, gsi, resamplefd=resamplefd, deassign=deassign)


@pytest.fixture
def partition() -> Iterator[Recording]:
    with builder.open_hypervisor("emulated") as system:
        part = system.create_partition()
        try:
            part.initialize()
            yield Recording(part)
        finally:
            part.close()


def test_pins_and_vectors_share_one_table(kvm: None, partition: Recording) -> None:
    routing = MsiRouting(partition)
    sink = IrqfdSink(routing)
    space = cfg.PciConfigSpace(0x1AF4, 0x1044, 0xFF0000)
    space.add_bar(cfg.Bar(0, 0x8000, cfg.BarKind.MEM64))
    lines = [IrqfdLine(routing, routing.allocate_gsi()) for _ in range(2)]
    try:
        assert [line.gsi for line in lines] == [IOAPIC_GSIS, IOAPIC_GSIS + 1]
        cap = msix.MsixCapability(space, list(lines), bar=0, table_offset=0x4000, pba_offset=0x5000)
        sink.route(4, MsiMessage(0xFEE00000, 0, 0x24))  # COM1's pin
        for v, irq in enumerate((0x40, 0x41)):
            cap.table_write(v * 16, 4, 0xFEE00000)
            cap.table_write(v * 16 + 8, 4, irq)
            cap.table_write(v * 16 + 12, 4, 0)
        space.write(cap.offset + 2, 2, msix.CONTROL_ENABLE)
        # Enabling MSI-X added both vectors without dropping the pin's entry.
        assert partition.tables[-1] == [
            MsiRoute(4, 0xFEE00000, 0, 0x24),
            MsiRoute(24, 0xFEE00000, 0, 0x40),
            MsiRoute(25, 0xFEE00000, 0, 0x41),
        ]
        sink.route(4, None)  # an IOAPIC mask keeps the vectors
        assert [r.gsi for r in partition.tables[-1]] == [24, 25]
        cap.fire(1)
        assert lines[1].fired == 1
        with pytest.raises(BlockingIOError):  # the kernel's irqfd (KVM's, behind the emulator) consumed it
            os.eventfd_read(lines[1].fd)
        space.write(cap.offset + 2, 2, 0)  # MSI-X disabled: the vectors leave, a fire pends
        assert partition.tables[-1] == []
        cap.fire(0)
        assert lines[0].fired == 0 and cap.pba_read(0, 4) == 1
    finally:
        for line in lines:
            line.close()
        sink.close()


def test_a_refused_table_keeps_the_old_one(partition: Recording) -> None:
    routing = MsiRouting(partition)
    routing.set(3, MsiMessage(0xFEE00000, 0, 0x30))
    with pytest.raises(MshvError) as refused:
        routing.set(30, MsiMessage(0xFEE00000, 1, 0x31))  # address_hi: upstream refuses the table
    assert refused.value.errno == errno.EINVAL
    assert routing.table() == [MsiRoute(3, 0xFEE00000, 0, 0x30)] and routing.route(30) is None
    routing.set(30, MsiMessage(0xFEE00000, 0, 0x31))
    assert [r.gsi for r in partition.tables[-1]] == [3, 30]


def test_gsis_run_out_at_the_table_limit(partition: Recording) -> None:
    routing = MsiRouting(partition)
    gsis = [routing.allocate_gsi() for _ in range(4096 - IOAPIC_GSIS)]
    assert gsis[0] == 24 and gsis[-1] == 4095
    with pytest.raises(ValueError, match="routing table is full"):
        routing.allocate_gsi()
