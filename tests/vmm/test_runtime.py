"""Lifecycle decisions of the VMM process, with the build step replaced by a fake (no hypervisor)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mshv_libvirt.vmm.config import VmmConfig
from mshv_libvirt.vmm.control import CommandError
from mshv_libvirt.vmm.devices.serial import Serial16550
from mshv_libvirt.vmm.runtime import Vmm
from mshv_libvirt.vmm.vcpu import ResponseKind, VcpuEvent, VcpuResponse, VmExit, VmExitKind
from tests.support.guests import TINY_BANNER
from tests.vmm.harness import VmmProcess


class FakeThread:
    def __init__(self) -> None:
        self.events: list[VcpuEvent] = []
        self.exits = 0
        self.thread = None

    def request(self, event: VcpuEvent, timeout: float = 10.0) -> VcpuResponse:
        self.events.append(event)
        kind = {VcpuEvent.PAUSE: ResponseKind.PAUSED, VcpuEvent.RESUME: ResponseKind.RESUMED}
        return VcpuResponse(kind.get(event, ResponseKind.FINISHED))


class FakePm:
    def __init__(self) -> None:
        self.presses = 0

    def press_power_button(self) -> None:
        self.presses += 1


class FakeKeyboard:
    def __init__(self, room: int = 1000) -> None:
        self.received: list[bytes] = []
        self.room = room

    def inject_keys(self, scancodes: bytes) -> int:
        taken = scancodes[: self.room]
        self.room -= len(taken)
        self.received.append(taken)
        return len(taken)


class FakePartition:
    def __init__(self) -> None:
        self.interrupts: list[tuple[int, int, int]] = []

    def assert_interrupt(self, vector: int, apic_id: int = 0, *, interrupt_type: int = 0) -> None:
        self.interrupts.append((vector, apic_id, interrupt_type))


@dataclass
class FakePlatform:
    acpi_pm: FakePm | None = field(default_factory=FakePm)
    i8042: FakeKeyboard = field(default_factory=FakeKeyboard)
    serial: Serial16550 = field(default_factory=lambda: Serial16550(lambda _data: None))


@dataclass
class FakeSystem:
    backend: str = "fake"


@dataclass
class FakeVm:
    on_exit: Callable[[VmExit], None]
    paused: bool
    vcpus: list[FakeThread] = field(default_factory=lambda: [FakeThread(), FakeThread()])
    platform: FakePlatform = field(default_factory=FakePlatform)
    system: FakeSystem = field(default_factory=FakeSystem)
    partition: FakePartition = field(default_factory=FakePartition)
    closed: bool = False

    def close(self) -> None:
        self.closed = True


class FakeConsole:
    pty_path = "/dev/pts/99"

    def write(self, data: bytes) -> None:
        pass


class Harness:
    def __init__(self, **config: Any) -> None:
        self.vms: list[FakeVm] = []
        cfg = VmmConfig.from_dict({"name": "t", "memory_bytes": 64 << 20, "kernel": "/k", "vcpus": 2, **config})
        self.vmm = Vmm(cfg, self.build)  # type: ignore[arg-type]
        self.events: list[dict[str, Any]] = []
        self.vmm._emit = lambda event, **f: self.events.append({"event": event, **f})  # type: ignore[method-assign]
        self.vmm._console = FakeConsole()  # type: ignore[assignment]
        self.vmm._start_vm(paused=cfg.start_paused)

    def build(self, config: VmmConfig, write: Any, on_exit: Callable[[VmExit], None], paused: bool) -> FakeVm:
        vm = FakeVm(on_exit, paused)
        self.vms.append(vm)
        return vm

    def guest_exit(self, kind: VmExitKind, detail: str = "d") -> None:
        """What a vCPU thread does: post through the VM's callback; then the main loop drains."""
        self.vms[-1].on_exit(VmExit(kind, detail))
        while not self.vmm._exits.empty():
            generation, exit_ = self.vmm._exits.get_nowait()
            if generation == self.vmm._generation:
                self.vmm._handle_vm_exit(exit_)


def test_pause_resume_reach_every_vcpu_and_emit_events() -> None:
    h = Harness()
    assert h.vmm.handle_command("pause", {}) == {"state": "paused"}
    assert h.vmm.handle_command("pause", {}) == {"state": "paused"}  # no second round
    assert h.vmm.handle_command("resume", {}) == {"state": "running"}
    assert [t.events for t in h.vms[0].vcpus] == [[VcpuEvent.PAUSE, VcpuEvent.RESUME]] * 2
    assert [e["event"] for e in h.events] == ["paused", "resumed"]
    status = h.vmm.handle_command("status", {})
    assert status["state"] == "running" and status["vcpus"] == 2 and status["pty"] == "/dev/pts/99"


def test_guest_poweroff_finishes_with_shutdown() -> None:
    h = Harness()
    h.guest_exit(VmExitKind.SHUTDOWN, "S5")
    assert h.vmm._finish == ("shutdown", "S5")
    assert h.events == [{"event": "shutdown", "detail": "S5"}]
    with pytest.raises(CommandError, match="shutting down"):
        h.vmm.handle_command("status", {})


def test_guest_reset_restarts_or_exits_per_on_reboot() -> None:
    h = Harness()
    h.guest_exit(VmExitKind.REBOOT, "guest reset")
    assert len(h.vms) == 2 and h.vms[0].closed and not h.vms[1].paused
    assert h.vmm._finish is None and h.vmm.boots == 2
    assert h.events == [{"event": "reboot", "detail": "guest reset"}]
    h = Harness(on_reboot="destroy")
    h.guest_exit(VmExitKind.REBOOT, "guest reset")
    assert len(h.vms) == 1 and h.vmm._finish == ("reboot", "guest reset")


def test_guest_reset_of_a_paused_vm_keeps_it_paused() -> None:
    # A reset report in flight when the pause landed: the new VM starts paused, like QEMU's own reset.
    h = Harness()
    h.vmm.handle_command("pause", {})
    h.guest_exit(VmExitKind.REBOOT, "triple fault on vCPU 0 at rip 0x1")
    assert len(h.vms) == 2 and h.vms[1].paused
    assert h.vmm.handle_command("status", {})["state"] == "paused"


def test_inject_nmi_is_an_nmi_request_to_apic_0() -> None:
    h = Harness()
    assert h.vmm.handle_command("inject-nmi", {}) == {"state": "running"}
    assert h.vms[0].partition.interrupts == [(0, 0, 4)]  # HV_X64_INTERRUPT_TYPE_NMI


def test_send_key_schedule_and_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("mshv_libvirt.vmm.runtime.time.monotonic", lambda: now[0])
    h = Harness()
    kbd = h.vms[0].platform.i8042
    h.vmm.handle_command("send-key", {"keys": [0x1D, 0xB8], "holdtime": 10})  # LEFTCTRL, RIGHTALT
    assert kbd.received == [b"\x1d"]  # the first press at once, the rest one hold apart
    assert h.vmm._loop_timeout() == pytest.approx(0.01)
    for _ in range(3):
        now[0] += 0.01
        h.vmm._deliver_keys()
    assert kbd.received == [b"\x1d", b"\xe0\x38", b"\xe0\xb8", b"\x9d"]
    assert h.vmm._loop_timeout() == 0.05  # nothing pending
    # holdtime 0 is QEMU's default of 100 ms; a request waits for the previous one (and its last hold) to finish.
    h.vmm.handle_command("send-key", {"keys": [0x1E]})
    h.vmm.handle_command("send-key", {"keys": [0x30]})
    assert kbd.received[4:] == []
    now[0] += 0.01
    h.vmm._deliver_keys()
    assert kbd.received[4:] == [b"\x1e"]
    now[0] += 0.1
    h.vmm._deliver_keys()
    now[0] += 0.1
    h.vmm._deliver_keys()
    assert kbd.received[4:] == [b"\x1e", b"\x9e", b"\x30"]
    # At most 32 requests' worth of key events wait; a full keyboard buffer drops the rest (logged).
    for _ in range(31):
        h.vmm.handle_command("send-key", {"keys": [0x1E] * 16, "holdtime": 1})
    with pytest.raises(CommandError, match="too many keys"):
        h.vmm.handle_command("send-key", {"keys": [0x1E] * 16})
    kbd.room = 1
    now[0] += 100
    h.vmm._deliver_keys()
    assert not h.vmm._key_events


def test_exits_from_a_torn_down_vm_are_ignored() -> None:
    h = Harness()
    old = h.vms[0]
    h.vmm.handle_command("reset", {})
    old.on_exit(VmExit(VmExitKind.CRASH, "late"))  # the old VM's vCPU was still finishing
    assert h.vmm._exits.empty()
    assert h.vmm._finish is None and len(h.vms) == 2


def test_reboot_command_turns_the_next_poweroff_into_a_restart() -> None:
    h = Harness()
    h.vmm.handle_command("reboot", {})
    assert h.vms[0].platform.acpi_pm is not None and h.vms[0].platform.acpi_pm.presses == 1
    h.guest_exit(VmExitKind.SHUTDOWN, "S5")
    assert len(h.vms) == 2 and h.vmm._finish is None
    h.guest_exit(VmExitKind.SHUTDOWN, "S5")  # the flag does not stick to the new boot
    assert h.vmm._finish == ("shutdown", "S5")


def test_crash_error_destroy_and_no_acpi() -> None:
    h = Harness()
    h.guest_exit(VmExitKind.CRASH, "triple fault")
    assert h.vmm._finish == ("crash", "triple fault") and h.events[-1]["event"] == "crashed"
    h = Harness()
    h.guest_exit(VmExitKind.ERROR, "vCPU 0: boom")
    assert h.vmm._finish == ("error", "vCPU 0: boom")
    h = Harness()
    h.vmm.handle_command("destroy", {})
    assert h.vmm._finish == ("destroyed", "destroyed by the host")
    h = Harness(acpi=False)
    h.vms[0].platform.acpi_pm = None
    with pytest.raises(CommandError, match="no ACPI power button"):
        h.vmm.handle_command("shutdown", {})
    with pytest.raises(CommandError, match="unknown command"):
        h.vmm.handle_command("explode", {})


def test_start_paused() -> None:
    h = Harness(start_paused=True)
    assert h.vms[0].paused and h.vmm.handle_command("status", {})["state"] == "paused"
    h.vmm.handle_command("resume", {})
    assert h.events == [{"event": "resumed"}]


def test_reset_keeps_a_paused_vm_paused_and_stuck_vcpus_are_reported() -> None:
    h = Harness()
    h.vmm.handle_command("pause", {})
    h.vmm.handle_command("reset", {})
    assert len(h.vms) == 2 and h.vms[1].paused
    assert h.vmm.handle_command("status", {})["state"] == "paused"

    def stuck(event: VcpuEvent, timeout: float = 10.0) -> VcpuResponse:
        raise TimeoutError("vCPU 0 did not answer resume")

    h.vms[1].vcpus[0].request = stuck  # type: ignore[method-assign]
    with pytest.raises(CommandError, match="operation failed: vCPU 0 did not answer resume"):
        h.vmm.handle_command("resume", {})
    assert h.vmm.handle_command("status", {})["state"] == "paused"


@pytest.mark.parametrize(
    ("policy", "kind", "event", "state"),
    [
        ({"on_poweroff": "preserve"}, VmExitKind.SHUTDOWN, "shutdown", "shutdown"),
        ({"on_reboot": "preserve"}, VmExitKind.REBOOT, "reboot", "shutdown"),
        ({"on_crash": "preserve"}, VmExitKind.CRASH, "crashed", "crashed"),
    ],
    ids=["poweroff", "reboot", "crash"],
)
def test_preserve_freezes_the_vm_until_destroy(
    policy: dict[str, str], kind: VmExitKind, event: str, state: str
) -> None:
    h = Harness(**policy)
    h.guest_exit(kind, "the end")
    vm = h.vms[0]
    # Every vCPU is finished for good, but the VM (partition, memory) and the process stay.
    assert [t.events for t in vm.vcpus] == [[VcpuEvent.FINISH]] * 2
    assert not vm.closed and h.vmm._vm is vm and len(h.vms) == 1  # type: ignore[comparison-overlap]
    assert h.vmm._finish is None
    assert h.events == [{"event": event, "preserved": True, "detail": "the end"}]
    assert h.vmm.handle_command("status", {})["state"] == state
    for cmd in ("pause", "resume", "shutdown", "reboot", "reset", "inject-nmi", "send-key"):
        with pytest.raises(CommandError, match="domain is not running"):
            h.vmm.handle_command(cmd, {"keys": [30]})
    # Later exits (another vCPU, a stale report) change nothing.
    h.guest_exit(VmExitKind.CRASH, "late")
    assert h.vmm._finish is None and len(h.events) == 1 and len(h.vms) == 1
    assert h.vmm.handle_command("destroy", {}) == {"state": state}
    assert h.vmm._finish == ("destroyed", "destroyed by the host")


def test_preserve_only_applies_to_its_own_ending() -> None:
    h = Harness(on_crash="preserve")
    h.guest_exit(VmExitKind.SHUTDOWN, "S5")
    assert h.vmm._finish == ("shutdown", "S5") and h.events == [{"event": "shutdown", "detail": "S5"}]
    h = Harness(on_poweroff="preserve")
    h.guest_exit(VmExitKind.CRASH, "triple fault")
    assert h.vmm._finish == ("crash", "triple fault")
    h = Harness(on_poweroff="preserve", on_crash="preserve")
    h.guest_exit(VmExitKind.ERROR, "vCPU 0: boom")  # the VMM's own failure is never preserved
    assert h.vmm._finish == ("error", "vCPU 0: boom")
    # A host-requested reboot under on_reboot=preserve ends like a guest reboot.
    h = Harness(on_reboot="preserve")
    h.vmm.handle_command("reboot", {})
    h.guest_exit(VmExitKind.SHUTDOWN, "S5")
    assert h.vmm._finish is None and len(h.vms) == 1
    assert h.events == [{"event": "reboot", "preserved": True, "detail": "reboot requested by the host"}]
    assert h.vmm.handle_command("status", {})["state"] == "shutdown"


def test_preserve_of_a_paused_vm_and_a_stuck_vcpu() -> None:
    h = Harness(on_crash="preserve")
    h.vmm.handle_command("pause", {})

    def stuck(event: VcpuEvent, timeout: float = 10.0) -> VcpuResponse:
        raise TimeoutError("vCPU 1 did not answer finish")

    h.vms[0].vcpus[1].request = stuck  # type: ignore[method-assign]
    h.guest_exit(VmExitKind.CRASH, "triple fault")  # a report in flight when the pause landed
    assert h.vmm.handle_command("status", {})["state"] == "crashed"
    assert h.events[-1] == {"event": "crashed", "preserved": True, "detail": "triple fault"}


@pytest.mark.kvm
@pytest.mark.parametrize(
    ("policy", "key", "event", "state"),
    [("on_crash", b"c", "crashed", "crashed"), ("on_poweroff", b"q", "shutdown", "shutdown")],
)
def test_real_vmm_keeps_a_preserved_guest_until_destroy(
    kvm: None, tiny_kernel: Path, tmp_path: Path, policy: str, key: bytes, event: str, state: str
) -> None:
    extra: dict[str, Any] = {policy: "preserve"}
    with VmmProcess.start(tmp_path / "vm", tiny_kernel, cmdline="console=ttyS0 tiny", **extra) as vm:
        vm.wait_serial(TINY_BANNER, timeout=30)
        vm.connect()
        vm.console_send(key)
        ev = vm.wait_event(event, timeout=30)
        assert ev["preserved"] is True and ev["detail"]
        assert vm.proc.poll() is None and vm.exit_record() is None
        status = vm.command("status")
        assert status["state"] == state and status["vcpu_threads"] == []
        assert Path(vm.config["pidfile"]).read_text().strip() == str(vm.proc.pid)
        reply = vm.request("resume")
        assert not reply["ok"] and "not running" in reply["error"]
        vm.command("destroy")
        assert vm.wait_exit(timeout=30) == {"reason": "destroyed", "detail": "destroyed by the host"}
        assert vm.proc.returncode == 0
        assert not os.path.exists(vm.config["pidfile"])
