"""Guest code really runs (KVM backing): exits become hv_message intercepts with mshv semantics.

The crucial rule: after an I/O or MMIO intercept the VP is left AT the instruction with its
registers untouched, whatever convention the host's KVM uses (on kvm-pvm hosts OUT and MMIO
writes arrive with RIP already advanced); the VMM completes the instruction itself.

Expected values: message types, payload sizes and field offsets from docs/ABI.md §7 (decoded in
guest.py), register names §8.2, hypercall inputs §6.1-6.3, the KVM translation and the emulated
hypervisor's answers §9.4-9.5; the kvm-pvm RIP convention is the host fact measured in
docs/DESIGN.md ("Host facts"). Instruction lengths and encodings are the x86 ones.
"""

from __future__ import annotations

import errno
import os
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from mshv_libvirt._mshv import ffi, lib

from tests.abi import facts as F
from tests.support.linuxboot import is_kvm_pvm
from tests.support.procfs import in_guest
from tests.support.waits import assert_quiet, wait_for

from .emutil import (
    PAGE,
    Mem,
    Table,
    eventfd,
    eventfd_count,
    get_property,
    gpap,
    hvcall,
    ioeventfd,
    irqfd,
    msi_entry,
    msi_routing,
    set_memory,
    set_property,
)
from .guest import (
    CLI,
    CODE,
    DATA,
    HLT,
    IN_AL_DX,
    IN_EAX_DX,
    IRETQ,
    JMP_SELF,
    MMIO,
    OUT_DX_AL,
    OUT_DX_AX,
    OUT_DX_EAX,
    REG,
    STI,
    UD2,
    Guest,
    Msg,
    RunError,
    mov_al,
    mov_dx,
    mov_eax,
    mov_ebx,
    out_imm,
)

pytestmark = [pytest.mark.kvm, pytest.mark.usefixtures("kvm")]

IO = F.HVMSG_X64_IO_PORT_INTERCEPT
UNMAPPED = F.HVMSG_UNMAPPED_GPA
READ, WRITE = F.READ, F.WRITE  # §7.3 access type


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest()
    yield g
    g.close()


def rip_of(g: Guest, index: int = 0) -> int:
    return g.regs(index, REG["rip"])[0]


def expect_io(msg: Msg, port: int, access: int, size: int, rip: int, length: int) -> None:
    assert msg.type == IO and msg.payload_size == 128
    io = msg.io
    assert (int(io.port_number), int(io.header.intercept_access_type)) == (port, access)
    assert int(io.access_info) == size  # no string op, no rep
    assert (int(io.header.rip), msg.length) == (rip, length)
    assert int(io.instruction_byte_count) == 16


# ---- port I/O -------------------------------------------------------------------------------


def test_out_intercept_fields(guest: Guest) -> None:
    code = mov_dx(0x3F8) + mov_al(ord("A")) + OUT_DX_AL + CLI + HLT
    guest.load(CODE, code)
    guest.long_mode(rax=0x1122334455667700)
    msg = guest.run()
    out_at = CODE + 6
    expect_io(msg, 0x3F8, WRITE, 1, out_at, 1)
    io = msg.io
    assert int(io.rax) == 0x1122334455667741
    assert io.instruction_bytes[:3] == OUT_DX_AL + CLI + HLT
    hdr = io.header
    assert int(hdr.vp_index) == 0
    assert int(hdr.cs_segment.selector) == 0x08 and int(hdr.cs_segment.attributes) == 0xA09B
    assert int(hdr.execution_state) == 0b11100  # cpl 0, cr0.pe, cr0.am, efer.lma
    assert int(hdr.rflags) == 2
    assert int(io.ds_segment.selector) == 0x10 and int(io.es_segment.selector) == 0x10
    # left at the instruction, registers untouched
    assert rip_of(guest) == out_at


def test_intercept_repeats_until_the_vmm_completes_it(guest: Guest) -> None:
    guest.load(CODE, mov_dx(0x80) + OUT_DX_AL + CLI + HLT)
    guest.long_mode()
    first = guest.run()
    second = guest.run()  # not completed: the VP executes the same OUT again
    assert int(first.header.rip) == int(second.header.rip) == CODE + 4
    guest.complete(second)
    assert guest.run().type == F.HVMSG_X64_HALT


def test_out_then_continue(guest: Guest) -> None:
    code = mov_dx(0x3F8)
    for ch in b"hi!":
        code += mov_al(ch) + OUT_DX_AL
    guest.load(CODE, code + CLI + HLT)
    guest.long_mode()
    seen = b""
    while True:
        msg = guest.run()
        if msg.type != IO:
            break
        seen += bytes([int(msg.io.rax) & 0xFF])
        guest.complete(msg)
    assert seen == b"hi!"
    assert msg.type == F.HVMSG_X64_HALT


@pytest.mark.parametrize(
    "insn,size,port,length",
    [
        (OUT_DX_AX, 2, 0x3F8, 2),
        (OUT_DX_EAX, 4, 0x3F8, 1),
        (out_imm(0x80), 1, 0x80, 2),
        (b"\xe7\x70", 4, 0x70, 2),
        (b"\x66\xe7\x70", 2, 0x70, 3),
    ],
)
def test_out_forms(guest: Guest, insn: bytes, size: int, port: int, length: int) -> None:
    guest.load(CODE, mov_dx(0x3F8) + insn + CLI + HLT)
    guest.long_mode(rax=0xA1B2C3D4)
    msg = guest.run()
    expect_io(msg, port, WRITE, size, CODE + 4, length)
    assert int(msg.io.rax) == 0xA1B2C3D4
    assert rip_of(guest) == CODE + 4


def test_in_with_rax_completion(guest: Guest) -> None:
    code = (
        mov_ebx(DATA)
        + mov_dx(0x3FD)
        + mov_eax(0x11223344)
        + IN_AL_DX
        + b"\x89\x03"  # mov [rbx], eax
        + mov_dx(0x3F9)
        + OUT_DX_AL
        + CLI
        + HLT
    )
    guest.load(CODE, code)
    guest.long_mode()
    msg = guest.run()
    in_at = CODE + 5 + 4 + 5
    expect_io(msg, 0x3FD, READ, 1, in_at, 1)
    assert int(msg.io.rax) == 0x11223344
    assert guest.regs(0, REG["rax"], REG["rip"]) == [0x11223344, in_at]
    guest.complete(msg, rax=0x112233AB)  # IN AL merges into RAX
    msg = guest.run()
    expect_io(msg, 0x3F9, WRITE, 1, in_at + 1 + 2 + 4, 1)
    assert int(msg.io.rax) == 0x112233AB
    assert struct.unpack("<I", guest.ram.read(DATA, 4))[0] == 0x112233AB


def test_in_eax(guest: Guest) -> None:
    guest.load(CODE, mov_dx(0xCFC) + IN_EAX_DX + OUT_DX_EAX + CLI + HLT)
    guest.long_mode(rax=0xFFFFFFFFFFFFFFFF)
    msg = guest.run()
    expect_io(msg, 0xCFC, READ, 4, CODE + 4, 1)
    guest.complete(msg, rax=0x80000000)
    msg = guest.run()
    expect_io(msg, 0xCFC, WRITE, 4, CODE + 5, 1)
    assert int(msg.io.rax) == 0x80000000


def test_string_out_is_reported_as_such(guest: Guest) -> None:
    guest.load(DATA, b"xyz")
    guest.load(
        CODE, mov_dx(0x3F8) + b"\xbe" + struct.pack("<I", DATA) + b"\xb9\x03\x00\x00\x00" + b"\xf3\x6e" + CLI + HLT
    )  # mov esi, DATA; mov ecx, 3; rep outsb
    guest.long_mode()
    msg = guest.run()
    io = msg.io
    assert msg.type == IO and int(io.access_info) == 1 | 1 << 3 | 1 << 4  # size 1, string, rep
    assert int(io.header.rip) == CODE + 14 and msg.length == 2
    assert (int(io.rsi), int(io.rcx)) == (DATA, 3)
    assert guest.regs(0, REG["rip"], REG["rsi"], REG["rcx"]) == [
        CODE + 14,
        DATA,
        3,
    ]


# ---- MMIO -----------------------------------------------------------------------------------


def expect_mmio(msg: Msg, gpa: int, access: int, rip: int, length: int, insn: bytes) -> None:
    assert msg.type == UNMAPPED and msg.payload_size == 80
    mem = msg.mem
    assert (int(mem.guest_physical_address), int(mem.header.intercept_access_type)) == (gpa, access)
    assert (int(mem.header.rip), msg.length) == (rip, length)
    assert int(mem.instruction_byte_count) == 16
    assert mem.instruction_bytes[: len(insn)] == insn


@pytest.mark.parametrize(
    "insn,gpa",
    [
        (b"\x89\x03", MMIO),  # mov [rbx], eax
        (b"\x88\x03", MMIO),  # mov [rbx], al
        (b"\x89\x4b\x10", MMIO + 0x10),  # mov [rbx+0x10], ecx
        (b"\xc7\x03\x0d\xf0\xfe\xca", MMIO),  # mov dword [rbx], 0xCAFEF00D
        (b"\xc6\x43\x01\x42", MMIO + 1),  # mov byte [rbx+1], 0x42
        (b"\x48\x89\x0b", MMIO),  # mov [rbx], rcx
        (b"\x66\x89\x03", MMIO),  # mov [rbx], ax
        (b"\xc7\x00\x00\x00\x00\x00", MMIO),  # mov dword [rax], 0 ("00 00" is a store too)
        (b"\x89\x83\x00\x10\x00\x00", MMIO + 0x1000),  # mov [rbx+0x1000], eax
        (b"\x89\x04\x8b", MMIO + 0x20),  # mov [rbx+rcx*4], eax (SIB)
    ],
)
def test_mmio_write(guest: Guest, insn: bytes, gpa: int) -> None:
    prologue = mov_ebx(MMIO) + mov_eax(MMIO)
    guest.load(CODE, prologue + insn + CLI + HLT)
    guest.long_mode(rcx=8)
    msg = guest.run()
    at = CODE + len(prologue)
    expect_mmio(msg, gpa, WRITE, at, len(insn), insn)
    assert guest.regs(0, REG["rip"], REG["rax"]) == [at, MMIO]
    mem = msg.mem
    assert int(mem.memory_access_info) & 3 == 3  # gva_valid, gva_gpa_valid
    assert int(mem.guest_virtual_address) == gpa
    guest.complete(msg)
    assert guest.run().type == F.HVMSG_X64_HALT


@pytest.mark.parametrize(
    "insn,dest,value",
    [
        (b"\x8b\x0b", REG["rcx"], 0x55667788),  # mov ecx, [rbx]
        (b"\x8a\x0b", REG["rcx"], 0x77),  # mov cl, [rbx]
        (b"\x48\x8b\x53\x08", REG["rdx"], 2**63 + 5),  # mov rdx, [rbx+8]
        (b"\x0f\xb7\x33", REG["rsi"], 0xBEEF),  # movzx esi, word [rbx]
    ],
)
def test_mmio_read_with_destination_completion(guest: Guest, insn: bytes, dest: int, value: int) -> None:
    prologue = mov_ebx(MMIO)
    guest.load(CODE, prologue + insn + CLI + HLT)
    guest.long_mode(rcx=0x1234, rdx=0x5678, rsi=0x9ABC)
    before = guest.regs(0, dest)[0]
    msg = guest.run()
    at = CODE + len(prologue)
    gpa = MMIO + (8 if insn[-1] == 0x08 else 0)
    expect_mmio(msg, gpa, READ, at, len(insn), insn)
    assert guest.regs(0, REG["rip"], dest) == [at, before]  # destination untouched
    h = guest.regs(0, REG["rip"])
    assert h == [at]
    guest.complete(msg, **{_name(dest): value})
    assert guest.run().type == F.HVMSG_X64_HALT
    assert guest.regs(0, dest) == [value]


def _name(reg: int) -> str:
    return {REG["rcx"]: "rcx", REG["rdx"]: "rdx", REG["rsi"]: "rsi"}[reg]


def test_mmio_write_then_read_then_use(guest: Guest) -> None:
    code = (
        mov_ebx(MMIO)
        + b"\xc7\x03\x78\x56\x34\x12"  # mov dword [rbx], 0x12345678
        + b"\x8b\x0b"  # mov ecx, [rbx]
        + b"\x89\xc8"  # mov eax, ecx
        + mov_dx(0x3F8)
        + OUT_DX_EAX
        + CLI
        + HLT
    )
    guest.load(CODE, code)
    guest.long_mode()
    w = guest.run()
    expect_mmio(w, MMIO, WRITE, CODE + 5, 6, b"\xc7\x03\x78\x56\x34\x12")
    guest.complete(w)
    r = guest.run()
    expect_mmio(r, MMIO, READ, CODE + 11, 2, b"\x8b\x0b")
    guest.complete(r, rcx=0x12345678)
    o = guest.run()
    expect_io(o, 0x3F8, WRITE, 4, CODE + 19, 1)
    assert int(o.io.rax) == 0x12345678


def test_write_to_read_only_memory_is_a_gpa_intercept(guest: Guest) -> None:
    rom = Mem(PAGE)
    rom.write(0, struct.pack("<I", 0xC0DE))
    try:
        assert set_memory(guest.pt, PAGE, 0x400, rom.addr, flags=0) == 0  # readable only
        code = mov_ebx(0x400000) + b"\x8b\x0b" + b"\x89\x03" + CLI + HLT  # mov ecx,[rbx]; mov [rbx],eax
        guest.load(CODE, code)
        guest.long_mode()
        msg = guest.run()
        assert msg.type == F.HVMSG_GPA_INTERCEPT
        assert int(msg.mem.guest_physical_address) == 0x400000
        assert int(msg.mem.header.intercept_access_type) == WRITE
        assert int(msg.header.rip) == CODE + 7 and msg.length == 2
        assert guest.regs(0, REG["rcx"]) == [0xC0DE]  # the read was RAM
    finally:
        assert set_memory(guest.pt, PAGE, 0x400, rom.addr, flags=4) == 0
        rom.close()


def test_ioeventfd_write_needs_no_intercept(guest: Guest) -> None:
    efd = eventfd()
    try:
        assert ioeventfd(guest.pt, efd, MMIO + 0x40, 4) == 0
        guest.load(CODE, mov_ebx(MMIO) + b"\x89\x43\x40" + mov_dx(0x3F8) + OUT_DX_AL + CLI + HLT)
        guest.long_mode()
        msg = guest.run()
        assert msg.type == IO  # the doorbell write was handled without an exit
        assert eventfd_count(efd) == 1
    finally:
        os.close(efd)


# ---- HLT, triple fault, CPUID-visible state -------------------------------------------------


def test_hlt_with_interrupts_off_is_a_halt_message(guest: Guest) -> None:
    guest.load(CODE, b"\x90" * 3 + CLI + HLT + JMP_SELF)
    guest.long_mode()
    t0 = time.monotonic()
    msg = guest.run()
    assert msg.type == F.HVMSG_X64_HALT and msg.payload_size == 40
    assert int(msg.header.rip) == CODE + 4 and msg.length == 1
    assert not int(msg.header.rflags) & 0x200
    assert time.monotonic() - t0 < 5


def test_triple_fault_is_an_unrecoverable_exception(guest: Guest) -> None:
    # #UD with an empty IDT: #GP, #DF, shutdown.
    guest.load(CODE, b"\x90" + UD2)
    guest.long_mode(idtr=Table(0, 0))
    msg = guest.run()
    assert msg.type == F.HVMSG_UNRECOVERABLE_EXCEPTION
    assert int(msg.header.rip) == CODE + 1


def test_translate_virtual_address(guest: Guest) -> None:
    guest.long_mode()
    for gva, result, gpa in [(CODE, 0, CODE), (MMIO + 0x5000, 4, MMIO + 0x5000), (0x8000000000, 1, None)]:
        h = hvcall(guest.vps[0], 0x52, struct.pack("<QIIQQ", 0, 0, 0, 0, gva >> 12), 16)
        assert (h.rc, h.status) == (0, 0)
        res, page = struct.unpack("<QQ", h.out)
        assert res == result
        if gpa is not None:
            assert page == gpa >> 12


# ---- several VPs, signals -------------------------------------------------------------------


def run_in_thread(g: Guest, index: int, results: dict[int, Msg | RunError]) -> threading.Thread:
    def body() -> None:
        try:
            results[index] = g.run(index)
        except RunError as err:
            results[index] = err

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t


def _msg(results: dict[int, Msg | RunError], index: int) -> Msg:
    msg = results[index]
    assert not isinstance(msg, RunError), f"VP {index}: errno {msg.errno}"
    return msg


def _ident(t: threading.Thread) -> int:
    assert t.ident is not None, "thread not started"
    return t.ident


def test_two_vps_run_concurrently() -> None:
    g = Guest(nvps=2)
    try:
        # VP0 spins until VP1 sets a flag: only possible if both run at the same time.
        vp0 = mov_ebx(DATA) + b"\x80\x3b\x01\x75\xfb" + mov_dx(0x500) + OUT_DX_AL + CLI + HLT
        vp1 = mov_ebx(DATA) + b"\xc6\x03\x01" + mov_dx(0x501) + OUT_DX_AL + CLI + HLT
        g.load(CODE, vp0)
        g.load(CODE + 0x100, vp1)
        g.long_mode(0)
        g.long_mode(1, rip=CODE + 0x100)  # an AP: its RIP set explicitly makes it runnable
        results: dict[int, Msg | RunError] = {}
        t0 = run_in_thread(g, 0, results)
        wait_for(lambda: in_guest(t0), timeout=10, what="VP0 spinning in the guest")
        assert t0.is_alive()  # spinning in the guest, without holding the partition
        t1 = run_in_thread(g, 1, results)
        t1.join(10)
        t0.join(10)
        m0, m1 = _msg(results, 0), _msg(results, 1)
        assert int(m1.io.port_number) == 0x501
        assert int(m0.io.port_number) == 0x500
        assert int(m0.header.vp_index) == 0 and int(m1.header.vp_index) == 1
    finally:
        g.close()


def test_ap_without_context_waits_for_sipi() -> None:
    g = Guest(nvps=2)
    try:
        # VP1 never got registers: it waits for INIT/SIPI like an AP under the hypervisor's
        # LAPIC. VP0 (BSP) sends INIT + SIPI through the hypercall and VP1 starts in real mode.
        g.load(0x9000, mov_dx(0x600)[1:] + OUT_DX_AL + CLI + HLT)  # real mode: mov dx, 0x600
        results: dict[int, Msg | RunError] = {}
        t1 = run_in_thread(g, 1, results)
        wait_for(lambda: in_guest(t1), timeout=10, what="VP1 in its run call, waiting for SIPI")
        assert t1.is_alive()
        for control, vector in ((5, 0), (6, 0x09)):  # INIT, then SIPI to page 0x9000
            h = hvcall(g.pt, 0x94, struct.pack("<QQQIBBH", 0, control, 1, vector, 0, 0, 0))
            assert (h.rc, h.status) == (0, 0)
        t1.join(10)
        msg = _msg(results, 1)
        assert msg.type == IO and int(msg.io.port_number) == 0x600
        assert int(msg.header.execution_state) & 0x4 == 0  # real mode
    finally:
        g.close()


def test_signal_kicks_a_running_vp_out_with_eintr(guest: Guest) -> None:
    guest.load(CODE, JMP_SELF)
    guest.long_mode()
    old = signal.signal(signal.SIGUSR1, lambda *_: None)  # Python installs it without SA_RESTART
    try:
        results: dict[int, Msg | RunError] = {}
        t = run_in_thread(guest, 0, results)
        wait_for(lambda: in_guest(t), timeout=10, what="the VP spinning in the guest")
        assert t.is_alive()
        for _ in range(50):
            signal.pthread_kill(_ident(t), signal.SIGUSR1)
            t.join(0.1)
            if not t.is_alive():
                break
        assert isinstance(results[0], RunError) and results[0].errno == errno.EINTR
        assert rip_of(guest) == CODE  # still in its loop
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_signal_kicks_a_halted_vp_out(guest: Guest) -> None:
    guest.load(CODE, STI + HLT + JMP_SELF)  # halted with interrupts on: no HALT message
    guest.long_mode()
    old = signal.signal(signal.SIGUSR1, lambda *_: None)
    try:
        results: dict[int, Msg | RunError] = {}
        t = run_in_thread(guest, 0, results)
        wait_for(lambda: in_guest(t), timeout=10, what="the VP halted in its run call")
        assert_quiet(t.is_alive, 0.4, "the halt monitor (a scan every 10 ms) looks at it a few times, leaves it halted")
        signal.pthread_kill(_ident(t), signal.SIGUSR1)
        t.join(5)
        assert isinstance(results[0], RunError) and results[0].errno == errno.EINTR
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_a_halt_is_reported_on_a_thread_that_blocks_every_signal(guest: Guest) -> None:
    # HLT with interrupts off is found by the device's halt monitor, which kicks the VP's thread with a
    # private signal; RUN_VP leaves the caller's mask alone, so the device unblocks that one signal on
    # the thread itself (docs/ABI.md §9.6). A thread blocking everything must still get its HALT.
    guest.load(CODE, CLI + HLT)
    guest.long_mode()
    results: dict[int, Msg | RunError] = {}

    def body() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            results[0] = guest.run(0)
        except RunError as err:
            results[0] = err

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "no HALT: the monitor's kick did not reach the VP"
    assert _msg(results, 0).type == F.HVMSG_X64_HALT


def test_intercept_message_page_mirrors_run_vp(guest: Guest) -> None:
    import mmap as _mmap

    p = lib.mshv_dev_mmap(ffi.NULL, PAGE, _mmap.PROT_READ, _mmap.MAP_SHARED, guest.vps[0], _mmap.PAGESIZE)
    assert p != ffi.cast("void *", -1)
    try:
        guest.load(CODE, mov_dx(0x3F8) + OUT_DX_AL + CLI + HLT)
        guest.long_mode()
        msg = guest.run()
        assert bytes(ffi.buffer(ffi.cast("char *", p), 256)) == msg.raw
    finally:
        from .emutil import unmap

        unmap(int(ffi.cast("uintptr_t", p)), PAGE)


# ---- interrupts -----------------------------------------------------------------------------

HANDLER = 0x11000


def interrupt_guest(g: Guest, eoi: bool) -> None:
    """Handler for vectors 0x40-0x42: OUT the vector's port, optional EOI, IRETQ.
    Main: enable the LAPIC (SVR), STI, HLT loop."""
    eoi_code = mov_eax(0xFEE000B0) + b"\xc7\x00\x00\x00\x00\x00" if eoi else b""
    for i, vec in enumerate((0x40, 0x41, 0x42)):
        h = HANDLER + 0x100 * i
        g.load(h, mov_dx(0x600 + vec) + OUT_DX_AL + eoi_code + IRETQ)
        g.set_gate(vec, h)
    main = mov_eax(0xFEE000F0) + b"\xc7\x00\xff\x01\x00\x00" + STI + HLT + b"\xeb\xfd"
    g.load(CODE, main)
    g.long_mode()


def run_until_exit(g: Guest, trigger: Callable[[], object] | None = None, timeout: float = 10) -> Msg:
    """Run VP 0 on a thread (it halts with interrupts on), fire ``trigger``, return its first exit."""
    results: dict[int, Msg | RunError] = {}
    t = run_in_thread(g, 0, results)
    wait_for(lambda: in_guest(t), timeout=10, what="the VP halted in its run call")
    assert t.is_alive()  # halted, waiting for an interrupt
    if trigger:
        trigger()
    t.join(timeout)
    assert not t.is_alive(), "guest did not exit"
    return _msg(results, 0)


def run_until_io(g: Guest, port: int, trigger: Callable[[], object] | None = None, timeout: float = 10) -> Msg:
    """As run_until_exit, expecting OUT ``port`` (completed before returning)."""
    msg = run_until_exit(g, trigger, timeout)
    assert msg.type == IO and int(msg.io.port_number) == port, exit_summary(msg)
    g.complete(msg)
    return msg


def exit_summary(msg: Msg) -> str:
    """What an unexpected exit was, for the failure message (an EOI names its vector)."""
    if msg.type == F.HVMSG_X64_APIC_EOI:
        return f"APIC EOI exit, vp {int(msg.eoi.vp_index)} vector {int(msg.eoi.interrupt_vector):#x}"
    if msg.type == IO:
        return f"IO exit, port {int(msg.io.port_number):#x} rip {int(msg.io.header.rip):#x}"
    return hex(msg.type)


def test_assert_virtual_interrupt_reaches_the_guest(guest: Guest) -> None:
    interrupt_guest(guest, eoi=True)

    def fire() -> None:
        h = hvcall(guest.pt, 0x94, struct.pack("<QQQIBBH", 0, 0, 0, 0x40, 0, 0, 0))
        assert (h.rc, h.status) == (0, 0)

    run_until_io(guest, 0x640, fire)


def test_irqfd_through_msi_routing(guest: Guest) -> None:
    interrupt_guest(guest, eoi=True)
    efd = eventfd()
    try:
        assert msi_routing(guest.pt, [msi_entry(30, 0x41)]) == 0
        assert irqfd(guest.pt, efd, 30) == 0
        run_until_io(guest, 0x641, lambda: os.write(efd, struct.pack("<Q", 1)))
        # deassigned: the eventfd no longer interrupts the guest
        assert irqfd(guest.pt, efd, 30, flags=1) == 0
        results: dict[int, Msg | RunError] = {}
        t = run_in_thread(guest, 0, results)
        wait_for(lambda: in_guest(t), timeout=10, what="the VP halted in its run call")
        os.write(efd, struct.pack("<Q", 1))
        assert_quiet(t.is_alive, 0.3, "a deassigned irqfd interrupts nothing")
        assert t.is_alive()
        hvcall(guest.pt, 0x94, struct.pack("<QQQIBBH", 0, 0, 0, 0x40, 0, 0, 0))
        t.join(10)
        assert int(_msg(results, 0).io.port_number) == 0x640
    finally:
        os.close(efd)


def test_level_triggered_eoi_is_an_apic_eoi_message(guest: Guest) -> None:
    interrupt_guest(guest, eoi=True)
    efd, rs = eventfd(), eventfd()
    try:
        assert msi_routing(guest.pt, [msi_entry(5, 0x42, level=True)]) == 0  # an IOAPIC pin
        assert irqfd(guest.pt, efd, 5, flags=2, resamplefd=rs) == 0
        first = run_until_exit(guest, lambda: os.write(efd, struct.pack("<Q", 1)))
        if first.type == IO:
            guest.complete(first)
            handler_out, eoi_msg = first, guest.run()  # then the handler's EOI write
        else:
            # kvm-pvm EOIs a level-triggered vector as it delivers it (ftrace: kvm_apic_accept_irq, then
            # "apic_write APIC_EOI" and kvm_eoi before the handler's first instruction, in every run), so
            # its EOI exit can come before the handler's OUT, once per ~20-100 runs under load. A host
            # that intercepts the guest's own EOI write must report the OUT first.
            assert is_kvm_pvm(), f"EOI exit before the handler ran, on a host without kvm-pvm: {exit_summary(first)}"
            eoi_msg, handler_out = first, guest.run()
        assert handler_out.type == IO and int(handler_out.io.port_number) == 0x642, exit_summary(handler_out)
        assert eoi_msg.type == F.HVMSG_X64_APIC_EOI and eoi_msg.payload_size == 8, exit_summary(eoi_msg)
        eoi = eoi_msg.eoi
        assert (int(eoi.vp_index), int(eoi.interrupt_vector)) == (0, 0x42)
        assert eventfd_count(rs) == 1  # the resampler heard about it
    finally:
        os.close(efd)
        os.close(rs)


# ---- dirty tracking, properties ------------------------------------------------------------


def test_dirty_pages_are_tracked(guest: Guest) -> None:
    assert set_property(guest.pt, 0x00050005, 1).status == 0
    out = Mem(PAGE)
    try:
        assert gpap(guest.pt, 1, 1, 512, 0, out.addr) == 0  # clear everything
        guest.load(CODE, mov_ebx(0x30000) + b"\x89\x03" + b"\x89\x83\x00\x20\x00\x00" + CLI + HLT)
        guest.long_mode()
        assert guest.run().type == F.HVMSG_X64_HALT
        assert gpap(guest.pt, 1, 0, 64, 0, out.addr) == 0
        bits = int.from_bytes(out.read(0, 8), "little")
        assert bits & (1 << 0x30) and bits & (1 << 0x32)  # the two pages written
        assert not bits & (1 << 0x31)
    finally:
        out.close()


def test_unimplemented_msr_action(guest: Guest) -> None:
    # rdmsr of an MSR nobody implements: #GP with FAULT (0), zero with IGNORE (1).
    guest.load(CODE, b"\xb9\x34\x12\x00\x00" + b"\x0f\x32" + mov_dx(0x3F8) + OUT_DX_EAX + CLI + HLT)
    assert set_property(guest.pt, 0x00050017, 1).status == 0
    guest.long_mode(rax=0xFFFF, rdx=0xFFFF)
    msg = guest.run()
    assert msg.type == IO and int(msg.io.rax) == 0
    assert struct.unpack("<Q", get_property(guest.pt, 0x00050017).out)[0] == 1
