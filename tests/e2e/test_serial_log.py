"""A guest cannot fill the host's disk through its console log (issue 19 item 9): the daemon's cap options
reach the sandboxed VMM, which rotates through the descriptors it was handed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess, domain_xml, running_daemon, virsh, wait_for
from tests.support.guests import TINY_BANNER

pytestmark = [pytest.mark.virsh, pytest.mark.kvm]

MAX = 4096
BACKUPS = 2
IOAPIC_LINE = b"TINY-IOAPIC-VERSION 00170020\n"  # what the tiny guest prints for each "i" typed at it
PRESSES = 700  # about 20 KB of output: five logs' worth, so the oldest output is rotated out


def log_parts(d: DaemonProcess, name: str) -> list[bytes]:
    base = d.serial_log(name)
    names = [Path(f"{base}.{i}") for i in range(BACKUPS, 0, -1)] + [base]
    return [p.read_bytes() if p.exists() else b"" for p in names]


def test_guest_output_is_capped_and_rotated(tmp_path: Path, tiny_kernel: Path) -> None:
    args = ("--serial-log-max-size", str(MAX), "--serial-log-max-backups", str(BACKUPS))
    with running_daemon(tmp_path / "d", *args) as d:
        xml = tmp_path / "chatty.xml"
        xml.write_text(domain_xml("chatty", tiny_kernel))
        virsh(d.uri, "define", str(xml))
        virsh(d.uri, "start", "chatty")
        banner = TINY_BANNER.encode() + b" cmdline=console=ttyS0\n"  # the whole line: it is all the guest says
        wait_for(lambda: b"".join(log_parts(d, "chatty")) == banner, timeout=30)
        boot = b"".join(log_parts(d, "chatty"))
        pty_path = virsh(d.uri, "ttyconsole", "chatty").stdout.strip()
        fd = os.open(pty_path, os.O_WRONLY | os.O_NOCTTY)
        try:
            os.write(fd, b"i" * PRESSES)
        finally:
            os.close(fd)
        everything = boot + IOAPIC_LINE * PRESSES
        last = (len(everything) - 1) % MAX + 1  # what the log itself holds after the last rotation
        # Done when the files hold exactly the newest output (a cycle earlier the lines sit 7 bytes apart).
        wait_for(lambda: everything[-(BACKUPS * MAX + last) :] == b"".join(log_parts(d, "chatty")), timeout=120)
        parts = log_parts(d, "chatty")
        assert [len(p) for p in parts] == [MAX] * BACKUPS + [last]
        assert everything.endswith(b"".join(parts))  # the newest output, in order, nothing lost in between
        assert TINY_BANNER.encode() not in b"".join(parts)  # the oldest went out with the rotations
        assert not Path(f"{d.run_dir / 'chatty.serial.log'}.{BACKUPS + 1}").exists()
        assert virsh(d.uri, "domstate", "chatty").stdout.strip() == "running"
        virsh(d.uri, "destroy", "chatty")
