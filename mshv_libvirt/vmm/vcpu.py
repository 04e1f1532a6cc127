"""One thread per virtual processor, each an explicit state machine.

    Paused  --Resume-->  Running  --Pause-->  Paused
    any     --Finish-->  Finished (thread exits)
    Running --VM-level exit (poweroff, reset or triple fault, panic, error)--> Paused, and the VM is told

Control arrives as :class:`VcpuEvent` on a queue; every event is answered with a
:class:`VcpuResponse` (``NOT_ALLOWED`` rather than silence when it makes no sense). A running VP is
inside ``run()``; the controller kicks it out with SIGUSR1 (``signal.pthread_kill``), which makes the
ioctl fail with EINTR. A kick can land just before the thread enters ``run()``, so the controller
repeats it until the VP answers.

Exits are serviced in :class:`ExitHandler`: port I/O and MMIO go to the device buses and the
instruction is completed by writing RIP (and RAX or the destination register), as the hypervisor
leaves the VP *at* the intercepted instruction. With a compiled run loop (vmm/runloop.py) the thread
runs the VP through it, and ExitHandler sees only the exits the loop does not complete itself.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import enum
import errno
import logging
import queue
import signal
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from mshv_libvirt.hv import HvMessage, MshvError, Reg, RegisterValue

from . import mmio, phases, sandbox
from .devices.bus import Bus

log = logging.getLogger(__name__)

KICK_SIGNAL = signal.SIGUSR1
KICK_INTERVAL = 0.005
RFLAGS_IF = 1 << 9

# GPR numbers as encoded in instructions -> hypervisor register names.
GPRS = (
    Reg.RAX, Reg.RCX, Reg.RDX, Reg.RBX, Reg.RSP, Reg.RBP, Reg.RSI, Reg.RDI,
    Reg.R8, Reg.R9, Reg.R10, Reg.R11, Reg.R12, Reg.R13, Reg.R14, Reg.R15,
)  # fmt: skip


class Vp(Protocol):
    """What a vCPU thread needs from a VP (``hv.VpFd`` satisfies it; tests use a fake)."""

    def run(self) -> HvMessage: ...

    def get_registers(self, names: Sequence[int]) -> list[RegisterValue]: ...

    def set_registers(self, values: Mapping[int, RegisterValue]) -> None: ...


class RunLoop(Protocol):
    """The compiled run loop (vmm/runloop.py): runs the VP, completing hot exits without Python."""

    def run(self) -> HvMessage: ...

    def interrupt(self) -> None: ...

    def runs(self) -> int:
        """Exits so far, those it completed itself and those it returned."""
        ...


class VcpuState(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    FINISHED = "finished"


class VcpuEvent(enum.Enum):
    PAUSE = "pause"
    RESUME = "resume"
    FINISH = "finish"


class ResponseKind(enum.Enum):
    PAUSED = "paused"
    RESUMED = "resumed"
    FINISHED = "finished"
    NOT_ALLOWED = "not_allowed"


@dataclass(frozen=True)
class VcpuResponse:
    kind: ResponseKind
    detail: str = ""


class VmExitKind(enum.Enum):
    """Why the whole VM stops running guest code."""

    SHUTDOWN = "shutdown"
    REBOOT = "reboot"
    CRASH = "crash"
    ERROR = "error"


@dataclass(frozen=True)
class VmExit:
    kind: VmExitKind
    detail: str
    vp_index: int | None = None


def _name_os_thread(name: str) -> None:
    """Name the OS thread (``top -H``, /proc/PID/task/TID/comm); Python 3.11 does not."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _frames(err: BaseException) -> str:
    """Where ``err`` was raised, from the traceback's code objects only (no source file is read)."""
    out = [
        f'  File "{frame.f_code.co_filename}", line {lineno}, in {frame.f_code.co_name}'
        for frame, lineno in traceback.walk_tb(err.__traceback__)
    ]
    return "\n".join(out)


def _site(msg: HvMessage) -> str:
    if msg.kind == "io_port":
        return f"io {msg.as_io_port().port:#x}"
    if msg.kind == "memory":
        return f"mmio {msg.as_memory().gpa & ~0xFFF:#x}"
    return msg.kind


class ExitGate:
    """Forwards the first VM-level exit of one VM and remembers that the VM is stopping.

    Devices (i8042 reset, ACPI S5) request exits from inside an I/O intercept; the vCPU that did
    the access must not re-enter the guest afterwards (a reset loop would keep asking), and later
    requests from other vCPUs are redundant.
    """

    def __init__(self, on_vm_exit: Callable[[VmExit], None]) -> None:
        self._on_vm_exit = on_vm_exit
        self._lock = threading.Lock()
        self.requested: VmExit | None = None

    def __call__(self, exit_: VmExit) -> None:
        with self._lock:
            if self.requested is not None:
                return
            self.requested = exit_
        self._on_vm_exit(exit_)


class GuestExitError(Exception):
    """An intercept the VMM cannot complete (the message says which)."""


def install_kick_handler() -> None:
    """SIGUSR1 must have a handler (else it kills the process) and must not restart syscalls.

    Python installs handlers without SA_RESTART; the handler itself does nothing, its only job is to
    make the blocked run ioctl return EINTR in whichever thread the signal was sent to.
    """
    signal.signal(KICK_SIGNAL, lambda _signum, _frame: None)


class ExitHandler:
    """Completes intercepts against the platform's buses; reports VM-level exits through ``gate``."""

    def __init__(self, pio: Bus, mmio_bus: Bus, gate: ExitGate, on_eoi: Callable[[int], None] | None = None) -> None:
        self.pio = pio
        self.mmio = mmio_bus
        self._gate = gate
        self._on_vm_exit: Callable[[VmExit], None] = gate
        self._on_eoi = on_eoi

    def handle(self, vp: Vp, index: int, msg: HvMessage) -> bool:
        """Service one exit; False when the VM as a whole must stop (``on_vm_exit`` was called)."""
        kind = msg.kind
        if kind == "io_port":
            self._io_port(vp, msg)
            return self._gate.requested is None
        if kind == "memory":
            self._mmio(vp, msg)
            return self._gate.requested is None
        if kind == "halt":
            header = msg.header()
            if header.rflags & RFLAGS_IF:
                return True  # woken by an interrupt the hypervisor delivers; run again
            # HLT with interrupts off never wakes: what Linux does at the end of halt/poweroff.
            self._on_vm_exit(VmExit(VmExitKind.SHUTDOWN, "guest halted with interrupts disabled", index))
            return False
        if kind == "unrecoverable_exception":
            # A triple fault resets the machine (the CPU's shutdown cycle; KVM/QEMU treat it as a guest reset):
            # on_reboot decides. Only a panic the guest reports itself (pvpanic) is a crash.
            rip = msg.header().rip
            self._on_vm_exit(VmExit(VmExitKind.REBOOT, f"triple fault on vCPU {index} at rip {rip:#x}", index))
            return False
        if kind == "apic_eoi":
            if self._on_eoi is not None:
                self._on_eoi(msg.as_apic_eoi().interrupt_vector)
            return True
        raise GuestExitError(f"unexpected intercept {msg.message_type:#x} on vCPU {index}")

    def _io_port(self, vp: Vp, msg: HvMessage) -> None:
        io = msg.as_io_port()
        if io.string_op or io.rep_prefix:
            raise GuestExitError(f"string I/O on port {io.port:#x} is not supported")
        size = io.access_size
        if size not in (1, 2, 4):
            raise GuestExitError(f"I/O access of size {size} on port {io.port:#x}")
        next_rip = io.rip + io.instruction_length
        if io.is_write:
            self.pio.write(io.port, size, io.rax)
            vp.set_registers({Reg.RIP: next_rip})
        else:
            value = self.pio.read(io.port, size)
            # IN AL/AX merges into RAX; IN EAX zero-extends like any 32-bit register write.
            rax = value if size == 4 else (io.rax & ~((1 << (8 * size)) - 1)) | value
            vp.set_registers({Reg.RAX: rax, Reg.RIP: next_rip})

    def _mmio(self, vp: Vp, msg: HvMessage) -> None:
        mem = msg.as_memory()
        try:
            insn = mmio.decode(mem.instruction_bytes)
        except mmio.DecodeError as err:
            raise GuestExitError(
                f"MMIO at {mem.gpa:#x} from rip {mem.rip:#x}: {err} ({mem.instruction_bytes.hex()})"
            ) from err
        if insn.is_write != mem.is_write:
            # The bytes are not the instruction that faulted (e.g. a backend that reports RIP
            # after the access): completing it would skip or repeat guest instructions.
            raise GuestExitError(
                f"MMIO {'write' if mem.is_write else 'read'} at {mem.gpa:#x} but the instruction at "
                f"rip {mem.rip:#x} ({mem.instruction_bytes[: insn.length].hex()}) is a "
                f"{'store' if insn.is_write else 'load'}"
            )
        next_rip = mem.rip + insn.length
        if insn.is_write:
            if insn.immediate is not None:
                value = insn.store_value(0)
            else:
                assert insn.reg is not None
                (reg_value,) = vp.get_registers([GPRS[insn.reg]])
                assert isinstance(reg_value, int)
                value = insn.store_value(reg_value)
            self.mmio.write(mem.gpa, insn.size, value)
            vp.set_registers({Reg.RIP: next_rip})
        else:
            assert insn.reg is not None
            data = self.mmio.read(mem.gpa, insn.size)
            reg = GPRS[insn.reg]
            old = 0
            if insn.high_byte or insn.dest_size in (1, 2):
                (old_value,) = vp.get_registers([reg])
                assert isinstance(old_value, int)
                old = old_value
            vp.set_registers({reg: insn.load_result(old, data), Reg.RIP: next_rip})


class VcpuThread:
    def __init__(
        self,
        index: int,
        vp: Vp,
        handler: ExitHandler,
        on_vm_exit: Callable[[VmExit], None],
        loop: RunLoop | None = None,
    ) -> None:
        self.index = index
        self.vp = vp
        # With a compiled loop, run() returns only the exits Python must complete; without, every exit.
        self.loop = loop
        self._run = loop.run if loop is not None else vp.run
        self._handler = handler
        self._on_vm_exit = on_vm_exit
        self._events: queue.SimpleQueue[VcpuEvent] = queue.SimpleQueue()
        self._responses: queue.SimpleQueue[VcpuResponse] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._state = VcpuState.PAUSED
        self._event_pending = threading.Event()
        self.python_exits = 0  # exits ExitHandler completed (all of them without a compiled loop)
        # ... by where they went: "io 0x64", "mmio 0xfec00000" (the page), or the message's kind.
        self.python_exit_sites: collections.Counter[str] = collections.Counter()

    @property
    def exits(self) -> int:
        return self.loop.runs() if self.loop is not None else self.python_exits

    @property
    def state(self) -> VcpuState:
        return self._state

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def start(self, paused: bool) -> None:
        if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
            # An unhandled kick would kill the process; only the main thread may install handlers.
            if threading.current_thread() is not threading.main_thread():
                raise RuntimeError("install_kick_handler() must run in the main thread before vCPUs start")
            install_kick_handler()
        self._state = VcpuState.PAUSED if paused else VcpuState.RUNNING
        self._thread = threading.Thread(target=self._main, name=f"vcpu{self.index}", daemon=True)
        self._thread.start()

    # -- controller side --------------------------------------------------------------------------
    def request(self, event: VcpuEvent, timeout: float = 10.0) -> VcpuResponse:
        """Send ``event`` and kick the thread until it answers."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            if event is VcpuEvent.FINISH:
                return VcpuResponse(ResponseKind.FINISHED)
            return VcpuResponse(ResponseKind.NOT_ALLOWED, "vCPU thread is not running")
        self._events.put(event)
        self._event_pending.set()  # after put: whoever sees the flag finds the event queued
        if self.loop is not None:
            self.loop.interrupt()  # a kick landing between two RUN_VPs of the C loop is not lost
        deadline = time.monotonic() + timeout
        while True:
            if thread.ident is not None and thread.is_alive():
                try:
                    signal.pthread_kill(thread.ident, KICK_SIGNAL)
                except ProcessLookupError:
                    pass
            try:
                return self._responses.get(timeout=KICK_INTERVAL)
            except queue.Empty:
                if not thread.is_alive():
                    return VcpuResponse(ResponseKind.FINISHED, "vCPU thread ended")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"vCPU {self.index} did not answer {event.value}") from None

    def kick(self) -> None:
        """Interrupt a running VP once (it then looks at its event queue and the test hook)."""
        thread = self._thread
        if self.loop is not None:
            self.loop.interrupt()
        if thread is not None and thread.ident is not None and thread.is_alive():
            with contextlib.suppress(ProcessLookupError):
                signal.pthread_kill(thread.ident, KICK_SIGNAL)

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    # -- vCPU thread ------------------------------------------------------------------------------
    def _main(self) -> None:
        name = f"vcpu{self.index}"
        _name_os_thread(name)
        try:
            # Before any guest code runs: this thread keeps only the vCPU allow-list (no-op unsandboxed).
            sandbox.enter_thread(sandbox.VCPU, name)
            while self._state is not VcpuState.FINISHED:
                if self._state is VcpuState.RUNNING:
                    self._running()
                else:
                    self._paused()
        except BaseException as err:  # the VM must hear about it, whatever it was
            # No log.exception: rendering source lines would open files, which a vCPU thread may not.
            log.error("vCPU %d failed: %s: %s\n%s", self.index, type(err).__name__, err, _frames(err))
            self._state = VcpuState.FINISHED
            self._on_vm_exit(VmExit(VmExitKind.ERROR, f"vCPU {self.index}: {err}", self.index))

    def _answer(self, event: VcpuEvent) -> None:
        if event is VcpuEvent.PAUSE:
            if self._state is VcpuState.RUNNING:
                self._state = VcpuState.PAUSED  # Running ---- Pause ----> Paused
            self._responses.put(VcpuResponse(ResponseKind.PAUSED))
        elif event is VcpuEvent.RESUME:
            if self._state is VcpuState.RUNNING:
                self._responses.put(VcpuResponse(ResponseKind.NOT_ALLOWED, "vCPU is already running"))
            else:
                self._state = VcpuState.RUNNING  # Paused ---- Resume ----> Running
                self._responses.put(VcpuResponse(ResponseKind.RESUMED))
        else:
            self._state = VcpuState.FINISHED  # any ---- Finish ----> Finished
            self._responses.put(VcpuResponse(ResponseKind.FINISHED))

    def _paused(self) -> None:
        self._answer(self._events.get())

    def _running(self) -> None:
        phases.first_run_vp()  # once per process: a flag test here, not per exit
        while self._state is VcpuState.RUNNING:
            if self._event_pending.is_set():
                self._event_pending.clear()
                while True:
                    try:
                        event = self._events.get_nowait()
                    except queue.Empty:
                        break
                    self._answer(event)
                if self._state is not VcpuState.RUNNING:
                    return
            if sandbox.test_call_pending():
                sandbox.take_test_call()  # test hook (docs/SECURITY.md): a forbidden call ends the VMM here
            try:
                msg = self._run()
            except InterruptedError:
                continue  # kicked: look at the event queue
            except MshvError as err:
                # EINTR: kicked; EAGAIN: an AP woke from wait-for-SIPI without running (KVM backing).
                if err.errno in (errno.EINTR, errno.EAGAIN):
                    continue
                raise
            self.python_exits += 1
            self.python_exit_sites[_site(msg)] += 1
            if not self._handler.handle(self.vp, self.index, msg):
                self._state = VcpuState.PAUSED  # Running -- VM-level exit --> Paused; VM decides
                return
