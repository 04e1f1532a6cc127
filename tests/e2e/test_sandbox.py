"""The VMM runs with least privilege (docs/SECURITY.md), checked from outside through /proc and from
inside through the documented test-only hooks, on VMMs the real daemon started for ``virsh start``."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import DaemonProcess, domain_xml, running_daemon, serial_log, virsh, vmm_processes, wait_for
from tests.support.guests import TINY_AP_BANNER, TINY_BANNER

pytestmark = [pytest.mark.virsh, pytest.mark.kvm]

NOBODY = pwd.getpwnam("nobody")
EACCES = 13


def start(d: DaemonProcess, tmp_path: Path, name: str, kernel: Path, vcpus: int = 2) -> int:
    xml = tmp_path / f"{name}.xml"
    xml.write_text(domain_xml(name, kernel, vcpus=vcpus))
    virsh(d.uri, "define", str(xml))
    virsh(d.uri, "start", name)
    wait_for(lambda: f"{TINY_AP_BANNER} {vcpus - 1}" in serial_log(d, name) if vcpus > 1 else True, timeout=30)
    wait_for(lambda: TINY_BANNER in serial_log(d, name), timeout=30)
    # The test's own /proc scan (not the daemon's records): the VMM process whose --config is in our run dir.
    pids = [pid for n, pid in vmm_processes(d.run_dir).items() if n == name]
    assert len(pids) == 1, pids
    return pids[0]


def proc_status(path: Path) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in path.read_text().splitlines() if ":\t" in line)


def tasks(pid: int) -> dict[int, dict[str, str]]:
    out = {}
    for t in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            out[int(t.name)] = proc_status(t / "status")
    return out


class Control:
    """The VMM's control socket, spoken directly (JSON lines, docs/DESIGN.md), as root may."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rwb")
        self.next_id = 0

    def __call__(self, cmd: str, **fields: Any) -> dict[str, Any]:
        self.next_id += 1
        self.file.write(json.dumps({"id": self.next_id, "cmd": cmd, **fields}).encode() + b"\n")
        self.file.flush()
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("the VMM closed its control socket")
            msg = json.loads(line)
            if msg.get("id") == self.next_id:
                assert msg["ok"], msg
                return dict(msg["result"])

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@contextlib.contextmanager
def control(d: DaemonProcess, name: str) -> Iterator[Control]:
    c = Control(d.control_socket(name))
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def user_daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    """The daemon as system mode runs it: VMMs as an unprivileged user (here nobody), test hooks on."""
    with running_daemon(tmp_path / "d", "--vmm-user", "nobody", "--vmm-group", "nogroup", "--vmm-test-hooks") as d:
        yield d


@pytest.fixture
def hook_daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    """Session mode (no user switch) with the test hooks."""
    with running_daemon(tmp_path / "d", "--vmm-test-hooks") as d:
        yield d


def host_landlock_abi() -> int:
    """The oracle for Landlock: asked of the kernel directly (syscall 444, LANDLOCK_CREATE_RULESET_VERSION)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return max(int(libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))), 0)


def test_guest_runs_as_the_vmm_user_and_every_thread_is_filtered(
    user_daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    pid = start(user_daemon, tmp_path, "jailed", tiny_kernel, vcpus=2)
    threads = tasks(pid)
    names = sorted(s["Name"].strip() for s in threads.values())
    assert {"vcpu0", "vcpu1"} <= set(names), names  # the guest's vCPUs are among the threads checked
    for tid, st in threads.items():
        uids, gids = st["Uid"].split(), st["Gid"].split()
        assert uids == [str(NOBODY.pw_uid)] * 4, (tid, st["Name"], uids)
        assert gids == [str(NOBODY.pw_gid)] * 4, (tid, st["Name"], gids)
        assert st["Groups"].strip() == "", (tid, st["Groups"])
        assert st["Seccomp"].strip() == "2" and st["NoNewPrivs"].strip() == "1", (tid, st["Name"], st["Seccomp"])
        assert st["CapEff"].strip() == "0000000000000000", (tid, st["CapEff"])
    # vCPU threads stack their own, narrower list on the process one.
    for st in threads.values():
        if st["Name"].strip().startswith("vcpu"):
            assert st["Seccomp_filters"].strip() == "2", st
    with control(user_daemon, "jailed") as c:
        status = c("status")
    assert status["sandbox"]["landlock_abi"] == host_landlock_abi() > 0
    assert status["sandbox"]["uid"] == NOBODY.pw_uid
    virsh(user_daemon.uri, "destroy", "jailed")


def test_vmm_cannot_open_shadow_or_another_domains_files(
    user_daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    start(user_daemon, tmp_path, "one", tiny_kernel, vcpus=1)
    start(user_daemon, tmp_path, "two", tiny_kernel, vcpus=1)
    run, other = user_daemon.run_dir, "two"
    probes = [
        ("/etc/shadow", False),
        ("/etc/passwd", False),  # world-readable: only Landlock keeps it out
        (str(user_daemon.serial_log(other)), False),
        (str(user_daemon.serial_log(other)), True),
        (str(user_daemon.vmm_file(other, "config")), False),
        (str(user_daemon.vmm_file(other, "exit_file")), True),
        (str(user_daemon.serial_log("one")), True),  # even its own log: only through the descriptor it was handed
        (str(run / "planted"), True),
        (str(user_daemon.config_file(other)), False),
        (str(tiny_kernel), False),
    ]
    with control(user_daemon, "one") as c:
        for path, write in probes:
            res = c("test-open", path=path, write=write)
            assert res == {"opened": False, "errno": EACCES, "error": "Permission denied"}, (path, write, res)
    assert not (run / "planted").exists()
    # Both guests are unharmed.
    for name in ("one", "two"):
        assert virsh(user_daemon.uri, "domstate", name).stdout.strip() == "running"


def test_session_mode_is_sandboxed_without_a_user_switch(
    hook_daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    pid = start(hook_daemon, tmp_path, "sess", tiny_kernel, vcpus=1)
    for st in tasks(pid).values():
        assert st["Uid"].split()[0] == str(os.getuid())
        assert st["Seccomp"].strip() == "2" and st["NoNewPrivs"].strip() == "1"
    with control(hook_daemon, "sess") as c:
        # Root's DAC would allow this: Landlock alone refuses it.
        assert c("test-open", path="/etc/shadow")["errno"] == EACCES
        assert c("test-open", path=str(hook_daemon.run_dir / "x"), write=True)["errno"] == EACCES


@pytest.mark.parametrize("thread", ["vcpu", "main"])
def test_a_forbidden_call_ends_the_vmm_naming_it(
    user_daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path, thread: str
) -> None:
    name = f"bad-{thread}"
    pid = start(user_daemon, tmp_path, name, tiny_kernel, vcpus=1)
    # socket(2) is in no allow-list; from the vCPU thread the call is made inside its run loop.
    with control(user_daemon, name) as c, contextlib.suppress(ConnectionError, OSError):
        c("test-syscall", syscall="socket", thread=thread)
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text())
    wait_for(lambda: virsh(user_daemon.uri, "domstate", name).stdout.strip() == "shut off", timeout=20)
    assert virsh(user_daemon.uri, "domstate", "--reason", name).stdout.strip() == "shut off (crashed)"
    log = user_daemon.vmm_log(name).read_text()
    who = "vcpu0 (tid " if thread == "vcpu" else "main (tid "
    filt = "vCPU filter" if thread == "vcpu" else "main filter"
    lines = [line for line in log.splitlines() if "seccomp:" in line]
    assert len(lines) == 1, log
    assert f"seccomp: thread {who}" in lines[0] and f"{filt}) made the forbidden system call socket (41)" in lines[0]
    # The same words reached the daemon through the exit report.
    daemon_log = user_daemon.log.read_text()
    assert f"{filt}) made the forbidden system call socket (41)" in daemon_log


def test_hooks_are_refused_without_the_test_flag(daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path) -> None:
    start(daemon, tmp_path, "nohooks", tiny_kernel, vcpus=1)
    c = Control(daemon.control_socket("nohooks"))
    try:
        c.file.write(b'{"id": 1, "cmd": "test-syscall", "syscall": "socket"}\n')
        c.file.flush()
        reply = json.loads(c.file.readline())
    finally:
        c.close()
    assert reply == {"id": 1, "ok": False, "error": "unknown command 'test-syscall'"}
    assert virsh(daemon.uri, "domstate", "nohooks").stdout.strip() == "running"


def test_vcpu_threads_have_the_narrower_list(user_daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path) -> None:
    pid = start(user_daemon, tmp_path, "narrow", tiny_kernel, vcpus=1)
    with control(user_daemon, "narrow") as c:
        # openat(0, NULL, ...) is allowed on the main thread (Landlock limits what it opens): EFAULT, alive.
        assert c("test-syscall", syscall="openat", thread="main") == {"result": -14}
        assert virsh(user_daemon.uri, "domstate", "narrow").stdout.strip() == "running"
        with contextlib.suppress(ConnectionError, OSError):
            c("test-syscall", syscall="openat", thread="vcpu")
    wait_for(lambda: virsh(user_daemon.uri, "domstate", "narrow").stdout.strip() == "shut off", timeout=20)
    assert not Path(f"/proc/{pid}/status").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    log = (user_daemon.run_dir / "narrow.log").read_text()
    assert "seccomp: thread vcpu0 (tid " in log and "made the forbidden system call openat (257)" in log


def test_a_missing_vmm_user_fails_the_start_naming_it(tmp_path: Path, tiny_kernel: Path) -> None:
    with running_daemon(tmp_path / "d", "--vmm-user", "no-such-vmm-user") as d:
        xml = tmp_path / "nouser.xml"
        xml.write_text(domain_xml("nouser", tiny_kernel))
        virsh(d.uri, "define", str(xml))
        res = virsh(d.uri, "start", "nouser", check=False)
        assert res.returncode != 0
        assert "failed to start: the VMM user 'no-such-vmm-user' does not exist" in res.stderr
        assert virsh(d.uri, "domstate", "nouser").stdout.strip() == "shut off"
