"""Calls real clients make that the other end-to-end tests do not: legacy listing APIs, the default
URI, the daemon's library version, and virsh's flag variants (define --validate, destroy --graceful,
shutdown --mode acpi). Values are compared with libvirt's test:///default driver where it has the same
semantics, else with what the test itself set up.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import libvirt
import pytest

from mshv_libvirt.rpc.host import hypervisor_version
from tests.support.daemon import DaemonProcess, domain_xml, virsh, wait_for
from tests.support.guests import TINY_BANNER

pytestmark = pytest.mark.virsh


def test_kernel_version_fields_are_leading_digits() -> None:
    # Debian's and this host's kernel release strings; libvirt encodes major * 1e6 + minor * 1e3 + micro.
    assert hypervisor_version("6.18.44-fc-v1147") == 6_018_044
    assert hypervisor_version("6.1.0-28-amd64") == 6_001_000
    assert hypervisor_version("7.0") == 7_000_000


def test_connection_level_calls(conn: libvirt.virConnect) -> None:
    assert conn.getLibVersion() == 9_000_000  # the protocol level we serve: libvirt 9.0.0's
    assert conn.getVersion() == hypervisor_version(os.uname().release)
    ref = libvirt.open("test:///default")
    try:
        assert isinstance(ref.getMaxVcpus(None), int)  # the oracle answers the same call
    finally:
        ref.close()
    assert conn.getMaxVcpus(None) == 254


def test_legacy_listing_calls(
    kvm: None, daemon: DaemonProcess, conn: libvirt.virConnect, tiny_kernel: Path, tmp_path: Path
) -> None:
    """numOfDomains/listDomainsID/numOfDefinedDomains/listDefinedDomains (what older tools use) agree
    with listAllDomains, as in libvirt's test driver."""
    ref = libvirt.open("test:///default")
    try:
        assert (
            ref.numOfDomains()
            == len(ref.listDomainsID())
            == len(ref.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE))
        )
        assert ref.numOfDefinedDomains() == len(ref.listDefinedDomains())
    finally:
        ref.close()
    running = conn.defineXML(domain_xml("legacy-run", tiny_kernel))
    conn.defineXML(domain_xml("legacy-off", tiny_kernel, memory_mib=32))
    running.create()
    try:
        assert conn.numOfDomains() == 1
        assert conn.listDomainsID() == [running.ID()]
        assert conn.numOfDefinedDomains() == 1
        assert conn.listDefinedDomains() == ["legacy-off"]
        assert running.maxMemory() == 64 * 1024
        assert conn.lookupByName("legacy-off").maxMemory() == 32 * 1024
        assert running.isUpdated() == 0
        assert running.listAllSnapshots() == [] and running.hasManagedSaveImage() == 0  # none exist here
    finally:
        running.destroy()


def test_virsh_flag_variants(kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path) -> None:
    xml = tmp_path / "v.xml"
    xml.write_text(domain_xml("variants", tiny_kernel))
    assert "Domain 'variants' defined" in virsh(daemon.uri, "define", "--validate", str(xml)).stdout
    bad = tmp_path / "bad.xml"
    bad.write_text(domain_xml("badvalidate", tiny_kernel).replace("<vcpu>1</vcpu>", "<vcpu>1</vcpu><bogus/>"))
    res = virsh(daemon.uri, "define", "--validate", str(bad), check=False)
    assert res.returncode == 1 and "bogus" in res.stderr
    assert "badvalidate" not in virsh(daemon.uri, "list", "--all", "--name").stdout

    log = daemon.serial_log("variants")
    virsh(daemon.uri, "start", "variants")
    wait_for(lambda: log.exists() and TINY_BANNER in log.read_text(errors="replace"), timeout=60)
    virsh(daemon.uri, "shutdown", "--mode", "acpi", "variants")  # the power button: the guest powers off
    wait_for(lambda: virsh(daemon.uri, "domstate", "variants").stdout.strip() == "shut off", timeout=60)
    res = virsh(daemon.uri, "shutdown", "--mode", "agent", "variants", check=False)
    assert res.returncode == 1  # no agent mode (and the domain is off anyway)

    virsh(daemon.uri, "start", "variants")
    virsh(daemon.uri, "destroy", "--graceful", "variants")
    assert virsh(daemon.uri, "domstate", "--reason", "variants").stdout.strip() == "shut off (destroyed)"


def test_default_uri_is_asked_of_the_daemon(tmp_path: Path) -> None:
    """A client without a URI connects to the default socket and asks the daemon for its URI
    (CONNECT_GET_URI). Here the default socket is ours, in a private mount namespace."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.fail("this test needs unshare -m (util-linux, as root)")
    script = tmp_path / "ns.sh"
    script.write_text(
        f"""set -e
mount -t tmpfs tmpfs /run/libvirt 2>/dev/null || {{ mkdir -p /run/libvirt; mount -t tmpfs tmpfs /run/libvirt; }}
{sys.executable} -m mshv_libvirt.daemon --system --socket /run/libvirt/libvirt-sock \\
    --config-dir {tmp_path}/etc --run-dir {tmp_path}/run --log-dir {tmp_path}/log > {tmp_path}/daemon.log 2>&1 &
pid=$!
trap 'kill $pid; wait $pid' EXIT
for i in $(seq 200); do [ -S /run/libvirt/libvirt-sock-ro ] && break; sleep 0.05; done
env -u LIBVIRT_DEFAULT_URI virsh uri
env -u LIBVIRT_DEFAULT_URI virsh -r uri
"""
    )
    env = {k: v for k, v in os.environ.items() if k != "LIBVIRT_DEFAULT_URI"}
    res = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "bash", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert res.returncode == 0, res.stderr + (tmp_path / "daemon.log").read_text()
    assert res.stdout.split() == ["mshv:///system", "mshv:///system"]
