"""virsh console typing and virsh shutdown reach the guest as interrupts, not by its polling.

The tiny guest's "tiny.irq" mode (tests/support/guests.py) receives and sends COM1 bytes only in its
IOAPIC interrupt handler and learns of the power button only from the SCI, all fired by the VMM
through its IrqfdSink; it sleeps in ``sti; hlt`` with no timer. Its counters line (key ``n``, and
before it powers off on the button) is the evidence: bytes moved by the handlers, SCIs taken, polls
of LSR/PM1_STS outside a handler (0), timer interrupts (0).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess, PtyProcess, domain_xml, virsh, wait_for
from tests.support.guests import TINY_BANNER, TINY_IRQ_FLAG, TINY_POWERBUTTON, wait_tiny_counts

pytestmark = pytest.mark.virsh

CMDLINE = f"console=ttyS0 {TINY_IRQ_FLAG}"


def start_irq_guest(d: DaemonProcess, tmp_path: Path, name: str, kernel: Path) -> Path:
    xml = tmp_path / f"{name}.xml"
    xml.write_text(domain_xml(name, kernel, cmdline=CMDLINE))
    virsh(d.uri, "define", str(xml))
    virsh(d.uri, "start", name)
    log = d.serial_log(name)
    wait_for(lambda: log.exists() and f"{TINY_BANNER} cmdline={CMDLINE}\n" in log.read_text())
    return log


def test_virsh_console_typing_goes_through_the_serial_interrupt(
    kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    log = start_irq_guest(daemon, tmp_path, "irqc", tiny_kernel)
    con = PtyProcess(["virsh", "-c", daemon.uri, "console", "irqc"])
    try:
        con.wait_console_ready()
        con.write(b"HELLO-MSHV-42")
        con.read_until(b"HELLO-MSHV-42")  # received by the RDA handler, echoed by the THRE handler
        con.write(b"n")
        at, counts = wait_tiny_counts(lambda: log.read_text(errors="replace"), timeout=30)
        con.read_until(b"polls=")  # the same line reached the console
        con.write(b"\x1d")
        assert con.wait() == 0
    finally:
        con.kill()
    assert counts["mode"] == "irq"
    assert int(counts["rx"]) == len(b"HELLO-MSHV-42n")
    assert int(counts["tx"]) == at  # every byte before the line was sent by the handler
    assert (counts["polls"], counts["timer"], counts["sci"], counts["kbd"]) == ("0", "0", "0", "1")
    virsh(daemon.uri, "destroy", "irqc")


def test_virsh_shutdown_arrives_as_an_sci(kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path) -> None:
    log = start_irq_guest(daemon, tmp_path, "irqs", tiny_kernel)
    virsh(daemon.uri, "shutdown", "irqs")
    wait_for(lambda: virsh(daemon.uri, "domstate", "irqs").stdout.strip() == "shut off")
    text = log.read_text()
    at, counts = wait_tiny_counts(lambda: text, timeout=0)
    assert text.index(TINY_POWERBUTTON) > at
    assert (counts["mode"], counts["sci"], counts["polls"], counts["timer"]) == ("irq", "1", "0", "0")
    assert int(counts["tx"]) == at
