"""The compiled vCPU run loop (vmm/runloop.py, abi/vmm/runloop.c) on a VP of a real partition.

A hand-assembled guest touches the loop's ports (the PM timer, the 0x80 sink) and reports each result
by an OUT to a port outside the table, which the loop must hand to Python with RAX in the message.
The PM timer's oracle is the test's own clock reading on each side of the run, converted here.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator

import pytest

from mshv_libvirt.hv import GuestMemory, MshvSystem, Reg, VpFd
from mshv_libvirt.vmm import builder, layout
from mshv_libvirt.vmm.runloop import PORT_PM_TIMER, PORT_SINK, CompiledRunLoop, PortTable
from tests.support.waits import wait_for

pytestmark = pytest.mark.kvm

CODE = 0x1000
REPORT = 0x99  # not in the table: every OUT there reaches Python
PM_TMR_PORT = 0x608
HZ = 3_579_545


def mov_rax(imm: int) -> bytes:
    return b"\x48\xb8" + struct.pack("<Q", imm)


def mov_dx(port: int) -> bytes:
    return b"\x66\xba" + struct.pack("<H", port)


IN_AL_80 = b"\xe4\x80"
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
