"""vCPU threads and exit handling against a fake VP (no hypervisor).

The fake VP's ``run()`` blocks in ``pause(2)`` like a VP blocked in the run ioctl, so the real
SIGUSR1 kick is what gets it out: the test exercises the actual signal path.
"""

from __future__ import annotations

import ctypes
import io
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest

from mshv_libvirt.hv import HvMessage, Reg, RegisterValue
from mshv_libvirt.vmm.devices.bus import Bus
from mshv_libvirt.vmm.devices.serial import Serial16550
from mshv_libvirt.vmm.vcpu import (
    ExitGate,
    ExitHandler,
    GuestExitError,
    ResponseKind,
    VcpuEvent,
    VcpuState,
    VcpuThread,
    VmExit,
    VmExitKind,
    install_kick_handler,
)
from tests.support.waits import assert_quiet, wait_for
from tests.vmm import fakehv

_libc = ctypes.CDLL(None, use_errno=True)


class FakeVp:
    def __init__(self) -> None:
        self.script: queue.SimpleQueue[HvMessage] = queue.SimpleQueue()
        self.regs: dict[int, RegisterValue] = {r: 0 for r in fakehv.GPRS}
        self.regs[Reg.RIP] = 0x1000
        self.runs = 0
        self.in_run = threading.Event()

    def run(self) -> HvMessage:
        self.runs += 1
        try:
            return self.script.get_nowait()
        except queue.Empty:
            pass
        self.in_run.set()
        _libc.pause()  # returns when a signal handler ran in this thread
        self.in_run.clear()
        raise InterruptedError(4, "EINTR")

    def get_registers(self, names: Sequence[int]) -> list[RegisterValue]:
        return [self.regs[n] for n in names]

    def set_registers(self, values: Mapping[int, RegisterValue]) -> None:
        self.regs.update(values)


@pytest.fixture(autouse=True)
def kick_handler() -> None:
    install_kick_handler()


@pytest.fixture
def platform() -> Iterator[tuple[Bus, Bus, io.BytesIO, list[VmExit]]]:
    out = io.BytesIO()
    pio, mmio = Bus("pio"), Bus("mmio")
    pio.register(0x3F8, 8, Serial16550(out.write))
    exits: list[VmExit] = []
    yield pio, mmio, out, exits


def test_io_out_and_in_complete_the_instruction(platform: Any) -> None:
    pio, mmio, out, exits = platform
    handler = ExitHandler(pio, mmio, ExitGate(exits.append))
    vp = FakeVp()
    vp.regs[Reg.RAX] = 0xFFFF_FFFF_FFFF_FF00
    assert handler.handle(vp, 0, fakehv.io_message(0x3F8, 1, True, rax=0x41, rip=0x2000, length=1))
    assert out.getvalue() == b"A" and vp.regs[Reg.RIP] == 0x2001
    # IN AL keeps the upper RAX bits; IN EAX from an unclaimed port zero-extends all ones.
    handler.handle(vp, 0, fakehv.io_message(0x3FD, 1, False, rax=0x1234_5600, rip=0x2001, length=1))
    assert vp.regs[Reg.RAX] == 0x1234_5660 and vp.regs[Reg.RIP] == 0x2002
    handler.handle(vp, 0, fakehv.io_message(0x70, 4, False, rax=0xAAAA_BBBB_CCCC_DDDD, rip=0x10, length=2))
    assert vp.regs[Reg.RAX] == 0xFFFF_FFFF and vp.regs[Reg.RIP] == 0x12
    with pytest.raises(GuestExitError, match="string I/O"):
        handler.handle(vp, 0, fakehv.io_message(0x3F8, 1, True, rip=0, length=1, string=True))


class Regs:
    def __init__(self) -> None:
        self.values: dict[int, int] = {}

    def read(self, offset: int, size: int) -> int:
        return self.values.get(offset, 0xDEAD_BEEF) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        self.values[offset] = value


def test_mmio_load_and_store_use_the_decoded_register(platform: Any) -> None:
    pio, mmio, _, exits = platform
    dev = Regs()
    mmio.register(0xFEC0_0000, 0x1000, dev)
    handler = ExitHandler(pio, mmio, ExitGate(exits.append))
    vp = FakeVp()
    vp.regs[Reg.RSI] = 0x1111_2222_3333_4444
    store = fakehv.mmio_message(  # mov %esi,0x10(%rdi)
        0xFEC0_0010, bytes.fromhex("897710") + b"\x90" * 13, rip=0x5000, is_write=True
    )
    handler.handle(vp, 0, store)
    assert dev.values[0x10] == 0x3333_4444 and vp.regs[Reg.RIP] == 0x5003
    vp.regs[Reg.RCX] = 0xFFFF_FFFF_FFFF_FFFF
    load = fakehv.mmio_message(0xFEC0_0010, bytes.fromhex("8b4f10") + b"\x90" * 13, rip=0x5003)  # mov 0x10(%rdi),%ecx
    handler.handle(vp, 0, load)
    assert vp.regs[Reg.RCX] == 0x3333_4444 and vp.regs[Reg.RIP] == 0x5006
    bad = fakehv.mmio_message(0xFEC0_0000, bytes.fromhex("f00fc10f") + b"\x90" * 12, rip=0)
    with pytest.raises(GuestExitError, match="unsupported MMIO"):
        handler.handle(vp, 0, bad)
    # A write intercept whose bytes decode to a load: refuse rather than skip an instruction.
    wrong = fakehv.mmio_message(0xFEC0_0000, bytes.fromhex("8b5810") + b"\x90" * 13, rip=0x10, is_write=True)
    with pytest.raises(GuestExitError, match="is a load"):
        handler.handle(vp, 0, wrong)
    assert vp.regs[Reg.RIP] == 0x5006


def test_triple_fault_and_halt_semantics(platform: Any) -> None:
    pio, mmio, _, exits = platform
    handler = ExitHandler(pio, mmio, ExitGate(exits.append))
    vp = FakeVp()
    assert handler.handle(vp, 0, fakehv.halt_message(rflags=0x202))
    assert exits == []  # interrupts on: it will wake
    assert not handler.handle(vp, 1, fakehv.triple_fault_message(rip=0xBAD))
    assert exits[0].kind is VmExitKind.REBOOT and exits[0].detail == "triple fault on vCPU 1 at rip 0xbad"
    gate_exits: list[VmExit] = []
    handler = ExitHandler(pio, mmio, ExitGate(gate_exits.append))
    assert not handler.handle(vp, 0, fakehv.halt_message(rflags=0x2))
    assert gate_exits[0].kind is VmExitKind.SHUTDOWN


def test_device_requested_exit_stops_the_vcpu_and_is_reported_once(platform: Any) -> None:
    pio, mmio, _, exits = platform
    gate = ExitGate(exits.append)
    reset = Regs()
    reset.write = lambda offset, size, value: gate(VmExit(VmExitKind.REBOOT, "guest reset"))  # type: ignore[method-assign]
    pio.register(0x64, 1, reset)
    handler = ExitHandler(pio, mmio, gate)
    vp = FakeVp()
    assert not handler.handle(vp, 0, fakehv.io_message(0x64, 1, True, rax=0xFE, rip=0, length=2))
    assert not handler.handle(vp, 1, fakehv.io_message(0x64, 1, True, rax=0xFE, rip=0, length=2))
    assert exits == [VmExit(VmExitKind.REBOOT, "guest reset")]


def test_thread_state_machine_with_real_kicks(platform: Any) -> None:
    pio, mmio, out, exits = platform
    vp = FakeVp()
    thread = VcpuThread(0, vp, ExitHandler(pio, mmio, ExitGate(exits.append)), exits.append)
    thread.start(paused=True)
    assert thread.state == VcpuState.PAUSED
    assert thread.request(VcpuEvent.PAUSE).kind is ResponseKind.PAUSED  # already paused: still acked
    assert thread.request(VcpuEvent.RESUME).kind is ResponseKind.RESUMED
    assert vp.in_run.wait(5)  # blocked "in the hypervisor"
    assert thread.request(VcpuEvent.RESUME).kind is ResponseKind.NOT_ALLOWED
    assert thread.state.value == "running"  # (mypy narrowed .state to PAUSED above)
    assert thread.request(VcpuEvent.PAUSE).kind is ResponseKind.PAUSED  # the kick got it out of run()
    vp.script.put(fakehv.io_message(0x3F8, 1, True, rax=ord("z"), rip=0x1000, length=1))
    assert_quiet(lambda: out.getvalue() == b"", 0.1, "paused: the scripted exit is not consumed")
    assert thread.request(VcpuEvent.RESUME).kind is ResponseKind.RESUMED
    wait_for(lambda: out.getvalue() == b"z", timeout=5, interval=0.01, what=out.getvalue)
    assert out.getvalue() == b"z" and thread.exits == 1
    assert thread.request(VcpuEvent.FINISH).kind is ResponseKind.FINISHED
    thread.join(5)
    assert thread.thread is not None and not thread.thread.is_alive()
    assert thread.request(VcpuEvent.FINISH).kind is ResponseKind.FINISHED  # idempotent after the end


def test_a_failing_exit_is_reported_as_an_error(platform: Any) -> None:
    pio, mmio, _, exits = platform
    vp = FakeVp()
    vp.script.put(fakehv.io_message(0x3F8, 1, True, rip=0, length=1, string=True))
    thread = VcpuThread(3, vp, ExitHandler(pio, mmio, ExitGate(exits.append)), exits.append)
    thread.start(paused=False)
    thread.join(5)
    assert exits and exits[0].kind is VmExitKind.ERROR and exits[0].detail.startswith("vCPU 3: string I/O")
