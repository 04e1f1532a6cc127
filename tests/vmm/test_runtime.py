"""The VMM's lifecycle decisions, observed from outside: a real VMM process (the daemon's command line) boots
the tiny guest (tests/support/guests.py) and is driven through its control socket (JSON lines,
mshv_libvirt/vmm/control.py) and its console; what it decided is read from its events, its status
reply and its exit file. The expected values (event names, exit reasons, error texts) are the control
protocol of docs/DESIGN.md; the guest's console keys are documented in tests/support/guests.py.

Not observable from outside, so not tested here: a vCPU that never answers a pause (no way to wedge one
thread of a live VMM), exits posted by a VM already torn down, and a guest reset racing a pause."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from mshv_libvirt.vmm.devices import keymap
from tests.support.guests import TINY_AP_BANNER, TINY_BANNER, TINY_POWERBUTTON, tiny_keys
from tests.support.waits import assert_quiet, wait_for
from tests.vmm.harness import VmmProcess

pytestmark = pytest.mark.kvm

BOOT = 60  # seconds; the tiny guest is up in well under one on KVM
STATUS_KEYS = {
    "state",
    "pty",
    "vcpus",
    "cpu_time_ns",
    "memory_kib",
    "boots",
    "backend",
    "vcpu_threads",
    "vcpu_tids",
    "exits",
    "python_exits",
    "python_exit_sites",
    "sandbox",
    "virtio",
}
# The commands that would run guest code again: refused once the guest ended and is preserved.
RUNNING_ONLY = ("pause", "resume", "shutdown", "reboot", "reset", "inject-nmi", "send-key")


@contextmanager
def booted(tmp_path: Path, kernel: Path, **config: Any) -> Iterator[VmmProcess]:
    with VmmProcess.start(tmp_path / "vm", kernel, cmdline="console=ttyS0 tiny", **config) as vm:
        if not config.get("start_paused"):
            vm.wait_serial(TINY_BANNER, timeout=BOOT)
        vm.connect()
        yield vm


def event_names(vm: VmmProcess) -> list[str]:
    return [e["event"] for e in vm.events]


def wait_keys(vm: VmmProcess, count: int) -> list[str]:
    return wait_for(
        lambda: (seen := tiny_keys(vm.serial))[count - 1 :] and seen,
        BOOT,
        interval=0.01,
        what=lambda: f"{tiny_keys(vm.serial)} {vm.diagnostics()}",
    )


def test_status_reports_the_running_vm(kvm: None, tiny_kernel: Path, tmp_path: Path) -> None:
    with booted(tmp_path, tiny_kernel, vcpus=2, memory_mib=96) as vm:
        vm.wait_serial(f"{TINY_AP_BANNER} 1", timeout=BOOT)
        status = vm.command("status")
        assert set(status) == STATUS_KEYS
        assert status["state"] == "running" and status["vcpus"] == 2 and status["boots"] == 1
        assert status["memory_kib"] == 96 * 1024 and status["pty"].startswith("/dev/pts/")
        assert isinstance(status["backend"], str) and status["backend"]
        assert status["exits"] > 0 and status["cpu_time_ns"] > 0
        # Python's: the guest's polls of PM1_STS, its IOAPIC accesses; never COM1's or the i8042's status.
        assert 0 < status["python_exits"] <= status["exits"]
        sites = status["python_exit_sites"]
        assert sum(sites.values()) == status["python_exits"] and sites["io 0x600"] > 0, sites
        assert not any(site in sites for site in ("io 0x3f8", "io 0x3fd", "io 0x64", "io 0x80")), sites
        assert status["virtio"] == []  # no <rng>: no virtio device (tests/vmm/test_tiny_virtio.py has one)
        tasks = {int(t) for t in os.listdir(f"/proc/{vm.proc.pid}/task")}  # the kernel's view, not the VMM's
        assert sorted(status["vcpu_tids"]) == ["0", "1"]
        assert sorted(status["vcpu_tids"].values()) == sorted(status["vcpu_threads"])
        assert len(set(status["vcpu_threads"])) == 2 and set(status["vcpu_threads"]) <= tasks
        assert event_names(vm) == []


def test_pause_and_resume_reach_every_vcpu_once(kvm: None, tiny_kernel: Path, tmp_path: Path) -> None:
    with booted(tmp_path, tiny_kernel, vcpus=2) as vm:
        vm.wait_serial(f"{TINY_AP_BANNER} 1", timeout=BOOT)
        assert vm.command("pause") == {"state": "paused"}
        assert vm.command("pause") == {"state": "paused"}  # no second round, no second event
        assert vm.command("status")["state"] == "paused"
        exits = vm.command("status")["exits"]
        vm.console_send(b"i")  # the guest would read the IOAPIC: an MMIO exit, a line on the serial port
        assert_quiet(
            lambda: vm.command("status")["exits"] == exits, 0.3, "a window in which a running vCPU would take the byte"
        )
        assert vm.command("status")["exits"] == exits
        assert "TINY-IOAPIC-VERSION" not in vm.serial
        assert vm.command("resume") == {"state": "running"}
        assert vm.command("resume") == {"state": "running"}
        vm.wait_serial("TINY-IOAPIC-VERSION 00170020\n", timeout=BOOT)  # the byte typed while paused
        assert event_names(vm) == ["paused", "resumed"]
        assert vm.command("status")["boots"] == 1


def test_start_paused_runs_nothing_until_resumed(kvm: None, tiny_kernel: Path, tmp_path: Path) -> None:
    with booted(tmp_path, tiny_kernel, start_paused=True) as vm:
        status = vm.command("status")
        assert status["state"] == "paused" and status["exits"] == 0 and TINY_BANNER not in vm.serial
        assert vm.command("resume") == {"state": "running"}
        vm.wait_serial(TINY_BANNER, timeout=BOOT)
        assert event_names(vm) == ["resumed"]


def test_guest_poweroff_ends_with_shutdown(kvm: None, tiny_kernel: Path, tmp_path: Path) -> None:
    with booted(tmp_path, tiny_kernel) as vm:
        vm.console_send(b"q")  # ACPI S5
        record = vm.wait_exit(timeout=BOOT)
        assert record["reason"] == "shutdown" and "S5" in record["detail"]
        assert vm.events == [{"event": "shutdown", "detail": record["detail"]}]
        assert vm.proc.returncode == 0
        assert not Path(vm.config["pidfile"]).exists() and not Path(vm.config["control_socket"]).exists()


def test_guest_reset_restarts_in_the_same_process(kvm: None, tiny_kernel: Path, tmp_path: Path) -> None:
    with booted(tmp_path, tiny_kernel) as vm:
        vm.console_send(b"r")  # i8042 0xFE
        assert vm.wait_event("reboot", timeout=BOOT) == {"event": "reboot", "detail": "guest reset"}
        vm.wait_serial(TINY_BANNER, timeout=BOOT, count=2)
        status = vm.command("status")
        assert status["state"] == "running" and status["boots"] == 2 and vm.proc.poll() is None
        assert vm.exit_record() is None and event_names(vm) == ["reboot"]


def test_guest_reset_with_on_reboot_destroy_exits(kvm: None, tiny_kernel: Path, tmp_path: Path) -> None:
    with booted(tmp_path, tiny_kernel, on_reboot="destroy") as vm:
        vm.console_send(b"r")
        assert vm.wait_exit(timeout=BOOT) == {"reason": "reboot", "detail": "guest reset"}
        assert vm.events == [{"event": "reboot", "detail": "guest reset"}]
        assert vm.proc.returncode == 0
        assert vm.serial.count(TINY_BANNER) == 1


def test_reset_command_keeps_a_paused_vm_paused(kvm: None, tiny_kernel: Path, tmp_path: Path) -> None:
    with booted(tmp_path, tiny_kernel) as vm:
        vm.command("pause")
        assert vm.command("reset") == {"state": "paused"}  # like a reset button: the new VM waits too
        status = vm.command("status")
        assert status["state"] == "paused" and status["boots"] == 2 and status["exits"] == 0
        assert vm.serial.count(TINY_BANNER) == 1
        vm.command("resume")
        vm.wait_serial(TINY_BANNER, timeout=BOOT, count=2)
        assert event_names(vm) == ["paused", "reboot", "resumed"]
        assert vm.events[1]["detail"] == "reset" and TINY_POWERBUTTON not in vm.serial


def test_reboot_command_restarts_the_next_poweroff_only(kvm: None, tiny_kernel: Path, tmp_path: Path) -> None:
    with booted(tmp_path, tiny_kernel) as vm:
        assert vm.command("reboot") == {"state": "running"}
        assert vm.wait_event("reboot", timeout=BOOT) == {"event": "reboot", "detail": "reboot requested by the host"}
        vm.wait_serial(TINY_BANNER, timeout=BOOT, count=2)
        assert TINY_POWERBUTTON in vm.serial  # the guest saw the power button and powered off
        assert vm.command("status")["boots"] == 2
        vm.console_send(b"q")  # the request does not stick to the new boot
        record = vm.wait_exit(timeout=BOOT)
        assert record["reason"] == "shutdown" and "S5" in record["detail"]
        assert event_names(vm) == ["reboot", "shutdown"]


def test_shutdown_command_presses_the_power_button(kvm: None, tiny_kernel: Path, tmp_path: Path) -> None:
    with booted(tmp_path, tiny_kernel) as vm:
        assert vm.command("shutdown") == {"state": "running"}
        vm.wait_serial(TINY_POWERBUTTON, timeout=BOOT)
        assert vm.wait_exit(timeout=BOOT)["reason"] == "shutdown"
        assert event_names(vm) == ["shutdown"]


def test_without_acpi_there_is_no_power_button(kvm: None, tiny_kernel: Path, tmp_path: Path) -> None:
    with booted(tmp_path, tiny_kernel, acpi=False) as vm:
        for cmd in ("shutdown", "reboot"):
            reply = vm.request(cmd)
            assert reply["ok"] is False
            assert reply["error"] == "the guest has no ACPI power button (acpi is disabled)"
        assert vm.request("explode")["error"] == "unknown command 'explode'"
        # (The tiny guest itself reads the missing PM1_STS as all ones: no console test of it here.)
        assert vm.command("status")["state"] == "running" and vm.events == [] and vm.exit_record() is None


def test_guest_panic_is_a_crash(kvm: None, tiny_kernel: Path, tmp_path: Path) -> None:
    with booted(tmp_path, tiny_kernel) as vm:
        vm.console_send(b"c")  # pvpanic
        detail = "guest panic reported through pvpanic"
        assert vm.wait_exit(timeout=BOOT) == {"reason": "crash", "detail": detail}
        assert vm.events == [{"event": "crashed", "detail": detail}]
        assert vm.proc.returncode == 1


def test_destroy_command(kvm: None, tiny_kernel: Path, tmp_path: Path) -> None:
    with booted(tmp_path, tiny_kernel) as vm:
        assert vm.command("destroy") == {"state": "running"}
        assert vm.wait_exit(timeout=BOOT) == {"reason": "destroyed", "detail": "destroyed by the host"}
        assert vm.proc.returncode == 0 and vm.events == []


def test_a_vm_that_cannot_be_built_exits_with_error(tiny_kernel: Path, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus"
    bogus.write_bytes(b"\0" * 8192)
    # A failure of the VMM itself is never preserved, whatever the policies.
    with VmmProcess.start(tmp_path / "vm", bogus, on_crash="preserve", on_poweroff="preserve") as vm:
        record = vm.wait_exit(timeout=BOOT)
        assert record["reason"] == "error"
        assert record["detail"].startswith("Cannot load the kernel: kernel image has no Linux setup header")
        assert vm.proc.returncode == 1


def test_send_key_default_hold_and_queueing(kvm: None, tiny_kernel: Path, tmp_path: Path) -> None:
    a, b = keymap.to_qnum(keymap.LINUX, 30), keymap.to_qnum(keymap.LINUX, 48)  # KEY_A, KEY_B
    with booted(tmp_path, tiny_kernel) as vm:
        started = time.monotonic()
        vm.command("send-key", keys=[a])  # holdtime 0: QEMU's default of 100 ms
        vm.command("send-key", keys=[b], holdtime=1)  # waits for the previous request's release
        assert wait_keys(vm, 4) == ["1e", "9e", "30", "b0"]
        assert time.monotonic() - started >= 0.1


def test_send_key_bounds_what_waits(kvm: None, tiny_kernel: Path, tmp_path: Path) -> None:
    # 32 requests of 16 keys (a press and a release each) may wait; the 33rd is refused.
    with booted(tmp_path, tiny_kernel) as vm:
        for _ in range(32):
            assert vm.command("send-key", keys=[0x1E] * 16, holdtime=60_000) == {"state": "running"}
        reply = vm.request("send-key", keys=[0x1E])
        assert reply["ok"] is False
        assert reply["error"] == "operation failed: too many keys are still waiting to be sent"
        assert wait_keys(vm, 1) == ["1e"]  # only the first press is due yet
        vm.command("destroy")  # with keys still queued
        assert vm.wait_exit(timeout=BOOT)["reason"] == "destroyed"


@pytest.mark.parametrize(
    ("policy", "key", "event", "state", "detail"),
    [
        ("on_poweroff", b"q", "shutdown", "shutdown", re.compile(r".*S5.*")),
        ("on_reboot", b"r", "reboot", "shutdown", re.compile("guest reset")),
        ("on_crash", b"c", "crashed", "crashed", re.compile("guest panic reported through pvpanic")),
    ],
    ids=["poweroff", "reboot", "crash"],
)
def test_preserve_keeps_the_ended_guest_until_destroy(
    kvm: None,
    tiny_kernel: Path,
    tmp_path: Path,
    policy: str,
    key: bytes,
    event: str,
    state: str,
    detail: re.Pattern[str],
) -> None:
    with booted(tmp_path, tiny_kernel, vcpus=2, **{policy: "preserve"}) as vm:
        vm.wait_serial(f"{TINY_AP_BANNER} 1", timeout=BOOT)
        vm.console_send(key)
        ev = vm.wait_event(event, timeout=BOOT)
        assert set(ev) == {"event", "preserved", "detail"} and ev["preserved"] is True
        assert detail.fullmatch(ev["detail"]), ev
        # Every vCPU thread is gone for good; the process, its VM and its pidfile stay.
        status = vm.command("status")
        assert status["state"] == state and status["vcpu_threads"] == [] and status["vcpu_tids"] == {}
        assert status["boots"] == 1 and vm.proc.poll() is None and vm.exit_record() is None
        assert Path(vm.config["pidfile"]).read_text().strip() == str(vm.proc.pid)
        for cmd in RUNNING_ONLY:
            reply = vm.request(cmd, keys=[30])
            assert reply["ok"] is False, cmd
            assert reply["error"] == f"domain is not running (the guest is {state}, preserved until destroy)"
        assert vm.serial.count(TINY_BANNER) == 1 and event_names(vm) == [event]
        assert vm.command("destroy") == {"state": state}
        assert vm.wait_exit(timeout=BOOT) == {"reason": "destroyed", "detail": "destroyed by the host"}
        assert vm.proc.returncode == 0 and not os.path.exists(vm.config["pidfile"])


@pytest.mark.parametrize(
    ("policy", "key", "reason", "event"),
    [
        ({"on_crash": "preserve"}, b"q", "shutdown", "shutdown"),
        ({"on_poweroff": "preserve"}, b"c", "crash", "crashed"),
        ({"on_poweroff": "preserve", "on_crash": "preserve"}, b"r", "reboot", "reboot"),
    ],
    ids=["poweroff-under-on_crash", "crash-under-on_poweroff", "reboot-under-the-others"],
)
def test_preserve_applies_only_to_its_own_ending(
    kvm: None, tiny_kernel: Path, tmp_path: Path, policy: dict[str, str], key: bytes, reason: str, event: str
) -> None:
    with booted(tmp_path, tiny_kernel, on_reboot="destroy", **policy) as vm:
        vm.console_send(key)
        record = vm.wait_exit(timeout=BOOT)
        assert record["reason"] == reason
        assert vm.events == [{"event": event, "detail": record["detail"]}]


def test_host_reboot_under_on_reboot_preserve(kvm: None, tiny_kernel: Path, tmp_path: Path) -> None:
    # A host-requested reboot ends like a guest reboot: preserved as shut off.
    with booted(tmp_path, tiny_kernel, on_reboot="preserve") as vm:
        vm.command("reboot")
        ev = vm.wait_event("reboot", timeout=BOOT)
        assert ev == {"event": "reboot", "preserved": True, "detail": "reboot requested by the host"}
        assert TINY_POWERBUTTON in vm.serial and vm.serial.count(TINY_BANNER) == 1
        status = vm.command("status")
        assert status["state"] == "shutdown" and status["boots"] == 1 and vm.exit_record() is None
        vm.command("destroy")
        assert vm.wait_exit(timeout=BOOT)["reason"] == "destroyed"
