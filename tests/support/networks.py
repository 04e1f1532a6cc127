"""libvirt networks and host network state for tests: isolated networks (no ``<forward>``) with test-unique
names, bridges and subnets, removed straight through libvirt; the host's routes and firewall rules, which
such a network must leave as they were."""

from __future__ import annotations

import contextlib
import random
import re
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt

from tests.support.daemon import virsh
from tests.support.libvirtd import missing, unique

ORACLE = "network:///system"


def sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout


def without_libvirt_scaffolding(saved: str) -> str:
    """``iptables-save`` output without what libvirtd sets up once, at its first network start, and keeps
    for its life: its empty private chains (LIBVIRT_INP, _OUT, _FWI, _FWO, _FWX, _PRT), the jumps to them,
    and tables holding nothing else (only ACCEPT policies). Removing them would break libvirtd's next
    network start; any rule a network leaves in them still shows."""
    lines = [re.sub(r"\[\d+:\d+\]", "", line) for line in saved.splitlines() if not line.startswith("#")]
    used = {ln.split()[1] for ln in lines if ln.startswith("-A LIBVIRT_")}
    empty = {ln[1:].split()[0] for ln in lines if ln.startswith(":LIBVIRT_")} - used
    kept = [
        ln
        for ln in lines
        if not (ln.startswith(":") and ln[1:].split()[0] in empty)
        and not (ln.startswith("-A ") and ln.split()[-1] in empty and ln.split()[-2] == "-j")
    ]
    out: list[str] = []
    for table in "\n".join(kept).split("COMMIT"):
        body = [ln for ln in table.strip().splitlines() if ln]
        if any(not ln.startswith(("*", ":")) or not ln.rstrip().endswith("ACCEPT") for ln in body[1:]):
            out.append("\n".join(body) + "\nCOMMIT")
    return "\n".join(out)


def host_network_state() -> dict[str, str]:
    """The host's routes and firewall rules (without counters): an isolated test network leaves them as found."""
    rules = {tool: without_libvirt_scaffolding(sh(tool)) for tool in ("iptables-save", "ip6tables-save")}
    return {**rules, "routes": sh("ip", "-4", "route") + sh("ip", "-6", "route")}


def free_subnet() -> str:
    """A 10.x.y.0/24 no route of this host uses ("10.x.y" returned), always as long (virsh pads its
    columns to the longest address)."""
    routes = sh("ip", "-4", "route") + sh("ip", "-4", "addr")
    for _ in range(100):
        prefix = f"10.{random.randint(200, 254)}.{random.randint(100, 255)}"
        if f"{prefix}." not in routes:
            return prefix
    raise AssertionError("no free 10.x.y.0/24 subnet")


def isolated_network_xml(name: str, subnet: str) -> str:
    # The bridge has the network's name (13 characters: within IFNAMSIZ); no <forward>: isolated.
    return (
        f"<network><name>{name}</name><bridge name='{name}' stp='off' delay='0'/>"
        f"<ip address='{subnet}.1' netmask='255.255.255.0'>"
        f"<dhcp><range start='{subnet}.100' end='{subnet}.200'/></dhcp></ip></network>"
    )


def remove_network(name: str) -> None:
    """Clean-up straight through libvirt (not through the code under test)."""
    with contextlib.suppress(libvirt.libvirtError):
        conn = libvirt.open(ORACLE)
        try:
            net = conn.networkLookupByName(name)
            if net.isActive():
                net.destroy()
            if net.isPersistent():
                net.undefine()
        finally:
            conn.close()


@contextlib.contextmanager
def isolated_network(tmp_path: Path) -> Iterator[str]:
    """An isolated network of libvirt's, started; its name is its bridge's. Afterwards no route or firewall
    rule of the host names its bridge (other tests on this machine change the rest of that state meanwhile)."""
    name = f"mshvn{uuid.uuid4().hex[:8]}"
    xml = tmp_path / f"{name}.xml"
    xml.write_text(isolated_network_xml(name, free_subnet()))
    try:
        virsh(ORACLE, "net-define", str(xml))
        virsh(ORACLE, "net-start", name)
        yield name
    finally:
        remove_network(name)
        left = {what: [ln for ln in text.splitlines() if name in ln] for what, text in host_network_state().items()}
        assert left == {what: [] for what in left}, left


def net_ports(network: str) -> list[str]:
    """``virsh net-port-list --uuid`` against libvirt's own network driver."""
    out = virsh(ORACLE, "net-port-list", network, "--uuid").stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


@contextlib.contextmanager
def dhcp_client(bridge: str, mac: str) -> Iterator[Callable[[], str]]:
    """A namespace with a veth on ``bridge``; the callable runs udhcpc there and returns the leased address."""
    busybox = "/bin/busybox"
    if not Path(busybox).exists():
        missing("busybox (busybox-static) is needed for a DHCP client")
    ns, veth, peer = unique("mshvns"), unique("mshvv"), unique("mshvp")
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", peer)
        sh("ip", "link", "set", peer, "netns", ns)
        sh("ip", "-n", ns, "link", "set", peer, "address", mac, "up")
        sh("ip", "link", "set", veth, "master", bridge, "up")

        def lease() -> str:
            out = subprocess.run(
                [
                    *("ip", "netns", "exec", ns, busybox, "udhcpc", "-i", peer, "-n", "-q", "-t", "10", "-T", "1"),
                    *("-s", "/bin/true", "-x", "hostname:guest"),
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            m = re.search(r"lease of (\S+) obtained", out.stdout + out.stderr)
            assert m, f"udhcpc got no lease:\n{out.stdout}{out.stderr}"
            return m.group(1)

        yield lease
    finally:
        sh("ip", "netns", "del", ns)  # takes the veth pair with it
        with contextlib.suppress(subprocess.CalledProcessError):
            sh("ip", "link", "del", veth)
