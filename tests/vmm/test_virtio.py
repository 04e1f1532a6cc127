"""Modern virtio-pci and virtio-rng, driven as a guest driver drives them, against the real emulated
/dev/mshv: guest RAM mapped in the partition, doorbells registered with MSHV_IOEVENTFD, MSI-X vectors
routed with MSHV_SET_MSI_ROUTING and fired through MSHV_IRQFD, the device thread reading /dev/urandom."""

from __future__ import annotations

import contextlib
import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from mshv_libvirt.hv import PartitionFd
from mshv_libvirt.vmm import builder, layout
from mshv_libvirt.vmm.devices.bus import Bus
from mshv_libvirt.vmm.devices.pci import config as cfg
from mshv_libvirt.vmm.devices.pci import msix
from mshv_libvirt.vmm.devices.virtio import pci as vpci
from mshv_libvirt.vmm.devices.virtio.queue import DESC_F_WRITE, DeviceMemory
from mshv_libvirt.vmm.devices.virtio.rng import RateLimit, VirtioRng
from mshv_libvirt.vmm.interrupts import MsiRouting
from tests.support import waits
from tests.support.virtio_rig import partition_with_ram, place_on_root_bus

DESC, AVAIL, USED, BUFS = 0x10_0000, 0x11_0000, 0x12_0000, 0x20_0000
QSIZE = 8


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    waits.wait_for(cond, timeout, interval=0.005)


@dataclass
class Rig:
    partition: PartitionFd
    ram: builder.GuestRam
    mmio: Bus
    function: vpci.VirtioPciFunction
    rng: VirtioRng
    dirty: list[tuple[int, int]]

    @property
    def bar(self) -> int:
        assert self.function.mapped_at is not None
        return self.function.mapped_at

    def common_read(self, offset: int, size: int) -> int:
        return self.mmio.read(self.bar + vpci.COMMON_OFFSET + offset, size)

    def common_write(self, offset: int, size: int, value: int) -> None:
        self.mmio.write(self.bar + vpci.COMMON_OFFSET + offset, size, value)

    def used_idx(self) -> int:
        return int(struct.unpack("<H", self.ram.read(USED + 2, 2))[0])

    def driver_init(self, *, vectors: bool = True, features: int = vpci.F_VERSION_1) -> None:
        """What Linux's virtio_pci_modern + virtio core do, in order (virtio 1.2 3.1.1)."""
        self.common_write(vpci.DEVICE_STATUS, 1, 0)
        self.common_write(vpci.DEVICE_STATUS, 1, vpci.STATUS_ACKNOWLEDGE)
        self.common_write(vpci.DEVICE_STATUS, 1, vpci.STATUS_ACKNOWLEDGE | vpci.STATUS_DRIVER)
        for select in (0, 1):
            self.common_write(vpci.DRIVER_FEATURE_SELECT, 4, select)
            self.common_write(vpci.DRIVER_FEATURE, 4, (features >> (32 * select)) & 0xFFFFFFFF)
        ok = vpci.STATUS_ACKNOWLEDGE | vpci.STATUS_DRIVER | vpci.STATUS_FEATURES_OK
        self.common_write(vpci.DEVICE_STATUS, 1, ok)
        if not self.common_read(vpci.DEVICE_STATUS, 1) & vpci.STATUS_FEATURES_OK:
            return
        if vectors:  # MSI-X: vector 0 for the queue at APIC 0, vector 0x45
            table = self.bar + vpci.MSIX_TABLE_OFFSET
            self.mmio.write(table, 4, 0xFEE00000)
            self.mmio.write(table + 8, 4, 0x45)
            self.mmio.write(table + 12, 4, 0)
            space = self.function.config
            space.write(self.function.msix.offset + 2, 2, msix.CONTROL_ENABLE)
        self.common_write(vpci.QUEUE_SELECT, 2, 0)
        assert self.common_read(vpci.QUEUE_SIZE, 2) == 256
        self.common_write(vpci.QUEUE_SIZE, 2, QSIZE)
        for reg, addr in ((vpci.QUEUE_DESC, DESC), (vpci.QUEUE_DRIVER, AVAIL), (vpci.QUEUE_DEVICE, USED)):
            self.common_write(reg, 4, addr & 0xFFFFFFFF)  # vp_iowrite64_twopart
            self.common_write(reg + 4, 4, addr >> 32)
        if vectors:
            self.common_write(vpci.QUEUE_MSIX_VECTOR, 2, 0)
            assert self.common_read(vpci.QUEUE_MSIX_VECTOR, 2) == 0
        self.common_write(vpci.QUEUE_ENABLE, 2, 1)
        self.common_write(vpci.DEVICE_STATUS, 1, ok | vpci.STATUS_DRIVER_OK)

    def post(self, index: int, lengths: list[int], avail_idx: int, *, flags: int = DESC_F_WRITE) -> None:
        """A chain of writable buffers at descriptor ``index``, made available as entry ``avail_idx``."""
        for k, length in enumerate(lengths):
            last = k == len(lengths) - 1
            d = (index + k) % QSIZE
            self.ram.write(
                DESC + 16 * d,
                struct.pack("<QIHH", BUFS + 0x1000 * d, length, flags | (0 if last else 1), (d + 1) % QSIZE),
            )
        self.ram.write(AVAIL + 4 + 2 * (avail_idx % QSIZE), struct.pack("<H", index))
        self.ram.write(AVAIL + 2, struct.pack("<H", (avail_idx + 1) & 0xFFFF))

    def kick(self) -> None:
        """The doorbell as the kernel delivers a registered one: the queue's eventfd, no VMM involved."""
        os.eventfd_write(self.function.kicks[0], 1)


@contextlib.contextmanager
def rig(rate: RateLimit | None = None) -> Iterator[Rig]:
    with builder.open_hypervisor("emulated") as system, contextlib.ExitStack() as stack:
        partition, ram = partition_with_ram(system, 16 << 20, stack)
        mmio = Bus("mmio")
        routing = MsiRouting(partition)
        dirty: list[tuple[int, int]] = []
        source = os.open("/dev/urandom", os.O_RDONLY | os.O_CLOEXEC)
        stack.callback(os.close, source)
        rng = VirtioRng(source, rate)
        function = vpci.VirtioPciFunction(
            rng, DeviceMemory(ram, lambda gpa, n: dirty.append((gpa, n))), routing, partition, mmio
        )
        stack.callback(function.close)
        place_on_root_bus(function, 3, 16 << 20)
        rng.start(function)
        stack.callback(rng.stop)
        yield Rig(partition, ram, mmio, function, rng, dirty)


def test_pci_identity_and_capabilities() -> None:
    with rig() as r:
        space = r.function.config
        assert space.read(0, 4) == 0x1044_1AF4  # 1af4:1044, the modern virtio-rng id
        assert space.read(cfg.REVISION_ID, 1) == 1 and space.read(cfg.SUBSYSTEM_ID, 2) == 0x40
        caps: dict[int, tuple[int, int, int]] = {}
        at = space.read(cfg.CAPABILITIES_POINTER, 1)
        while at:
            cap_id = space.read(at, 1)
            if cap_id == vpci.CAP_VENDOR:
                cfg_type, bar = space.read(at + 3, 1), space.read(at + 4, 1)
                assert bar == 0
                caps[cfg_type] = (space.read(at + 8, 4), space.read(at + 12, 4), space.read(at + 2, 1))
                if cfg_type == vpci.CAP_NOTIFY:
                    assert space.read(at + 16, 4) == vpci.NOTIFY_MULTIPLIER
            at = space.read(at + 1, 1)
        assert caps == {
            vpci.CAP_COMMON: (0x0000, 0x40, 16),
            vpci.CAP_NOTIFY: (0x3000, 4, 20),
            vpci.CAP_ISR: (0x1000, 4, 16),
        }  # virtio-rng has no device-specific configuration
        # BAR 0 is a 64-bit BAR above RAM, mapped on the MMIO bus where it was placed.
        assert space.read(cfg.BAR0, 4) & 0x7 == cfg.BAR_MEM64
        assert r.bar == space.bar_address(0) == layout.pci_mmio64_window(16 << 20)[0]
        assert r.common_read(vpci.NUM_QUEUES, 2) == 1
        r.common_write(vpci.DEVICE_FEATURE_SELECT, 4, 1)
        assert r.common_read(vpci.DEVICE_FEATURE, 4) == 1  # VIRTIO_F_VERSION_1 (bit 32)
        r.common_write(vpci.DEVICE_FEATURE_SELECT, 4, 0)
        assert r.common_read(vpci.DEVICE_FEATURE, 4) == 0


def test_the_bar_follows_the_guest() -> None:
    with rig() as r:
        old = r.bar
        space = r.function.config
        space.write(cfg.COMMAND, 2, 0)  # decoding off: unmapped (and the doorbells withdrawn)
        assert r.function.mapped_at is None and r.mmio.lookup(old, 4) is None
        space.write(cfg.BAR0, 4, 0xFFFFFFFF)  # sizing, as Linux does it with decoding off
        space.write(cfg.BAR0 + 4, 4, 0xFFFFFFFF)
        assert space.read(cfg.BAR0, 4) == (~(vpci.BAR_SIZE - 1) & 0xFFFFFFF0) | cfg.BAR_MEM64
        space.write(cfg.BAR0, 4, 0xD000_0000)  # moved below 4 GiB
        space.write(cfg.BAR0 + 4, 4, 0)
        space.write(cfg.COMMAND, 2, cfg.COMMAND_MEMORY)
        assert r.bar == 0xD000_0000 and r.common_read(vpci.NUM_QUEUES, 2) == 1
        # The doorbell moved too: registering the old address again succeeds, the new one is taken.
        probe = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            r.partition.ioeventfd(probe, old + vpci.NOTIFY_OFFSET, 0)
            r.partition.ioeventfd(probe, old + vpci.NOTIFY_OFFSET, 0, deassign=True)
            with pytest.raises(OSError, match="File exists"):
                r.partition.ioeventfd(probe, 0xD000_0000 + vpci.NOTIFY_OFFSET, 0)
        finally:
            os.close(probe)


def test_feature_negotiation_refuses_what_was_not_offered() -> None:
    with rig() as r:
        r.driver_init(features=vpci.F_VERSION_1 | (1 << 28))  # INDIRECT_DESC: not offered
        assert not r.common_read(vpci.DEVICE_STATUS, 1) & vpci.STATUS_FEATURES_OK
        r.driver_init(features=0)  # a legacy driver (no VERSION_1)
        assert not r.common_read(vpci.DEVICE_STATUS, 1) & vpci.STATUS_FEATURES_OK
        r.driver_init()
        assert r.common_read(vpci.DEVICE_STATUS, 1) == 0xF
        r.common_write(vpci.QUEUE_MSIX_VECTOR, 2, 7)  # enabled queue: read-only now
        assert r.common_read(vpci.QUEUE_MSIX_VECTOR, 2) == 0
        r.common_write(vpci.CONFIG_MSIX_VECTOR, 2, 2)  # 2 vectors (config + 1 queue): 2 does not exist
        assert r.common_read(vpci.CONFIG_MSIX_VECTOR, 2) == vpci.NO_VECTOR
        r.common_write(vpci.QUEUE_SELECT, 2, 1)  # no queue 1
        assert r.common_read(vpci.QUEUE_SIZE, 2) == 0


def test_entropy_arrives_through_the_queue_and_the_msix_irqfd(kvm: None) -> None:
    with rig() as r:
        r.driver_init()
        line = r.function.lines[0]  # the driver gave the queue vector 0: line index = vector
        assert r.function.msix.enabled
        r.post(0, [64], 0)
        r.kick()
        wait_for(lambda: r.used_idx() == 1)
        head, written = struct.unpack("<II", r.ram.read(USED + 4, 8))
        data = r.ram.read(BUFS, 64)
        assert (head, written) == (0, 64) and data != bytes(64) and len(set(data)) > 16
        wait_for(lambda: line.fired == 1)
        assert r.function.interrupts == 1 and r.function.notify_exits == 0
        assert r.rng.served == 64 and r.rng.requests == 1
        # Every device write into guest memory was logged: the buffer, the used element, the used index.
        assert (BUFS, 64) in r.dirty and (USED + 4, 8) in r.dirty and (USED + 2, 2) in r.dirty
        # A two-buffer chain, kicked through the BAR (a doorbell that reached the VMM: counted).
        r.post(1, [16, 32], 1)
        r.mmio.write(r.bar + vpci.NOTIFY_OFFSET, 2, 0)
        wait_for(lambda: r.used_idx() == 2)
        assert struct.unpack("<II", r.ram.read(USED + 4 + 8, 8)) == (1, 48) and r.function.notify_exits == 1
        wait_for(lambda: line.fired == 2)
        # NO_INTERRUPT: used, but no interrupt.
        r.ram.write(AVAIL, struct.pack("<H", 1))
        r.post(3, [8], 2)
        r.kick()
        wait_for(lambda: r.used_idx() == 3)
        # An interrupt, were one (wrongly) sent, comes from the same thread right after.
        waits.assert_quiet(lambda: line.fired == 2, 0.05, "no interrupt for a NO_INTERRUPT buffer")
        assert r.rng.thread is not None and r.rng.thread.is_alive()


def test_without_msix_the_isr_says_it() -> None:
    with rig() as r:
        r.driver_init(vectors=False)
        r.post(0, [8], 0)
        r.kick()
        wait_for(lambda: r.used_idx() == 1)
        wait_for(lambda: r.function.interrupts == 1)
        assert r.mmio.read(r.bar + vpci.ISR_OFFSET, 1) == vpci.ISR_QUEUE
        assert r.mmio.read(r.bar + vpci.ISR_OFFSET, 1) == 0  # read-to-clear


def test_a_broken_chain_needs_a_reset_and_touches_nothing() -> None:
    with rig() as r:
        r.driver_init()
        r.ram.write(DESC, struct.pack("<QIHH", BUFS, 8, 3, 0))  # WRITE|NEXT pointing at itself: a loop
        r.ram.write(AVAIL + 4, struct.pack("<H", 0))
        r.ram.write(AVAIL + 2, struct.pack("<H", 1))
        before = r.ram.read(BUFS, 8)
        r.kick()
        wait_for(lambda: bool(r.common_read(vpci.DEVICE_STATUS, 1) & vpci.STATUS_NEEDS_RESET))
        assert r.ram.read(BUFS, 8) == before and r.used_idx() == 0 and r.rng.served == 0
        # A buffer outside guest RAM is refused the same way (a new driver, with fresh rings).
        r.ram.write(AVAIL, bytes(0x1000))
        r.ram.write(USED, bytes(0x1000))
        r.driver_init()
        assert r.common_read(vpci.DEVICE_STATUS, 1) == 0xF
        r.ram.write(DESC, struct.pack("<QIHH", 0xF000_0000, 8, 2, 0))
        r.ram.write(AVAIL + 4, struct.pack("<H", 0))
        r.ram.write(AVAIL + 2, struct.pack("<H", 1))
        r.kick()
        wait_for(lambda: bool(r.common_read(vpci.DEVICE_STATUS, 1) & vpci.STATUS_NEEDS_RESET))
        assert r.rng.thread is not None and r.rng.thread.is_alive()  # the device thread survives


def test_rate_limit() -> None:
    with rig(RateLimit(bytes=100, period_ms=300)) as r:
        r.driver_init()
        start = time.monotonic()
        r.post(0, [64], 0)
        r.post(1, [64], 1)
        r.kick()
        wait_for(lambda: r.used_idx() >= 2)
        lengths = [struct.unpack_from("<II", r.ram.read(USED + 4 + 8 * i, 8))[1] for i in range(2)]
        # 100 bytes in the first period: 64, then 36 of the second buffer; nothing more until the next one.
        assert lengths == [64, 36] and r.rng.served == 100
        r.post(2, [64], 2)
        r.kick()
        wait_for(lambda: r.used_idx() == 3)
        assert time.monotonic() - start >= 0.3 - 0.01  # it waited for the next period
        assert r.rng.served == 164


def test_state_round_trip() -> None:
    with rig() as r:
        r.driver_init()
        r.post(0, [32], 0)
        r.kick()
        wait_for(lambda: r.used_idx() == 1)
        state = r.function.to_dict()
        assert state["version"] == vpci.STATE_VERSION and state["queues"][0]["last_avail"] == 1
        with rig() as r2:
            r2.function.load_dict(state)
            assert r2.function.to_dict() == state
            assert r2.function.queues[0].desc == DESC and r2.function.driver_ok
            with pytest.raises(ValueError, match="version"):
                r2.function.load_dict({**state, "version": 2})
