"""The VMM process booting the tiny guest for real (KVM-backed), driven like the daemon drives it."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from mshv_libvirt.vmm import layout
from tests.support.guests import TINY_AP_BANNER, TINY_BANNER, TINY_BENCH_DONE, TINY_PCI_ECAM, TINY_POWERBUTTON
from tests.support.waits import assert_quiet
from tests.vmm.harness import VmmProcess

pytestmark = pytest.mark.kvm

BOOT = 60  # seconds; the tiny guest is up in well under one on KVM


def test_banner_shows_the_boot_params_command_line(tiny_vm: VmmProcess) -> None:
    tiny_vm.wait_serial(f"{TINY_BANNER} cmdline=console=ttyS0 tiny\n", timeout=BOOT)
    status = tiny_vm.command("status")
    assert status["state"] == "running" and status["vcpus"] == 1 and status["memory_kib"] == 64 * 1024
    assert status["pty"].startswith("/dev/pts/")
    assert Path(tiny_vm.config["pidfile"]).read_text().strip() == str(tiny_vm.proc.pid)


def test_ioapic_registers_over_mmio(tiny_vm: VmmProcess) -> None:
    # A store to IOREGSEL then a load from IOWIN, decoded and completed by the VMM.
    tiny_vm.wait_serial(TINY_BANNER, timeout=BOOT)
    tiny_vm.console_send(b"i")
    tiny_vm.wait_serial("TINY-IOAPIC-VERSION 00170020\n", timeout=BOOT)


def test_pci_bus_enumerated_through_ports_and_ecam(tiny_vm: VmmProcess) -> None:
    # The guest scans bus 0 with mechanism #1 and reads the same id back through ECAM (MMIO).
    tiny_vm.wait_serial(TINY_BANNER, timeout=BOOT)
    tiny_vm.console_send(b"d")
    out = tiny_vm.wait_serial("TINY-PCI-DONE 00000001\n", timeout=BOOT)  # one function: the host bridge
    lines = re.findall(r"TINY-PCI ([0-9a-f]{8}) ([0-9a-f]{8}) ecam ([0-9a-f]{8}) class ([0-9a-f]{8})\n", out)
    assert lines == [("00000000", "00081b36", "00081b36", "06000000")]
    assert layout.PCI_ECAM_ADDR == TINY_PCI_ECAM


def test_console_pty_echo_and_acpi_poweroff(tiny_vm: VmmProcess) -> None:
    tiny_vm.wait_serial(TINY_BANNER, timeout=BOOT)
    tiny_vm.connect()
    tiny_vm.console_send(b"xyz")
    tiny_vm.wait_console(b"xyz", timeout=BOOT)
    tiny_vm.console_send(b"q")
    record = tiny_vm.wait_exit(timeout=BOOT)
    assert record["reason"] == "shutdown" and "S5" in record["detail"]
    assert tiny_vm.proc.returncode == 0
    assert [e["event"] for e in tiny_vm.events] == ["shutdown"]
    assert not Path(tiny_vm.config["pidfile"]).exists()
    assert not Path(tiny_vm.config["control_socket"]).exists()
    assert "xyz" in tiny_vm.serial  # the serial log has everything the console saw


def test_guest_reset_restarts_in_process(tiny_vm: VmmProcess) -> None:
    tiny_vm.wait_serial(TINY_BANNER, timeout=BOOT)
    tiny_vm.connect()
    pid = tiny_vm.proc.pid
    tiny_vm.console_send(b"r")  # i8042 0xFE
    event = tiny_vm.wait_event("reboot", timeout=BOOT)
    assert event["detail"] == "guest reset"
    tiny_vm.wait_serial(TINY_BANNER, timeout=BOOT, count=2)
    status = tiny_vm.command("status")
    assert status["boots"] == 2 and status["state"] == "running" and tiny_vm.proc.pid == pid
    tiny_vm.console_send(b"hey")  # the rebuilt VM still owns the same console
    tiny_vm.wait_console(b"hey", timeout=BOOT)
    tiny_vm.console_send(b"q")
    assert tiny_vm.wait_exit(timeout=BOOT)["reason"] == "shutdown"


def test_guest_reset_with_on_reboot_destroy_exits(kvm: None, tiny_kernel: Path, tmp_path: Path) -> None:
    with VmmProcess.start(tmp_path / "vm", tiny_kernel, on_reboot="destroy") as vm:
        vm.wait_serial(TINY_BANNER, timeout=BOOT)
        vm.connect()
        vm.console_send(b"r")
        record = vm.wait_exit(timeout=BOOT)
        assert record == {"reason": "reboot", "detail": "guest reset"}
        assert [e["event"] for e in vm.events] == ["reboot"]


def test_triple_fault_resets_the_guest(tiny_vm: VmmProcess) -> None:
    # As on KVM/QEMU, a triple fault is the CPU's shutdown cycle: the machine resets and on_reboot applies.
    tiny_vm.wait_serial(TINY_BANNER, timeout=BOOT)
    tiny_vm.connect()
    pid = tiny_vm.proc.pid
    tiny_vm.console_send(b"f")
    event = tiny_vm.wait_event("reboot", timeout=BOOT)
    assert re.fullmatch(r"triple fault on vCPU 0 at rip 0x[0-9a-f]+", event["detail"]), event
    tiny_vm.wait_serial(TINY_BANNER, timeout=BOOT, count=2)
    assert tiny_vm.command("status")["boots"] == 2 and tiny_vm.proc.pid == pid
    assert [e["event"] for e in tiny_vm.events] == ["reboot"]


def test_triple_fault_with_on_reboot_destroy_exits_as_a_reboot(kvm: None, tiny_kernel: Path, tmp_path: Path) -> None:
    with VmmProcess.start(tmp_path / "vm", tiny_kernel, on_reboot="destroy", on_crash="preserve") as vm:
        vm.wait_serial(TINY_BANNER, timeout=BOOT)
        vm.connect()
        vm.console_send(b"f")
        record = vm.wait_exit(timeout=BOOT)
        assert record["reason"] == "reboot" and record["detail"].startswith("triple fault on vCPU 0")
        assert vm.proc.returncode == 0


def test_pvpanic_is_a_crash(tiny_vm: VmmProcess) -> None:
    tiny_vm.wait_serial(TINY_BANNER, timeout=BOOT)
    tiny_vm.connect()
    tiny_vm.console_send(b"c")
    record = tiny_vm.wait_exit(timeout=BOOT)
    assert record == {"reason": "crash", "detail": "guest panic reported through pvpanic"}
    assert [e["event"] for e in tiny_vm.events] == ["crashed"]
    assert tiny_vm.proc.returncode == 1


def test_pause_stops_the_guest_and_resume_continues(tiny_vm: VmmProcess) -> None:
    tiny_vm.wait_serial(f"{TINY_BANNER} cmdline=console=ttyS0 tiny\n", timeout=BOOT)
    assert tiny_vm.command("pause") == {"state": "paused"}
    assert tiny_vm.command("status")["state"] == "paused"
    assert tiny_vm.wait_event("paused", timeout=5)
    exits = tiny_vm.command("status")["exits"]
    tiny_vm.console_send(b"p")
    assert_quiet(lambda: tiny_vm.command("status")["exits"] == exits, 1.0, "paused: no guest instruction runs")
    assert tiny_vm.command("status")["exits"] == exits  # no guest instruction ran
    assert "p" not in tiny_vm.serial.split(TINY_BANNER, 1)[1].split("\n", 1)[1]
    assert tiny_vm.command("pause") == {"state": "paused"}  # idempotent
    assert tiny_vm.command("resume") == {"state": "running"}
    tiny_vm.wait_event("resumed", timeout=5)
    tiny_vm.wait_console(b"p", timeout=BOOT)  # the byte typed while paused is delivered
    for _ in range(3):  # repeated cycles lose nothing
        tiny_vm.command("pause")
        tiny_vm.command("resume")
    tiny_vm.console_send(b"ok")
    tiny_vm.wait_console(b"ok", timeout=BOOT)


def test_graceful_shutdown_presses_the_power_button(tiny_vm: VmmProcess) -> None:
    tiny_vm.wait_serial(TINY_BANNER, timeout=BOOT)
    assert tiny_vm.command("shutdown") == {"state": "running"}
    tiny_vm.wait_serial(TINY_POWERBUTTON, timeout=BOOT)
    assert tiny_vm.wait_exit(timeout=BOOT)["reason"] == "shutdown"


def test_reboot_command_is_power_button_then_restart(tiny_vm: VmmProcess) -> None:
    tiny_vm.wait_serial(TINY_BANNER, timeout=BOOT)
    tiny_vm.command("reboot")
    tiny_vm.wait_event("reboot", timeout=BOOT)
    tiny_vm.wait_serial(TINY_BANNER, timeout=BOOT, count=2)
    assert TINY_POWERBUTTON in tiny_vm.serial
    assert tiny_vm.command("status")["boots"] == 2
    tiny_vm.command("destroy")
    assert tiny_vm.wait_exit(timeout=BOOT)["reason"] == "destroyed"


def test_reset_command_rebuilds_immediately(tiny_vm: VmmProcess) -> None:
    tiny_vm.wait_serial(TINY_BANNER, timeout=BOOT)
    tiny_vm.command("reset")
    assert tiny_vm.wait_event("reboot", timeout=BOOT)["detail"] == "reset"
    tiny_vm.wait_serial(TINY_BANNER, timeout=BOOT, count=2)
    assert TINY_POWERBUTTON not in tiny_vm.serial


def test_two_vcpus_each_on_its_own_thread(kvm: None, tiny_kernel: Path, tmp_path: Path) -> None:
    with VmmProcess.start(tmp_path / "vm", tiny_kernel, vcpus=2) as vm:
        vm.wait_serial(f"{TINY_AP_BANNER} 1", timeout=BOOT)  # the AP ran guest code after INIT/SIPI
        status = vm.command("status")
        threads = status["vcpu_threads"]
        assert status["vcpus"] == 2 and len(set(threads)) == 2
        for tid in threads:
            assert Path(f"/proc/{vm.proc.pid}/task/{tid}").exists()
            assert Path(f"/proc/{vm.proc.pid}/task/{tid}/comm").read_text().strip().startswith("vcpu")
        vm.command("pause")  # both VPs acknowledge, one of them sitting in hlt
        vm.command("resume")
        vm.console_send(b"two")
        vm.wait_console(b"two", timeout=BOOT)
        vm.console_send(b"q")
        assert vm.wait_exit(timeout=BOOT)["reason"] == "shutdown"


def test_start_paused_runs_nothing_until_resumed(kvm: None, tiny_kernel: Path, tmp_path: Path) -> None:
    with VmmProcess.start(tmp_path / "vm", tiny_kernel, start_paused=True) as vm:
        assert vm.command("status")["state"] == "paused"
        assert_quiet(lambda: TINY_BANNER not in vm.serial, 0.5, "started paused, the guest prints nothing")
        assert TINY_BANNER not in vm.serial
        vm.command("resume")
        vm.wait_serial(TINY_BANNER, timeout=BOOT)


def test_destroy_and_sigterm_write_destroyed(kvm: None, tiny_kernel: Path, tmp_path: Path) -> None:
    with VmmProcess.start(tmp_path / "a", tiny_kernel) as vm:
        vm.wait_serial(TINY_BANNER, timeout=BOOT)
        reply = vm.request("destroy")
        assert reply["ok"] is True
        assert vm.wait_exit(timeout=BOOT) == {"reason": "destroyed", "detail": "destroyed by the host"}
    with VmmProcess.start(tmp_path / "b", tiny_kernel) as vm:
        vm.wait_serial(TINY_BANNER, timeout=BOOT)
        vm.proc.send_signal(signal.SIGTERM)
        record = vm.wait_exit(timeout=BOOT)
        assert record["reason"] == "destroyed" and "SIGTERM" in record["detail"]


def test_survives_clients_going_away_and_sighup(tiny_vm: VmmProcess) -> None:
    tiny_vm.wait_serial(TINY_BANNER, timeout=BOOT)
    tiny_vm.connect()
    assert tiny_vm._sock is not None
    tiny_vm._sock.sendall(b'{"id": 99, "cmd": "status"}\n')
    tiny_vm.disconnect()  # gone before reading its reply, like a SIGKILLed daemon
    os.kill(tiny_vm.proc.pid, signal.SIGHUP)
    assert_quiet(lambda: tiny_vm.proc.poll() is None, 0.3, "SIGHUP does not end the VMM")
    assert tiny_vm.command("status")["state"] == "running"  # a new connection works
    tiny_vm.console_send(b"yes")
    tiny_vm.wait_console(b"yes", timeout=BOOT)


def test_unknown_command_and_bad_kernel(kvm: None, tiny_vm: VmmProcess, tmp_path: Path) -> None:
    tiny_vm.wait_serial(TINY_BANNER, timeout=BOOT)
    reply = tiny_vm.request("fly")
    assert reply == {"id": reply["id"], "ok": False, "error": "unknown command 'fly'"}
    bogus = tmp_path / "bogus"
    bogus.write_bytes(b"\0" * 8192)
    with VmmProcess.start(tmp_path / "bad", bogus) as vm:
        record = vm.wait_exit(timeout=BOOT)
        assert record["reason"] == "error"
        assert record["detail"].startswith("Cannot load the kernel: kernel image has no Linux setup header")


def test_io_exits_are_counted(tiny_vm: VmmProcess) -> None:
    tiny_vm.wait_serial(TINY_BANNER, timeout=BOOT)
    before = tiny_vm.command("status")["exits"]
    tiny_vm.console_send(b"b")
    tiny_vm.wait_console(TINY_BENCH_DONE.encode(), timeout=BOOT)
    assert tiny_vm.command("status")["exits"] - before >= 20000


def test_console_paste_larger_than_the_fifo_is_not_lost(tiny_vm: VmmProcess) -> None:
    tiny_vm.wait_serial(TINY_BANNER, timeout=BOOT)
    text = b"0123456789" * 30 + b"END!"  # 304 bytes against a 64-byte receive FIFO
    tiny_vm.console_send(text)
    echoed = tiny_vm.wait_console(b"END!", timeout=BOOT)
    assert echoed.endswith(text)
