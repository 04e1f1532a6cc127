"""The CMOS real-time clock (a Motorola MC146818A as PCs have it) on ports 0x70/0x71, IRQ 8.

Port 0x70 selects a register (bits 6-0) and carries the NMI mask (bit 7, kept and read back: there is
no NMI source to mask); port 0x71 reads or writes the selected register:

    0x00-0x09  seconds, seconds alarm, minutes, minutes alarm, hours, hours alarm, day of week
               (1 = Sunday), day of month, month, year (00-99)
    0x0A  A    UIP (bit 7, read-only), divider (bits 6-4; 010 = running), rate select (bits 3-0)
    0x0B  B    SET, PIE, AIE, UIE, SQWE, DM (1 = binary, 0 = BCD), 24/12 (1 = 24 hour), DSE
    0x0C  C    IRQF, PF, AF, UF; read-only, cleared by reading it (which also drops IRQ 8)
    0x0D  D    VRT (bit 7): the time and RAM are valid
    0x0E-0x7F  battery-backed RAM; 0x32 is the century (the FADT's CENTURY field says so)

The clock is the host's wall clock plus an offset: the guest's zone at start (``<clock offset='utc'>``:
0; ``'localtime'``: the VMM's local UTC offset at start, fixed from then on, as QEMU's
``-rtc base=localtime``) plus whatever the guest sets. Time fields read in the format register B
selects (BCD or binary, 12 hour with bit 7 = PM, or 24 hour). While SET is 1 the fields stop and take
the guest's writes (also while the divider, register A bits 6-4, is held in reset, as Linux does while
it sets the time); clearing SET starts the clock from them. UIP is 1 for the 244 us before each second
boundary (QEMU's window). Flags: UF at every second boundary, AF when the time matches the alarm
(an alarm byte with bits 7-6 set matches anything), PF at the periodic rate (32768 >> (RS - 1) Hz; RS 1
and 2 are 256 and 128 Hz). They are set whatever the enables say; IRQF (and an edge on IRQ 8) when an
enabled one is set. A timer thread raises them while an interrupt is enabled; otherwise they are
computed when register C is read.

The index register and the 128 CMOS bytes live in the compiled module's memory: the vCPU run loop
(vmm/runloop.py) serves index accesses and CMOS RAM reads itself; the clock's registers are read here.
"""

from __future__ import annotations

import datetime
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from mshv_libvirt._mshv import ffi, lib

UNIX_EPOCH = datetime.datetime(1970, 1, 1)  # _epoch reads the fields as UTC, as calendar.timegm would

INDEX_PORT = 0
DATA_PORT = 1
NMI_MASK = 0x80

SECONDS, SECONDS_ALARM, MINUTES, MINUTES_ALARM, HOURS, HOURS_ALARM = range(6)
DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR = range(6, 10)
REG_A, REG_B, REG_C, REG_D = range(0x0A, 0x0E)
CENTURY = 0x32
CMOS_SIZE = 128

A_UIP = 0x80
A_DV_MASK = 0x70
A_DV_RUNNING = 0x20  # 32.768 kHz time base, divider chain running
A_RS_MASK = 0x0F
B_SET, B_PIE, B_AIE, B_UIE, B_SQWE, B_DM_BINARY, B_24H, B_DSE = (1 << b for b in range(7, -1, -1))
C_IRQF, C_PF, C_AF, C_UF = 0x80, 0x40, 0x20, 0x10
D_VRT = 0x80
ALARM_DONT_CARE = 0xC0
HOUR_PM = 0x80

UIP_WINDOW = 244e-6
STATE_VERSION = 1
_FIELDS = (SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR, CENTURY)


def periodic_hz(rate_select: int) -> float:
    """Register A's RS bits as a frequency (0: no periodic interrupt)."""
    rs = rate_select & A_RS_MASK
    if rs == 0:
        return 0.0
    return float(32768 >> (rs + 6 if rs <= 2 else rs - 1))


def _bcd(value: int) -> int:
    return (value // 10) << 4 | value % 10


def _unbcd(value: int) -> int:
    return (value >> 4) * 10 + (value & 0x0F)


def local_utc_offset(now: float | None = None) -> int:
    """This process's local time minus UTC, in seconds (TZ, else /etc/localtime)."""
    return time.localtime(time.time() if now is None else now).tm_gmtoff


class CmosRtc:
    def __init__(
        self,
        set_irq: Callable[[bool], None],
        *,
        utc_offset: int = 0,
        clock: Callable[[], float] = time.time,
        timer: bool = True,
    ) -> None:
        self._set_irq = set_irq
        self._clock = clock
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        handle = lib.mshv_rtc_new()
        if handle == ffi.NULL:
            raise MemoryError("mshv_rtc_new")
        self._c: Any = ffi.gc(handle, lib.mshv_rtc_free)
        self._cmos = memoryview(ffi.buffer(lib.mshv_rtc_cmos(self._c), CMOS_SIZE))
        self._cmos[REG_A] = A_DV_RUNNING | 0x06  # what PC firmware leaves: 1024 Hz, not enabled
        self._cmos[REG_B] = B_24H
        self._cmos[REG_D] = D_VRT
        self._offset = float(utc_offset)  # RTC time = host wall clock + this
        self._stopped_at = 0.0  # the RTC time when the divider or SET stopped it
        self._stopped_fields: dict[int, int] = {}  # the time fields while stopped (guest-writable)
        self._flags = 0  # register C
        self._checked = self._now()  # RTC events before this time are already in _flags
        self._closed = False
        self._thread: threading.Thread | None = None
        if timer:
            self._thread = threading.Thread(target=self._run, name="rtc-timer", daemon=True)
            self._thread.start()

    @property
    def handle(self) -> int:
        """The C side's address, for the run loop's port table (it lives as long as this object)."""
        return int(ffi.cast("uintptr_t", self._c))

    @property
    def index(self) -> int:
        return int(lib.mshv_rtc_index(self._c)) & 0x7F

    @index.setter
    def index(self, value: int) -> None:
        lib.mshv_rtc_set_index(self._c, (value & 0x7F) | (NMI_MASK if self.nmi_masked else 0))

    @property
    def nmi_masked(self) -> bool:
        return bool(lib.mshv_rtc_index(self._c) & NMI_MASK)

    @nmi_masked.setter
    def nmi_masked(self, value: bool) -> None:
        lib.mshv_rtc_set_index(self._c, self.index | (NMI_MASK if value else 0))

    # -- the clock ---------------------------------------------------------------------------------
    def _now(self) -> float:
        return self._clock() + self._offset

    def _running(self) -> bool:
        return not self._cmos[REG_B] & B_SET and self._cmos[REG_A] & A_DV_MASK == A_DV_RUNNING

    def rtc_time(self) -> float:
        """The clock now, as seconds since 1970 in the guest's zone (while stopped: what the fields
        say, or the time it stopped at if they name no valid date)."""
        with self._lock:
            return self._now() if self._running() else self._stopped_time()

    def _stopped_time(self) -> float:
        epoch = self._epoch(self._stopped_fields)
        return self._stopped_at if epoch is None else float(epoch)

    def _encode(self, value: int, *, hours: bool = False) -> int:
        b = self._cmos[REG_B]
        pm = 0
        if hours and not b & B_24H:
            pm = HOUR_PM if value >= 12 else 0
            value = value % 12 or 12
        return (value if b & B_DM_BINARY else _bcd(value)) | pm

    def _decode(self, raw: int, *, hours: bool = False) -> int:
        b = self._cmos[REG_B]
        pm = hours and not b & B_24H and raw & HOUR_PM
        if hours and not b & B_24H:
            raw &= ~HOUR_PM
        value = raw if b & B_DM_BINARY else _unbcd(raw)
        if hours and not b & B_24H:
            value = value % 12 + (12 if pm else 0)
        return value

    def _fields(self, when: float) -> dict[int, int]:
        t = time.gmtime(math.floor(when))
        return {
            SECONDS: t.tm_sec,
            MINUTES: t.tm_min,
            HOURS: t.tm_hour,
            DAY_OF_WEEK: (t.tm_wday + 1) % 7 + 1,  # tm_wday 0 = Monday; the RTC's 1 = Sunday
            DAY_OF_MONTH: t.tm_mday,
            MONTH: t.tm_mon,
            YEAR: t.tm_year % 100,
            CENTURY: t.tm_year // 100,
        }

    def _set_field(self, reg: int, raw: int) -> None:
        """A guest write to a time field. While stopped the fields are registers of their own (Linux
        writes them one by one: Feb 29 may be written while the month still says December); running,
        the clock takes the new field at once, unless no calendar has the result."""
        value = self._decode(raw, hours=reg == HOURS)
        if not self._running():
            self._stopped_fields[reg] = value
            return
        fields = self._fields(self._now())
        fields[reg] = value
        new = self._epoch(fields)
        if new is not None:
            now = self._now()
            self._offset += new - math.floor(now)
            self._checked = self._now()

    @staticmethod
    def _epoch(f: dict[int, int]) -> int | None:
        """The fields as seconds since 1970 (the day of week follows the date), None if invalid."""
        try:
            when = datetime.datetime(
                f[CENTURY] * 100 + f[YEAR], f[MONTH], f[DAY_OF_MONTH], f[HOURS], f[MINUTES], f[SECONDS]
            )
        except ValueError:
            return None
        return (when - UNIX_EPOCH) // datetime.timedelta(seconds=1)  # calendar.timegm without its imports

    # -- events (register C) ---------------------------------------------------------------------
    def _alarm_matches(self, when: int) -> bool:
        f = self._fields(when)
        for alarm, field in ((SECONDS_ALARM, SECONDS), (MINUTES_ALARM, MINUTES), (HOURS_ALARM, HOURS)):
            raw = self._cmos[alarm]
            if raw & ALARM_DONT_CARE == ALARM_DONT_CARE:
                continue
            if self._decode(raw, hours=field == HOURS) != f[field]:
                return False
        return True

    def _advance(self) -> None:
        """Account for the RTC events between the last check and now; raise IRQ 8 on a new IRQF."""
        now = self._now()
        last, self._checked = self._checked, now
        if not self._running() or now <= last:
            return
        flags = 0
        first, final = math.floor(last) + 1, math.floor(now)  # second boundaries crossed
        if first <= final:
            flags |= C_UF
            # Every alarm pattern matches some second of any day: past a day the scan is moot.
            if final - first >= 86400 or any(self._alarm_matches(s) for s in range(first, final + 1)):
                flags |= C_AF
        hz = periodic_hz(self._cmos[REG_A])
        if hz and math.floor(now * hz) > math.floor(last * hz):
            flags |= C_PF
        self._raise(flags)

    def _raise(self, flags: int) -> None:
        self._flags |= flags
        enabled = self._cmos[REG_B] & (B_PIE | B_AIE | B_UIE)  # the enables line up with PF/AF/UF
        if self._flags & enabled and not self._flags & C_IRQF:
            self._flags |= C_IRQF
            self._set_irq(True)

    def _next_event(self) -> float | None:
        """Seconds of host time until the next enabled event, or None when none is enabled."""
        b = self._cmos[REG_B]
        if not self._running() or not b & (B_PIE | B_AIE | B_UIE):
            return None
        now = self._now()
        period = 1.0
        if b & B_PIE and (hz := periodic_hz(self._cmos[REG_A])):
            period = 1.0 / hz
        elif not b & (B_AIE | B_UIE):
            return None
        return max(0.0, (math.floor(now / period) + 1) * period - now)

    def _run(self) -> None:
        with self._lock:
            while not self._closed:
                self._advance()
                delay = self._next_event()
                self._wake.wait(timeout=None if delay is None else delay + 1e-6)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wake.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    # -- ports -----------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset == INDEX_PORT:
                return int(lib.mshv_rtc_index(self._c))
            return self._read_register(self.index)

    def write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            if offset == INDEX_PORT:
                lib.mshv_rtc_set_index(self._c, value & 0xFF)  # the register and the NMI mask bit
            else:
                self._write_register(self.index, value & 0xFF)
                self._wake.notify_all()

    def _read_register(self, reg: int) -> int:
        if reg in _FIELDS:
            fields = self._fields(self._now()) if self._running() else self._stopped_fields
            return self._encode(fields[reg], hours=reg == HOURS)
        if reg == REG_A:
            a = self._cmos[REG_A] & ~A_UIP
            if self._running():
                now = self._now()
                if math.floor(now + UIP_WINDOW) > math.floor(now):
                    a |= A_UIP
            return a
        if reg == REG_C:
            self._advance()
            value, self._flags = self._flags, 0
            if value & C_IRQF:
                self._set_irq(False)
            return value
        if reg == REG_D:
            return D_VRT
        return self._cmos[reg]

    def _write_register(self, reg: int, value: int) -> None:
        if reg in _FIELDS:
            self._set_field(reg, value)
        elif reg in (REG_A, REG_B):
            self._advance()
            was_running = self._running()
            if reg == REG_A:
                self._cmos[REG_A] = value & ~A_UIP
            else:
                self._cmos[REG_B] = value & ~(B_UIE if value & B_SET else 0)  # SET clears UIE (datasheet)
            running = self._running()
            if was_running and not running:  # SET (or a divider reset) stops the fields
                self._stopped_at = float(math.floor(self._now()))
                self._stopped_fields = self._fields(self._stopped_at)
            elif running and not was_running:  # and the clock restarts from them, at the second
                self._offset = self._stopped_time() - self._clock()
                self._checked = self._now()
            self._raise(0)  # a flag already set whose enable just came on
        elif reg in (REG_C, REG_D):
            pass  # read-only
        else:
            self._cmos[reg] = value

    # -- state -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Everything a restore needs; the clock is kept as an offset from the host's UTC, so a guest
        restored later reads the time that passed (as a battery-backed clock does)."""
        with self._lock:
            return {
                "version": STATE_VERSION,
                "cmos": self._cmos.hex(),
                "index": self.index,
                "nmi_masked": self.nmi_masked,
                "offset": self._offset,
                "stopped_at": self._stopped_at,
                "stopped_fields": {f"{k:02x}": v for k, v in sorted(self._stopped_fields.items())},
                "flags": self._flags,
            }

    def load_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"RTC state version {state.get('version')!r} is not {STATE_VERSION}")
        cmos = bytes.fromhex(state["cmos"])
        if len(cmos) != CMOS_SIZE:
            raise ValueError(f"RTC state has {len(cmos)} CMOS bytes, not {CMOS_SIZE}")
        stopped_fields = {int(k, 16): int(v) for k, v in state["stopped_fields"].items()}
        if stopped_fields and set(stopped_fields) != set(_FIELDS):
            raise ValueError(f"RTC state's stopped fields are {sorted(stopped_fields)}, not {sorted(_FIELDS)}")
        with self._lock:
            self._cmos[:] = cmos
            lib.mshv_rtc_set_index(self._c, (int(state["index"]) & 0x7F) | (NMI_MASK if state["nmi_masked"] else 0))
            self._offset = float(state["offset"])
            self._stopped_at = float(state["stopped_at"])
            self._stopped_fields = stopped_fields
            if not self._running() and not stopped_fields:
                self._stopped_fields = self._fields(self._stopped_at)
            self._flags = int(state["flags"]) & 0xF0
            self._checked = self._now()
            self._set_irq(bool(self._flags & C_IRQF))
            self._wake.notify_all()
