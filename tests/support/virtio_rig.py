"""What every virtio device test rig builds around its device: an emulated partition with memfd RAM, and
the device's PCI function on the root bus with its BARs placed as the VMM's builder places them."""

from __future__ import annotations

import contextlib

from mshv_libvirt.hv import MshvSystem, PartitionFd
from mshv_libvirt.vmm import builder, layout
from mshv_libvirt.vmm.devices.pci.bridge import BarAllocator, PciRootBus
from mshv_libvirt.vmm.devices.virtio.pci import VirtioPciFunction


def partition_with_ram(
    system: MshvSystem, ram_bytes: int, stack: contextlib.ExitStack
) -> tuple[PartitionFd, builder.GuestRam]:
    """An initialized partition with ``ram_bytes`` of guest RAM, both closed by ``stack``."""
    partition = system.create_partition()
    stack.callback(partition.close)
    partition.initialize()
    ram = builder.map_memory(partition, ram_bytes)
    for _, mem in ram.regions:
        stack.callback(mem.close)
    return partition, ram


def place_on_root_bus(function: VirtioPciFunction, slot: int, ram_bytes: int) -> None:
    """``function`` in ``slot`` of a root bus, its BARs in the MMIO windows of a ``ram_bytes`` guest."""
    PciRootBus().add(function, slot)
    BarAllocator((layout.PCI_MMIO32_START, layout.PCI_MMIO32_SIZE), layout.pci_mmio64_window(ram_bytes)).place(
        function.config
    )
    function.sync_bar()
