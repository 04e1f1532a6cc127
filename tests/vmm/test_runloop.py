"""The compiled vCPU run loop (vmm/runloop.py, abi/vmm/runloop.c) on a VP of a real partition.

A hand-assembled guest touches the loop's ports (the PM timer, the 0x80 sink, COM1, PCI configuration,
the RTC) and reports each result
by an OUT to a port outside the table, which the loop must hand to Python with RAX in the message.
The PM timer's oracle is the test's own clock reading on each side of the run, converted here.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mshv_libvirt.hv import GuestMemory, MshvSystem, Reg, VpFd
from mshv_libvirt.vmm import builder, layout
from mshv_libvirt.vmm.console import Console, open_log_files
from mshv_libvirt.vmm.devices import i8042, serial
from mshv_libvirt.vmm.devices.i8042 import I8042
from mshv_libvirt.vmm.devices.pci.bridge import CONFIG_ADDRESS_PORT, CONFIG_PORTS_LENGTH, ConfigPorts, PciRootBus
from mshv_libvirt.vmm.devices.rtc import CmosRtc
from mshv_libvirt.vmm.devices.serial import Serial16550
from mshv_libvirt.vmm.runloop import (
    PORT_PCI,
    PORT_PM_TIMER,
    PORT_RTC,
    PORT_SERIAL,
    PORT_SINK,
    PORT_STATUS,
    CompiledRunLoop,
    PortTable,
)
from tests.support.waits import wait_for

pytestmark = pytest.mark.kvm

CODE = 0x1000
REPORT = 0x99  # not in the table: every OUT there reaches Python
PM_TMR_PORT = 0x608
HZ = 3_579_545


def mov_rax(imm: int) -> bytes:
    return b"\x48\xb8" + struct.pack("<Q", imm)


def mov_eax(imm: int) -> bytes:
    return b"\xb8" + struct.pack("<I", imm)


def mov_dx(port: int) -> bytes:
    return b"\x66\xba" + struct.pack("<H", port)


IN_AL_80 = b"\xe4\x80"
IN_AL_DX = b"\xec"
OUT_DX_AL = b"\xee"
OUT_DX_EAX = b"\xef"
IN_AX_DX = b"\x66\xed"
IN_EAX_DX = b"\xed"
OUT_80_AL = b"\xe6\x80"
OUT_REPORT_EAX = b"\xe7" + bytes([REPORT])
HLT = b"\xf4"


@pytest.fixture
def guest() -> Iterator[tuple[VpFd, GuestMemory]]:
    """VP 0 of a fresh partition in long mode at CODE, and its RAM (the test writes the code)."""
    system = MshvSystem.open(mode="auto")
    pt = system.create_partition()
    pt.initialize()
    mem = GuestMemory(0x200000)
    pt.map_memory(0, mem, writable=True, executable=True)
    _, tables = layout.identity_page_tables()
    mem.write(layout.PML4_ADDR, tables)
    mem.write(layout.GDT_ADDR, layout.gdt_bytes())
    vp = pt.create_vp(0)
    vp.set_registers(builder.boot_registers(CODE))
    yield vp, mem
    vp.close()
    pt.close()
    mem.close()
    system.close()


def report(loop: CompiledRunLoop, vp: VpFd) -> int:
    """Run to the next OUT to REPORT, complete it from Python, return the guest's RAX."""
    msg = loop.run()
    io = msg.as_io_port()
    assert (io.port, io.is_write) == (REPORT, True), msg
    vp.set_registers({Reg.RIP: io.rip + io.instruction_length})
    return io.rax


def ticks(now_ns: int, epoch_ns: int) -> int:
    return (now_ns - epoch_ns) * HZ // 1_000_000_000 & 0xFFFFFFFF


def test_the_loop_answers_its_ports_and_hands_the_others_to_python(guest: tuple[VpFd, GuestMemory]) -> None:
    vp, mem = guest
    table = PortTable()
    table.add(0x80, 1, PORT_SINK)
    # Two hours back: the tick count's 64-bit product would have overflowed after 85 minutes.
    epoch = time.monotonic_ns() - 7200 * 1_000_000_000
    table.add(PM_TMR_PORT, 4, PORT_PM_TIMER, epoch)
    mem.write(
        CODE,
        mov_rax(0x1122334455667700) + IN_AL_80 + OUT_REPORT_EAX  # a sink reads all ones, AL only
        + mov_rax(0xFFFFFFFFFFFFFFFF) + mov_dx(PM_TMR_PORT) + IN_EAX_DX + OUT_REPORT_EAX  # zero-extends
        + mov_rax(0xAAAAAAAAAAAAAAAA) + mov_dx(PM_TMR_PORT + 2) + IN_AX_DX + OUT_REPORT_EAX  # the high half
        + OUT_80_AL + HLT,
    )  # fmt: skip
    loop = CompiledRunLoop(table, vp)
    assert report(loop, vp) == 0x11223344556677FF
    before = time.monotonic_ns()
    full = report(loop, vp)
    after = time.monotonic_ns()
    lo, hi = ticks(before, epoch), ticks(after, epoch)
    assert full >> 32 == 0 and lo <= full <= hi, (lo, full, hi)  # (a wrap of 2^32 ticks takes 20 min)
    high = report(loop, vp)
    assert high >> 16 == 0xAAAAAAAAAAAA and (lo >> 16) <= (high & 0xFFFF) <= (ticks(time.monotonic_ns(), epoch) >> 16)
    # HLT with interrupts off (boot RFLAGS) never wakes: Python's to decide.
    assert loop.run().kind == "halt"
    stats = loop.stats()
    assert (stats.runs, stats.fast_io, stats.halts, stats.to_python) == (8, 4, 0, 4), stats


def test_an_interrupt_request_ends_a_loop_that_never_leaves_c(guest: tuple[VpFd, GuestMemory]) -> None:
    vp, mem = guest
    table = PortTable()
    table.add(0x80, 1, PORT_SINK)
    mem.write(CODE, OUT_80_AL + b"\xeb\xfc")  # 1: out %al, $0x80; jmp 1b
    loop = CompiledRunLoop(table, vp)
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            loop.run()
        except BaseException as err:
            outcome.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_for(lambda: loop.stats().fast_io > 1000, timeout=30, what=loop.stats)
    loop.interrupt()  # no signal: the loop sees the request before its next RUN_VP
    thread.join(30)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], InterruptedError), outcome
    stats = loop.stats()
    assert stats.to_python == 0 and stats.fast_io == stats.runs, stats


def test_the_table_refuses_overlaps_and_unknown_kinds() -> None:
    table = PortTable()
    table.add(0x600, 8, PORT_SINK)
    with pytest.raises(ValueError, match="EEXIST"):
        table.add(0x607, 2, PORT_SINK)
    with pytest.raises(ValueError, match="EINVAL"):
        table.add(0x700, 1, 99)
    with pytest.raises(ValueError, match="EINVAL"):
        table.add(0xFFFF, 2, PORT_SINK)


def test_the_uart_transmits_from_c_to_the_console_and_rotates_its_log_through_python(
    guest: tuple[VpFd, GuestMemory], tmp_path: Path
) -> None:
    vp, mem = guest
    levels: list[bool] = []
    uart = Serial16550(lambda data: pytest.fail(f"{data!r} went through Python's write"), levels.append)
    master, slave = os.openpty()
    log = tmp_path / "serial.log"
    console = Console(log_fds=open_log_files(str(log), 1), max_size=3, max_backups=1, pty_fds=(master, slave))
    try:
        uart.attach_console(console)
        table = PortTable()
        table.add(0x3F8, 8, PORT_SERIAL, uart.handle)
        code = b"".join(mov_dx(0x3F8) + b"\xb0" + bytes([ch]) + OUT_DX_AL for ch in b"hello")
        code += mov_dx(0x3F9) + b"\xb0" + bytes([serial.IER_THRE]) + OUT_DX_AL  # THR is empty: the line rises
        code += mov_dx(0x3FA) + IN_AL_DX + OUT_REPORT_EAX  # reading IIR acknowledges THRE: it drops
        mem.write(CODE, code + HLT)
        loop = CompiledRunLoop(table, vp, uart.service)
        assert report(loop, vp) & 0xFF == serial.IIR_THRE
        assert loop.run().kind == "halt"
        assert os.read(slave, 100) == b"hello"  # the pty's other end: what virsh console reads
        # The log took 3 bytes from C; the 4th found it at its cap: Python rotated it and wrote that byte,
        # and C the 5th into the new log's room.
        assert (Path(f"{log}.1").read_bytes(), log.read_bytes()) == (b"hel", b"lo")
        assert levels == [True, False]
        stats = loop.stats()
        # 5 THR writes, IER and the IIR read completed in C; the OUT to REPORT and the HLT reached Python.
        assert (stats.fast_io, stats.to_python) == (7, 2), stats
        assert stats.device_events == 3, stats  # the 2nd 'l' (the log at its cap), IER (line up), IIR (down)
    finally:
        console.close()


def test_pci_config_reads_come_from_the_image_and_writes_reach_python(guest: tuple[VpFd, GuestMemory]) -> None:
    vp, mem = guest
    bus = PciRootBus()
    ports = ConfigPorts(bus)
    table = PortTable()
    table.add(CONFIG_ADDRESS_PORT, CONFIG_PORTS_LENGTH, PORT_PCI, bus.handle)
    enable = 0x8000_0000
    code = mov_dx(CONFIG_ADDRESS_PORT) + mov_eax(enable | 0x00) + OUT_DX_EAX  # 00:00.0, register 0
    code += mov_dx(0xCFC) + IN_EAX_DX + OUT_REPORT_EAX  # vendor and device id
    code += mov_dx(0xCFE) + mov_rax(0xAAAAAAAAAAAAAAAA) + IN_AX_DX + OUT_REPORT_EAX  # the device id alone
    code += mov_dx(CONFIG_ADDRESS_PORT) + mov_eax(enable | 5 << 11) + OUT_DX_EAX  # slot 5: empty
    code += mov_dx(0xCFC) + IN_EAX_DX + OUT_REPORT_EAX
    code += mov_dx(CONFIG_ADDRESS_PORT) + mov_eax(enable | 0x3C) + OUT_DX_EAX  # interrupt line
    code += mov_dx(0xCFC) + b"\xb0\x0b" + OUT_DX_AL  # a write: Python's
    code += IN_EAX_DX + OUT_REPORT_EAX + HLT
    mem.write(CODE, code)
    loop = CompiledRunLoop(table, vp)
    assert report(loop, vp) == 0x0008_1B36
    assert report(loop, vp) == 0xAAAAAAAAAAAA_0008
    assert report(loop, vp) == 0xFFFF_FFFF
    msg = loop.run()  # the CONFIG_DATA write, with CONFIG_ADDRESS as the loop left it
    io = msg.as_io_port()
    assert (io.port, io.is_write, ports.address) == (0xCFC, True, enable | 0x3C)
    ports.write(io.port - CONFIG_ADDRESS_PORT, io.access_size, io.rax)
    vp.set_registers({Reg.RIP: io.rip + io.instruction_length})
    assert report(loop, vp) & 0xFF == 0x0B  # Python's write, read back from the image by C
    assert bus.function(0) is not None and bus.function(0).config.read(0x3C, 1) == 0x0B  # type: ignore[union-attr]
    assert loop.run().kind == "halt"
    stats = loop.stats()
    assert (stats.fast_io, stats.to_python) == (7, 6), stats  # 3 CONFIG_ADDRESS writes, 4 CONFIG_DATA reads


def test_rtc_index_and_cmos_ram_are_served_in_c_and_the_clock_in_python(guest: tuple[VpFd, GuestMemory]) -> None:
    vp, mem = guest
    rtc = CmosRtc(lambda _level: None, timer=False)
    try:
        rtc.write(0, 1, 0x20)
        rtc.write(1, 1, 0x5A)  # a CMOS RAM byte, written by Python as a guest's data write is
        table = PortTable()
        table.add(0x70, 2, PORT_RTC, rtc.handle)
        code = b"\xb0\xa0" + b"\xe6\x70"  # mov $0xa0, %al; out %al, $0x70: register 0x20, NMI masked
        code += b"\xe4\x70" + OUT_REPORT_EAX  # the index reads back with the mask bit
        code += b"\xe4\x71" + OUT_REPORT_EAX  # CMOS RAM from C
        code += b"\xb0\x00" + b"\xe6\x70" + b"\xe4\x71" + HLT  # seconds: the clock is Python's
        mem.write(CODE, code)
        loop = CompiledRunLoop(table, vp)
        assert report(loop, vp) & 0xFF == 0xA0
        assert (rtc.index, rtc.nmi_masked) == (0x20, True)
        assert report(loop, vp) & 0xFF == 0x5A
        io = loop.run().as_io_port()
        assert (io.port, io.is_write, rtc.index) == (0x71, False, 0)
        stats = loop.stats()
        assert (stats.fast_io, stats.to_python) == (4, 3), stats  # index write, index read, RAM read, write
    finally:
        rtc.close()


def test_the_i8042_status_is_read_in_c_as_python_last_published_it(guest: tuple[VpFd, GuestMemory]) -> None:
    vp, mem = guest
    kbc = I8042(lambda: None)
    table = PortTable()
    table.add(0x64, 1, PORT_STATUS, kbc.status_handle, kbc)
    code = b"\xe4\x64" + OUT_REPORT_EAX  # status: nothing to read
    code += b"\xb0\xaa" + b"\xe6\x64"  # the self-test command: Python's; it queues 0x55
    code += b"\xe4\x64" + OUT_REPORT_EAX  # status: OBF now set
    code += b"\xe4\x60" + b"\xe4\x64" + OUT_REPORT_EAX + HLT  # the data read (Python's) empties it again
    mem.write(CODE, code)
    loop = CompiledRunLoop(table, vp)
    assert report(loop, vp) & 0xFF == kbc.read(4, 1) == i8042.STATUS_SYS | i8042.STATUS_UNLOCKED
    io = loop.run().as_io_port()
    assert (io.port, io.is_write) == (0x64, True)
    kbc.write(4, 1, io.rax & 0xFF)
    vp.set_registers({Reg.RIP: io.rip + io.instruction_length})
    assert report(loop, vp) & i8042.STATUS_OBF
    io = loop.run().as_io_port()
    assert (io.port, io.is_write) == (0x60, False)
    assert kbc.read(0, 1) == 0x55
    vp.set_registers({Reg.RAX: 0x55, Reg.RIP: io.rip + io.instruction_length})
    assert not report(loop, vp) & i8042.STATUS_OBF
    stats = loop.stats()
    assert (stats.fast_io, stats.to_python) == (3, 5), stats  # 3 status reads; 3 reports, the command, the data
