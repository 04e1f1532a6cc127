"""Instructions a real CPU (and so mshv) executes but some hosts' KVM cannot.

On kvm-pvm hosts KVM runs guest CPL0 code through its instruction emulator, which gives up on
FWAIT, LDMXCSR/STMXCSR and INT3 (KVM_INTERNAL_ERROR_EMULATION). The emulated /dev/mshv completes
those itself -- with their architectural exceptions -- and runs on. Everything here is CPL0 code,
so on such a host each instruction really takes that path; elsewhere it runs natively and the
same architectural results are expected.

Expected values: the architectural x86 behaviour (Intel SDM: #NM with CR0.TS, #MF on a pending
unmasked x87 exception, #GP for reserved MXCSR bits, #UD without CR4.OSFXSR, #BP as a trap); the
register names and FP/XMM control-register formats of docs/ABI.md §8; what kvm-pvm cannot
emulate is the host fact measured in docs/DESIGN.md, and the emulator's completion of it §9.4.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.abi import facts as F

from .emutil import Seg, set_regs
from .guest import CLI, CODE, DATA, DATA64, HLT, IRETQ, REG, Guest, Msg, RunError, mov_ebx, out_imm

pytestmark = [pytest.mark.kvm, pytest.mark.usefixtures("kvm")]

IO = F.HVMSG_X64_IO_PORT_INTERCEPT
HANDLER = 0x12000
CR0 = 0x80050033  # PG, WP, NE, ET, MP, PE
CR0_TS = 1 << 3
CR4_SSE = 0x20 | 0x200  # PAE, OSFXSR
FWAIT = b"\x9b"
INT3 = b"\xcc"
DONE = out_imm(0x99) + CLI + HLT
FP_CONTROL_STATUS = REG["fp_control_status"]  # fcw, fsw, ftw, ...
XMM_CONTROL_STATUS = REG["xmm_control_status"]  # last rdp, mxcsr, mxcsr mask


def ldmxcsr_abs(addr: int) -> bytes:
    return b"\x0f\xae\x14\x25" + struct.pack("<I", addr)


def stmxcsr_abs(addr: int) -> bytes:
    return b"\x0f\xae\x1c\x25" + struct.pack("<I", addr)


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest()
    yield g
    g.close()


def expect_out(msg: Msg, port: int) -> int:
    assert msg.type == IO, hex(msg.type)
    assert int(msg.io.port_number) == port
    return int(msg.header.rip)


def handler(g: Guest, vector: int) -> None:
    """Vector's handler: OUT to port 0x600 + vector (the frame stays on the stack), then IRETQ."""
    h = HANDLER + 0x40 * vector
    g.load(h, out_imm(vector) + IRETQ)
    g.set_gate(vector, h)


def frame(g: Guest, with_error: bool) -> tuple[int, ...]:
    """(error code, RIP, CS) of the exception frame at the handler's RSP."""
    rsp = g.regs(0, REG["rsp"])[0]
    words = struct.unpack("<6Q", g.ram.read(rsp, 48))
    return words[:3] if with_error else (0, *words[:2])


def u32(g: Guest, gpa: int) -> int:
    return int(struct.unpack("<I", g.ram.read(gpa, 4))[0])


def test_fwait_continues(guest: Guest) -> None:
    guest.load(CODE, FWAIT + b"\x90" + FWAIT + DONE)
    guest.long_mode()
    assert expect_out(guest.run(), 0x99) == CODE + 3


def test_fwait_with_ts_and_mp_is_nm(guest: Guest) -> None:
    handler(guest, 7)
    guest.load(CODE, FWAIT + DONE)
    guest.long_mode(cr0=CR0 | CR0_TS)
    expect_out(guest.run(), 7)
    assert frame(guest, False)[1:] == (CODE, 0x08)


def test_fwait_with_pending_x87_exception_is_mf(guest: Guest) -> None:
    handler(guest, 16)
    guest.load(CODE, b"\x90" + FWAIT + DONE)
    guest.long_mode()
    # FCW 0x37E (invalid-operation unmasked), FSW: IE + ES (an unmasked exception is pending)
    h = set_regs(guest.vps[0], 0, {FP_CONTROL_STATUS: 0x037E | (0x0081 << 16)})
    assert (h.rc, h.status) == (0, 0)
    expect_out(guest.run(), 16)
    assert frame(guest, False)[1] == CODE + 1


def test_ldmxcsr_stmxcsr_absolute(guest: Guest) -> None:
    guest.ram.write(DATA, struct.pack("<I", 0x7F80))  # round toward zero
    guest.load(CODE, ldmxcsr_abs(DATA) + stmxcsr_abs(DATA + 4) + DONE)
    guest.long_mode(cr4=CR4_SSE)
    assert expect_out(guest.run(), 0x99) == CODE + 16
    assert u32(guest, DATA + 4) == 0x7F80


def test_mxcsr_modrm_forms(guest: Guest) -> None:
    code = (
        mov_ebx(DATA)
        + b"\x0f\xae\x13"  # ldmxcsr [rbx]                    -> 0x3F80
        + b"\x0f\xae\x5b\x08"  # stmxcsr [rbx+8]
        + b"\x41\x0f\xae\x54\x8c\x10"  # ldmxcsr [r12+rcx*4+0x10] -> 0x5F80
        + b"\x48\x0f\xae\x5b\x0c"  # stmxcsr [rbx+12] (REX.W)
        + b"\x65\x0f\xae\x53\x20"  # ldmxcsr gs:[rbx+0x20]       -> 0x1FC0 (GS base 0x100)
        + b"\x0f\xae\x1d\x00\x01\x00\x00"  # stmxcsr [rip+0x100]
        + DONE
    )
    guest.ram.write(DATA, struct.pack("<I", 0x3F80))
    guest.ram.write(DATA + 0x18, struct.pack("<I", 0x5F80))
    guest.ram.write(DATA + 0x120, struct.pack("<I", 0x1FC0))
    guest.load(CODE, code)
    guest.long_mode(cr4=CR4_SSE, r12=DATA, rcx=2)
    h = set_regs(guest.vps[0], 0, {REG["gs"]: Seg(0x100, 0xFFFFFFFF, 0x10, DATA64.attributes)})
    assert (h.rc, h.status) == (0, 0)
    rip = expect_out(guest.run(), 0x99)
    assert rip == CODE + len(code) - len(DONE)
    assert u32(guest, DATA + 8) == 0x3F80
    assert u32(guest, DATA + 12) == 0x5F80
    rip_rel = CODE + len(code) - len(DONE) + 0x100
    assert u32(guest, rip_rel) == 0x1FC0


def test_ldmxcsr_reserved_bits_is_gp(guest: Guest) -> None:
    handler(guest, 13)
    guest.ram.write(DATA, struct.pack("<2I", 0x7F80, 0xFFFF0000))
    bad = ldmxcsr_abs(DATA + 4)
    code = ldmxcsr_abs(DATA) + bad + stmxcsr_abs(DATA + 8) + DONE
    guest.load(CODE, code)
    # the handler skips the faulting LDMXCSR: error code off the stack, RIP += its length
    guest.load(HANDLER, out_imm(13) + b"\x48\x83\xc4\x08" + b"\x48\x83\x04\x24" + bytes([len(bad)]) + IRETQ)
    guest.set_gate(13, HANDLER)
    guest.long_mode(cr4=CR4_SSE)
    msg = guest.run()
    expect_out(msg, 13)
    assert frame(guest, True) == (0, CODE + 8, 0x08)
    guest.complete(msg)
    assert expect_out(guest.run(), 0x99) == CODE + len(code) - len(DONE)
    assert u32(guest, DATA + 8) == 0x7F80  # unchanged by the faulting LDMXCSR


def test_ldmxcsr_without_osfxsr_is_ud(guest: Guest) -> None:
    handler(guest, 6)
    guest.ram.write(DATA, struct.pack("<I", 0x1F80))
    guest.load(CODE, ldmxcsr_abs(DATA) + DONE)
    guest.long_mode()  # CR4.OSFXSR clear
    expect_out(guest.run(), 6)
    assert frame(guest, False)[1] == CODE


def test_stmxcsr_with_ts_is_nm(guest: Guest) -> None:
    handler(guest, 7)
    guest.ram.write(DATA, struct.pack("<I", 0xAAAAAAAA))
    guest.load(CODE, stmxcsr_abs(DATA) + DONE)
    guest.long_mode(cr0=CR0 | CR0_TS, cr4=CR4_SSE)
    expect_out(guest.run(), 7)
    assert frame(guest, False)[1] == CODE
    assert u32(guest, DATA) == 0xAAAAAAAA


def test_int3_delivers_bp_as_a_trap(guest: Guest) -> None:
    handler(guest, 3)
    guest.load(CODE, b"\x90" + INT3 + DONE)
    guest.long_mode()
    msg = guest.run()
    assert expect_out(msg, 3) == HANDLER + 0x40 * 3
    assert frame(guest, False)[1:] == (CODE + 2, 0x08)  # RIP after the INT3
    guest.complete(msg)
    assert expect_out(guest.run(), 0x99) == CODE + 2  # IRETQ came back after the INT3


def test_int3_twice(guest: Guest) -> None:
    handler(guest, 3)
    guest.load(CODE, INT3 + INT3 + DONE)
    guest.long_mode()
    for rip in (CODE + 1, CODE + 2):
        msg = guest.run()
        expect_out(msg, 3)
        assert frame(guest, False)[1] == rip
        guest.complete(msg)
    assert expect_out(guest.run(), 0x99) == CODE + 2


@pytest.mark.skipif(not Path("/sys/module/kvm_pvm").exists(), reason="kvm-pvm only: elsewhere it runs natively")
def test_other_unemulated_instruction_is_still_eio(guest: Guest) -> None:
    guest.load(CODE, b"\xf3\x0f\xb8\xc0" + DONE)  # POPCNT eax, eax
    guest.long_mode()
    with pytest.raises(RunError) as err:
        guest.run()
    assert err.value.errno == errno.EIO
    assert guest.regs(0, REG["rip"])[0] == CODE  # state kept


def mxcsr(g: Guest) -> int:
    return (g.regs(0, XMM_CONTROL_STATUS)[0] >> 64) & 0xFFFFFFFF


def test_mxcsr_register_and_the_guest_agree(guest: Guest) -> None:
    # KVM_GET/SET_FPU ignore MXCSR; the register goes through the XSAVE image instead.
    guest.ram.write(DATA, struct.pack("<I", 0x3F80))
    guest.load(CODE, stmxcsr_abs(DATA + 4) + ldmxcsr_abs(DATA) + DONE)
    guest.long_mode(cr4=CR4_SSE)
    assert mxcsr(guest) == 0x1F80  # reset value
    h = set_regs(guest.vps[0], 0, {XMM_CONTROL_STATUS: 0x7F80 << 64, REG["xmm1"]: 0x55})
    assert (h.rc, h.status) == (0, 0)
    assert mxcsr(guest) == 0x7F80
    expect_out(guest.run(), 0x99)
    assert u32(guest, DATA + 4) == 0x7F80  # the guest saw the register's value
    assert mxcsr(guest) == 0x3F80  # and the register sees the guest's LDMXCSR
    assert guest.regs(0, REG["xmm1"])[0] == 0x55
