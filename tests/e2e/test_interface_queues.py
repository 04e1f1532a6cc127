"""``<interface><driver queues='N'/>`` end to end through real virsh against the real daemon: the definition's
round trip, the refusals (libvirt's parser errors compared with its own test:///default driver), and a
running domain's tap as the kernel shows it (``ip -d link``: multi_queue, one queue per pair, only pair 1's
attached until the guest's driver asks for more; ``tun_flags`` in sysfs), held by the VMM alone and gone with
it. The guest's side of multiqueue (VQ_PAIRS_SET, frames on pair 2) is tests/vmm/test_virtio_net_vmm.py's.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess, domain_xml, domstate, running_daemon, serial_log, virsh, wait_for
from tests.support.guests import TINY_BANNER
from tests.support.libvirtd import unique
from tests.support.networks import isolated_network, sh
from tests.support.procfs import process_gone

pytestmark = [pytest.mark.virsh, pytest.mark.usefixtures("system_libvirtd")]

MAC = "52:54:00:6e:71:01"
IFF_MULTI_QUEUE = 0x0100


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    with running_daemon(tmp_path_factory.mktemp("ifqueues") / "d") as d:
        yield d


def with_interface(name: str, kernel: Path, iface: str) -> str:
    return domain_xml(name, kernel).replace("<serial type='pty'/>", f"<serial type='pty'/>{iface}")


def interfaces(xml: str) -> list[str]:
    return re.findall(r"<interface .*?</interface>", xml, re.S)


def tun_queues(tap: str) -> tuple[bool, int, int]:
    """(multi_queue, attached queues, detached queues) as ``ip -d link`` shows the tap."""
    out = sh("ip", "-d", "link", "show", "dev", tap)
    m = re.search(r" tun type tap .*?(?: numqueues (\d+) numdisabled (\d+))?(?: persist)", out)
    assert m is not None, out
    return " multi_queue " in out, int(m.group(1) or 1), int(m.group(2) or 0)


def tun_fds(pid: int) -> int:
    """How many descriptors of /dev/net/tun process ``pid`` holds (from /proc)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/net/tun"
        except OSError:
            continue
    return count


def test_queues_round_trip_through_define_and_dumpxml(daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path) -> None:
    name = unique("ifq")
    iface = (
        f"<interface type='ethernet'><mac address='{MAC}'/><model type='virtio'/><driver queues='4'/></interface>"
        "<interface type='ethernet'><mac address='52:54:00:6e:71:02'/><model type='virtio'/><driver queues='1'/>"
        "</interface>"
    )
    xml = tmp_path / "vm.xml"
    xml.write_text(with_interface(name, tiny_kernel, iface))
    virsh(daemon.uri, "define", str(xml))
    try:
        dumped = virsh(daemon.uri, "dumpxml", name).stdout
        first, second = interfaces(dumped)
        assert "<driver queues='4'/>" in first, first
        assert "<driver" not in second, second  # one pair is libvirt's default: not printed, as libvirt does
        again = tmp_path / "again.xml"
        again.write_text(dumped)
        virsh(daemon.uri, "define", str(again))
        assert virsh(daemon.uri, "dumpxml", name).stdout == dumped
    finally:
        virsh(daemon.uri, "undefine", name, check=False)


@pytest.mark.parametrize("value", ["x", "-2", "0x2", "2.5"])
def test_a_malformed_queues_is_refused_with_libvirts_parser_error(
    daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path, value: str
) -> None:
    name = unique("ifqbad")
    iface = f"<interface type='ethernet'><model type='virtio'/><driver queues='{value}'/></interface>"
    ours, theirs = tmp_path / "ours.xml", tmp_path / "theirs.xml"
    ours.write_text(with_interface(name, tiny_kernel, iface))
    theirs.write_text(
        f"<domain type='test'><name>{name}</name><memory>262144</memory><os><type>hvm</type></os>"
        f"<devices>{iface}</devices></domain>"
    )
    res = virsh(daemon.uri, "define", str(ours), check=False)
    oracle = virsh("test:///default", "define", str(theirs), check=False)
    assert res.returncode == oracle.returncode == 1
    # the first line names the file, the second is libvirt's error
    ours_error, theirs_error = res.stderr.strip().splitlines()[-1], oracle.stderr.strip().splitlines()[-1]
    assert ours_error == theirs_error and "Invalid value for attribute 'queues'" in ours_error, (res, oracle)


def test_more_pairs_than_the_device_has_vectors_for_is_refused_naming_the_limit(
    daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    name = unique("ifqbig")
    xml = tmp_path / "vm.xml"
    xml.write_text(with_interface(name, tiny_kernel, "<interface type='ethernet'><driver queues='128'/></interface>"))
    res = virsh(daemon.uri, "define", str(xml), check=False)
    assert res.returncode == 1
    assert (
        "error: unsupported configuration: interface driver queues='128' is not supported by the mshv driver; "
        "use 1 to 127"
    ) in res.stderr, res.stderr
    assert virsh(daemon.uri, "dominfo", name, check=False).returncode == 1  # nothing was defined


def test_a_running_domains_tap_is_multiqueue_with_one_queue_per_pair_and_goes_with_the_vmm(
    kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    name = unique("ifqrun")
    with isolated_network(tmp_path) as network:
        iface = (
            f"<interface type='bridge'><mac address='{MAC}'/><source bridge='{network}'/><model type='virtio'/>"
            "<driver queues='3'/></interface>"
        )
        xml = tmp_path / "vm.xml"
        xml.write_text(with_interface(name, tiny_kernel, iface))
        virsh(daemon.uri, "define", str(xml))
        try:
            for ending in ("destroy", "sigkill"):
                virsh(daemon.uri, "start", name)
                wait_for(lambda: TINY_BANNER in serial_log(daemon, name), 120, what="banner")
                live = virsh(daemon.uri, "dumpxml", name).stdout
                (block,) = interfaces(live)
                assert "<driver queues='3'/>" in block, block
                m = re.search(r"<target dev='(vnet\d+)'/>", block)
                assert m is not None, block
                tap = m.group(1)
                # the kernel's view: three queues, pair 1's attached; the tiny guest sent no VQ_PAIRS_SET
                assert tun_queues(tap) == (True, 1, 2)
                assert int(Path(f"/sys/class/net/{tap}/tun_flags").read_text(), 16) & IFF_MULTI_QUEUE
                assert f" master {network} " in sh("ip", "-o", "link", "show", "dev", tap)
                pid = daemon.vmm_pid(name)
                assert tun_fds(pid) == 3  # one descriptor per queue, all the VMM's (the daemon closed its own)
                if ending == "destroy":
                    virsh(daemon.uri, "destroy", name)
                else:
                    os.kill(pid, signal.SIGKILL)
                wait_for(lambda pid=pid: process_gone(pid), 30, what="VMM gone")
                wait_for(lambda: domstate(daemon, name, reason=False) == "shut off", 30, what="shut off")
                wait_for(lambda tap=tap: not Path("/sys/class/net", tap).exists(), 30, what=f"{tap} gone")
        finally:
            virsh(daemon.uri, "destroy", name, check=False)
            virsh(daemon.uri, "undefine", name, check=False)
