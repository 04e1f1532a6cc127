"""The small guest kernel (scripts/build-test-kernel.sh) on a libvirt network (issue 14, part 4): a domain with
an ``<interface type='network'>`` on an isolated network of libvirt's own (no ``<forward>``; test-unique name,
bridge and subnet, removed afterwards) is defined and started with virsh against the real daemon, its kernel
booted with ``ip=dhcp`` and a root disk it does not have, so it waits for that root forever with its network
up.

One boot shows, in order: the virtio-net device at the PCI slot of the domain's XML, ``IP-Config: Got DHCP
answer`` from the network's own address (libvirt's dnsmasq) with an address of the network's DHCP range, the
kernel's summary naming the interface's MAC (read from the device's config space) and that address, then the
wait for the root device. While it waits: libvirt's ``net-dhcp-leases`` (network:///system) and our
``domifaddr`` show the address for the MAC; the host's ``ping`` (iputils, onto the test bridge only) gets all
of 100 echo requests answered by the guest kernel, whose MAC the host's neighbour table then holds for that
address, and ``domifaddr --source arp`` shows it too.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess, domain_xml, serial_log, virsh, vmm_request, wait_for
from tests.support.guests import KVM_PVM_CLEARCPUID
from tests.support.kernel import require_small_kernel
from tests.support.linuxboot import cpu_seconds
from tests.support.networks import ORACLE, isolated_network, sh

pytestmark = [pytest.mark.virsh, pytest.mark.usefixtures("system_libvirtd")]

# Start to the root wait, measured here on 2026-12-04 (the test prints its milestones): 50 s (VMM CPU 47 s) at
# load 2-4 with no other guest running, 1233 s (VMM CPU 536 s) with four other small-kernel boots sharing the 2
# cores (load 5-7); see docs/DESIGN.md ("Guest kernels").
BOOT_TIMEOUT = float(os.environ.get("MSHV_LIBVIRT_KERNEL_DHCP_BOOT_TIMEOUT", "2400"))
MEMORY_MIB = 256
MAC = "52:54:00:6e:00:21"
# No disk: rootwait keeps the kernel waiting for /dev/vda (and answering the network) after IP-Config.
CMDLINE = (
    "console=ttyS0 earlyprintk=ttyS0 panic=-1 nowatchdog mitigations=off cryptomgr.notests ip=dhcp "
    "root=/dev/vda rootwait " + KVM_PVM_CLEARCPUID
)
VIRTIO_NET_MODERN = "1af4:1041"  # virtio 1.2, 4.1.2.1: 0x1040 + device type 1
PINGS = 100
PING_INTERVAL = 0.2
# ping -w: the whole run's deadline; it ends earlier once PINGS replies came.
PING_DEADLINE = 120
# What ipconfig prints when it gave up or the NIC did not come up (net/ipv4/ipconfig.c); none may appear.
ABSENT = (
    "IP-Config: No network devices available",
    "IP-Config: Auto-configuration of network failed",
    "IP-Config: Reopening network devices",
    "timed out!",
    "Kernel panic",
    "VFS: Cannot open root device",
)


def milestones(slot: int, server: str, address: str) -> list[tuple[str, re.Pattern[str]]]:
    """In boot order; each must appear (and, with the ones after it, in this order)."""
    return [
        ("banner", re.compile(r"Linux version 6\.1\.\d+")),
        ("pci", re.compile(re.escape(f"pci 0000:00:{slot:02x}.0: [{VIRTIO_NET_MODERN}] type 00 class 0x020000"))),
        ("dhcp", re.compile(re.escape(f"IP-Config: Got DHCP answer from {server}, my address is {address}"))),
        ("complete", re.compile(re.escape("IP-Config: Complete:"))),
        # the MAC the kernel read from the device's config space, and the lease
        ("summary", re.compile(re.escape(f"device=eth0, hwaddr={MAC}, ipaddr={address}, mask=255.255.255.0,"))),
        ("root wait", re.compile(re.escape("Waiting for root device /dev/vda"))),
    ]


DHCP_ANSWER = re.compile(r"IP-Config: Got DHCP answer from (\S+), my address is (\S+)")


@pytest.fixture
def network(tmp_path: Path) -> Iterator[str]:
    with isolated_network(tmp_path) as name:
        yield name


def subnet_of(network: str) -> tuple[str, tuple[int, int]]:
    """The network's own address and its DHCP range's last octets, from libvirt's XML of it."""
    doc = ET.fromstring(virsh(ORACLE, "net-dumpxml", network).stdout)
    ip, dhcp = doc.find("ip"), doc.find("ip/dhcp/range")
    assert ip is not None and dhcp is not None
    start, end = (int(dhcp.get(edge, "").rsplit(".", 1)[1]) for edge in ("start", "end"))
    return ip.get("address", ""), (start, end)


def nic_slot(daemon: DaemonProcess, name: str) -> int:
    address = ET.fromstring(virsh(daemon.uri, "dumpxml", name).stdout).find("devices/interface/address")
    assert address is not None and address.get("type") == "pci" and int(address.get("bus", "-1"), 0) == 0
    return int(address.get("slot", "-1"), 0)


@pytest.mark.kvm
@pytest.mark.slow
@pytest.mark.timeout(BOOT_TIMEOUT + PING_DEADLINE + 300)
@pytest.mark.parametrize(
    "queues",
    # two pairs offered (MQ): Linux's virtio_net runs min(max_virtqueue_pairs, its CPUs) = 1 of them and says
    # so with VQ_PAIRS_SET (a two-vCPU boot of this kernel did not get past "Booting SMP configuration" in 3 min)
    [1, 2],
    ids=["one-pair", "two-pairs-offered"],
)
def test_the_kernel_gets_a_lease_from_libvirts_dnsmasq_and_answers_100_pings(
    daemon: DaemonProcess, network: str, tmp_path: Path, queues: int
) -> None:
    kernel = require_small_kernel()
    server, (first, last) = subnet_of(network)
    prefix = server.rsplit(".", 1)[0]
    name = f"kernel-dhcp-{queues}"
    driver = f"<driver queues='{queues}'/>" if queues > 1 else ""
    iface = (
        f"<interface type='network'><mac address='{MAC}'/><source network='{network}'/>"
        f"<model type='virtio'/>{driver}</interface>"
    )
    xml = tmp_path / "vm.xml"
    doc = domain_xml(name, kernel, memory_mib=MEMORY_MIB, cmdline=CMDLINE)
    xml.write_text(doc.replace("<serial type='pty'/>", f"<serial type='pty'/>{iface}"))
    virsh(daemon.uri, "define", str(xml))
    try:
        start = time.monotonic()
        out = virsh(daemon.uri, "start", name).stdout
        assert f"Domain '{name}' started" in out, out
        pid = daemon.vmm_pid(name)
        (tap,) = re.findall(r"<target dev='([^']+)'/>", virsh(daemon.uri, "dumpxml", name).stdout)
        slot = nic_slot(daemon, name)
        seen: dict[str, tuple[float, float]] = {}  # milestone -> (s after start, VMM CPU s)

        def root_wait() -> bool:
            text = serial_log(daemon, name)
            answer = DHCP_ANSWER.search(text)
            for label, pattern in milestones(slot, *(answer.groups() if answer else ("?", "?"))):
                if label not in seen and pattern.search(text):
                    seen[label] = (round(time.monotonic() - start, 1), round(cpu_seconds(pid), 1))
            return "Waiting for root device" in text or any(m in text for m in ABSENT)

        wait_for(root_wait, BOOT_TIMEOUT, interval=0.5, what=lambda: serial_log(daemon, name).splitlines()[-8:])
        print(f"milestones (s after start, VMM CPU s): {seen}")  # the figures the timeouts above quote
        text = serial_log(daemon, name)
        tail = text.splitlines()[-10:]
        found = [m for m in ABSENT if m in text]
        assert not found, (found, tail)
        answer = DHCP_ANSWER.search(text)
        assert answer, tail
        assert answer.group(1) == server, answer.group(0)  # libvirt's dnsmasq listens on the network's address
        address = answer.group(2)
        assert address.rsplit(".", 1)[0] == prefix and first <= int(address.rsplit(".", 1)[1]) <= last, address
        expected = milestones(slot, server, address)
        missing = [label for label, _ in expected if label not in seen]
        assert not missing, (missing, seen, tail)
        positions = [m.start() for _, p in expected if (m := p.search(text))]
        assert positions == sorted(positions), seen

        # libvirt's network driver has the lease for the MAC; our domifaddr shows it on the tap
        leases = virsh(ORACLE, "net-dhcp-leases", network, "--mac", MAC).stdout
        assert re.search(rf"\s{re.escape(MAC)}\s+ipv4\s+{re.escape(address)}/24\s", leases), leases
        shown = virsh(daemon.uri, "domifaddr", name).stdout
        assert re.search(rf"^ {tap}\s+{MAC}\s+ipv4\s+{re.escape(address)}/24$", shown, re.M), shown

        # the host pings the guest kernel on the test bridge alone
        ping = subprocess.run(
            [
                *("ping", "-n", "-c", str(PINGS), "-i", str(PING_INTERVAL)),
                *("-w", str(PING_DEADLINE), "-I", network, address),
            ],
            capture_output=True,
            text=True,
            timeout=PING_DEADLINE + 30,
        )
        summary = ping.stdout.strip().splitlines()[-2:]
        print(f"ping: {summary}")
        assert ping.returncode == 0, ping.stdout + ping.stderr
        # with -w, ping sends until PINGS replies came: a lost one shows as more transmitted than received
        assert f"{PINGS} packets transmitted, {PINGS} received, 0% packet loss" in ping.stdout, ping.stdout
        # the answers came from the guest's MAC (ARP resolved to it), not from anything else on the bridge
        neigh = sh("ip", "-4", "neigh", "show", address, "dev", network)
        assert f"lladdr {MAC}" in neigh, neigh
        arp = virsh(daemon.uri, "domifaddr", name, "--source", "arp").stdout
        assert re.search(rf"^ {tap}\s+{MAC}\s+ipv4\s+{re.escape(address)}/0$", arp, re.M), arp
        assert serial_log(daemon, name).count("Linux version ") == 1  # one boot: nothing reset it meanwhile
        # Linux's virtio_net drove the control queue: its RX mode commands at ipconfig's open (promisc, allmulti,
        # the MAC tables) and, with MQ, VQ_PAIRS_SET 1; pair 2 idles, its tap queue detached
        (dev,) = [d for d in vmm_request(daemon, name, "status")["virtio"] if d["device_id"] == 1]
        assert dev["ctrl_commands"] >= 3 + (queues > 1) and dev["error"] is None, dev
        assert (dev["max_queue_pairs"], dev["queue_pairs"]) == (queues, 1), dev
        assert dev["pairs"][0]["rx_packets"] == dev["rx_packets"] >= PINGS, dev
        out = sh("ip", "-d", "link", "show", "dev", tap)
        assert (f" multi_queue numqueues 1 numdisabled {queues - 1} " in out) == (queues > 1), out
        virsh(daemon.uri, "destroy", name)
    finally:
        virsh(daemon.uri, "destroy", name, check=False)
        virsh(daemon.uri, "undefine", name, check=False)
