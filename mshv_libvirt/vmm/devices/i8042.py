"""i8042 keyboard controller, just enough for Linux's probe and the classic reset line.

Ports (bus offsets): 0x60 data -> offset 0, 0x64 status/command -> offset 4 (register the device on
0x60 with length 5). There is no keyboard behind it: keyboard commands are ACKed and a reset/identify
answers like an MF2 keyboard, so Linux's probe finishes quickly instead of timing out. Command 0xFE
(pulse output line 0 = CPU reset) or writing the output port with bit 0 clear calls ``on_reset``.

Keys (``send-key``) arrive through :meth:`I8042.inject_keys` as scancodes of translated set 1, what the
guest reads from port 0x60 with the controller's default translation on; the keyboard's own buffer holds
at most ``KEY_BUFFER`` bytes, like a real keyboard's, and drops what does not fit.

The status register (port 0x64 reads, which change nothing) is also published to the compiled module's
memory after every change, where the vCPU run loop reads it (Linux's probe polls it thousands of times).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from mshv_libvirt._mshv import ffi

DATA = 0
STATUS_COMMAND = 4

STATUS_OBF = 0x01
STATUS_SYS = 0x04
STATUS_CMD = 0x08  # last write was to the command port
STATUS_UNLOCKED = 0x10
STATUS_AUX_OBF = 0x20

CMDBYTE_KBD_INT = 0x01
CMDBYTE_AUX_INT = 0x02
CMDBYTE_SYS = 0x04
CMDBYTE_KBD_DISABLE = 0x10
CMDBYTE_AUX_DISABLE = 0x20
CMDBYTE_XLATE = 0x40

CMD_READ_CMDBYTE = 0x20
CMD_WRITE_CMDBYTE = 0x60
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_OUTPORT = 0xD0
CMD_WRITE_OUTPORT = 0xD1
CMD_WRITE_KBD_OBUF = 0xD2
CMD_WRITE_AUX_OBUF = 0xD3
CMD_WRITE_AUX = 0xD4
CMD_PULSE_RESET = 0xFE

KBD_ACK = 0xFA
KBD_IRQ = 1
KEY_BUFFER = 64


class I8042:
    def __init__(self, on_reset: Callable[[], None], set_irq: Callable[[int, bool], None] | None = None) -> None:
        self._on_reset = on_reset
        self._set_irq = set_irq
        self._lock = threading.RLock()
        self._out: deque[int] = deque()
        self._status = STATUS_SYS | STATUS_UNLOCKED
        self._cmdbyte = CMDBYTE_SYS | CMDBYTE_XLATE | CMDBYTE_KBD_INT
        self._pending_cmd: int | None = None
        self._outport = 0x01  # bit 0: CPU not in reset
        self.reset_requested = False
        self._published: Any = ffi.new("uint8_t *", self._status)

    @property
    def status_handle(self) -> int:
        """Where the status byte is published, for the run loop's port table (lives as long as this object)."""
        return int(ffi.cast("uintptr_t", self._published))

    def _publish(self) -> None:
        self._published[0] = self._status | (STATUS_OBF if self._out else 0)

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset == DATA:
                value = self._out.popleft() if self._out else 0
                self._update_irq()
                self._publish()
                return value
            if offset == STATUS_COMMAND:
                return self._status | (STATUS_OBF if self._out else 0)
            return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        with self._lock:
            if offset == STATUS_COMMAND:
                self._status |= STATUS_CMD
                self._command(value)
            elif offset == DATA:
                self._status &= ~STATUS_CMD
                self._data(value)
            self._publish()

    def _command(self, cmd: int) -> None:
        self._pending_cmd = None
        if cmd == CMD_READ_CMDBYTE:
            self._push(self._cmdbyte)
        elif cmd in (
            CMD_WRITE_CMDBYTE,
            CMD_WRITE_OUTPORT,
            CMD_WRITE_KBD_OBUF,
            CMD_WRITE_AUX_OBUF,
            CMD_WRITE_AUX,
        ):
            self._pending_cmd = cmd
        elif cmd == CMD_SELF_TEST:
            self._push(0x55)
        elif cmd in (CMD_KBD_TEST, CMD_AUX_TEST):
            self._push(0x00)
        elif cmd == CMD_KBD_DISABLE:
            self._cmdbyte |= CMDBYTE_KBD_DISABLE
        elif cmd == CMD_KBD_ENABLE:
            self._cmdbyte &= ~CMDBYTE_KBD_DISABLE
        elif cmd == CMD_AUX_DISABLE:
            self._cmdbyte |= CMDBYTE_AUX_DISABLE
        elif cmd == CMD_AUX_ENABLE:
            self._cmdbyte &= ~CMDBYTE_AUX_DISABLE
        elif cmd == CMD_READ_OUTPORT:
            self._push(self._outport)
        elif 0xF0 <= cmd <= 0xFF and not cmd & 0x01:
            # Pulse output lines: a clear bit 0 pulses the CPU reset line (0xFE is the classic one).
            self._reset()

    def _data(self, value: int) -> None:
        cmd, self._pending_cmd = self._pending_cmd, None
        if cmd == CMD_WRITE_CMDBYTE:
            self._cmdbyte = value
            self._update_irq()
        elif cmd == CMD_WRITE_OUTPORT:
            self._outport = value
            if not value & 0x01:
                self._reset()
        elif cmd == CMD_WRITE_KBD_OBUF:
            self._push(value)
        elif cmd in (CMD_WRITE_AUX_OBUF, CMD_WRITE_AUX):
            pass  # no mouse: the probe sees no answer and gives up on AUX
        else:
            self._keyboard(value)

    def _keyboard(self, value: int) -> None:
        if value == 0xFF:  # reset: ACK + self-test passed
            self._push(KBD_ACK, 0xAA)
        elif value == 0xF2:  # identify: MF2 keyboard
            self._push(KBD_ACK, 0xAB, 0x83)
        elif value == 0xEE:  # echo
            self._push(0xEE)
        else:
            self._push(KBD_ACK)

    def inject_keys(self, scancodes: bytes) -> int:
        """Queue scancodes from the (virtual) keyboard; returns how many fit in its buffer."""
        with self._lock:
            room = max(0, KEY_BUFFER - len(self._out))
            accepted = scancodes[:room]
            if accepted:
                self._push(*accepted)
                self._publish()
            return len(accepted)

    def _push(self, *values: int) -> None:
        self._out.extend(values)
        self._update_irq()

    def _update_irq(self) -> None:
        if self._set_irq is not None:
            self._set_irq(KBD_IRQ, bool(self._out) and bool(self._cmdbyte & CMDBYTE_KBD_INT))

    def _reset(self) -> None:
        self.reset_requested = True
        self._on_reset()
