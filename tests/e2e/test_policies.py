"""on_poweroff / on_reboot / on_crash carried out by the real daemon, for guests that really do it.

The tiny guest powers off on ``q``, resets through the i8042 on ``r``, reports a panic through pvpanic
on ``c`` and triple-faults on ``f`` (typed on its console through ``virsh console``); the daemon must
follow the lifecycle table: state, reason and the events (lifecycle and reboot, in order) a
libvirt-python client receives. The expected events are those of libvirt 9.0's QEMU driver with a
modern QEMU (qemu_process.c: qemuProcessHandleShutdown, qemuProcessHandleReset, qemuProcessFakeReboot;
qemu_driver.c: processMonitorEOFEvent, processGuestPanicEvent).
"""

from __future__ import annotations

import os
import signal
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import (
    DaemonProcess,
    PtyProcess,
    domain_xml,
    domstate,
    serial_log,
    virsh,
    vmm_processes,
    wait_for,
)
from tests.support.events import REBOOT, Seen
from tests.support.events import DomainEvents as Events
from tests.support.guests import TINY_BANNER
from tests.support.procfs import process_alive, process_gone

libvirt = pytest.importorskip("libvirt")

pytestmark = pytest.mark.virsh

E = libvirt
BOOTED = (E.VIR_DOMAIN_EVENT_STARTED, E.VIR_DOMAIN_EVENT_STARTED_BOOTED)
PANICKED = (E.VIR_DOMAIN_EVENT_CRASHED, E.VIR_DOMAIN_EVENT_CRASHED_PANICKED)
STOPPED_CRASHED = (E.VIR_DOMAIN_EVENT_STOPPED, E.VIR_DOMAIN_EVENT_STOPPED_CRASHED)
SHUTDOWN_GUEST = (E.VIR_DOMAIN_EVENT_SHUTDOWN, E.VIR_DOMAIN_EVENT_SHUTDOWN_GUEST)
RESUMED_UNPAUSED = (E.VIR_DOMAIN_EVENT_RESUMED, E.VIR_DOMAIN_EVENT_RESUMED_UNPAUSED)
STOPPED_SHUTDOWN = (E.VIR_DOMAIN_EVENT_STOPPED, E.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN)
STOPPED_DESTROYED = (E.VIR_DOMAIN_EVENT_STOPPED, E.VIR_DOMAIN_EVENT_STOPPED_DESTROYED)


@pytest.fixture
def events(daemon: DaemonProcess) -> Iterator[Events]:
    ev = Events(uri=daemon.uri, reboot=True)
    yield ev
    ev.close()


def start_with_policy(d: DaemonProcess, tmp_path: Path, kernel: Path, name: str, **policy: str) -> None:
    extra = "".join(f"<on_{kind}>{action}</on_{kind}>" for kind, action in policy.items())
    xml = tmp_path / f"{name}.xml"
    xml.write_text(domain_xml(name, kernel, extra=extra))
    virsh(d.uri, "define", str(xml))
    inactive = virsh(d.uri, "dumpxml", "--inactive", name).stdout
    for kind, action in policy.items():
        assert f"<on_{kind}>{action}</on_{kind}>" in inactive
    virsh(d.uri, "start", name)
    wait_for(lambda: TINY_BANNER in serial_log(d, name))


def type_on_console(d: DaemonProcess, name: str, key: bytes) -> PtyProcess:
    con = PtyProcess(["virsh", "-c", d.uri, "console", name])
    con.wait_console_ready()
    con.write(key)
    return con


def act(d: DaemonProcess, name: str, key: bytes, until: str) -> None:
    """Type ``key`` on the domain's console, wait until ``virsh domstate --reason`` says ``until``."""
    con = type_on_console(d, name, key)
    try:
        wait_for(lambda: domstate(d, name) == until, timeout=15)
    finally:
        con.kill()


def test_on_crash_destroy(kvm: None, daemon: DaemonProcess, events: Events, tiny_kernel: Path, tmp_path: Path) -> None:
    start_with_policy(daemon, tmp_path, tiny_kernel, "crd", crash="destroy")
    act(daemon, "crd", b"c", "shut off (crashed)")
    events.wait_domain(
        "crd", [(E.VIR_DOMAIN_EVENT_DEFINED, E.VIR_DOMAIN_EVENT_DEFINED_ADDED), BOOTED, PANICKED, STOPPED_CRASHED]
    )
    assert daemon.stale_runtime("crd") == []
    assert daemon.processes() == {}


def _check_core(core: Path, memory_mib: int) -> None:
    data = core.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2  # ELF64
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    assert (e_type, e_machine) == (4, 62)  # ET_CORE, x86-64
    phoff, phnum = struct.unpack_from("<Q", data, 32)[0], struct.unpack_from("<H", data, 56)[0]
    loads = [struct.unpack_from("<IIQQQQQQ", data, phoff + 56 * i) for i in range(phnum)]
    assert sum(p[5] for p in loads if p[0] == 1) == memory_mib << 20  # every byte of guest RAM
    assert TINY_BANNER.encode() in data  # the guest's own memory, not zeros


@pytest.mark.parametrize("policy", ["coredump-destroy", "coredump-restart"])
def test_on_crash_coredump(
    kvm: None, daemon: DaemonProcess, events: Events, tiny_kernel: Path, tmp_path: Path, policy: str
) -> None:
    name = "cd" + policy.split("-")[1][0]
    start_with_policy(daemon, tmp_path, tiny_kernel, name, crash=policy)
    con = type_on_console(daemon, name, b"c")
    dumps = daemon.run_dir / "dump"
    try:
        wait_for(lambda: any(dumps.glob(f"*-{name}-*.core")), timeout=20)
        if policy == "coredump-destroy":
            wait_for(lambda: domstate(daemon, name) == "shut off (crashed)", timeout=15)
        else:
            wait_for(lambda: serial_log(daemon, name).count(TINY_BANNER) == 2, timeout=15)
            assert domstate(daemon, name) == "running (crashed)"
    finally:
        con.kill()
    after = [REBOOT, RESUMED_UNPAUSED] if policy == "coredump-restart" else [STOPPED_CRASHED]
    events.wait_domain(name, [(E.VIR_DOMAIN_EVENT_DEFINED, 0), BOOTED, PANICKED, *after])
    (core,) = list(dumps.glob(f"*-{name}-*.core"))
    _check_core(core, memory_mib=64)
    if policy == "coredump-restart":
        virsh(daemon.uri, "destroy", name)
    assert daemon.stale_runtime(name) == []


def domid(d: DaemonProcess, name: str) -> str:
    return virsh(d.uri, "domid", name).stdout.strip()


def test_on_crash_restart(kvm: None, daemon: DaemonProcess, events: Events, tiny_kernel: Path, tmp_path: Path) -> None:
    start_with_policy(daemon, tmp_path, tiny_kernel, "crr", crash="restart")
    pid, dom_id = daemon.vmm_pid("crr"), domid(daemon, "crr")
    con = type_on_console(daemon, "crr", b"c")
    try:
        wait_for(lambda: serial_log(daemon, "crr").count(TINY_BANNER) == 2, timeout=15)
    finally:
        con.kill()
    # QEMU's fake reboot from CRASHED: the CPUs start again with reason "crashed".
    assert domstate(daemon, "crr") == "running (crashed)"
    events.wait_domain("crr", [(E.VIR_DOMAIN_EVENT_DEFINED, 0), BOOTED, PANICKED, REBOOT, RESUMED_UNPAUSED])
    wait_for(lambda: daemon.try_vmm_pid("crr") not in (None, pid))  # a new VMM...
    assert domid(daemon, "crr") == dom_id  # ...for the same domain, as a fake reboot keeps the id
    # the restarted domain is fully managed: console and destroy work
    con = type_on_console(daemon, "crr", b"ECHO-AFTER-CRASH")
    try:
        con.read_until(b"ECHO-AFTER-CRASH")
    finally:
        con.kill()
    virsh(daemon.uri, "destroy", "crr")
    assert domstate(daemon, "crr") == "shut off (destroyed)"
    assert daemon.stale_runtime("crr") == []


def test_on_poweroff_restart(
    kvm: None, daemon: DaemonProcess, events: Events, tiny_kernel: Path, tmp_path: Path
) -> None:
    start_with_policy(daemon, tmp_path, tiny_kernel, "por", poweroff="restart")
    dom_id = domid(daemon, "por")
    con = type_on_console(daemon, "por", b"q")
    try:
        wait_for(lambda: serial_log(daemon, "por").count(TINY_BANNER) == 2, timeout=15)
    finally:
        con.kill()
    # A fake reboot: no lifecycle event and no state change, only the REBOOT event of QEMU's system_reset.
    assert domstate(daemon, "por") == "running (booted)" and domid(daemon, "por") == dom_id
    events.wait_domain("por", [(E.VIR_DOMAIN_EVENT_DEFINED, 0), BOOTED, REBOOT])
    virsh(daemon.uri, "destroy", "por")
    assert daemon.stale_runtime("por") == []


def test_on_reboot_destroy(kvm: None, daemon: DaemonProcess, events: Events, tiny_kernel: Path, tmp_path: Path) -> None:
    start_with_policy(daemon, tmp_path, tiny_kernel, "rbd", reboot="destroy")
    act(daemon, "rbd", b"r", "shut off (shutdown)")
    events.wait_domain("rbd", [(E.VIR_DOMAIN_EVENT_DEFINED, 0), BOOTED, SHUTDOWN_GUEST, STOPPED_SHUTDOWN])
    assert serial_log(daemon, "rbd").count(TINY_BANNER) == 1
    assert daemon.stale_runtime("rbd") == []


def test_on_reboot_restart_reboots_in_place(
    kvm: None, daemon: DaemonProcess, events: Events, tiny_kernel: Path, tmp_path: Path
) -> None:
    start_with_policy(daemon, tmp_path, tiny_kernel, "rbr", reboot="restart")
    pid = daemon.vmm_pid("rbr")
    con = type_on_console(daemon, "rbr", b"r")
    try:
        con.read_until(TINY_BANNER.encode() * 1)  # the console stays attached across an in-place reboot
        wait_for(lambda: serial_log(daemon, "rbr").count(TINY_BANNER) == 2, timeout=15)
    finally:
        con.kill()
    assert domstate(daemon, "rbr") == "running (booted)"
    assert daemon.vmm_pid("rbr") == pid
    events.wait_domain("rbr", [(E.VIR_DOMAIN_EVENT_DEFINED, 0), BOOTED, REBOOT])  # QEMU sends only a reboot event
    virsh(daemon.uri, "destroy", "rbr")


@pytest.mark.parametrize(
    ("reboot", "state", "expected"),
    [
        ("restart", "running (booted)", [REBOOT]),
        ("destroy", "shut off (shutdown)", [SHUTDOWN_GUEST, STOPPED_SHUTDOWN]),
    ],
)
def test_triple_fault_is_a_reset_not_a_crash(
    kvm: None,
    daemon: DaemonProcess,
    events: Events,
    tiny_kernel: Path,
    tmp_path: Path,
    reboot: str,
    state: str,
    expected: list[Seen],
) -> None:
    """KVM/QEMU turn a triple fault into a guest reset: on_reboot applies, on_crash (destroy here) does not."""
    name = f"tf-{reboot}"
    start_with_policy(daemon, tmp_path, tiny_kernel, name, reboot=reboot, crash="destroy")
    pid = daemon.vmm_pid(name)
    con = type_on_console(daemon, name, b"f")
    try:
        if reboot == "restart":
            wait_for(lambda: serial_log(daemon, name).count(TINY_BANNER) == 2, timeout=15)
        else:
            wait_for(lambda: domstate(daemon, name) == state, timeout=15)
    finally:
        con.kill()
    assert domstate(daemon, name) == state
    events.wait_domain(name, [(E.VIR_DOMAIN_EVENT_DEFINED, 0), BOOTED, *expected])
    if reboot == "restart":
        assert daemon.vmm_pid(name) == pid  # reset in place
        virsh(daemon.uri, "destroy", name)
    assert daemon.stale_runtime(name) == []


@pytest.mark.parametrize(
    ("policy", "key", "state", "expected"),
    [
        ({"crash": "preserve"}, b"c", "crashed (panicked)", [PANICKED]),
        ({"poweroff": "preserve"}, b"q", "in shutdown (unknown)", [SHUTDOWN_GUEST]),
        ({"reboot": "preserve"}, b"r", "in shutdown (unknown)", [SHUTDOWN_GUEST]),
    ],
    ids=["crash", "poweroff", "reboot"],
)
def test_preserve(
    kvm: None,
    daemon: DaemonProcess,
    events: Events,
    tiny_kernel: Path,
    tmp_path: Path,
    policy: dict[str, str],
    key: bytes,
    state: str,
    expected: list[Seen],
) -> None:
    name = "pre-" + next(iter(policy))
    start_with_policy(daemon, tmp_path, tiny_kernel, name, **policy)
    pid = daemon.vmm_pid(name)
    act(daemon, name, key, state)
    head: list[tuple[int, int] | str] = [(E.VIR_DOMAIN_EVENT_DEFINED, 0), BOOTED]
    events.wait_domain(name, head + expected)
    # The VMM keeps the frozen partition: the same process is still there, and nothing booted again.
    assert process_alive(pid) and daemon.vmm_pid(name) == pid
    # The daemon hands the VMM its exit file open and empty; a report in it would mean the VMM ended.
    exit_file = daemon.vmm_file(name, "exit_file")
    assert not exit_file.exists() or exit_file.read_text() == ""
    assert serial_log(daemon, name).count(TINY_BANNER) == 1
    assert name in virsh(daemon.uri, "list", "--name").stdout.split()  # still active
    for refused in ("start", "suspend", "resume", "shutdown", "reboot"):
        res = virsh(daemon.uri, refused, name, check=False)
        assert res.returncode != 0, refused
    assert domstate(daemon, name) == state and process_alive(pid)

    # A daemon crash and restart re-attaches to that same VMM and keeps the preserved state.
    daemon.kill()
    assert process_alive(pid)
    daemon.start()
    events.reconnect()
    assert domstate(daemon, name) == state
    assert process_alive(pid) and daemon.vmm_pid(name) == pid
    assert vmm_processes(daemon.run_dir) == {name: pid} and set(daemon.processes()) == {pid}

    virsh(daemon.uri, "destroy", name)
    assert domstate(daemon, name) == "shut off (destroyed)"
    events.wait_domain(name, [STOPPED_DESTROYED])
    wait_for(lambda: process_gone(pid), timeout=10)
    assert daemon.stale_runtime(name) == []
    assert daemon.processes() == {}


def test_preserved_vmm_dying_is_reported_per_table(
    kvm: None, daemon: DaemonProcess, events: Events, tiny_kernel: Path, tmp_path: Path
) -> None:
    """A preserved VMM that goes away (here: killed) leaves the domain per the table's VMM_DIED row."""
    start_with_policy(daemon, tmp_path, tiny_kernel, "pre-die", crash="preserve")
    pid = daemon.vmm_pid("pre-die")
    act(daemon, "pre-die", b"c", "crashed (panicked)")
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: domstate(daemon, "pre-die") == "shut off (crashed)", timeout=10)
    events.wait_domain(
        "pre-die",
        [
            (E.VIR_DOMAIN_EVENT_DEFINED, 0),
            BOOTED,
            PANICKED,
            (E.VIR_DOMAIN_EVENT_STOPPED, E.VIR_DOMAIN_EVENT_STOPPED_FAILED),
        ],
    )
    assert daemon.stale_runtime("pre-die") == []
