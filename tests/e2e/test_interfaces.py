"""<interface> end to end: a running domain's taps and network ports, through real virsh against the real
daemon, with libvirt's own network driver (``network:///system``) for type='network'.

Everything is on one isolated libvirt network (no ``<forward>``) with a test-unique name, bridge and
subnet, which the test defines and removes; type='bridge' joins that network's bridge and type='ethernet'
a tap of a test-unique name on no bridge. Oracles are not the code under test: ``ip -o link`` for the taps
(their bridge and state), real virsh against ``network:///system`` for the ports (``net-port-list``),
/proc for the VMM, and the host's routes and firewall rules, which must be what they were.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from mshv_libvirt.driver.nets import KILL_AFTER_PORT_CREATE_ENV
from tests.support.daemon import (
    DaemonProcess,
    domain_xml,
    domstate,
    running_daemon,
    serial_log,
    virsh,
    vmm_request,
    wait_for,
)
from tests.support.guests import TINY_BANNER
from tests.support.libvirtd import unique
from tests.support.networks import ORACLE, dhcp_client, host_network_state, isolated_network, net_ports, sh
from tests.support.procfs import process_gone

pytestmark = [pytest.mark.virsh, pytest.mark.usefixtures("system_libvirtd")]

NET_MAC, BRIDGE_MAC, ETH_MAC = "52:54:00:6e:00:01", "52:54:00:6e:00:02", "52:54:00:6e:00:03"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    with running_daemon(tmp_path_factory.mktemp("ifaces") / "d") as d:
        yield d


@pytest.fixture
def network(tmp_path: Path) -> Iterator[str]:
    with isolated_network(tmp_path) as name:
        yield name


def link(ifname: str) -> str:
    """``ip -o link show`` of one device ('' when it does not exist)."""
    out = sh("ip", "-o", "link", "show")
    return next((line for line in out.splitlines() if re.match(rf"\d+: {re.escape(ifname)}[@:]", line)), "")


def link_lines(names: tuple[str, ...]) -> list[str]:
    return [link(n) for n in names]


def all_gone(names: tuple[str, ...]) -> bool:
    """None of ``names`` exists any more."""
    return link_lines(names) == [""] * len(names)


def started_taps(daemon: DaemonProcess, name: str) -> list[str]:
    return re.findall(r"<target dev='([^']+)'/>", virsh(daemon.uri, "dumpxml", name).stdout)


def test_taps_and_ports_follow_the_vm(
    kvm: None, daemon: DaemonProcess, tiny_kernel: Path, network: str, tmp_path: Path
) -> None:
    name, eth = unique("ifvm"), unique("mshvt")[:15]
    interfaces = (
        f"<interface type='network'><mac address='{NET_MAC}'/><source network='{network}'/>"
        "<model type='virtio'/></interface>"
        f"<interface type='bridge'><mac address='{BRIDGE_MAC}'/><source bridge='{network}'/>"
        "<model type='virtio'/><mtu size='1400'/></interface>"
        f"<interface type='ethernet'><mac address='{ETH_MAC}'/><target dev='{eth}'/><model type='virtio'/></interface>"
    )
    xml = tmp_path / "vm.xml"
    xml.write_text(domain_xml(name, tiny_kernel).replace("<serial type='pty'/>", f"<serial type='pty'/>{interfaces}"))
    virsh(daemon.uri, "define", str(xml))
    try:
        for ending in ("sigkill", "destroy", "guest power-off"):
            virsh(daemon.uri, "start", name)
            wait_for(lambda: TINY_BANNER in serial_log(daemon, name), 120, what="banner")
            taps = started_taps(daemon, name)
            assert len(taps) == 3 and taps[2] == eth and all(re.fullmatch(r"vnet\d+", t) for t in taps[:2]), taps
            # each tap: up, on the bridge asked for (the network's for both), the host side's MAC the
            # guest's with fe: first (libvirt's), the MTU asked for or the bridge's
            for tap, mac, bridge in ((taps[0], NET_MAC, network), (taps[1], BRIDGE_MAC, network), (eth, ETH_MAC, None)):
                shown = link(tap)
                assert ",UP" in shown and f"link/ether fe:{mac[3:]}" in shown, shown
                assert (f" master {bridge} " in shown) == (bridge is not None), shown
            assert " mtu 1400 " in link(taps[1]) and " mtu 1500 " in link(taps[0])
            # the port libvirt's network driver gave the type='network' interface, and only that one
            port = net_ports(network)
            live = virsh(daemon.uri, "dumpxml", name).stdout
            assert len(port) == 1 and f"portid='{port[0]}' bridge='{network}'" in live, (port, live)
            listed = virsh(daemon.uri, "domiflist", name).stdout
            assert re.search(rf"{taps[0]}\s+network\s+{network}\s+virtio\s+{NET_MAC}", listed), listed
            # domifstat by tap, MAC or alias: the VMM's data-path counters (nothing typed 'u', so the guest sent
            # no frame and none has moved; test_interface_traffic.py moves them), printed as virsh prints
            # libvirt's; an unknown one is refused
            by_name = virsh(daemon.uri, "domifstat", name, taps[1]).stdout
            fields = [f"{d}_{c}" for d in ("rx", "tx") for c in ("bytes", "packets", "errs", "drop")]
            dotted = [f"{d}.{c}" for d in ("rx", "tx") for c in ("bytes", "pkts", "errs", "drop")]
            assert [ln.split()[1:] for ln in by_name.splitlines() if ln.strip()] == [[f, "0"] for f in fields], by_name
            assert virsh(daemon.uri, "domifstat", name, BRIDGE_MAC).stdout == by_name.replace(taps[1], BRIDGE_MAC)
            assert virsh(daemon.uri, "domifstat", name, "net1").stdout == by_name.replace(taps[1], "net1")
            stats = virsh(daemon.uri, "domstats", name, "--interface").stdout.split()
            assert stats[2:] == [
                "net.count=3",
                *(f"net.{i}.{kv}" for i, t in enumerate(taps) for kv in [f"name={t}", *(f"{f}=0" for f in dotted)]),
            ], stats
            unknown = virsh(daemon.uri, "domifstat", name, "nosuch0", check=False)
            assert "error: invalid argument: 'nosuch0' is not a known interface" in unknown.stderr, unknown.stderr
            pid = daemon.vmm_pid(name)
            if ending == "sigkill":
                os.kill(pid, signal.SIGKILL)
            elif ending == "destroy":
                virsh(daemon.uri, "destroy", name)
            else:
                virsh(daemon.uri, "shutdown", name)  # the ACPI power button: the tiny guest powers off
            wait_for(lambda pid=pid: process_gone(pid), 30, what="VMM gone")
            wait_for(lambda: domstate(daemon, name, reason=False) == "shut off", 30, what="shut off")
            wait_for(partial(all_gone, tuple(taps)), 30, what=partial(link_lines, tuple(taps)))
            wait_for(lambda: net_ports(network) == [], 30, what=lambda: net_ports(network))
            assert started_taps(daemon, name) == [eth]  # the shut-off definition keeps the name the user chose
            assert not any(eth in text for text in host_network_state().values())  # no route left on its tap
    finally:
        virsh(daemon.uri, "destroy", name, check=False)
        virsh(daemon.uri, "undefine", name, check=False)


def test_a_network_that_does_not_exist_fails_the_start_with_libvirts_error(
    daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    name, missing = unique("ifvm"), unique("nonet")
    iface = f"<interface type='network'><source network='{missing}'/></interface>"
    xml = tmp_path / "vm.xml"
    xml.write_text(domain_xml(name, tiny_kernel).replace("<serial type='pty'/>", f"<serial type='pty'/>{iface}"))
    virsh(daemon.uri, "define", str(xml))
    try:
        res = virsh(daemon.uri, "start", name, check=False)
        oracle = virsh(ORACLE, "net-info", missing, check=False)
        assert res.returncode == 1 and oracle.returncode == 1
        assert f"error: Network not found: no network with matching name '{missing}'" in res.stderr, res.stderr
        assert f"error: Network not found: no network with matching name '{missing}'" in oracle.stderr
        assert domstate(daemon, name, reason=False) == "shut off"
    finally:
        virsh(daemon.uri, "undefine", name, check=False)


def test_a_restarted_daemon_keeps_the_tap_and_port_and_deletes_the_port_of_a_vmm_that_died_meanwhile(
    kvm: None, tiny_kernel: Path, network: str, tmp_path: Path
) -> None:
    name = unique("ifvm")
    iface = f"<interface type='network'><mac address='{NET_MAC}'/><source network='{network}'/></interface>"
    xml = tmp_path / "vm.xml"
    xml.write_text(domain_xml(name, tiny_kernel).replace("<serial type='pty'/>", f"<serial type='pty'/>{iface}"))
    with running_daemon(tmp_path / "d") as daemon:
        virsh(daemon.uri, "define", str(xml))
        virsh(daemon.uri, "start", name)
        (tap,) = started_taps(daemon, name)
        port = net_ports(network)
        assert len(port) == 1
        daemon.kill()  # a crash: no clean-up
        daemon.start()
        # re-attached: the same tap on the bridge, the same port, shown in the live XML
        assert started_taps(daemon, name) == [tap] and f" master {network} " in link(tap)
        assert net_ports(network) == port
        assert f"portid='{port[0]}'" in virsh(daemon.uri, "dumpxml", name).stdout
        # the VMM dies while no daemon watches: the next daemon deletes its port; the tap went with it
        pid = daemon.vmm_pid(name)
        daemon.kill()
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: process_gone(pid), 30, what="VMM gone")
        # (the kernel removes a tap once its last descriptor is closed: soon after the process is gone)
        wait_for(partial(all_gone, (tap,)), 30, what=partial(link_lines, (tap,)))
        assert net_ports(network) == port
        daemon.start()
        assert domstate(daemon, name, reason=False) == "shut off"
        wait_for(lambda: net_ports(network) == [], 30, what=lambda: net_ports(network))
        # and it starts (and stops) again with a new tap and port
        virsh(daemon.uri, "start", name)
        assert re.fullmatch(r"vnet\d+", started_taps(daemon, name)[0])
        virsh(daemon.uri, "destroy", name)
        wait_for(lambda: net_ports(network) == [], 30, what=lambda: net_ports(network))


SWEPT = "network port sweep done: "


def port_owner(network: str, portid: str) -> tuple[str, str]:
    """The <owner> (name, uuid) of a port, as libvirt's network driver shows it."""
    xml = virsh(ORACLE, "net-port-dumpxml", network, portid).stdout
    m = re.search(r"<owner>\s*<name>([^<]*)</name>\s*<uuid>([^<]*)</uuid>", xml)
    assert m, xml
    return m.group(1), m.group(2)


def crash_after_port_create(daemon: DaemonProcess, network: str, *command: str) -> str:
    """Restart the daemon with the test hook that SIGKILLs it right after a port's creation, run the virsh
    command that creates one on ``network``, and return the port the dead daemon left, as libvirt lists it."""
    before = set(net_ports(network))
    daemon.kill()
    daemon.env = {KILL_AFTER_PORT_CREATE_ENV: "1"}
    daemon.start()
    ran = virsh(daemon.uri, *command, check=False)
    assert daemon.proc is not None and daemon.proc.wait(30) == -signal.SIGKILL, ran.stderr
    assert ran.returncode == 1, ran
    assert f"test hook {KILL_AFTER_PORT_CREATE_ENV}: SIGKILL after creating port" in daemon.log.read_text()
    (leaked,) = set(net_ports(network)) - before
    daemon.env = {}
    return leaked


def restart_and_sweep(daemon: DaemonProcess) -> str:
    """Start the daemon again and wait for its sweep of unclaimed ports; returns what it logged of it."""
    sweeps = daemon.log.read_text().count(SWEPT)
    daemon.start()
    log = daemon.log.read_text
    wait_for(lambda: log().count(SWEPT) > sweeps, 30, what=lambda: log()[-2000:])
    return log().split(SWEPT)[sweeps + 1]


def test_a_port_created_by_a_daemon_killed_before_recording_it_is_deleted_by_the_next_daemon(
    kvm: None, tiny_kernel: Path, network: str, tmp_path: Path
) -> None:
    """The daemon SIGKILLs itself right after libvirt's network driver created a port for a start (a test
    hook), before anything recorded it: the next daemon deletes that port, for a defined domain and for a
    transient one (virsh create: unknown to the next daemon), and a port its shut-off domain owns that no
    journal names. Another domain's port, claimed by its runtime record across the restarts, and a port of
    another owner with the same domain name (not ours: the UUID differs) stay. The oracle is libvirt's own
    net-port-list."""
    crashed, kept, transient = unique("ifvm"), unique("ifvm"), unique("ifvm")
    for name, mac in ((crashed, NET_MAC), (kept, BRIDGE_MAC), (transient, "52:54:00:6e:00:04")):
        iface = f"<interface type='network'><mac address='{mac}'/><source network='{network}'/></interface>"
        (tmp_path / f"{name}.xml").write_text(
            domain_xml(name, tiny_kernel).replace("<serial type='pty'/>", f"<serial type='pty'/>{iface}")
        )
    foreign_xml = tmp_path / "foreign.xml"
    foreign = str(uuid.uuid4())
    foreign_xml.write_text(
        f"<networkport><uuid>{foreign}</uuid><owner><name>{crashed}</name><uuid>{uuid.uuid4()}</uuid></owner>"
        f"<mac address='{ETH_MAC}'/></networkport>"
    )
    with running_daemon(tmp_path / "d") as daemon:
        for name in (crashed, kept):
            virsh(daemon.uri, "define", str(tmp_path / f"{name}.xml"))
        crashed_uuid = virsh(daemon.uri, "domuuid", crashed).stdout.strip()
        virsh(daemon.uri, "start", kept)
        (kept_port,) = net_ports(network)
        virsh(ORACLE, "net-port-create", network, str(foreign_xml))
        try:
            assert sorted(net_ports(network)) == sorted([kept_port, foreign])
            leaked = crash_after_port_create(daemon, network, "start", crashed)
            assert port_owner(network, leaked) == (crashed, crashed_uuid)
            # and a port of the shut-off domain that no daemon journaled (as an earlier version, or a delete at
            # stop that failed, leaves one): found by its owner
            orphan_xml = tmp_path / "orphan.xml"
            orphan = str(uuid.uuid4())
            orphan_xml.write_text(
                f"<networkport><uuid>{orphan}</uuid><owner><name>{crashed}</name><uuid>{crashed_uuid}</uuid></owner>"
                f"<mac address='{NET_MAC}'/></networkport>"
            )
            virsh(ORACLE, "net-port-create", network, str(orphan_xml))
            swept = restart_and_sweep(daemon)
            assert sorted(net_ports(network)) == sorted([kept_port, foreign])
            assert swept.startswith("2 unclaimed port(s) deleted"), swept
            assert f"deleted port {leaked} of network {network}: " in daemon.log.read_text()
            assert f"deleted port {orphan} of network {network}: " in daemon.log.read_text()
            assert domstate(daemon, crashed, reason=False) == "shut off"
            assert domstate(daemon, kept, reason=False) == "running"
            assert f"portid='{kept_port}'" in virsh(daemon.uri, "dumpxml", kept).stdout
            # a transient domain: the next daemon knows neither it nor its owner, only its own journal
            leaked = crash_after_port_create(daemon, network, "create", str(tmp_path / f"{transient}.xml"))
            assert port_owner(network, leaked)[0] == transient
            swept = restart_and_sweep(daemon)
            assert sorted(net_ports(network)) == sorted([kept_port, foreign])
            assert swept.startswith("1 unclaimed port(s) deleted"), swept
            assert transient not in virsh(daemon.uri, "list", "--all", "--name").stdout
            # and the domain starts (and stops) as before, with a port of its own
            virsh(daemon.uri, "start", crashed)
            assert len(set(net_ports(network)) - {kept_port, foreign}) == 1
            virsh(daemon.uri, "destroy", crashed)
            virsh(daemon.uri, "destroy", kept)
            wait_for(lambda: net_ports(network) == [foreign], 30, what=lambda: net_ports(network))
            wait_for(lambda: daemon.runtime_leftovers() == [], 30, what=daemon.runtime_leftovers)
        finally:
            virsh(ORACLE, "net-port-delete", network, foreign, check=False)


def interfaces_of(xml: str) -> list[str]:
    return re.findall(r"^    <interface.*?</interface>\n", xml, re.S | re.M)


def test_attach_detach_interface_config_and_domif_setlink(
    kvm: None, daemon: DaemonProcess, tiny_kernel: Path, network: str, tmp_path: Path
) -> None:
    name = unique("ifvm")
    xml = tmp_path / "vm.xml"
    xml.write_text(domain_xml(name, tiny_kernel))
    virsh(daemon.uri, "define", str(xml))
    try:
        # attach-interface builds the <interface> and attaches it to the persistent config: a MAC is
        # generated and kept, and a PCI address assigned
        virsh(daemon.uri, "attach-interface", name, "network", network, "--model", "virtio", "--config")
        # without --config virsh calls virDomainAttachDevice (live): refused for a shut-off domain, as libvirt
        off = virsh(daemon.uri, "attach-interface", name, "bridge", network, "--model", "virtio", check=False)
        assert "error: Requested operation is not valid: domain is not running" in off.stderr, off.stderr
        virsh(
            daemon.uri,
            "attach-interface",
            name,
            "bridge",
            network,
            "--mac",
            BRIDGE_MAC,
            "--model",
            "virtio",
            "--config",
        )
        persistent = virsh(daemon.uri, "dumpxml", name, "--inactive").stdout
        first, second = interfaces_of(persistent)
        mac = re.search(r"<mac address='(52:54:00:[0-9a-f:]{8})'/>", first)
        assert mac and f"<source network='{network}'/>" in first and "slot='0x02'" in first, first
        assert f"<mac address='{BRIDGE_MAC}'/>" in second and "slot='0x03'" in second, second
        # detach-interface finds it by type (and MAC) in the persistent XML and detaches that element
        none = virsh(daemon.uri, "detach-interface", name, "bridge", "--mac", NET_MAC, "--config", check=False)
        assert f"error: No interface with MAC address {NET_MAC} was found" in none.stderr, none.stderr  # virsh's
        virsh(daemon.uri, "detach-interface", name, "bridge", "--mac", BRIDGE_MAC, "--config")
        assert interfaces_of(virsh(daemon.uri, "dumpxml", name, "--inactive").stdout) == [first]
        virsh(daemon.uri, "start", name)
        wait_for(lambda: TINY_BANNER in serial_log(daemon, name), 120, what="banner")
        # no hotplug: a live attach is refused and changes nothing
        live = virsh(daemon.uri, "attach-interface", name, "bridge", network, "--model", "virtio", check=False)
        assert "(no hotplug); use --config" in live.stderr, live.stderr
        (tap,) = started_taps(daemon, name)
        assert virsh(daemon.uri, "domif-getlink", name, tap).stdout.split() == [tap, "up"]
        # domif-setlink: the VMM's virtio-net STATUS link bit (its status), the live XML; not the config
        virsh(daemon.uri, "domif-setlink", name, tap, "down")
        assert vmm_net(daemon, name, mac.group(1))["link_up"] is False
        assert virsh(daemon.uri, "domif-getlink", name, tap).stdout.split() == [tap, "down"]
        assert "<link state=" not in virsh(daemon.uri, "dumpxml", name, "--inactive").stdout
        virsh(daemon.uri, "domif-setlink", name, mac.group(1), "up")
        assert vmm_net(daemon, name, mac.group(1))["link_up"] is True
        # --config: the persistent definition only; the running VM keeps its link up
        # (by MAC: the definition has no tap name, so virsh finds no 'vnetN' there, as with libvirt's drivers)
        assert (
            "interface 'vnet" in virsh(daemon.uri, "domif-setlink", name, tap, "down", "--config", check=False).stderr
        )
        virsh(daemon.uri, "domif-setlink", name, mac.group(1), "down", "--config")
        assert "<link state='down'/>" in virsh(daemon.uri, "dumpxml", name, "--inactive").stdout
        assert vmm_net(daemon, name, mac.group(1))["link_up"] is True
        virsh(daemon.uri, "destroy", name)
        virsh(daemon.uri, "start", name)  # the definition's link state is the new VM's
        wait_for(lambda: vmm_net(daemon, name, mac.group(1))["link_up"] is False, 30, what="link down at start")
        virsh(daemon.uri, "destroy", name)
    finally:
        virsh(daemon.uri, "destroy", name, check=False)
        virsh(daemon.uri, "undefine", name, check=False)


def vmm_net(daemon: DaemonProcess, name: str, mac: str) -> dict[str, Any]:
    """The VMM's own report of its virtio-net device with ``mac`` (the VMM is not the daemon under test)."""
    status = vmm_request(daemon, name, "status")
    return next(d for d in status["virtio"] if d.get("device_id") == 1 and d.get("mac") == mac)


LEASE_MAC = "52:54:00:6e:00:0b"


def test_domifaddr_from_the_networks_leases_and_the_hosts_arp_table(
    kvm: None, daemon: DaemonProcess, tiny_kernel: Path, network: str, tmp_path: Path
) -> None:
    """The tiny guest runs no DHCP client, so udhcpc is the client, in a namespace of the test's own, its veth on
    the network's bridge with the interface's MAC: the lease is libvirt's dnsmasq's for that MAC either way."""
    name = unique("ifvm")
    iface = f"<interface type='network'><mac address='{LEASE_MAC}'/><source network='{network}'/></interface>"
    xml = tmp_path / "vm.xml"
    xml.write_text(domain_xml(name, tiny_kernel).replace("<serial type='pty'/>", f"<serial type='pty'/>{iface}"))
    virsh(daemon.uri, "define", str(xml))
    try:
        virsh(daemon.uri, "start", name)
        (tap,) = started_taps(daemon, name)
        none = virsh(daemon.uri, "domifaddr", name, "--source", "lease").stdout
        assert LEASE_MAC not in none  # no lease yet: the interface is not listed
        with dhcp_client(network, LEASE_MAC) as lease:
            address = lease()
            leases = virsh(ORACLE, "net-dhcp-leases", network, "--mac", LEASE_MAC).stdout
            assert f"{address}/24" in leases, leases
            shown = virsh(daemon.uri, "domifaddr", name, "--source", "lease").stdout
            assert re.search(rf"^ {tap}\s+{LEASE_MAC}\s+ipv4\s+{re.escape(address)}/24$", shown, re.M), shown
            # one datagram from the host to the test's namespace (on the test bridge) puts it in the ARP table
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                udp.sendto(b"arp", (address, 9))  # the discard port
            wait_for(lambda: LEASE_MAC in sh("ip", "-4", "neigh", "show", address), 30, what="ARP entry")
            shown = virsh(daemon.uri, "domifaddr", name, "--source", "arp").stdout
            assert re.search(rf"^ {tap}\s+{LEASE_MAC}\s+ipv4\s+{re.escape(address)}/0$", shown, re.M), shown
        agent = virsh(daemon.uri, "domifaddr", name, "--source", "agent", check=False)
        assert "argument unsupported: the mshv driver has no guest agent" in agent.stderr, agent.stderr
        virsh(daemon.uri, "destroy", name)
        off = virsh(daemon.uri, "domifaddr", name, check=False)
        assert "error: Requested operation is not valid: domain is not running" in off.stderr, off.stderr
    finally:
        virsh(daemon.uri, "destroy", name, check=False)
        virsh(daemon.uri, "undefine", name, check=False)
