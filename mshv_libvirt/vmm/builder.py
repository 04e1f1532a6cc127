"""Build a running VM from a :class:`VmmConfig`: the default recipe, composed of reusable steps.

    open_hypervisor -> create_partition -> initialize -> set_properties -> map_memory
    -> attach_devices -> load_kernel -> write_platform_tables -> create_vps
    -> set_boot_registers -> start_vcpus (paused when requested)

(set_properties follows initialize as in QEMU and Cloud Hypervisor: the property we set,
UNIMPLEMENTED_MSR_ACTION, is one they set on the initialized partition; we need no early ones.)

Each step is a small function with its own :class:`BuildError` subclass whose docstring is the
message. Everything a step creates is registered on an ``ExitStack``: when a later step fails, the
stack unwinds (vCPU threads stop, fds close, memory is unmapped) before the error propagates; on
success the stack moves into the :class:`Vm`, whose ``close()`` tears it down. Other VM flavours
can be built by composing the same steps differently.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from mshv_libvirt.hv import (
    DEFAULT_PT_FLAGS,
    PT_NESTED_VIRTUALIZATION,
    PT_SMT_ENABLED_GUEST,
    GuestMemory,
    MshvError,
    MshvSystem,
    PartitionFd,
    Reg,
    RegisterValue,
    Segment,
    TableRegister,
    VpFd,
)

from . import acpi, images, layout, loader, mptable, phases
from .config import VmmConfig
from .devices.acpi_pm import BLOCK_SIZE as PM_BLOCK_SIZE
from .devices.acpi_pm import PM_TMR, AcpiPm
from .devices.bus import Bus, BusDevice
from .devices.i8042 import I8042, STATUS_COMMAND
from .devices.ioapic import MMIO_SIZE as IOAPIC_MMIO_SIZE
from .devices.ioapic import IoApic
from .devices.pci.bridge import CONFIG_ADDRESS_PORT, CONFIG_PORTS_LENGTH, BarAllocator, ConfigPorts, Ecam, PciRootBus
from .devices.pvpanic import PORT as PVPANIC_PORT
from .devices.pvpanic import PvPanic
from .devices.rtc import CmosRtc, local_utc_offset
from .devices.serial import Serial16550
from .interrupts import IrqfdSink, MsiRouting
from .runloop import (
    PORT_PCI,
    PORT_PM_TIMER,
    PORT_RTC,
    PORT_SERIAL,
    PORT_SINK,
    PORT_STATUS,
    CompiledRunLoop,
    PortTable,
)
from .vcpu import ExitGate, ExitHandler, VcpuEvent, VcpuThread, VmExit, VmExitKind

# virtio devices import their modules when a VM has them (attach_virtio_devices), not at every start.
if TYPE_CHECKING:
    from .devices.virtio.blk import BackendInfo, Relay
    from .devices.virtio.pci import VirtioPciFunction
    from .vhost_user import Backend

log = logging.getLogger(__name__)

COM1_PORT = 0x3F8
COM1_IRQ = 4
POST_PORT = 0x80  # POST/debug codes (Linux's io_delay, the tiny guest's benchmark): nothing behind it
I8042_PORT = 0x60


class BuildError(Exception):
    """Building the VM failed."""

    def __init__(self, detail: str = "") -> None:
        message = (self.__doc__ or "").strip().rstrip(".")
        super().__init__(f"{message}: {detail}" if detail else message)
        self.detail = detail


class OpenHypervisorError(BuildError):
    """Cannot open the hypervisor device."""


class CreatePartitionError(BuildError):
    """Cannot create the partition."""


class SetPropertiesError(BuildError):
    """Cannot set the partition properties."""


class InitializePartitionError(BuildError):
    """Cannot initialize the partition."""


class MapMemoryError(BuildError):
    """Cannot map guest memory."""


class AttachDevicesError(BuildError):
    """Cannot attach the platform devices."""


class LoadKernelError(BuildError):
    """Cannot load the kernel."""


class PlatformTablesError(BuildError):
    """Cannot write the platform tables."""


class CreateVpsError(BuildError):
    """Cannot create the virtual processors."""


class BootRegistersError(BuildError):
    """Cannot set the boot registers."""


class StartVcpusError(BuildError):
    """Cannot start the vCPU threads."""


@dataclass
class GuestRam:
    """Guest RAM: one GuestMemory per range of the memory map."""

    regions: list[tuple[layout.RamRange, GuestMemory]]

    def _locate(self, gpa: int, size: int) -> tuple[GuestMemory, int]:
        for r, mem in self.regions:
            if r.gpa <= gpa and gpa + size <= r.end:
                return mem, gpa - r.gpa
        raise ValueError(f"guest range {gpa:#x}+{size:#x} is not RAM")

    def write(self, gpa: int, data: bytes) -> None:
        mem, offset = self._locate(gpa, len(data))
        mem.write(offset, data)

    def read(self, gpa: int, size: int) -> bytes:
        mem, offset = self._locate(gpa, size)
        return mem.read(offset, size)

    @property
    def ranges(self) -> list[layout.RamRange]:
        return [r for r, _ in self.regions]


@dataclass
class Platform:
    pio: Bus
    mmio: Bus
    serial: Serial16550
    ioapic: IoApic
    i8042: I8042
    acpi_pm: AcpiPm | None
    pci: PciRootBus
    routing: MsiRouting
    bars: BarAllocator
    virtio: list[VirtioPciFunction] = field(default_factory=list)
    rtc: CmosRtc | None = None
    # The ports the compiled run loop completes without Python (vmm/runloop.py), each also on ``pio``.
    fast_ports: PortTable = field(default_factory=PortTable)


@dataclass
class Vm:
    """A built VM. Owns every resource through ``resources``; ``close()`` releases them in order."""

    config: VmmConfig
    system: MshvSystem
    partition: PartitionFd
    ram: GuestRam
    platform: Platform
    kernel: loader.KernelImage
    vps: list[VpFd]
    vcpus: list[VcpuThread]
    resources: contextlib.ExitStack = field(repr=False)

    def close(self) -> None:
        self.resources.close()


# --------------------------------------------------------------------------------------------------
# Steps


HypervisorMode = Literal["auto", "kernel", "emulated"]


def open_hypervisor(mode: HypervisorMode = "auto") -> MshvSystem:
    try:
        return MshvSystem.open(mode=mode)
    except (MshvError, OSError) as err:
        raise OpenHypervisorError(str(err)) from err


@dataclass(frozen=True)
class _OptionalBit:
    flag: int
    name: str  # the UAPI bit
    feature: str  # what it gives the guest
    without: str  # what starting without it means
    required: bool


def _refusal(system: MshvSystem, name: str, err: int) -> str:
    """Who said no: an unknown bit is the kernel's EINVAL; any other errno came from the hypervisor."""
    said = f"MSHV_CREATE_PARTITION refused {name} with {errno.errorcode.get(err, err)}"
    if err != errno.EINVAL:
        return f"{said}, the hypervisor cannot provide it"
    emulated = f" (the emulated device behaves as Linux {system.emulated_kernel})" if system.emulated_kernel else ""
    return f"{said}, the kernel's mshv driver predates Linux 7.0{emulated}"


def create_partition(system: MshvSystem, *, threads_per_core: int = 1, nested: str = "off") -> PartitionFd:
    """Create the partition with the optional bits the guest asks for, which older kernels lack: SMT
    scheduling (``threads_per_core`` > 1) and nested virtualization (``nested``: "require", "optional" or
    "off"). When the create is refused, each bit is tried on its own: a refused optional one is dropped
    and said in the VM's log, a refused required one fails the step."""
    bits: list[_OptionalBit] = []
    if nested in ("require", "optional"):
        bits.append(
            _OptionalBit(
                PT_NESTED_VIRTUALIZATION,
                "MSHV_PT_BIT_NESTED_VIRTUALIZATION",
                "nested virtualization",
                "the guest sees no VMX/SVM",
                nested == "require",
            )
        )
    if threads_per_core > 1:
        bits.append(
            _OptionalBit(
                PT_SMT_ENABLED_GUEST,
                "MSHV_PT_BIT_SMT_ENABLED_GUEST",
                f"SMT scheduling of {threads_per_core} threads per core",
                f"the hypervisor schedules the guest's {threads_per_core} threads per core as separate cores",
                False,
            )
        )
    wanted = DEFAULT_PT_FLAGS | sum(b.flag for b in bits)
    flags = wanted
    try:
        try:
            partition = system.create_partition(flags)
        except MshvError as err:
            if not bits or err.errno not in (errno.EINVAL, errno.EIO):
                raise
            for bit in bits:
                refused = system.refuses(DEFAULT_PT_FLAGS | bit.flag)
                if not refused:
                    continue
                why = _refusal(system, bit.name, refused)
                if bit.required:
                    raise CreatePartitionError(f"{bit.feature} is required, but {why}") from err
                log.warning("%s is not available: %s. Starting without it: %s", bit.feature, why, bit.without)
                flags &= ~bit.flag
            if flags == wanted:
                raise  # none of the optional bits was the reason
            partition = system.create_partition(flags)
    except (MshvError, OSError) as err:
        raise CreatePartitionError(str(err)) from err
    for bit in bits:
        if flags & bit.flag:
            log.info("%s: partition created with %s", bit.feature, bit.name)
    return partition


# Unimplemented MSRs: ignore writes, read as zero (what QEMU and Cloud Hypervisor choose) rather
# than injecting #GP into guests that probe model-specific MSRs without rdmsr_safe.
HV_PARTITION_PROPERTY_UNIMPLEMENTED_MSR_ACTION = 0x00050017
UNIMPLEMENTED_MSR_IGNORE_WRITE_READ_ZERO = 1


def set_properties(partition: PartitionFd) -> None:
    # No synthetic (Hyper-V enlightenment) features: the guest sees a plain PC with a LAPIC, so
    # the same guest configuration runs on /dev/mshv and on the emulated device.
    try:
        partition.set_property(HV_PARTITION_PROPERTY_UNIMPLEMENTED_MSR_ACTION, UNIMPLEMENTED_MSR_IGNORE_WRITE_READ_ZERO)
    except (MshvError, OSError) as err:
        raise SetPropertiesError(str(err)) from err


def initialize(partition: PartitionFd) -> None:
    try:
        partition.initialize()
    except (MshvError, OSError) as err:
        raise InitializePartitionError(str(err)) from err


def map_memory(partition: PartitionFd, memory_bytes: int) -> GuestRam:
    regions: list[tuple[layout.RamRange, GuestMemory]] = []
    try:
        for r in layout.ram_ranges(memory_bytes):
            mem = GuestMemory(r.size)
            regions.append((r, mem))
            partition.map_memory(r.gpa // layout.PAGE_SIZE, mem, writable=True, executable=True)
    except (MshvError, OSError, ValueError) as err:
        for _, mem in regions:
            mem.close()
        raise MapMemoryError(str(err)) from err
    return GuestRam(regions)


def attach_devices(
    partition: PartitionFd,
    config: VmmConfig,
    console_write: Callable[[bytes], object],
    on_vm_exit: Callable[[VmExit], None],
    resources: contextlib.ExitStack,
) -> Platform:
    try:
        routing = MsiRouting(partition)
        sink = IrqfdSink(routing)
    except (MshvError, OSError) as err:
        raise AttachDevicesError(f"interrupt routing: {err}") from err
    resources.callback(sink.close)
    ioapic = IoApic(sink, ioapic_id=config.max_vcpus)  # distinct from every LAPIC id, disabled ones too
    pio = Bus("port I/O")
    mmio_bus = Bus("MMIO")
    serial = Serial16550(console_write, lambda level: ioapic.set_irq(COM1_IRQ, level))

    def reset() -> None:
        on_vm_exit(VmExit(VmExitKind.REBOOT, "guest reset"))

    def poweroff() -> None:
        on_vm_exit(VmExit(VmExitKind.SHUTDOWN, "guest powered off (ACPI S5)"))

    def panic() -> None:
        on_vm_exit(VmExit(VmExitKind.CRASH, "guest panic reported through pvpanic"))

    i8042 = I8042(reset, ioapic.set_irq)
    pio.register(COM1_PORT, 8, serial)
    pio.register(I8042_PORT, 5, i8042)
    pio.register(PVPANIC_PORT, 1, PvPanic(panic))
    mmio_bus.register(layout.IOAPIC_ADDR, IOAPIC_MMIO_SIZE, ioapic)
    pm: AcpiPm | None = None
    if config.acpi:
        pm = AcpiPm(poweroff, reset, lambda level: ioapic.set_irq(acpi.SCI_IRQ, level))
        pio.register(acpi.PM1A_EVT_PORT, PM_BLOCK_SIZE, pm)
    pci, bars = attach_pci(pio, mmio_bus, config, reset_register=pm.reset_register if pm is not None else None)
    platform = Platform(pio, mmio_bus, serial, ioapic, i8042, pm, pci, routing, bars)
    platform.rtc = attach_rtc(pio, ioapic, config, resources)
    pio.register(POST_PORT, 1, _Sink())  # so that no device claims it behind the loop's back
    platform.fast_ports.add(POST_PORT, 1, PORT_SINK)
    platform.fast_ports.add(COM1_PORT, 8, PORT_SERIAL, serial.handle, serial)
    platform.fast_ports.add(CONFIG_ADDRESS_PORT, CONFIG_PORTS_LENGTH, PORT_PCI, pci.handle, pci)
    platform.fast_ports.add(acpi.RTC_PORT, acpi.RTC_PORTS_LENGTH, PORT_RTC, platform.rtc.handle, platform.rtc)
    platform.fast_ports.add(I8042_PORT + STATUS_COMMAND, 1, PORT_STATUS, i8042.status_handle, i8042)
    if pm is not None:
        # Python's PM_TMR and the loop's count from the same epoch on CLOCK_MONOTONIC (time.monotonic_ns).
        platform.fast_ports.add(acpi.PM1A_EVT_PORT + PM_TMR, 4, PORT_PM_TIMER, pm.timer_epoch_ns)
    return platform


class _Sink:
    """A port nothing answers: writes vanish, reads float high (what the unclaimed bus does too)."""

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        pass


def attach_rtc(pio: Bus, ioapic: IoApic, config: VmmConfig, resources: contextlib.ExitStack) -> CmosRtc:
    """The CMOS RTC on ports 0x70-0x71 and ISA IRQ 8 (identity-mapped to IOAPIC pin 8, edge, high: no
    MADT override), in the zone <clock offset> asks for; its timer thread ends with the VM."""
    offset = local_utc_offset() if config.clock_offset == "localtime" else 0
    rtc = CmosRtc(lambda level: ioapic.set_irq(acpi.RTC_IRQ, level), utc_offset=offset)
    resources.callback(rtc.close)
    pio.register(acpi.RTC_PORT, acpi.RTC_PORTS_LENGTH, rtc)
    return rtc


def attach_pci(
    pio: Bus, mmio_bus: Bus, config: VmmConfig, *, reset_register: BusDevice | None
) -> tuple[PciRootBus, BarAllocator]:
    """The root bus on ports 0xCF8-0xCFF (0xCF9, the ACPI reset register, inside them) and ECAM; every
    BAR placed, as firmware would have, before the guest runs."""
    assert acpi.RESET_PORT == CONFIG_ADDRESS_PORT + 1
    pci = PciRootBus()
    pio.register(CONFIG_ADDRESS_PORT, CONFIG_PORTS_LENGTH, ConfigPorts(pci, reset=reset_register))
    mmio_bus.register(layout.PCI_ECAM_ADDR, layout.PCI_ECAM_SIZE, Ecam(pci))
    bars = BarAllocator(
        (layout.PCI_MMIO32_START, layout.PCI_MMIO32_SIZE), layout.pci_mmio64_window(config.memory_bytes)
    )
    for function in pci.slots.values():
        bars.place(function.config)
    return pci, bars


def attach_virtio_devices(
    partition: PartitionFd,
    ram: GuestRam,
    platform: Platform,
    config: VmmConfig,
    resources: contextlib.ExitStack,
    disks: Mapping[int, tuple[Backend, BackendInfo]] | None = None,
    relays: Mapping[int, Relay] | None = None,
) -> None:
    """virtio-pci functions in their configured slots, BARs placed and mapped, device threads started.
    ``disks``: each disk's running backend by PCI slot (the VMM's, kept across rebuilds); ``relays``: each
    disk's counting relay by slot (likewise kept: its counters outlive the VM), else the device makes its own."""
    if not (config.rng or config.disks or config.net):
        return
    from .devices.virtio.blk import VirtioBlk
    from .devices.virtio.net import VirtioNet, parse_mac
    from .devices.virtio.pci import VirtioPciFunction
    from .devices.virtio.queue import DeviceMemory
    from .devices.virtio.rng import RateLimit, VirtioRng
    from .vhost_user import MemRegion

    for rng_config in config.rng:
        try:
            fd = rng_config.fd
            if fd is None:
                fd = os.open(rng_config.backend, os.O_RDONLY | os.O_CLOEXEC)
                resources.callback(os.close, fd)
            rate = RateLimit(rng_config.rate_bytes, rng_config.rate_period_ms) if rng_config.rate_bytes else None
            rng = VirtioRng(fd, rate)
            function = VirtioPciFunction(rng, DeviceMemory(ram), platform.routing, partition, platform.mmio)
            resources.callback(function.close)
            platform.pci.add(function, rng_config.slot)
            platform.bars.place(function.config)
            function.sync_bar()
            rng.start(function)
            resources.callback(rng.stop)
            platform.virtio.append(function)
        except (MshvError, OSError, ValueError) as err:
            raise AttachDevicesError(f"virtio-rng in PCI slot {rng_config.slot}: {err}") from err
    regions = [MemRegion(r.gpa, r.size, mem.address, mem.fd) for r, mem in ram.regions]
    for disk in config.disks:
        try:
            if disks is None or disk.slot not in disks:
                raise ValueError("no backend was started for it")
            backend, info = disks[disk.slot]
            blk = VirtioBlk(backend, info, regions, disk.queues, relay=(relays or {}).get(disk.slot))
            function = VirtioPciFunction(blk, DeviceMemory(ram), platform.routing, partition, platform.mmio)
            resources.callback(function.close)
            platform.pci.add(function, disk.slot)
            platform.bars.place(function.config)
            function.sync_bar()
            blk.start(function)
            resources.callback(blk.stop)  # before the irqfds and memory go: the backend's rings stop first
            platform.virtio.append(function)
        except (MshvError, OSError, ValueError) as err:
            raise AttachDevicesError(f"virtio-blk in PCI slot {disk.slot}: {err}") from err
    for nic in config.net:
        try:
            net = VirtioNet(
                nic.fd, parse_mac(nic.mac), regions, mtu=nic.mtu, link_up=nic.link_up, queue_fds=nic.queue_fds
            )
            resources.callback(net.stop)  # runs last (ExitStack order): the thread ends after the transport closed
            function = VirtioPciFunction(net, DeviceMemory(ram), platform.routing, partition, platform.mmio)
            resources.callback(function.close)
            resources.callback(net.reset)  # the I/O thread lets go of the rings before the irqfds close
            platform.pci.add(function, nic.slot)
            platform.bars.place(function.config)
            function.sync_bar()
            net.start(function)
            platform.virtio.append(function)
        except (MshvError, OSError, ValueError) as err:
            raise AttachDevicesError(f"virtio-net in PCI slot {nic.slot}: {err}") from err


def read_kernel(config: VmmConfig) -> loader.KernelImage:
    """The kernel image read and, by default, decompressed on the host (no guest RAM needed yet)."""
    kernel = images.load("kernel", config.kernel, config.fds.kernel, config.memory_bytes)
    cached = None
    if config.fds.kernel_payload is not None and config.host_decompress:
        with contextlib.suppress(images.ImageError, OSError):  # unreadable: decompress as without it
            cached = images.load("cached kernel payload", config.kernel, config.fds.kernel_payload, config.memory_bytes)
    return loader.load_kernel_image(kernel, host_decompress=config.host_decompress, cached=cached)


class KernelPrefetch:
    """:func:`read_kernel` on a thread of its own, started before guest RAM is mapped.

    A Linux bzImage is xz-compressed: decompressing it is most of its load (0.2-0.6 s here), and mapping
    guest RAM (populating every page, see map_memory) is as long again. Both run in C without the GIL, so
    they overlap where a second core is free (on a loaded host they share one: benchmarks/RESULTS.md,
    ``startup.py``). ``result()`` returns the image or raises what ``read_kernel`` raised.
    """

    def __init__(self, config: VmmConfig) -> None:
        self._config = config
        self._image: loader.KernelImage | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kernel-read", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._image = read_kernel(self._config)
        except BaseException as err:  # handed to the thread that waits for the image
            self._error = err

    def join(self) -> None:
        self._thread.join()

    def result(self) -> loader.KernelImage:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._image is not None
        image, self._image = self._image, None  # the caller's from here on; this object keeps no copy
        return image


def load_kernel(ram: GuestRam, config: VmmConfig, prefetch: KernelPrefetch | None = None) -> loader.KernelImage:
    try:
        limit = config.memory_bytes
        image = prefetch.result() if prefetch is not None else read_kernel(config)
        for seg in image.segments:
            ram.write(seg.gpa, seg.data)
            if seg.mem_size > len(seg.data):
                ram.write(seg.gpa + len(seg.data), bytes(seg.mem_size - len(seg.data)))
        initrd: tuple[int, int] | None = None
        if config.initrd:
            data = images.load("initrd", config.initrd, config.fds.initrd, limit)
            addr = loader.place_initrd(image.header, ram.ranges, len(data), image.end)
            ram.write(addr, data)
            initrd = (addr, len(data))
        ram.write(layout.CMDLINE_ADDR, loader.encode_cmdline(image.header, config.cmdline))
        boot_params = loader.build_boot_params(
            image.header,
            cmdline_addr=layout.CMDLINE_ADDR,
            e820=loader.e820_map(ram.ranges),
            initrd=initrd,
            rsdp_addr=layout.ACPI_START if config.acpi else 0,
        )
        ram.write(layout.BOOT_PARAMS_ADDR, boot_params)
        pt_addr, tables = layout.identity_page_tables()
        ram.write(pt_addr, tables)
        ram.write(layout.GDT_ADDR, layout.gdt_bytes())
    except (OSError, ValueError, loader.LoaderError) as err:
        raise LoadKernelError(str(err)) from err
    return image


def write_platform_tables(ram: GuestRam, config: VmmConfig) -> None:
    """ACPI tables (when enabled) at 0xE0000 and an MP table at 0xF0000 (always: it costs nothing
    and serves ``acpi=off`` guests)."""
    try:
        mp = mptable.build_mptable(config.max_vcpus, ioapic_id=config.max_vcpus, online=config.vcpus)
        if mptable.MP_TABLE_ADDR + len(mp) > layout.ACPI_END:
            raise ValueError("MP table does not fit below 1 MiB")
        ram.write(mptable.MP_TABLE_ADDR, mp)
        if config.acpi:
            tables = acpi.build_tables(
                config.max_vcpus,
                base=layout.ACPI_START,
                ioapic_id=config.max_vcpus,
                online=config.vcpus,
                pci=acpi.pci_windows(config.memory_bytes),
                rtc=True,
            )
            if tables.rsdp_addr + len(tables.blob) > mptable.MP_TABLE_ADDR:
                raise ValueError("ACPI tables overlap the MP table")
            ram.write(tables.rsdp_addr, tables.blob)
    except ValueError as err:
        raise PlatformTablesError(str(err)) from err


def create_vps(partition: PartitionFd, count: int, resources: contextlib.ExitStack) -> list[VpFd]:
    vps: list[VpFd] = []
    try:
        for i in range(count):
            vp = partition.create_vp(i)
            resources.callback(vp.close)
            vps.append(vp)
    except (MshvError, OSError) as err:
        raise CreateVpsError(f"vCPU {len(vps)}: {err}") from err
    return vps


def boot_registers(entry: int) -> dict[int, RegisterValue]:
    """64-bit boot protocol state: long mode, paging on the identity map, RSI = boot_params."""
    code = Segment(0, 0xFFFFFFFF, layout.BOOT_CS, layout.CODE64_ATTRIBUTES)
    data = Segment(0, 0xFFFFFFFF, layout.BOOT_DS, layout.DATA_ATTRIBUTES)
    return {
        Reg.CR0: layout.BOOT_CR0,
        Reg.CR3: layout.PML4_ADDR,
        Reg.CR4: layout.BOOT_CR4,
        Reg.EFER: layout.BOOT_EFER,
        Reg.GDTR: TableRegister(layout.GDT_ADDR, len(layout.gdt_bytes()) - 1),
        Reg.IDTR: TableRegister(0, 0),
        Reg.CS: code,
        Reg.DS: data,
        Reg.ES: data,
        Reg.FS: data,
        Reg.GS: data,
        Reg.SS: data,
        Reg.RFLAGS: layout.RFLAGS_RESERVED,
        Reg.RIP: entry,
        Reg.RSP: layout.BOOT_STACK_TOP,
        Reg.RSI: layout.BOOT_PARAMS_ADDR,
        Reg.RBP: 0,
        Reg.RDI: 0,
        Reg.RBX: 0,
    }


def set_boot_registers(vps: Sequence[VpFd], entry: int) -> None:
    # Only the bootstrap processor starts at the kernel; the others wait for INIT/SIPI from it.
    try:
        vps[0].set_registers(boot_registers(entry))
    except (MshvError, OSError) as err:
        raise BootRegistersError(str(err)) from err


def start_vcpus(
    vps: Sequence[VpFd],
    handler: ExitHandler,
    on_vm_exit: Callable[[VmExit], None],
    paused: bool,
    resources: contextlib.ExitStack,
    fast_ports: PortTable | None = None,
    on_device_events: Callable[[int], None] | None = None,
) -> list[VcpuThread]:
    """One thread per VP; with ``fast_ports`` each runs its VP in the compiled loop over that table."""
    threads: list[VcpuThread] = []

    def stop_all() -> None:
        for t in threads:
            t.request(VcpuEvent.FINISH)
        for t in threads:
            t.join(5)

    resources.callback(stop_all)
    try:
        for i, vp in enumerate(vps):
            loop = CompiledRunLoop(fast_ports, vp, on_device_events) if fast_ports is not None else None
            t = VcpuThread(i, vp, handler, on_vm_exit, loop)
            t.start(paused)
            threads.append(t)
    except (RuntimeError, OSError) as err:
        raise StartVcpusError(str(err)) from err
    return threads


# --------------------------------------------------------------------------------------------------
# The default recipe


def build_vm(
    config: VmmConfig,
    console_write: Callable[[bytes], object],
    on_vm_exit: Callable[[VmExit], None],
    *,
    mode: HypervisorMode = "auto",
    paused: bool | None = None,
    disks: Mapping[int, tuple[Backend, BackendInfo]] | None = None,
    relays: Mapping[int, Relay] | None = None,
) -> Vm:
    gate = ExitGate(on_vm_exit)
    with contextlib.ExitStack() as resources:
        system = open_hypervisor(mode)
        resources.callback(system.close)
        partition = create_partition(system, threads_per_core=config.threads_per_core, nested=config.nested)
        memory: list[GuestMemory] = []

        def close_partition() -> None:
            partition.close()  # drops the mappings first, then the host memory can go
            for mem in memory:
                mem.close()

        resources.callback(close_partition)
        prefetch = KernelPrefetch(config)
        resources.callback(prefetch.join)  # a failed build waits for it: no thread outlives its build
        initialize(partition)
        set_properties(partition)
        phases.mark("partition")
        ram = map_memory(partition, config.memory_bytes)
        memory.extend(mem for _, mem in ram.regions)
        phases.mark("memory_map")
        platform = attach_devices(partition, config, console_write, gate, resources)
        attach_virtio_devices(partition, ram, platform, config, resources, disks, relays)
        phases.mark("devices")
        kernel = load_kernel(ram, config, prefetch)
        phases.mark("kernel_load")
        write_platform_tables(ram, config)
        phases.mark("tables")
        # The image's bytes are in guest RAM now: the Vm keeps its header and entry, not a second copy
        # (a Linux kernel's is ~9 MiB).
        kernel = dataclasses.replace(kernel, segments=())
        vps = create_vps(partition, config.vcpus, resources)
        set_boot_registers(vps, kernel.entry)
        handler = ExitHandler(platform.pio, platform.mmio, gate, platform.ioapic.end_of_interrupt)
        start_paused = config.start_paused if paused is None else paused
        vcpus = start_vcpus(vps, handler, gate, start_paused, resources, platform.fast_ports, platform.serial.service)
        return Vm(config, system, partition, ram, platform, kernel, vps, vcpus, resources.pop_all())
    raise AssertionError("unreachable")  # pragma: no cover  (ExitStack does not swallow errors)
