"""virtio-net in a real VMM process: the tap is created in a test namespace and handed over as the
config's "net" fd, ``set-link`` and ``status`` go through the VMM's control socket, and a SIGKILL of
the VMM leaves neither a thread of it nor the tap behind."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support.guests import (
    TINY_BANNER,
    TINY_IRQ_FLAG,
    TINY_NET_FRAME_LEN,
    TINY_NET_FRAMES,
    tiny_net,
    tiny_net_hash,
)
from tests.support.netns import NetNs, answer_tiny_net, netns
from tests.support.procfs import process_gone
from tests.support.waits import wait_for
from tests.vmm.harness import VmmProcess

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

SLOT = 6
MAC = "52:54:00:12:34:56"
TAP = "vtv1"
COUNTERS = ("rx_packets", "rx_bytes", "rx_drops", "tx_packets", "tx_bytes", "tx_drops")


@contextmanager
def vmm_with_tap(
    tiny_kernel: Path, tmp_path: Path, *, link_up: bool = True, cmdline: str = "console=ttyS0 tiny"
) -> Iterator[tuple[VmmProcess, NetNs]]:
    """A VMM with one virtio-net on a non-persistent tap of a test namespace; the test's copy of the
    tap fd is closed once the VMM has it, so the VMM's is the only one left."""
    with netns("vvmm") as ns:
        tap = ns.open_tap(TAP)
        try:
            net = [{"slot": SLOT, "fd": tap, "mac": MAC, "mtu": 1500, "link_up": link_up}]
            vm = VmmProcess.start(tmp_path / "vm", tiny_kernel, cmdline=cmdline, net=net, pass_fds=(tap,))
        finally:
            os.close(tap)
        with vm:
            vm.connect()
            yield vm, ns


def net_status(vm: VmmProcess) -> dict[str, Any]:
    devices: list[dict[str, Any]] = [d for d in vm.command("status")["virtio"] if d["device_id"] == 1]
    (dev,) = devices
    return dev


def test_status_reports_the_nets_counters_and_set_link_flips_status(
    kvm: None, tiny_kernel: Path, tmp_path: Path
) -> None:
    with vmm_with_tap(tiny_kernel, tmp_path) as (vm, _ns):
        dev = net_status(vm)
        assert dev["mac"] == MAC and dev["link_up"] is True
        assert {k: dev[k] for k in COUNTERS} == dict.fromkeys(COUNTERS, 0)  # no driver: nothing moved
        assert vm.command("set-link", mac=MAC.upper(), up=False) == {"state": "running"}
        assert net_status(vm)["link_up"] is False  # STATUS as the driver reads it
        vm.command("set-link", mac=MAC, up=True)
        assert net_status(vm)["link_up"] is True


def test_set_link_survives_a_reset_and_bad_requests_are_refused(kvm: None, tiny_kernel: Path, tmp_path: Path) -> None:
    with vmm_with_tap(tiny_kernel, tmp_path) as (vm, _ns):
        vm.command("set-link", mac=MAC, up=False)
        boots = vm.command("status")["boots"]
        vm.command("reset")
        assert vm.command("status")["boots"] == boots + 1
        assert net_status(vm)["link_up"] is False  # the rebuilt device keeps domif-setlink's state
        unknown = vm.request("set-link", mac="52:54:00:00:00:01", up=True)
        assert not unknown["ok"] and "52:54:00:00:00:01" in unknown["error"], unknown
        bad = vm.request("set-link", mac=MAC, up="yes")
        assert not bad["ok"] and "'up'" in bad["error"], bad


def test_link_down_from_the_config(kvm: None, tiny_kernel: Path, tmp_path: Path) -> None:
    with vmm_with_tap(tiny_kernel, tmp_path, link_up=False) as (vm, _ns):
        assert net_status(vm)["link_up"] is False


def tids(pid: int) -> set[int]:
    return {int(t) for t in os.listdir(f"/proc/{pid}/task")}


def session_members(sid: int) -> set[int]:
    """Processes whose session id is ``sid`` (the VMM leads its own session), read from /proc."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[3]) == sid and stat[0] not in ("Z", "X"):  # field 6 of proc(5): session
            found.add(int(entry))
    return found


def holds_tun(pid: int) -> bool:
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/net/tun":
                return True
        except OSError:
            continue
    return False


def test_a_sigkilled_vmm_leaves_no_thread_and_releases_the_tap(kvm: None, tiny_kernel: Path, tmp_path: Path) -> None:
    with vmm_with_tap(tiny_kernel, tmp_path) as (vm, ns):
        pid = vm.proc.pid
        net_status(vm)  # the device is built: its I/O and watcher threads run
        threads = tids(pid)
        assert len(threads) > 1
        assert holds_tun(pid)
        assert ns.link_exists(TAP)  # only the VMM's descriptor keeps the non-persistent tap
        os.kill(pid, signal.SIGKILL)
        vm.proc.wait(10)
        assert process_gone(pid)
        assert not any(Path(f"/proc/{pid}/task/{t}").exists() for t in threads)
        wait_for(lambda: not session_members(pid), 10, what=f"every process of session {pid} gone")
        wait_for(lambda: not ns.link_exists(TAP), 10, what=f"tap {TAP} gone from {ns.name}")


def net_line(vm: VmmProcess, nth: int) -> dict[str, int]:
    """The guest's ``nth`` TINY-NET line, once printed (a TINY-NET-FAIL ends the wait at once)."""

    def printed() -> list[dict[str, int]] | None:
        assert "TINY-NET-FAIL" not in vm.serial, vm.diagnostics()
        found = tiny_net(vm.serial)
        return found if len(found) >= nth else None

    return wait_for(printed, 60, what=vm.diagnostics)[nth - 1]


def press_net(vm: VmmProcess, nth: int, sock: socket.socket) -> tuple[dict[str, int], list[bytes]]:
    """Press ``u`` once, be the guest's peer on the tap, and return its ``nth`` line and the replies."""
    vm.console_send(b"u")
    replies = answer_tiny_net(sock, bytes.fromhex(MAC.replace(":", "")), nth, timeout=60)
    return net_line(vm, nth), replies


@pytest.mark.parametrize("mode", ["", f" {TINY_IRQ_FLAG}"], ids=["polled", "irq"])
def test_the_tiny_guest_sends_frames_to_the_tap_and_counts_the_replies(
    kvm: None, tiny_kernel: Path, tmp_path: Path, mode: str
) -> None:
    with vmm_with_tap(tiny_kernel, tmp_path, cmdline="console=ttyS0 tiny" + mode) as (vm, ns):
        vm.wait_serial(TINY_BANNER, timeout=60)
        before = ns.link_stats(TAP)
        with ns.packet_socket(TAP) as sock:
            replies: list[bytes] = []
            for press in (1, 2):
                line, sent = press_net(vm, press, sock)  # the guest's frames checked byte for byte inside
                replies += sent
                n = press * TINY_NET_FRAMES
                assert line == {
                    "press": press,
                    "tx": n,
                    "rx": n,
                    "rxbytes": sum(map(len, replies)),
                    "sum": tiny_net_hash(replies),
                    "irqs": line["irqs"],
                }, (line, vm.diagnostics())
                # both queues share one vector, so interrupts close together arrive as one (the LAPIC's IRR bit)
                assert line["irqs"] >= press, line
        after = ns.link_stats(TAP)
        # the kernel's own count of the tap: what the VMM wrote (the guest's frames) and what it read
        grew = {k: after[k] - before[k] for k in after}
        assert grew == {
            "rx_packets": n,
            "rx_bytes": n * TINY_NET_FRAME_LEN,
            "tx_packets": n,
            "tx_bytes": sum(map(len, replies)),
        }, grew
        counters = {k: net_status(vm)[k] for k in COUNTERS}  # the device's, which domifstat reports
        assert counters == {
            "rx_packets": n,
            "rx_bytes": sum(map(len, replies)),
            "rx_drops": 0,
            "tx_packets": n,
            "tx_bytes": n * TINY_NET_FRAME_LEN,
            "tx_drops": 0,
        }, counters


def test_with_the_link_down_the_guests_frames_are_dropped_and_its_wait_for_replies_ends(
    kvm: None, tiny_kernel: Path, tmp_path: Path
) -> None:
    with vmm_with_tap(tiny_kernel, tmp_path, link_up=False) as (vm, ns):
        vm.wait_serial(TINY_BANNER, timeout=60)
        before = ns.link_stats(TAP)
        vm.console_send(b"u")
        line = net_line(vm, 1)  # after the guest's bounded wait (TINY_NET_WAIT_TICKS): nobody answered
        assert line == {"press": 1, "tx": TINY_NET_FRAMES, "rx": 0, "rxbytes": 0, "sum": 0, "irqs": line["irqs"]}
        after = ns.link_stats(TAP)
        assert after == before  # not a frame reached the tap
        counters = {k: net_status(vm)[k] for k in COUNTERS}
        assert counters == {**dict.fromkeys(COUNTERS, 0), "tx_drops": TINY_NET_FRAMES}, counters


def test_the_tiny_guest_asks_for_two_pairs_and_its_frames_go_both_ways_on_pair_two(
    kvm: None, tiny_kernel: Path, tmp_path: Path
) -> None:
    """Key ``m``: the guest negotiates CTRL_VQ and MQ, sends VQ_PAIRS_SET 2 on the control queue, then sends
    its frames on transmitq2 and counts the replies on receiveq2 (and, apart, what reached receiveq1)."""
    with netns("vmq") as ns:
        fds = ns.open_tap_queues(TAP, 2)
        try:
            net = [{"slot": SLOT, "fd": fds[0], "queue_fds": fds[1:], "mac": MAC, "mtu": 1500, "link_up": True}]
            # sandboxed: the control queue's thread runs on the device threads' seccomp list
            vm = VmmProcess.start(
                tmp_path / "vm", tiny_kernel, cmdline="console=ttyS0 tiny", net=net, pass_fds=tuple(fds), sandbox=True
            )
        finally:
            for fd in fds:
                os.close(fd)
        with vm:
            vm.connect()
            vm.wait_serial(TINY_BANNER, timeout=60)
            assert ns.tun_queues(TAP) == (True, 1, 1)  # the kernel's view: pair 2's tap queue detached
            dev = net_status(vm)
            assert (dev["max_queue_pairs"], dev["queue_pairs"]) == (2, 0), dev
            before = ns.link_stats(TAP)
            with ns.packet_socket(TAP) as sock:
                vm.console_send(b"m")
                replies = answer_tiny_net(sock, bytes.fromhex(MAC.replace(":", "")), 1, timeout=60)
                line = net_line(vm, 1)
            n = TINY_NET_FRAMES
            assert line == {
                "press": 1,
                "tx": n,
                "rx": n,
                "rxbytes": sum(map(len, replies)),
                "sum": tiny_net_hash(replies),
                "irqs": line["irqs"],
                "pairs": 2,  # max_virtqueue_pairs as the guest read it
                "ack": 0,  # VIRTIO_NET_OK
                "rx1": 0,  # the tap steered the replies to the queue their flow came from
            }, (line, vm.diagnostics())
            assert ns.tun_queues(TAP) == (True, 2, 0)  # VQ_PAIRS_SET 2 attached pair 2's tap queue
            grew = {k: v - before[k] for k, v in ns.link_stats(TAP).items()}
            assert grew == {
                "rx_packets": n,
                "rx_bytes": n * TINY_NET_FRAME_LEN,
                "tx_packets": n,
                "tx_bytes": sum(map(len, replies)),
            }, grew
            dev = net_status(vm)
            assert (dev["queue_pairs"], dev["ctrl_commands"]) == (2, 1), dev
            first, second = ({k: p[k] for k in COUNTERS} for p in dev["pairs"])
            assert first == dict.fromkeys(COUNTERS, 0), first
            assert second == {
                "rx_packets": n,
                "rx_bytes": sum(map(len, replies)),
                "rx_drops": 0,
                "tx_packets": n,
                "tx_bytes": n * TINY_NET_FRAME_LEN,
                "tx_drops": 0,
            }, second
            assert {k: dev[k] for k in COUNTERS} == second  # the device's total (domifstat's) sums the pairs
            assert vm.command("status")["sandbox"] is not None
            # A reset rebuilds the device on the same tap, whose queues the old one left detached.
            vm.command("reset")
            vm.wait_serial(TINY_BANNER, timeout=60, count=2)
            assert ns.tun_queues(TAP) == (True, 1, 1)  # the rebuilt device starts with pair 1 only
            with ns.packet_socket(TAP) as sock:
                vm.console_send(b"m")
                replies = answer_tiny_net(sock, bytes.fromhex(MAC.replace(":", "")), 1, timeout=60)
                line = net_line(vm, 2)
            assert (line["press"], line["ack"], line["rx"], line["rx1"]) == (1, 0, n, 0), (line, vm.diagnostics())
            assert ns.tun_queues(TAP) == (True, 2, 0)
            assert vm.proc.poll() is None
