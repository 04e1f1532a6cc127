"""Frames through a running domain's <interface type='bridge'>, end to end through the real daemon and virsh.

The daemon runs inside a network namespace the test creates (``ip netns exec``), so the tap it makes and the
bridge it joins are that namespace's: nothing reaches the host's own network. The tiny guest's virtio-net
driver (key ``u``, typed in ``virsh console``) sends frames; a raw AF_PACKET socket on the namespace's
bridge reads them, checks their bytes and answers each; then ``virsh domifstat`` and ``domstats
--interface`` must show counters grown by exactly those frames. With ``<driver queues='2'/>`` the guest's
``m`` key moves them on queue pair 2 and the counters (summed over the pairs) must be the same. Oracles
besides the daemon's counters: the frames themselves, the guest's own counts on its serial console, and the
kernel's counters of the tap (``ip -s`` in the namespace) and its queues (``ip -d``).
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess, PtyProcess, domain_xml, serial_log, virsh, wait_for
from tests.support.guests import TINY_BANNER, TINY_NET_FRAME_LEN, TINY_NET_FRAMES, tiny_net, tiny_net_hash
from tests.support.libvirtd import unique
from tests.support.netns import NetNs, answer_tiny_net, netns
from tests.support.networks import sh

pytestmark = [
    pytest.mark.virsh,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]

BRIDGE = "mshvbr0"  # inside the test's namespace only
MAC = "52:54:00:6e:74:01"
HOST_SIDE_MAC = "fe:54:00:6e:74:01"  # the tap's own MAC (libvirt's rule: the guest's with fe: first)
FIELDS = [f"{d}_{c}" for d in ("rx", "tx") for c in ("bytes", "packets", "errs", "drop")]


def domifstat(daemon: DaemonProcess, name: str, dev: str) -> dict[str, int]:
    out = virsh(daemon.uri, "domifstat", name, dev).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()]
    assert all(row[0] == dev for row in rows) and [row[1] for row in rows] == FIELDS, out
    return {row[1]: int(row[2]) for row in rows}


def press_in_console(
    daemon: DaemonProcess, name: str, sock: socket.socket, presses: int, key: bytes = b"u"
) -> list[bytes]:
    """Type ``key`` ``presses`` times in ``virsh console``, answering the guest's frames each time; the replies."""
    guest_mac = bytes.fromhex(MAC.replace(":", ""))
    replies: list[bytes] = []
    con = PtyProcess(["virsh", "-c", daemon.uri, "console", name])
    try:
        con.wait_console_ready()
        for press in range(1, presses + 1):
            con.write(key)
            replies += answer_tiny_net(sock, guest_mac, press, timeout=60)  # checks the guest's frames' bytes

            def printed(press: int = press) -> bool:
                text = serial_log(daemon, name)
                assert "TINY-NET-FAIL" not in text, text[-2000:]
                return len(tiny_net(text)) >= press

            wait_for(printed, 60, what=lambda: serial_log(daemon, name)[-2000:])
        con.write(b"\x1d")
        assert con.wait() == 0
    finally:
        con.kill()
    return replies


def in_namespace(ns: NetNs, tap: str) -> str:
    return sh("ip", "-n", ns.name, "-o", "link", "show", tap)


@pytest.mark.parametrize(
    ("key", "driver"),
    [(b"u", ""), (b"m", "<driver queues='2'/>")],
    ids=["one-pair", "pair-two-of-two"],  # m: VQ_PAIRS_SET 2, then the frames move on pair 2
)
def test_frames_through_a_bridge_interface_are_counted_by_domifstat_and_domstats(
    kvm: None, tiny_kernel: Path, tmp_path: Path, key: bytes, driver: str
) -> None:
    name = unique("iftraffic")
    with netns("iftraffic") as ns:
        # Without snooping the bridge joins no all-snoopers group (224.0.0.106): its IGMP report, sent at a
        # random point of its first second, would otherwise reach the guest as one more frame.
        ns.run("ip", "link", "add", BRIDGE, "type", "bridge", "mcast_snooping", "0")
        ns.run("ip", "link", "set", BRIDGE, "up")
        iface = (
            f"<interface type='bridge'><mac address='{MAC}'/><source bridge='{BRIDGE}'/>"
            f"<model type='virtio'/>{driver}</interface>"
        )
        xml = tmp_path / "vm.xml"
        xml.write_text(domain_xml(name, tiny_kernel).replace("<serial type='pty'/>", f"<serial type='pty'/>{iface}"))
        daemon = DaemonProcess(tmp_path / "d", netns=ns.name).start()
        try:
            virsh(daemon.uri, "define", str(xml))
            virsh(daemon.uri, "start", name)
            wait_for(lambda: TINY_BANNER in serial_log(daemon, name), 120, what="banner")
            (tap,) = re.findall(r"<target dev='([^']+)'/>", virsh(daemon.uri, "dumpxml", name).stdout)
            shown = in_namespace(ns, tap)
            assert f" master {BRIDGE} " in shown and f"link/ether {HOST_SIDE_MAC}" in shown, shown
            assert HOST_SIDE_MAC not in sh("ip", "-o", "link", "show")  # the host has no such tap
            assert domifstat(daemon, name, tap) == dict.fromkeys(FIELDS, 0)
            kernel_before = ns.link_stats(tap)
            with ns.packet_socket(BRIDGE) as sock:
                replies = press_in_console(daemon, name, sock, 2, key)
            n = 2 * TINY_NET_FRAMES
            line = tiny_net(serial_log(daemon, name))[-1]
            assert line == {
                "press": 2,
                "tx": n,
                "rx": n,
                "rxbytes": sum(map(len, replies)),
                "sum": tiny_net_hash(replies),
                "irqs": line["irqs"],
                **({"pairs": 2, "ack": 0, "rx1": 0} if driver else {}),  # nothing reached pair 1
            }, line
            if driver:
                assert ns.tun_queues(tap) == (True, 2, 0)  # the kernel's view: both pairs' tap queues attached
            kernel_after = ns.link_stats(tap)
            # the tap's rx is what the guest sent, its tx what was delivered to the guest (the kernel's count)
            assert {k: kernel_after[k] - kernel_before[k] for k in kernel_after} == {
                "rx_packets": n,
                "rx_bytes": n * TINY_NET_FRAME_LEN,
                "tx_packets": n,
                "tx_bytes": sum(map(len, replies)),
            }
            # domifstat as libvirt shows a tap: from the guest's side (rx = what the guest received)
            expected = {
                "rx_bytes": sum(map(len, replies)),
                "rx_packets": n,
                "rx_errs": 0,
                "rx_drop": 0,
                "tx_bytes": n * TINY_NET_FRAME_LEN,
                "tx_packets": n,
                "tx_errs": 0,
                "tx_drop": 0,
            }
            assert domifstat(daemon, name, tap) == expected
            assert domifstat(daemon, name, MAC) == expected
            stats = virsh(daemon.uri, "domstats", name, "--interface").stdout.split()
            dotted = {f"{k.split('_')[0]}.{k.split('_')[1].replace('packets', 'pkts')}": v for k, v in expected.items()}
            assert stats[2:] == ["net.count=1", f"net.0.name={tap}", *(f"net.0.{k}={v}" for k, v in dotted.items())]
            virsh(daemon.uri, "destroy", name)
            wait_for(lambda: not ns.link_exists(tap), 30, what=lambda: in_namespace(ns, tap))
        finally:
            virsh(daemon.uri, "destroy", name, check=False)
            virsh(daemon.uri, "undefine", name, check=False)
            daemon.stop()
            daemon.destroy_all_vmms()
