"""The CMOS RTC device through its two ports, as a guest drives it, on a clock the test controls.

Expected register values are written out from the MC146818A's documented formats (BCD/binary,
12/24 hour with bit 7 = PM, 1 = Sunday) for a known instant, not computed by the device's code.
"""

from __future__ import annotations

import calendar
import threading
import time

import pytest

from mshv_libvirt.vmm.devices import rtc as rtcmod
from mshv_libvirt.vmm.devices.rtc import CmosRtc

# Tuesday 2026-12-01 21:07:09 UTC
T0 = calendar.timegm((2026, 12, 1, 21, 7, 9))


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Irq:
    def __init__(self) -> None:
        self.level = False
        self.edges = 0

    def __call__(self, level: bool) -> None:
        if level and not self.level:
            self.edges += 1
        self.level = level


def make(t: float = T0 + 0.5, **kw: int) -> tuple[CmosRtc, Clock, Irq]:
    clock, irq = Clock(t), Irq()
    return CmosRtc(irq, clock=clock, timer=False, **kw), clock, irq


def rd(dev: CmosRtc, reg: int) -> int:
    dev.write(0, 1, reg)
    return dev.read(1, 1)


def wr(dev: CmosRtc, reg: int, value: int) -> None:
    dev.write(0, 1, reg)
    dev.write(1, 1, value)


def test_time_reads_as_bcd_24h_by_default() -> None:
    dev, _, _ = make()
    got = [rd(dev, r) for r in (0, 2, 4, 6, 7, 8, 9, 0x32)]
    # sec 09, min 07, hour 21, Tuesday = 3, day 01, month 12, year 26, century 20 (BCD)
    assert got == [0x09, 0x07, 0x21, 0x03, 0x01, 0x12, 0x26, 0x20]
    assert rd(dev, 0x0B) == 0x02 and rd(dev, 0x0D) == 0x80  # 24 hour, BCD; VRT


def test_binary_and_12_hour_formats() -> None:
    dev, _, _ = make()
    wr(dev, 0x0B, 0x04)  # binary, 12 hour
    assert [rd(dev, r) for r in (0, 2, 4, 9, 0x32)] == [9, 7, 0x80 | 9, 26, 20]  # 9 PM
    wr(dev, 0x0B, 0x00)  # BCD, 12 hour
    assert rd(dev, 4) == 0x89
    dev2, _, _ = make(calendar.timegm((2026, 12, 1, 0, 30, 0)))
    wr(dev2, 0x0B, 0x00)
    assert rd(dev2, 4) == 0x12  # midnight is 12 AM
    dev3, _, _ = make(calendar.timegm((2026, 12, 1, 12, 30, 0)))
    wr(dev3, 0x0B, 0x00)
    assert rd(dev3, 4) == 0x80 | 0x12  # noon is 12 PM


def test_the_clock_runs_with_the_host() -> None:
    dev, clock, _ = make()
    clock.t += 60 * 60 * 3  # three hours later: 00:07:09 on Wednesday the 2nd
    assert [rd(dev, r) for r in (0, 2, 4, 6, 7)] == [0x09, 0x07, 0x00, 0x04, 0x02]


def test_localtime_offset() -> None:
    dev, _, _ = make(utc_offset=5 * 3600 + 1800)  # +05:30: 02:37:09 on the 2nd
    assert [rd(dev, r) for r in (0, 2, 4, 7)] == [0x09, 0x37, 0x02, 0x02]


def test_set_freezes_and_the_guest_sets_the_time_as_linux_does() -> None:
    dev, clock, _ = make()
    wr(dev, 0x0B, 0x82)  # SET, 24 hour, BCD
    wr(dev, 0x0A, 0x70)  # divider held in reset (Linux's mc146818_set_time)
    for reg, value in ((0, 0x00), (2, 0x00), (4, 0x08), (7, 0x29), (8, 0x02), (9, 0x28), (0x32, 0x20)):
        wr(dev, reg, value)
    clock.t += 100  # frozen while SET
    assert [rd(dev, r) for r in (0, 2, 4, 7, 8, 9)] == [0x00, 0x00, 0x08, 0x29, 0x02, 0x28]
    wr(dev, 0x0A, 0x26)
    wr(dev, 0x0B, 0x02)  # runs again from 2028-02-29 08:00:00
    clock.t += 61
    assert [rd(dev, r) for r in (0, 2, 4, 6, 7, 8, 9)] == [0x01, 0x01, 0x08, 0x03, 0x29, 0x02, 0x28]  # a Tuesday
    assert dev.rtc_time() == pytest.approx(calendar.timegm((2028, 2, 29, 8, 1, 1)))


def test_a_field_no_calendar_has_keeps_the_time() -> None:
    dev, _, _ = make()
    wr(dev, 0x0B, 0x82)
    wr(dev, 8, 0x13)  # month 13
    wr(dev, 0x0B, 0x02)
    assert rd(dev, 8) == 0x12 and rd(dev, 9) == 0x26


def test_update_in_progress_in_the_244us_before_each_second() -> None:
    dev, clock, _ = make(T0 + 0.9998)
    assert rd(dev, 0x0A) == 0x80 | 0x26
    clock.t = T0 + 0.9997  # 300 us before
    assert rd(dev, 0x0A) == 0x26
    wr(dev, 0x0B, 0x82)  # no update while SET
    clock.t = T0 + 0.9999
    assert rd(dev, 0x0A) == 0x26


def test_index_port_keeps_the_nmi_mask_bit() -> None:
    dev, _, _ = make()
    dev.write(0, 1, 0x80 | 0x0D)
    assert dev.nmi_masked and dev.read(0, 1) == 0x8D
    assert dev.read(1, 1) == 0x80  # register D: the mask bit is not part of the index
    dev.write(0, 1, 0x0D)
    assert not dev.nmi_masked


def test_nvram_keeps_what_is_written_and_c_d_are_read_only() -> None:
    dev, _, _ = make()
    wr(dev, 0x10, 0x5A)
    wr(dev, 0x7F, 0xA5)
    wr(dev, 0x0D, 0x00)
    assert (rd(dev, 0x10), rd(dev, 0x7F), rd(dev, 0x0D)) == (0x5A, 0xA5, 0x80)


def test_update_flag_and_interrupt() -> None:
    dev, clock, irq = make()
    wr(dev, 0x0A, 0x20)  # no periodic rate (PF would be set at firmware's 1024 Hz)
    clock.t += 1
    assert rd(dev, 0x0C) == 0x10  # UF set without UIE, no IRQF
    assert irq.edges == 0
    wr(dev, 0x0B, 0x12)  # UIE
    clock.t += 1
    assert rd(dev, 0x0C) == 0x90 and irq.edges == 1 and not irq.level  # reading C drops the line
    assert rd(dev, 0x0C) == 0x00


def test_alarm_matches_with_dont_care_bytes() -> None:
    dev, clock, irq = make()
    wr(dev, 0x0A, 0x20)  # no periodic rate
    wr(dev, 0x0B, 0x22)  # AIE
    wr(dev, 1, 0x30)  # seconds alarm 30, minutes and hours don't care
    wr(dev, 3, 0xC0)
    wr(dev, 5, 0xFF)
    rd(dev, 0x0C)
    clock.t = T0 + 20.5  # 21:07:29
    assert rd(dev, 0x0C) == 0x10 and irq.edges == 0
    clock.t = T0 + 21.5  # 21:07:30
    assert rd(dev, 0x0C) == 0xB0 and irq.edges == 1
    wr(dev, 5, 0x22)  # hour alarm 22 (BCD): no match at 21:07:30 of the next minute
    clock.t += 60
    assert rd(dev, 0x0C) == 0x10


def test_periodic_rate_and_flag() -> None:
    assert [rtcmod.periodic_hz(rs) for rs in (0, 1, 2, 3, 6, 15)] == [0, 256, 128, 8192, 1024, 2]
    dev, clock, irq = make(T0 + 0.1)
    wr(dev, 0x0A, 0x2F)  # 2 Hz
    wr(dev, 0x0B, 0x42)  # PIE
    rd(dev, 0x0C)
    clock.t = T0 + 0.45
    assert rd(dev, 0x0C) == 0x00
    clock.t = T0 + 0.55
    assert rd(dev, 0x0C) == 0xC0 and irq.edges == 1


def test_periodic_flag_is_set_at_the_default_rate_without_its_enable() -> None:
    dev, clock, irq = make()
    assert rd(dev, 0x0A) == 0x26  # 1024 Hz, as firmware leaves it
    rd(dev, 0x0C)
    clock.t += 1 / 512
    assert rd(dev, 0x0C) == 0x40 and irq.edges == 0


def test_enabling_an_interrupt_for_a_pending_flag_raises_it() -> None:
    dev, clock, irq = make()
    clock.t += 1
    wr(dev, 0x0B, 0x12)  # UF pending from the second that passed: IRQF now
    assert irq.edges == 1 and irq.level


def test_state_round_trip() -> None:
    dev, _, _ = make()
    wr(dev, 0x0B, 0x06)  # binary 24 hour
    wr(dev, 0x20, 0x77)
    dev.write(0, 1, 0x8A)
    state = dev.to_dict()
    other, _, _ = make(T0 + 0.5)
    other.load_dict(state)
    assert other.to_dict() == state
    assert rd(other, 0x20) == 0x77 and rd(other, 0) == 9 and rd(other, 0x0B) == 0x06
    with pytest.raises(ValueError, match="version"):
        other.load_dict({**state, "version": 2})
    with pytest.raises(ValueError, match="CMOS bytes"):
        other.load_dict({**state, "cmos": "00"})


def test_timer_thread_delivers_update_interrupts_on_the_real_clock() -> None:
    irq = Irq()
    fired = threading.Event()

    def set_irq(level: bool) -> None:
        irq(level)
        if level:
            fired.set()

    dev = CmosRtc(set_irq)
    try:
        wr(dev, 0x0B, 0x12)  # UIE
        start = time.monotonic()
        assert fired.wait(timeout=3), "no update interrupt within 3 s"
        assert time.monotonic() - start <= 1.5
        assert rd(dev, 0x0C) & 0x90 == 0x90
    finally:
        dev.close()
    assert dev._thread is not None and not dev._thread.is_alive()
