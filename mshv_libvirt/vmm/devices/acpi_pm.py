"""ACPI fixed hardware: PM1a event/control blocks, PM timer and the reset register.

Layout (see ``vmm/acpi.py``, which publishes it in the FADT), relative to the block at 0x600:

    +0  PM1_STS  (16 bit, write 1 to clear)   +2  PM1_EN (16 bit)
    +4  PM1_CNT  (16 bit; SLP_TYP bits 10-12, SLP_EN bit 13 is write-only)
    +8  PM_TMR   (32 bit, 3.579545 MHz, read-only)

and a one-byte reset register at 0xCF9 (writing a value with bit 2 set resets, as on a PIIX).

The SCI is asserted while any enabled status bit is set. A power-button press sets PWRBTN_STS:
Linux sees the SCI and runs its power-button policy; the tiny test guest polls the bit instead.
``SLP_TYP = S5`` with ``SLP_EN`` calls ``on_poweroff``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from .. import acpi

PM1_STS = 0
PM1_EN = 2
PM1_CNT = 4
PM_TMR = 8
BLOCK_SIZE = 12

STS_TMR = 1 << 0
STS_GBL = 1 << 5
STS_PWRBTN = 1 << 8
STS_SLPBTN = 1 << 9
STS_RTC = 1 << 10
STS_WAK = 1 << 15
EN_MASK = STS_TMR | STS_GBL | STS_PWRBTN | STS_SLPBTN | STS_RTC

CNT_SCI_EN = 1 << 0
CNT_SLP_TYP_SHIFT = 10
CNT_SLP_TYP_MASK = 0x7 << CNT_SLP_TYP_SHIFT
CNT_SLP_EN = 1 << 13

PM_TIMER_HZ = 3_579_545
RESET_BIT = 0x04


class AcpiPm:
    def __init__(
        self,
        on_poweroff: Callable[[], None],
        on_reset: Callable[[], None],
        set_sci: Callable[[bool], None] | None = None,
        clock_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self._on_poweroff = on_poweroff
        self._on_reset = on_reset
        self._set_sci = set_sci
        self._clock_ns = clock_ns
        self._lock = threading.RLock()
        self._regs = bytearray(8)  # PM1_STS, PM1_EN, PM1_CNT, pad
        self._regs[PM1_CNT] = CNT_SCI_EN  # no SMI_CMD: the platform is always in ACPI mode
        self._sci_level = False
        self._epoch_ns = clock_ns()
        self.reset_register = _ResetRegister(self)

    # -- host side ------------------------------------------------------------------------------
    def press_power_button(self) -> None:
        """The "graceful shutdown" request: latch PWRBTN_STS and raise the SCI if enabled."""
        with self._lock:
            self._set16(PM1_STS, self._get16(PM1_STS) | STS_PWRBTN)
            self._update_sci()

    @property
    def status(self) -> int:
        with self._lock:
            return self._get16(PM1_STS)

    @property
    def timer_epoch_ns(self) -> int:
        """Where PM_TMR counts from, on ``clock_ns``'s clock (the compiled run loop reads PM_TMR itself)."""
        return self._epoch_ns

    @property
    def sci_level(self) -> bool:
        return self._sci_level

    # -- guest side -----------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if PM_TMR <= offset < PM_TMR + 4:
                ticks = (self._clock_ns() - self._epoch_ns) * PM_TIMER_HZ // 1_000_000_000
                return (ticks & 0xFFFFFFFF) >> (8 * (offset - PM_TMR))
            if offset + size > PM_TMR:
                return (1 << (8 * size)) - 1
            # SLP_EN never reads back set: write() clears it as soon as it has acted on it.
            return int.from_bytes(self._regs[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            for i in range(size):
                self._write_byte(offset + i, (value >> (8 * i)) & 0xFF)
            self._update_sci()
            cnt = self._get16(PM1_CNT)
            if cnt & CNT_SLP_EN:
                self._set16(PM1_CNT, cnt & ~CNT_SLP_EN)
                if (cnt & CNT_SLP_TYP_MASK) >> CNT_SLP_TYP_SHIFT == acpi.SLP_TYP_S5:
                    self._on_poweroff()
                # Other sleep states are not offered (the DSDT has only \_S5): ignore.

    def _write_byte(self, offset: int, value: int) -> None:
        if offset in (PM1_STS, PM1_STS + 1):
            self._regs[offset] &= ~value & 0xFF  # write 1 to clear
        elif offset in (PM1_EN, PM1_EN + 1):
            self._regs[offset] = value & (EN_MASK >> (8 * (offset - PM1_EN))) & 0xFF
        elif offset in (PM1_CNT, PM1_CNT + 1):
            if offset == PM1_CNT:
                value |= CNT_SCI_EN  # SCI_EN is hardwired on
            self._regs[offset] = value
        # PM_TMR is read-only

    def _get16(self, offset: int) -> int:
        return int.from_bytes(self._regs[offset : offset + 2], "little")

    def _set16(self, offset: int, value: int) -> None:
        self._regs[offset : offset + 2] = (value & 0xFFFF).to_bytes(2, "little")

    def _update_sci(self) -> None:
        level = bool(self._get16(PM1_STS) & self._get16(PM1_EN))
        if level != self._sci_level:
            self._sci_level = level
            if self._set_sci is not None:
                self._set_sci(level)

    def _reset_write(self, value: int) -> None:
        if value & RESET_BIT:
            self._on_reset()


class _ResetRegister:
    """The FADT RESET_REG (I/O port 0xCF9), a separate one-byte bus device."""

    def __init__(self, pm: AcpiPm) -> None:
        self._pm = pm

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self._pm._reset_write(value & 0xFF)
