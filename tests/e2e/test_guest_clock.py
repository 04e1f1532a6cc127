"""<clock offset='utc'|'localtime'> reaches the guest's CMOS RTC, through the real daemon and virsh.

The daemon runs with a TZ of UTC+05:30 (a half hour, so no whole-hour slip can pass for it): tzdata's
Asia/Kolkata where installed, which the sandboxed VMM has read before Landlock shuts the zone files
away (Python's time module loads the zone on import), else the same rule as a POSIX TZ string. The
tiny guest reads the RTC on ``g`` as Linux does (UIP, seconds re-read) and prints the raw BCD fields;
the test compares them with the host's clock read around the keypress, shifted by the offset it set
itself (not by the code under test).
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess, PtyProcess, domain_xml, virsh, wait_for
from tests.support.guests import TINY_BANNER

pytestmark = pytest.mark.virsh

TZ = "Asia/Kolkata" if Path("/usr/share/zoneinfo/Asia/Kolkata").is_file() else "IST-5:30"  # no DST in either
TZ_OFFSET = 5 * 3600 + 1800
RTC_LINE = re.compile(r"TINY-RTC (\d{4})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d) b=([0-9a-f]{2})\r?\n")


@pytest.fixture
def tz_daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path / "d", env={"TZ": TZ}).start()
    try:
        yield d
    finally:
        d.stop()
        d.destroy_all_vmms()


def read_rtc(d: DaemonProcess, name: str) -> tuple[float, int, float, str]:
    """(host time before the key, the guest's RTC as seconds since 1970, host time after, register B)."""
    log = d.serial_log(name)
    wait_for(lambda: log.exists() and TINY_BANNER in log.read_text(errors="replace"))
    con = PtyProcess(["virsh", "-c", d.uri, "console", name])
    try:
        con.wait_console_ready()
        before = time.time()
        con.write(b"g")
        out = con.read_until(b" b=")
        after = time.time()
        con.write(b"\x1d")
        assert con.wait() == 0
    finally:
        con.kill()
    wait_for(lambda: RTC_LINE.search(log.read_text(errors="replace")) is not None)
    m = RTC_LINE.search(log.read_text(errors="replace"))
    assert m is not None, out
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    return before, calendar.timegm((year, month, day, hour, minute, second)), after, m.group(7)


@pytest.mark.parametrize(("offset", "shift"), [("utc", 0), ("localtime", TZ_OFFSET)])
def test_guest_rtc_follows_clock_offset(
    kvm: None, tz_daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path, offset: str, shift: int
) -> None:
    name = f"clk-{offset}"
    xml = tmp_path / f"{name}.xml"
    xml.write_text(domain_xml(name, tiny_kernel, extra=f"<clock offset='{offset}'/>"))
    virsh(tz_daemon.uri, "define", str(xml))
    assert f"<clock offset='{offset}'/>" in virsh(tz_daemon.uri, "dumpxml", name).stdout
    virsh(tz_daemon.uri, "start", name)
    before, guest, after, reg_b = read_rtc(tz_daemon, name)
    virsh(tz_daemon.uri, "destroy", name)
    assert reg_b == "02"  # BCD, 24 hour: what the device starts with
    # The RTC has whole seconds: the guest's reading lies in [floor(before), after] once shifted.
    assert int(before) + shift <= guest <= after + shift, (before, guest - shift, after)


def test_other_offsets_and_timers_are_refused_naming_them(tz_daemon: DaemonProcess, tmp_path: Path) -> None:
    for extra, words in (
        ("<clock offset='variable' adjustment='3600' basis='utc'/>", "attribute 'adjustment' of <clock>"),
        ("<clock offset='timezone' timezone='Asia/Kolkata'/>", "attribute 'timezone' of <clock>"),
        ("<clock offset='variable'/>", "clock offset 'variable' is not supported"),
        ("<clock offset='utc'><timer name='hpet' present='no'/></clock>", "clock timer 'hpet' is not supported"),
    ):
        xml = tmp_path / "bad.xml"
        xml.write_text(domain_xml("badclock", Path("/nonexistent"), extra=extra))
        done = virsh(tz_daemon.uri, "define", str(xml), check=False)
        assert done.returncode != 0
        assert "unsupported configuration: " + words in done.stderr, done.stderr
