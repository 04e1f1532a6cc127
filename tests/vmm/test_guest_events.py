"""inject-nmi and send-key in a real VMM, seen by the tiny guest: its NMI handler counts, its main loop
prints what the i8042 hands it on port 0x60."""

from __future__ import annotations

import time
from typing import Any

import pytest

from mshv_libvirt.vmm.devices import keymap
from tests.support.guests import TINY_BANNER, TINY_KEY, TINY_NMI, tiny_keys
from tests.support.waits import assert_quiet, wait_for
from tests.vmm.harness import VmmProcess

pytestmark = pytest.mark.kvm

BOOT = 60


def test_nmi_reaches_vcpu0_and_waits_while_paused(tiny_vm: VmmProcess) -> None:
    tiny_vm.wait_serial(TINY_BANNER, timeout=BOOT)
    assert TINY_NMI not in tiny_vm.serial
    assert tiny_vm.command("inject-nmi") == {"state": "running"}
    tiny_vm.wait_serial(f"{TINY_NMI} 00000001\n", timeout=BOOT)
    tiny_vm.command("inject-nmi")
    tiny_vm.wait_serial(f"{TINY_NMI} 00000002\n", timeout=BOOT)
    # Paused, the NMI stays pending in the LAPIC (as in QEMU) and is taken on resume.
    tiny_vm.command("pause")
    assert tiny_vm.command("inject-nmi") == {"state": "paused"}
    assert_quiet(lambda: f"{TINY_NMI} 00000003" not in tiny_vm.serial, 0.5, "paused: the NMI stays pending")
    tiny_vm.command("resume")
    tiny_vm.wait_serial(f"{TINY_NMI} 00000003\n", timeout=BOOT)


def test_send_key_presses_in_order_and_releases_in_reverse(tiny_vm: VmmProcess) -> None:
    tiny_vm.wait_serial(TINY_BANNER, timeout=BOOT)
    a, up = keymap.to_qnum(keymap.LINUX, 30), keymap.to_qnum(keymap.LINUX, 103)  # KEY_A, KEY_UP
    assert (a, up) == (0x1E, 0xC8)
    started = time.monotonic()
    assert tiny_vm.command("send-key", keys=[a, up], holdtime=50) == {"state": "running"}
    want = ["1e", "e0", "48", "e0", "c8", "9e"]  # A down, Up down, Up up, A up

    def all_keys() -> bool:
        seen = tiny_keys(tiny_vm.serial)
        assert len(seen) <= len(want), seen
        return seen == want

    wait_for(all_keys, timeout=BOOT, interval=0.02, what=lambda: tiny_keys(tiny_vm.serial))
    assert time.monotonic() - started >= 3 * 0.05  # each key event one hold after the previous
    # A second request queues behind nothing; Pause has no release, as on a PC keyboard.
    tiny_vm.command("send-key", keys=[keymap.to_qnum(keymap.LINUX, 119)], holdtime=1)
    tiny_vm.wait_serial(f"{TINY_KEY} c5\n", timeout=BOOT)
    assert tiny_keys(tiny_vm.serial)[len(want) :] == ["e1", "1d", "45", "e1", "9d", "c5"]


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ({}, "send-key needs 'keys'"),
        ({"keys": []}, "send-key needs 'keys'"),
        ({"keys": [0]}, "send-key needs 'keys'"),
        ({"keys": [256]}, "send-key needs 'keys'"),
        ({"keys": [1] * 17}, "send-key needs 'keys'"),
        ({"keys": [True]}, "send-key needs 'keys'"),
        ({"keys": [30], "holdtime": -1}, "'holdtime' must be"),
        ({"keys": [30], "holdtime": "1"}, "'holdtime' must be"),
    ],
)
def test_send_key_refuses_bad_requests(tiny_vm: VmmProcess, args: dict[str, Any], error: str) -> None:
    tiny_vm.wait_serial(TINY_BANNER, timeout=BOOT)
    reply = tiny_vm.request("send-key", **args)
    assert reply["ok"] is False and error in reply["error"]
    assert tiny_keys(tiny_vm.serial) == []
