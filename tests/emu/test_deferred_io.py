"""What a VMM sees of a port-I/O intercept whose KVM completion the emulated device defers.

For plain IN/OUT the device leaves KVM mid-instruction and hands the VMM's completion to KVM's own
at the next RUN_VP (abi/emu/emu_kvm.c, "deferred completion"); any other access in between runs
the completion first. Either way the VP must behave as docs/ABI.md §7.3 says the hypervisor's does:
suspended at the instruction with its registers untouched until the VMM writes them, then running
on from exactly what the VMM wrote. Each guest first takes one exit of the class under test, which
is completed, so that the exit the test looks at is a deferred one (the deferral is used from the
second exit of a class on, where the bytes leave no doubt where the instruction is: a NOP keeps
two alike instructions apart; tests/emu/test_exit_syscalls.py shows the deferral is used). Expected
values are the instruction semantics (Intel SDM) and what the VMM wrote.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from tests.abi import facts as F

from .emutil import get_regs
from .guest import CLI, CODE, HLT, REG, Guest, Msg

pytestmark = [pytest.mark.kvm, pytest.mark.usefixtures("kvm")]

IO = F.HVMSG_X64_IO_PORT_INTERCEPT
IN_81 = b"\xe4\x81"  # in al, 0x81
IN_EAX_81 = b"\xe5\x81"  # in eax, 0x81
OUT_80 = b"\xe6\x80"  # out 0x80, al
OUT_EAX_80 = b"\xe7\x80"  # out 0x80, eax
OUT_82 = b"\xe6\x82"  # out 0x82, al
MOV_EAX_EBX = b"\x89\xd8"  # mov eax, ebx
SHR_RAX_32 = b"\x48\xc1\xe8\x20"  # shr rax, 32
NOP = b"\x90"  # between two alike instructions: the bytes before the second must not decode as one
DONE = CLI + HLT


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest()
    yield g
    g.close()


def io(msg: Msg, port: int) -> Msg:
    assert msg.type == IO and int(msg.io.port_number) == port, hex(msg.type)
    return msg


def test_the_vp_reads_back_at_the_instruction_then_as_the_vmm_wrote_it(guest: Guest) -> None:
    guest.load(CODE, IN_81 + NOP + IN_81 + OUT_80 + DONE)
    guest.long_mode(rax=0x1111)
    guest.complete(io(guest.run(), 0x81), rax=0x1122)
    msg = io(guest.run(), 0x81)
    assert int(msg.header.rip) == CODE + 3
    assert guest.regs(0, REG["rip"], REG["rax"]) == [CODE + 3, 0x1122]  # untouched, at the IN
    guest.complete(msg, rax=0x11AB)  # IN AL: the VMM keeps the rest of RAX
    assert guest.regs(0, REG["rip"], REG["rax"]) == [CODE + 5, 0x11AB]
    assert int(io(guest.run(), 0x80).io.rax) == 0x11AB


def test_an_intercept_not_completed_comes_back(guest: Guest) -> None:
    guest.load(CODE, OUT_80 + NOP + OUT_80 + DONE)
    guest.long_mode()
    guest.complete(io(guest.run(), 0x80))
    first = io(guest.run(), 0x80)
    again = io(guest.run(), 0x80)  # nothing written: the VP executes the same OUT again
    assert int(first.header.rip) == int(again.header.rip) == CODE + 3
    guest.complete(again)
    assert guest.run().type == F.HVMSG_X64_HALT


def test_other_registers_written_with_the_completion_reach_the_guest(guest: Guest) -> None:
    guest.load(CODE, IN_81 + NOP + IN_81 + MOV_EAX_EBX + OUT_EAX_80 + DONE)
    guest.long_mode()
    guest.complete(io(guest.run(), 0x81), rax=1)
    guest.complete(io(guest.run(), 0x81), rax=2, rbx=0x5A5A1234)
    assert int(io(guest.run(), 0x80).io.rax) == 0x5A5A1234


def test_an_out_completed_with_a_new_rax_runs_on_with_it(guest: Guest) -> None:
    guest.load(CODE, OUT_80 + NOP + OUT_80 + OUT_82 + DONE)
    guest.long_mode(rax=0x10)
    guest.complete(io(guest.run(), 0x80))
    guest.complete(io(guest.run(), 0x80), rax=0x77)
    assert int(io(guest.run(), 0x82).io.rax) == 0x77


def test_the_whole_rax_the_vmm_writes_for_a_4_byte_in_is_what_the_guest_gets(guest: Guest) -> None:
    # KVM's own completion of IN EAX would zero-extend; the VMM's write of all 64 bits wins.
    guest.load(CODE, IN_EAX_81 + NOP + IN_EAX_81 + SHR_RAX_32 + OUT_EAX_80 + DONE)
    guest.long_mode()
    guest.complete(io(guest.run(), 0x81), rax=0x12345678)
    guest.complete(io(guest.run(), 0x81), rax=0xCAFE0000_12345678)
    assert int(io(guest.run(), 0x80).io.rax) == 0xCAFE0000


def test_other_state_read_in_between_sees_the_vp_at_the_instruction(guest: Guest) -> None:
    # An MSR, the FPU control word and a special register before the completion: each goes to
    # KVM, which first finishes its half of the IN; the VMM's completion still decides.
    guest.load(CODE, IN_81 + NOP + IN_81 + OUT_80 + DONE)
    guest.long_mode(rax=0xAB00)
    guest.complete(io(guest.run(), 0x81), rax=0xAB01)
    msg = io(guest.run(), 0x81)
    guest.regs(0, REG["tsc"], REG["fp_control_status"], REG["cr0"])
    assert guest.regs(0, REG["rip"], REG["rax"]) == [CODE + 3, 0xAB01]
    guest.complete(msg, rax=0xAB02)
    assert int(io(guest.run(), 0x80).io.rax) == 0xAB02


def test_the_partition_fd_on_another_thread_sees_the_same_vp(guest: Guest) -> None:
    guest.load(CODE, IN_81 + NOP + IN_81 + OUT_80 + DONE)
    guest.long_mode(rax=0x4400)
    guest.complete(io(guest.run(), 0x81), rax=0x4401)
    msg = io(guest.run(), 0x81)
    seen: list[list[int]] = []
    t = threading.Thread(target=lambda: seen.append(get_regs(guest.pt, 0, [REG["rip"], REG["rax"]])))
    t.start()
    t.join(10)
    assert seen == [[CODE + 3, 0x4401]]
    guest.complete(msg, rax=0x4402)
    assert int(io(guest.run(), 0x80).io.rax) == 0x4402
