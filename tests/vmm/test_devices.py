"""Device register models, driven through their bus interface with injected I/O."""

from __future__ import annotations

import io

import pytest

from mshv_libvirt.vmm import acpi
from mshv_libvirt.vmm.devices import acpi_pm, i8042, ioapic, serial
from mshv_libvirt.vmm.devices.bus import Bus, BusConflictError


class Irq:
    def __init__(self) -> None:
        self.levels: list[bool] = []

    def __call__(self, level: bool) -> None:
        self.levels.append(level)

    @property
    def level(self) -> bool:
        return bool(self.levels) and self.levels[-1]


# ---- bus -----------------------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int, int]] = []

    def read(self, offset: int, size: int) -> int:
        self.calls.append(("r", offset, size, 0))
        return 0x1234_5678

    def write(self, offset: int, size: int, value: int) -> None:
        self.calls.append(("w", offset, size, value))


def test_bus_dispatches_by_range_and_floats_high_elsewhere() -> None:
    bus = Bus("pio")
    dev = Recorder()
    bus.register(0x3F8, 8, dev)
    assert bus.read(0x3FD, 1) == 0x78  # masked to the access size
    bus.write(0x3F8, 1, 0x141)
    assert dev.calls == [("r", 5, 1, 0), ("w", 0, 1, 0x41)]
    assert bus.read(0x20, 1) == 0xFF
    assert bus.read(0x20, 4) == 0xFFFFFFFF
    assert bus.read(0x3FF, 2) == 0xFFFF  # straddles the end: nobody owns it
    with pytest.raises(BusConflictError):
        bus.register(0x3FC, 8, Recorder())
    with pytest.raises(BusConflictError):
        bus.register(0x3F0, 9, Recorder())
    bus.register(0x400, 1, Recorder())


# ---- 16550 ---------------------------------------------------------------------------------------


def test_serial_transmits_and_reports_thr_empty() -> None:
    out = io.BytesIO()
    uart = serial.Serial16550(out.write)
    for ch in b"hi\n":
        uart.write(serial.RBR_THR, 1, ch)
    assert out.getvalue() == b"hi\n"
    assert uart.read(serial.LSR, 1) & (serial.LSR_THRE | serial.LSR_TEMT) == 0x60


def test_serial_receive_fifo_and_data_ready() -> None:
    uart = serial.Serial16550(io.BytesIO().write)
    assert uart.read(serial.LSR, 1) & serial.LSR_DR == 0
    assert uart.enqueue_input(b"ab") == 2
    assert uart.read(serial.LSR, 1) & serial.LSR_DR
    assert uart.read(serial.RBR_THR, 1) == ord("a")
    assert uart.read(serial.RBR_THR, 1) == ord("b")
    assert uart.read(serial.LSR, 1) & serial.LSR_DR == 0
    assert uart.enqueue_input(b"x" * 100) == serial.RX_FIFO_SIZE
    assert uart.read(serial.LSR, 1) & serial.LSR_OE  # overrun reported once
    assert uart.read(serial.LSR, 1) & serial.LSR_OE == 0


def test_serial_divisor_latch_and_scratch() -> None:
    uart = serial.Serial16550(io.BytesIO().write)
    uart.write(serial.LCR, 1, 0x83)
    uart.write(serial.RBR_THR, 1, 0x01)
    uart.write(serial.IER, 1, 0x00)
    assert uart.read(serial.RBR_THR, 1) == 0x01
    uart.write(serial.LCR, 1, 0x03)
    uart.write(serial.SCR, 1, 0x5A)
    assert uart.read(serial.SCR, 1) == 0x5A
    uart.write(serial.IER, 1, 0xFF)
    assert uart.read(serial.IER, 1) == 0x0F  # Linux's autoconfig checks the top bits read 0


def test_serial_interrupts_rda_and_thre() -> None:
    irq = Irq()
    out = io.BytesIO()
    uart = serial.Serial16550(out.write, irq)
    assert uart.read(serial.IIR_FCR, 1) == serial.IIR_NONE
    uart.write(serial.IER, 1, serial.IER_RDA)
    uart.enqueue_input(b"z")
    assert irq.level
    assert uart.read(serial.IIR_FCR, 1) == serial.IIR_RDA
    uart.read(serial.RBR_THR, 1)
    assert not irq.level
    # Enabling THRE with an empty THR raises it at once; reading IIR acknowledges it.
    uart.write(serial.IER, 1, serial.IER_THRE)
    assert irq.level
    assert uart.read(serial.IIR_FCR, 1) == serial.IIR_THRE
    assert not irq.level
    # A write re-arms it (the byte went out instantly): one edge per batch, not per byte.
    uart.write(serial.RBR_THR, 1, ord("a"))
    uart.write(serial.RBR_THR, 1, ord("b"))
    assert irq.levels.count(True) == 3
    assert out.getvalue() == b"ab"


def test_serial_out2_gates_the_interrupt_and_fifo_bits() -> None:
    irq = Irq()
    uart = serial.Serial16550(io.BytesIO().write, irq)
    uart.write(serial.MCR, 1, 0)
    uart.write(serial.IER, 1, serial.IER_RDA)
    uart.enqueue_input(b"q")
    assert not irq.level
    uart.write(serial.MCR, 1, serial.MCR_OUT2)
    assert irq.level
    uart.write(serial.IIR_FCR, 1, serial.FCR_ENABLE)
    assert uart.read(serial.IIR_FCR, 1) & 0xC0 == 0xC0
    uart.write(serial.IIR_FCR, 1, serial.FCR_ENABLE | serial.FCR_CLEAR_RX)
    assert uart.read(serial.LSR, 1) & serial.LSR_DR == 0


def test_serial_loopback() -> None:
    out = io.BytesIO()
    uart = serial.Serial16550(out.write)
    uart.write(serial.MCR, 1, serial.MCR_LOOP | 0x0A)  # RTS + OUT2, as Linux's probe does
    assert uart.read(serial.MSR, 1) & 0xF0 == 0x90
    uart.write(serial.RBR_THR, 1, 0x55)
    assert out.getvalue() == b""
    assert uart.read(serial.RBR_THR, 1) == 0x55
    uart.write(serial.MCR, 1, 0)
    assert uart.read(serial.MSR, 1) == serial.MSR_DCD | serial.MSR_DSR | serial.MSR_CTS


# ---- IOAPIC --------------------------------------------------------------------------------------


class Sink:
    def __init__(self) -> None:
        self.routes: dict[int, ioapic.MsiMessage | None] = {}
        self.fired: list[int] = []

    def route(self, pin: int, msi: ioapic.MsiMessage | None) -> None:
        self.routes[pin] = msi

    def fire(self, pin: int) -> None:
        self.fired.append(pin)


def program(dev: ioapic.IoApic, pin: int, low: int, high: int = 0) -> None:
    dev.write(ioapic.IOREGSEL, 4, ioapic.REG_REDTBL + 2 * pin + 1)
    dev.write(ioapic.IOWIN, 4, high)
    dev.write(ioapic.IOREGSEL, 4, ioapic.REG_REDTBL + 2 * pin)
    dev.write(ioapic.IOWIN, 4, low)


def test_ioapic_identity_registers() -> None:
    dev = ioapic.IoApic(Sink(), ioapic_id=2)
    dev.write(ioapic.IOREGSEL, 4, ioapic.REG_VER)
    assert dev.read(ioapic.IOWIN, 4) == 0x00170020
    dev.write(ioapic.IOREGSEL, 4, ioapic.REG_ID)
    assert dev.read(ioapic.IOWIN, 4) == 2 << 24
    assert dev.read(ioapic.IOREGSEL, 4) == ioapic.REG_ID
    for pin in range(24):
        assert dev.redirection_entry(pin) & ioapic.RTE_MASKED


def test_ioapic_edge_pin_routes_and_fires_on_rising_edge() -> None:
    sink = Sink()
    dev = ioapic.IoApic(sink)
    program(dev, 4, 0x31, high=1 << 24)  # vector 0x31, fixed, physical, edge, dest APIC 1
    assert sink.routes[4] == ioapic.MsiMessage(0xFEE01000, 0, 0x31)
    dev.set_irq(4, True)
    dev.set_irq(4, True)  # no new edge
    dev.set_irq(4, False)
    dev.set_irq(4, True)
    assert sink.fired == [4, 4]
    dev.write(ioapic.IOREGSEL, 4, ioapic.REG_REDTBL + 8)
    assert dev.read(ioapic.IOWIN, 4) == 0x31


def test_ioapic_masked_pin_does_not_fire() -> None:
    sink = Sink()
    dev = ioapic.IoApic(sink)
    program(dev, 1, 0x41 | ioapic.RTE_MASKED)
    assert sink.routes[1] is None
    dev.set_irq(1, True)
    assert sink.fired == []


def test_ioapic_level_pin_remote_irr_and_eoi() -> None:
    sink = Sink()
    dev = ioapic.IoApic(sink)
    program(dev, 9, 0x29 | ioapic.RTE_LEVEL | ioapic.RTE_DEST_LOGICAL, high=0x03 << 24)
    msi = sink.routes[9]
    assert msi is not None and msi.address_lo == 0xFEE03004 and msi.data == 0xC029
    dev.set_irq(9, True)
    assert sink.fired == [9]
    assert dev.redirection_entry(9) & ioapic.RTE_REMOTE_IRR
    dev.set_irq(9, True)  # still in service: no redelivery
    assert sink.fired == [9]
    dev.end_of_interrupt(0x29)  # line still high: delivered again
    assert sink.fired == [9, 9]
    dev.set_irq(9, False)
    dev.write(ioapic.EOI, 4, 0x29)  # the directed-EOI register
    assert sink.fired == [9, 9]
    assert not dev.redirection_entry(9) & ioapic.RTE_REMOTE_IRR


def test_ioapic_remote_irr_is_read_only() -> None:
    sink = Sink()
    dev = ioapic.IoApic(sink)
    program(dev, 3, 0x33 | ioapic.RTE_LEVEL | ioapic.RTE_REMOTE_IRR | ioapic.RTE_DELIVERY_STATUS)
    assert not dev.redirection_entry(3) & (ioapic.RTE_REMOTE_IRR | ioapic.RTE_DELIVERY_STATUS)


def test_ioapic_unmasking_a_high_level_pin_delivers() -> None:
    sink = Sink()
    dev = ioapic.IoApic(sink)
    program(dev, 5, 0x35 | ioapic.RTE_LEVEL | ioapic.RTE_MASKED)
    dev.set_irq(5, True)
    assert sink.fired == []
    program(dev, 5, 0x35 | ioapic.RTE_LEVEL)
    assert sink.fired == [5]


# ---- i8042 ---------------------------------------------------------------------------------------


def test_i8042_reset_pulse_requests_reboot() -> None:
    resets: list[int] = []
    dev = i8042.I8042(lambda: resets.append(1))
    dev.write(i8042.STATUS_COMMAND, 1, 0xFE)
    assert resets == [1]
    dev.write(i8042.STATUS_COMMAND, 1, 0xFF)  # bit 0 set: pulses nothing
    assert resets == [1]
    dev.write(i8042.STATUS_COMMAND, 1, i8042.CMD_WRITE_OUTPORT)
    dev.write(i8042.DATA, 1, 0x00)
    assert resets == [1, 1]


def test_i8042_probe_sequence_answers() -> None:
    irqs: list[tuple[int, bool]] = []
    dev = i8042.I8042(lambda: None, lambda pin, level: irqs.append((pin, level)))
    assert dev.read(i8042.STATUS_COMMAND, 1) & i8042.STATUS_OBF == 0
    dev.write(i8042.STATUS_COMMAND, 1, i8042.CMD_SELF_TEST)
    assert dev.read(i8042.STATUS_COMMAND, 1) & i8042.STATUS_OBF
    assert dev.read(i8042.DATA, 1) == 0x55
    dev.write(i8042.STATUS_COMMAND, 1, i8042.CMD_READ_CMDBYTE)
    cmdbyte = dev.read(i8042.DATA, 1)
    dev.write(i8042.STATUS_COMMAND, 1, i8042.CMD_WRITE_CMDBYTE)
    dev.write(i8042.DATA, 1, cmdbyte | i8042.CMDBYTE_KBD_INT)
    dev.write(i8042.DATA, 1, 0xF2)  # keyboard identify
    assert [dev.read(i8042.DATA, 1) for _ in range(3)] == [0xFA, 0xAB, 0x83]
    assert (1, True) in irqs and irqs[-1] == (1, False)


# ---- ACPI PM -------------------------------------------------------------------------------------


def make_pm(now: list[int] | None = None) -> tuple[acpi_pm.AcpiPm, list[str], Irq]:
    events: list[str] = []
    sci = Irq()
    clock = now if now is not None else [0]
    pm = acpi_pm.AcpiPm(lambda: events.append("off"), lambda: events.append("reset"), sci, lambda: clock[0])
    return pm, events, sci


def test_acpi_pm_s5_powers_off() -> None:
    pm, events, _ = make_pm()
    assert pm.read(acpi_pm.PM1_CNT, 2) & acpi_pm.CNT_SCI_EN  # ACPI mode is always on
    pm.write(acpi_pm.PM1_CNT, 2, acpi.SLP_TYP_S5 << 10)  # SLP_TYP without SLP_EN: nothing
    assert events == []
    pm.write(acpi_pm.PM1_CNT, 2, (acpi.SLP_TYP_S5 << 10) | acpi_pm.CNT_SLP_EN)
    assert events == ["off"]
    assert not pm.read(acpi_pm.PM1_CNT, 2) & acpi_pm.CNT_SLP_EN
    pm.write(acpi_pm.PM1_CNT, 2, (1 << 10) | acpi_pm.CNT_SLP_EN)  # S1 is not offered
    assert events == ["off"]


def test_acpi_pm_power_button_status_enable_and_sci() -> None:
    pm, _, sci = make_pm()
    pm.press_power_button()
    assert pm.read(acpi_pm.PM1_STS, 2) & acpi_pm.STS_PWRBTN
    assert not sci.level  # not enabled yet
    pm.write(acpi_pm.PM1_EN, 2, acpi_pm.STS_PWRBTN)
    assert sci.level
    assert pm.read(acpi_pm.PM1_EN, 2) == acpi_pm.STS_PWRBTN
    pm.write(acpi_pm.PM1_STS, 2, acpi_pm.STS_PWRBTN)  # write 1 to clear
    assert not pm.read(acpi_pm.PM1_STS, 2) & acpi_pm.STS_PWRBTN
    assert not sci.level
    # Byte access to the high byte of PM1_STS, as some guests do.
    pm.press_power_button()
    assert pm.read(acpi_pm.PM1_STS + 1, 1) == acpi_pm.STS_PWRBTN >> 8
    pm.write(acpi_pm.PM1_STS + 1, 1, 0x01)
    assert pm.status == 0


def test_acpi_pm_timer_and_reset_register() -> None:
    clock = [0]
    pm, events, _ = make_pm(clock)
    clock[0] = 1_000_000_000
    assert pm.read(acpi_pm.PM_TMR, 4) == acpi_pm.PM_TIMER_HZ
    pm.write(acpi_pm.PM_TMR, 4, 0)  # read-only
    assert pm.read(acpi_pm.PM_TMR, 4) == acpi_pm.PM_TIMER_HZ
    pm.reset_register.write(0, 1, 0x02)
    assert events == []
    pm.reset_register.write(0, 1, acpi.RESET_VALUE)
    assert events == ["reset"]


def test_serial_wakes_the_host_once_when_a_full_fifo_is_half_drained() -> None:
    # The VMM stops reading the console while the FIFO is full; the UART calls on_rx_room once the guest
    # has read half of the 64-byte FIFO (not per byte, not before the host found it full).
    uart = serial.Serial16550(io.BytesIO().write)
    wakes: list[int] = []
    uart.on_rx_room = lambda: wakes.append(len(wakes))
    assert uart.enqueue_input(b"x" * 64) == 64
    for _ in range(40):
        uart.read(serial.RBR_THR, 1)
    assert wakes == []  # the host never found it full
    uart.enqueue_input(b"y" * 64)
    assert uart.rx_space() == 0  # what the VMM's console reader sees: it stops watching the pty
    reads = 0
    while not wakes:
        uart.read(serial.RBR_THR, 1)
        reads += 1
    assert reads == 32 and uart.rx_space() == 32
    for _ in range(32):
        uart.read(serial.RBR_THR, 1)
    assert wakes == [0]


def test_bus_unregister_frees_the_range() -> None:
    class Reg:
        def read(self, offset: int, size: int) -> int:
            return 0x5A

        def write(self, offset: int, size: int, value: int) -> None:
            pass

    bus = Bus("mmio")
    bus.register(0x1000, 0x100, Reg())
    assert bus.read(0x1010, 1) == 0x5A
    with pytest.raises(ValueError, match="no range at 0x1010"):
        bus.unregister(0x1010)
    bus.unregister(0x1000)
    assert bus.read(0x1010, 1) == 0xFF and bus.lookup(0x1000, 1) is None
    bus.register(0x1080, 0x100, Reg())  # the freed range can be claimed again, overlapping the old one
    assert bus.read(0x1100, 1) == 0x5A
