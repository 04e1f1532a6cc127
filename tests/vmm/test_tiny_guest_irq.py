"""The tiny guest's interrupt-driven mode ("tiny.irq"), booted by the real VMM.

In that mode every byte in and out of COM1 and the power button reach the guest only as IOAPIC
interrupts that the VMM fires through its IrqfdSink (an eventfd per pin, bound with MSHV_IRQFD), and
the guest sleeps in ``sti; hlt`` with no timer armed. Its counters line says how many bytes its
handlers moved and how many times it polled LSR or PM1_STS outside a handler (tests/support/guests.py).
The same line from the polled mode shows that the counters tell the two apart.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.guests import (
    TINY_AP_BANNER,
    TINY_BANNER,
    TINY_IRQ_FLAG,
    TINY_POWERBUTTON,
    tiny_counts,
    wait_tiny_counts,
)
from tests.vmm.harness import VmmProcess

pytestmark = pytest.mark.kvm

BOOT = 60  # seconds; the tiny guest is up in well under one on KVM
CMDLINE = f"console=ttyS0 tiny {TINY_IRQ_FLAG}"


@pytest.fixture
def irq_vm(kvm: None, tiny_kernel: Path, tmp_path: Path) -> Iterator[VmmProcess]:
    with VmmProcess.start(tmp_path / "vm", tiny_kernel, cmdline=CMDLINE) as vm:
        yield vm


def counts_after(vm: VmmProcess, nth: int = 1) -> tuple[int, dict[str, str]]:
    return wait_tiny_counts(lambda: vm.serial, nth=nth, timeout=BOOT)


def test_typing_is_received_and_echoed_by_interrupt_handlers(irq_vm: VmmProcess) -> None:
    irq_vm.wait_serial(f"{TINY_BANNER} cmdline={CMDLINE}\n", timeout=BOOT)
    irq_vm.console_send(b"hello-42")  # no command keys (q r c f b i n d v g)
    irq_vm.wait_console(b"hello-42", timeout=BOOT)
    irq_vm.console_send(b"n")  # print the counters
    at, counts = counts_after(irq_vm)
    assert counts["mode"] == "irq"
    assert int(counts["rx"]) == len(b"hello-42n")  # every byte typed came in through the handler
    assert int(counts["tx"]) == at  # every byte the guest printed before this line went out from it
    assert counts["kbd"] == "1"  # the boot-time i8042 self-test interrupt
    assert (counts["polls"], counts["timer"], counts["sci"]) == ("0", "0", "0")


def test_virsh_shutdown_power_button_arrives_as_an_sci(irq_vm: VmmProcess) -> None:
    irq_vm.wait_serial(TINY_BANNER, timeout=BOOT)
    assert irq_vm.command("shutdown") == {"state": "running"}
    text = irq_vm.wait_serial(TINY_POWERBUTTON, timeout=BOOT)
    assert irq_vm.wait_exit(timeout=BOOT)["reason"] == "shutdown"
    [(at, counts)] = tiny_counts(text)
    assert text.index(TINY_POWERBUTTON) > at  # the handler saw PWRBTN_STS; the main loop then reported it
    assert (counts["mode"], counts["sci"], counts["polls"], counts["timer"]) == ("irq", "1", "0", "0")
    assert int(counts["tx"]) == at


def test_a_paste_larger_than_every_buffer_is_not_lost(irq_vm: VmmProcess) -> None:
    irq_vm.wait_serial(TINY_BANNER, timeout=BOOT)
    text = b"0123456789" * 100 + b"END!"  # 1004 bytes: the UART FIFO holds 64, the guest's ring 256
    irq_vm.console_send(text)
    assert irq_vm.wait_console(b"END!", timeout=BOOT).endswith(text)
    irq_vm.console_send(b"n")
    _, counts = counts_after(irq_vm)
    assert int(counts["rx"]) == len(text) + 1 and counts["polls"] == "0"


def test_an_application_processor_prints_through_the_bsp_handler(kvm: None, tiny_kernel: Path, tmp_path: Path) -> None:
    with VmmProcess.start(tmp_path / "vm", tiny_kernel, cmdline=CMDLINE, vcpus=2) as vm:
        vm.wait_serial(f"{TINY_AP_BANNER} 1\n", timeout=BOOT)  # queued on the AP, sent by the BSP's handler
        vm.console_send(b"two")
        vm.wait_console(b"two", timeout=BOOT)
        vm.console_send(b"n")
        at, counts = counts_after(vm)
        assert int(counts["tx"]) == at and counts["polls"] == "0" and counts["timer"] == "0"


def test_the_polled_mode_counts_its_polls(kvm: None, tiny_kernel: Path, tmp_path: Path) -> None:
    # The counters' other side: without "tiny.irq" no handler moves a byte and the loops poll.
    with VmmProcess.start(tmp_path / "vm", tiny_kernel, cmdline="console=ttyS0 tiny") as vm:
        vm.wait_serial(TINY_BANNER, timeout=BOOT)
        vm.console_send(b"n")
        counts_after(vm)
        vm.console_send(b"n")  # only its timer wakes it to see this one: timer > 0 below
        _, counts = counts_after(vm, nth=2)
        assert counts["mode"] == "polled"
        assert (counts["tx"], counts["rx"], counts["serial"], counts["sci"], counts["kbd"]) == ("0",) * 5
        assert int(counts["polls"]) > 0 and int(counts["timer"]) > 0


def test_rtc_update_interrupts_arrive_on_ioapic_pin_8(irq_vm: VmmProcess) -> None:
    # 'g' reads the clock, then sleeps in sti; hlt with UIE on until two update-ended interrupts came
    # (the RTC's timer thread raises IRQ 8, the IOAPIC fires it through the irqfd); they are one
    # second apart, so between 1 and 2 s pass after UIE is enabled.
    irq_vm.wait_serial(f"{TINY_BANNER} cmdline={CMDLINE}\n", timeout=BOOT)
    start = time.monotonic()
    irq_vm.console_send(b"g")
    irq_vm.wait_serial("TINY-RTC ", timeout=BOOT)
    out = irq_vm.wait_serial("TINY-RTC-UIE 00000002\n", timeout=BOOT)
    elapsed = time.monotonic() - start
    assert 1.0 <= elapsed <= 2.0 + 3.0, elapsed  # 3 s of slack for a loaded host, none below one update
    assert re.search(r"TINY-RTC \d{4}-\d\d-\d\d \d\d:\d\d:\d\d b=02\r?\n", out), out[-500:]
    irq_vm.console_send(b"n")
    _, counts = counts_after(irq_vm)
    assert (counts["mode"], counts["polls"], counts["timer"]) == ("irq", "0", "0")
