"""The daemon's taps (mshv_libvirt/driver/taps.py, nets.py) made for real in a test namespace: the kernel's
view of them (``ip -n``) is the oracle; a tap lives exactly as long as a descriptor of it."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator

import pytest

from mshv_libvirt.driver import nets
from mshv_libvirt.driver.taps import create_tap
from mshv_libvirt.errors import ErrorCode, ErrorDomain, VirtError
from tests.support.netns import NetNs, netns
from tests.support.waits import wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

MAC = "52:54:00:ab:cd:01"


@pytest.fixture
def ns() -> Iterator[NetNs]:
    with netns("taps") as n:
        n.run("ip", "link", "add", "tbr0", "type", "bridge")
        n.run("ip", "link", "set", "tbr0", "mtu", "1400", "up")
        yield n


def link(ns: NetNs, name: str) -> str:
    r = subprocess.run(["ip", "-n", ns.name, "-o", "link", "show", name], capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else ""


def test_a_tap_joins_its_bridge_with_the_bridges_mtu_and_goes_with_its_descriptor(ns: NetNs) -> None:
    tap = ns.call(lambda: create_tap("tt0", MAC, mtu=None, bridge="tbr0"))
    try:
        shown = link(ns, "tt0")
        assert " master tbr0 " in shown and ",UP" in shown and " mtu 1400 " in shown, shown
        assert "link/ether fe:54:00:ab:cd:01 " in shown, shown  # libvirt's host side: fe: first
    finally:
        tap.close()
    wait_for(lambda: link(ns, "tt0") == "", 10, what="tap gone")


def test_an_mtu_asked_for_wins_and_no_bridge_is_joined_without_one(ns: NetNs) -> None:
    tap = ns.call(lambda: create_tap("tt1", MAC, mtu=9000, bridge=None))
    try:
        shown = link(ns, "tt1")
        assert " mtu 9000 " in shown and " master " not in shown and ",UP" in shown, shown
    finally:
        tap.close()


@pytest.mark.parametrize(
    ("name", "mtu", "bridge", "message"),
    [
        # virNetDevTapCreateInBridgePort's order: the bridge's MTU is read before the port is added
        ("tt2", None, "nobr0", "Cannot get interface MTU on 'nobr0': No such device"),
        ("tt2", 1500, "nobr0", "Unable to add bridge nobr0 port tt2: No such device"),
        ("t" * 16, None, None, f"Network interface name '{'t' * 16}' is too long: Numerical result out of range"),
    ],
)
def test_a_step_that_fails_is_libvirts_error_and_leaves_nothing(
    ns: NetNs, name: str, mtu: int | None, bridge: str | None, message: str
) -> None:
    with pytest.raises(VirtError) as info:
        ns.call(lambda: create_tap(name, MAC, mtu=mtu, bridge=bridge))
    assert (info.value.code, info.value.domain, info.value.message) == (
        ErrorCode.SYSTEM_ERROR,
        ErrorDomain.NONE,
        message,
    )
    assert link(ns, name) == ""


class _Taken(nets.IfnameAllocator):
    """Hands out a name another VM's tap holds first, as when a second daemon took it meanwhile."""

    def __init__(self, first: str) -> None:
        super().__init__()
        self.first: str | None = first

    def next(self) -> str:
        name, self.first = self.first, None
        return name if name is not None else super().next()


def test_a_generated_name_taken_meanwhile_is_skipped(ns: NetNs) -> None:
    held = ns.open_tap("vnet0")  # busy: another VM's
    try:
        names = _Taken("vnet0")
        tap = ns.call(lambda: nets._tap(None, names, MAC, None, "tbr0"))
        try:
            assert re.fullmatch(r"vnet\d+", tap.name) and tap.name != "vnet0"
            assert " master tbr0 " in link(ns, tap.name)
        finally:
            tap.close()
    finally:
        os.close(held)


def test_queues_above_one_make_a_multiqueue_tap_with_a_descriptor_each(ns: NetNs) -> None:
    tap = ns.call(lambda: create_tap("tt3", MAC, mtu=None, bridge="tbr0", queues=4))
    try:
        assert len(tap.fds) == 4 and len(set(tap.fds)) == 4
        assert ns.tun_queues("tt3") == (True, 4, 0)  # the kernel's view: multi_queue numqueues 4
        shown = link(ns, "tt3")
        assert " master tbr0 " in shown and ",UP" in shown, shown
    finally:
        tap.close()
    wait_for(lambda: link(ns, "tt3") == "", 10, what="multiqueue tap gone with its last descriptor")
    one = ns.call(lambda: create_tap("tt4", MAC, mtu=None, bridge=None))
    try:
        assert one.queue_fds == () and ns.tun_queues("tt4") == (False, 1, 0)
    finally:
        one.close()


def test_more_queues_than_the_kernel_takes_is_libvirts_tap_error_and_leaves_nothing(ns: NetNs) -> None:
    # MAX_TAP_QUEUES (256): the 257th TUNSETIFF fails with E2BIG, as virNetDevTapCreate would report it
    with pytest.raises(VirtError) as info:
        ns.call(lambda: create_tap("tt5", MAC, mtu=None, bridge=None, queues=257))
    assert (info.value.code, info.value.message) == (
        ErrorCode.SYSTEM_ERROR,
        "Unable to create tap device tt5: Argument list too long",
    )
    wait_for(lambda: link(ns, "tt5") == "", 10, what="no tap left")
