"""Linux's own account of ``<vcpu current='1'>2</vcpu>`` (issue 21 item 3): the MADT describes two CPUs,
one enabled and one present but disabled (online capable), and the kernel prints
"smpboot: Allowing 2 CPUs, 1 hotplug CPUs". The line comes early in the boot (measured: 67 s on a busy
kvm-pvm host, where the kernel's CPL0 code runs in the host's instruction emulator); the domain is
destroyed as soon as it is seen.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess, domain_xml, serial_log, vmm_request, wait_for
from tests.support.guests import LINUX_CMDLINE as CMDLINE
from tests.support.guests import GuestUnavailable, debian_kernel

libvirt = pytest.importorskip("libvirt")

pytestmark = [pytest.mark.kvm, pytest.mark.slow, pytest.mark.virsh]

# 4x the measurement above
TIMEOUT = float(os.environ.get("MSHV_LIBVIRT_LINUX_SMPBOOT_TIMEOUT", "300"))


@pytest.fixture
def vmlinuz(kvm: None) -> Path:
    try:
        return debian_kernel().vmlinuz
    except GuestUnavailable as err:
        if os.environ.get("CI"):
            pytest.fail(f"Debian's kernel is needed: {err}")
        pytest.skip(str(err))


@pytest.mark.timeout(TIMEOUT + 60)
@pytest.mark.parametrize(("vcpu", "line"), [("<vcpu current='1'>2</vcpu>", "Allowing 2 CPUs, 1 hotplug CPUs")])
def test_linux_sees_present_but_disabled_cpus(daemon: DaemonProcess, vmlinuz: Path, vcpu: str, line: str) -> None:
    conn = libvirt.open(daemon.uri)
    xml = domain_xml("smp", vmlinuz, memory_mib=256, cmdline=CMDLINE).replace("<vcpu>1</vcpu>", vcpu)
    dom = conn.defineXML(xml)
    dom.create()
    try:
        wait_for(lambda: "smpboot: Allowing" in serial_log(daemon, "smp"), timeout=TIMEOUT, interval=0.5)
        found = re.search(r"smpboot: (Allowing .*)", serial_log(daemon, "smp"))
        assert found is not None and found.group(1).strip() == line
        assert len(vmm_request(daemon, "smp", "status")["vcpu_threads"]) == 1
    finally:
        dom.destroy()
        conn.close()
