"""16550A UART register model (COM1 at 0x3F8, IRQ 4 on a PC).

The registers live in C (abi/vmm/serial.c), so that the compiled run loop (vmm/runloop.py) serves the
guest's accesses without Python; this class is the same model's Python side: the accesses the loop hands
over, console input, and the events an access leaves for Python (:meth:`service`).

Output bytes go to an injected ``write`` callable (``io.BytesIO().write`` in tests, the pty and the
serial log in the VMM) or, once :meth:`attach_console` ran, from C straight to the console's pty and log
(the log's overflow at its cap comes back here to be rotated); input arrives through
:meth:`Serial16550.enqueue_input`; the interrupt line is reported through an injected
``set_irq(level)`` callback, called only when the level changes.

Transmission is instantaneous, so THR-empty and transmitter-empty are always set in LSR. The THRE
interrupt is re-armed by every THR write but the line only drops when the guest reads IIR (or
disables the interrupt): a guest that fills the FIFO from its handler gets one more interrupt per
batch, like a real 16550A whose FIFO drained, instead of one per byte.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

from mshv_libvirt._mshv import ffi, lib

# Register offsets
RBR_THR = 0
IER = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDA = 0x01
IER_THRE = 0x02
IER_RLS = 0x04
IER_MS = 0x08
IER_MASK = 0x0F

IIR_NONE = 0x01
IIR_MS = 0x00
IIR_THRE = 0x02
IIR_RDA = 0x04
IIR_RLS = 0x06
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80

RX_FIFO_SIZE = 64  # deeper than a 16550A's 16 so pasted input is not dropped while the guest is slow


# abi/vmm/serial.h: what an access left for Python.
EV_IRQ = 1
EV_OUTPUT = 2
EV_RX_ROOM = 4


class ConsoleSink(Protocol):
    """What :meth:`Serial16550.attach_console` needs (vmm/console.py's Console)."""

    def sink(self) -> tuple[int, int, int]: ...

    def write_log(self, data: bytes, written_elsewhere: int) -> int: ...


class Serial16550:
    def __init__(self, write: Callable[[bytes], object], set_irq: Callable[[bool], None] | None = None) -> None:
        self._write = write
        self._set_irq = set_irq
        handle = lib.mshv_serial_new()
        if handle == ffi.NULL:
            raise MemoryError("mshv_serial_new")
        self._s: Any = ffi.gc(handle, lib.mshv_serial_free)
        self._irq_lock = threading.Lock()
        self._out_lock = threading.Lock()
        self._irq_level = False
        self._console: ConsoleSink | None = None
        # The host found the FIFO full and stopped feeding it; once the guest has drained half of it,
        # on_rx_room (set by the VMM: a wakeup of its main loop) is called once, so input resumes at
        # once instead of at the main loop's next timeout, without a wakeup per byte read.
        self.on_rx_room: Callable[[], None] | None = None

    @property
    def handle(self) -> int:
        """The C model's address, for the run loop's port table (it lives as long as this object)."""
        return int(ffi.cast("uintptr_t", self._s))

    def attach_console(self, console: ConsoleSink) -> None:
        """From now on C writes transmitted bytes to the console's pty and log itself."""
        with self._out_lock:  # bytes taken before are Python's to write everywhere, after it only to the log
            pty, log, room = console.sink()
            lib.mshv_serial_set_sink(self._s, pty, log, room)  # writes out what is still buffered
            self._console = console

    # -- host side ------------------------------------------------------------------------------
    def enqueue_input(self, data: bytes) -> int:
        """Queue bytes typed on the console; returns how many fitted in the receive FIFO."""
        events = ffi.new("unsigned *")
        taken = int(lib.mshv_serial_enqueue(self._s, ffi.from_buffer("uint8_t[]", data), len(data), events))
        self.service(events[0])
        return taken

    def rx_space(self) -> int:
        return int(lib.mshv_serial_rx_space(self._s))

    @property
    def irq_level(self) -> bool:
        return self._irq_level

    def service(self, events: int) -> None:
        """Carry out what an access (here or in the run loop) left for Python."""
        if events & EV_OUTPUT:
            buf = ffi.new("uint8_t[]", 4096)
            with self._out_lock:
                while n := int(lib.mshv_serial_take_output(self._s, buf, 4096)):
                    data = ffi.buffer(buf, n)[:]
                    if self._console is None:
                        self._write(data)
                    else:  # the pty has these; the log was at its cap
                        written = int(lib.mshv_serial_log_sync(self._s, -1))
                        lib.mshv_serial_log_sync(self._s, self._console.write_log(data, written))
        if events & EV_IRQ:
            # The level now, not the one the access saw: accesses from several vCPUs may report out of order.
            with self._irq_lock:
                level = bool(lib.mshv_serial_irq_level(self._s))
                if level != self._irq_level:
                    self._irq_level = level
                    if self._set_irq is not None:
                        self._set_irq(level)
        if events & EV_RX_ROOM and self.on_rx_room is not None:
            self.on_rx_room()

    # -- guest side -----------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        events = ffi.new("unsigned *")
        value = 0
        for i in range(size):
            value |= int(lib.mshv_serial_read(self._s, offset + i, events)) << (8 * i)
        self.service(events[0])
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        events = ffi.new("unsigned *")
        for i in range(size):
            lib.mshv_serial_write(self._s, offset + i, (value >> (8 * i)) & 0xFF, events)
        self.service(events[0])
