"""16550A UART register model (COM1 at 0x3F8, IRQ 4 on a PC).

Output bytes go to an injected ``write`` callable (``io.BytesIO().write`` in tests, the pty and the
serial log in the VMM); input arrives through :meth:`Serial16550.enqueue_input`; the interrupt line
is reported through an injected ``set_irq(level)`` callback, called only when the level changes.

Transmission is instantaneous, so THR-empty and transmitter-empty are always set in LSR. The THRE
interrupt is re-armed by every THR write but the line only drops when the guest reads IIR (or
disables the interrupt): a guest that fills the FIFO from its handler gets one more interrupt per
batch, like a real 16550A whose FIFO drained, instead of one per byte.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

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


class Serial16550:
    def __init__(self, write: Callable[[bytes], object], set_irq: Callable[[bool], None] | None = None) -> None:
        self._write = write
        self._set_irq = set_irq
        self._lock = threading.RLock()
        self._rx: deque[int] = deque()
        self._ier = 0
        self._lcr = 0x03  # 8N1
        self._mcr = MCR_OUT2  # firmware leaves OUT2 set so the IRQ reaches the interrupt controller
        self._scr = 0
        self._dll = 0x0C  # 9600 baud
        self._dlm = 0
        self._fcr = 0
        self._lsr_errors = 0
        self._thre_pending = True
        self._irq_level = False
        # The host found the FIFO full and stopped feeding it; once the guest has drained half of it,
        # on_rx_room (set by the VMM: a wakeup of its main loop) is called once, so input resumes at
        # once instead of at the main loop's next timeout, without a wakeup per byte read.
        self._host_waiting = False
        self.on_rx_room: Callable[[], None] | None = None

    # -- host side ------------------------------------------------------------------------------
    def enqueue_input(self, data: bytes) -> int:
        """Queue bytes typed on the console; returns how many fitted in the receive FIFO."""
        with self._lock:
            room = RX_FIFO_SIZE - len(self._rx)
            taken = data[:room]
            self._rx.extend(taken)
            if len(taken) < len(data):
                self._lsr_errors |= LSR_OE
            self._update_irq()
            return len(taken)

    def rx_space(self) -> int:
        with self._lock:
            room = RX_FIFO_SIZE - len(self._rx)
            if room == 0:
                self._host_waiting = True
            return room

    @property
    def irq_level(self) -> bool:
        return self._irq_level

    # -- guest side -----------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        value = 0
        for i in range(size):
            value |= self._read_byte(offset + i) << (8 * i)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            self._write_byte(offset + i, (value >> (8 * i)) & 0xFF)

    def _read_byte(self, offset: int) -> int:
        with self._lock:
            dlab = bool(self._lcr & LCR_DLAB)
            if offset == RBR_THR:
                if dlab:
                    return self._dll
                value = self._rx.popleft() if self._rx else 0
                self._update_irq()
                if self._host_waiting and len(self._rx) <= RX_FIFO_SIZE // 2:
                    self._host_waiting = False
                    if self.on_rx_room is not None:
                        self.on_rx_room()
                return value
            if offset == IER:
                return self._dlm if dlab else self._ier
            if offset == IIR_FCR:
                iir = self._pending_iir()
                if iir == IIR_THRE:
                    self._thre_pending = False  # reading IIR acknowledges THRE
                    self._update_irq()
                return iir | (IIR_FIFO_ENABLED if self._fcr & FCR_ENABLE else 0)
            if offset == LCR:
                return self._lcr
            if offset == MCR:
                return self._mcr
            if offset == LSR:
                lsr = LSR_THRE | LSR_TEMT | self._lsr_errors | (LSR_DR if self._rx else 0)
                self._lsr_errors = 0
                self._update_irq()
                return lsr
            if offset == MSR:
                return self._msr()
            if offset == SCR:
                return self._scr
            return 0xFF

    def _write_byte(self, offset: int, value: int) -> None:
        with self._lock:
            dlab = bool(self._lcr & LCR_DLAB)
            if offset == RBR_THR:
                if dlab:
                    self._dll = value
                    return
                if self._mcr & MCR_LOOP:
                    if len(self._rx) < RX_FIFO_SIZE:
                        self._rx.append(value)
                    else:
                        self._lsr_errors |= LSR_OE
                else:
                    self._write(bytes([value]))
                self._thre_pending = True
                self._update_irq()
            elif offset == IER:
                if dlab:
                    self._dlm = value
                    return
                enabling_thre = not self._ier & IER_THRE and value & IER_THRE
                self._ier = value & IER_MASK
                if enabling_thre:
                    self._thre_pending = True  # THR is empty, so enabling THRE raises it at once
                self._update_irq()
            elif offset == IIR_FCR:
                self._fcr = value & 0xC9
                if value & FCR_CLEAR_RX:
                    self._rx.clear()
                self._update_irq()
            elif offset == LCR:
                self._lcr = value
            elif offset == MCR:
                self._mcr = value & MCR_MASK
                self._update_irq()
            elif offset == SCR:
                self._scr = value
            # LSR and MSR are read-only

    def _msr(self) -> int:
        if self._mcr & MCR_LOOP:
            # Loopback wires DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD (Linux's autoconfig checks this).
            m = self._mcr
            return (
                (MSR_CTS if m & MCR_RTS else 0)
                | (MSR_DSR if m & MCR_DTR else 0)
                | (MSR_RI if m & MCR_OUT1 else 0)
                | (MSR_DCD if m & MCR_OUT2 else 0)
            )
        return MSR_DCD | MSR_DSR | MSR_CTS

    def _pending_iir(self) -> int:
        if self._ier & IER_RLS and self._lsr_errors:
            return IIR_RLS
        if self._ier & IER_RDA and self._rx:
            return IIR_RDA
        if self._ier & IER_THRE and self._thre_pending:
            return IIR_THRE
        return IIR_NONE

    def _update_irq(self) -> None:
        # OUT2 gates the UART's interrupt output on PCs; loopback disconnects it.
        level = self._pending_iir() != IIR_NONE and bool(self._mcr & MCR_OUT2) and not self._mcr & MCR_LOOP
        if level != self._irq_level:
            self._irq_level = level
            if self._set_irq is not None:
                self._set_irq(level)
