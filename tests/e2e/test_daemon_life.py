"""The daemon's process life, through the real clients (issue 12 items 1 and 2, issue 19 item 4).

SIGTERM ends the daemon promptly and leaves its VMs running for the next daemon; ``--daemon`` does
what a daemon does; the daemon and its VMMs import only the installed package; a second daemon on
the same directories is refused by libvirt's pid file lock.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import mshv_libvirt
from mshv_libvirt.driver import layout
from tests.support.daemon import (
    SIGTERM_BOUND,
    DaemonProcess,
    PtyProcess,
    console_roundtrip,
    define,
    domstate,
    kill_pids,
    serial_log,
    sigterm,
    virsh,
    vmm_processes,
    wait_for,
)
from tests.support.guests import TINY_BANNER
from tests.support.limits import MAX_RUN_DIR_BYTES
from tests.support.procfs import process_alive, process_gone

libvirt = pytest.importorskip("libvirt")

pytestmark = pytest.mark.virsh

# -- issue 12 item 1: SIGTERM ------------------------------------------------------------------------


def test_sigterm_with_running_and_paused_vms(
    kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    for name in ("tr", "tp"):
        define(daemon, tmp_path, name, tiny_kernel)
        virsh(daemon.uri, "start", name)
    wait_for(lambda: all(TINY_BANNER in serial_log(daemon, n) for n in ("tr", "tp")))
    virsh(daemon.uri, "suspend", "tp")
    before = vmm_processes(daemon.run_dir)  # the test's own /proc scan
    assert set(before) == {"tr", "tp"}
    # Clients holding what a daemon must let go of: a console stream, event callbacks.
    con = PtyProcess(["virsh", "-c", daemon.uri, "console", "tr"])
    events = subprocess.Popen(
        ["virsh", "-c", daemon.uri, "event", "--all", "--loop"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        con.wait_console_ready()
        elapsed = sigterm(daemon)
        print(f"SIGTERM to exit: {elapsed:.2f} s")
        assert vmm_processes(daemon.run_dir) == before and all(process_alive(p) for p in before.values())
        con.read_until(b"Disconnected from", timeout=10)  # the clients see the connection end
        events.wait(10)

        daemon.start()
        assert domstate(daemon, "tr") == "running (booted)"
        assert domstate(daemon, "tp") == "paused (user)"
        assert {n: daemon.vmm_pid(n) for n in before} == before
        console_roundtrip(daemon, "tr", b"AFTER-SIGTERM")
        virsh(daemon.uri, "resume", "tp")
        console_roundtrip(daemon, "tp", b"RESUMED-AFTER")
        for name in before:
            virsh(daemon.uri, "destroy", name)
        wait_for(lambda: not any(process_alive(p) for p in before.values()), timeout=10)
        assert daemon.runtime_leftovers() == []
        sigterm(daemon)  # and with nothing running
    finally:
        con.kill()
        events.kill()
        events.wait()
        kill_pids(before.values())


def _recv_queue(pid: int) -> int:
    """Bytes waiting unread in the UNIX stream sockets of process ``pid`` (from ``ss``)."""
    out = subprocess.run(["ss", "-xpH"], capture_output=True, text=True, check=True).stdout
    return sum(int(ln.split()[2]) for ln in out.splitlines() if f"pid={pid}," in ln)


def test_sigterm_with_a_call_waiting_on_a_stopped_vmm(
    kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    """A client call that waits for a VMM (here one SIGSTOPped, so it never answers) must not keep a
    stopping daemon alive for the call's 30 s timeout, nor for the 60 s a disconnecting client waits."""
    if shutil.which("ss") is None:
        if os.environ.get("CI"):
            raise AssertionError("ss (iproute2) is needed to see the call reach the VMM")
        pytest.skip("ss (iproute2) is needed to see the call reach the VMM")
    define(daemon, tmp_path, "tw", tiny_kernel)
    virsh(daemon.uri, "start", "tw")
    wait_for(lambda: TINY_BANNER in serial_log(daemon, "tw"))
    pid = daemon.vmm_pid("tw")
    os.kill(pid, signal.SIGSTOP)
    client = subprocess.Popen(
        ["virsh", "-c", daemon.uri, "suspend", "tw"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        wait_for(lambda: _recv_queue(pid) > 0, timeout=15)  # the daemon's "pause" request sits in the VMM's socket
        print(f"SIGTERM to exit, a call in flight: {sigterm(daemon):.2f} s")
        assert client.wait(10) != 0  # the call ended with the connection
        assert process_alive(pid)
        os.kill(pid, signal.SIGCONT)
        daemon.start()
        # The VMM carried out the request it had read: the new daemon sees it paused (or still running).
        wait_for(lambda: domstate(daemon, "tw") in ("paused (unknown)", "running (booted)"), timeout=10)
        assert daemon.vmm_pid("tw") == pid
        virsh(daemon.uri, "destroy", "tw")
        wait_for(lambda: process_gone(pid), timeout=10)
    finally:
        client.kill()
        client.wait()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        kill_pids([pid])


def test_systemd_units_leave_vms_running() -> None:
    """No systemd as PID 1 on these machines: the units are checked as text (test_paths.py verifies them)."""
    from importlib import resources

    units = resources.files("mshv_libvirt") / "data" / "systemd"
    for service in (units / "virtmshvd.service", units / "user" / "virtmshvd.service"):
        text = service.read_text()
        lines = [ln.strip() for ln in text.splitlines()]
        assert "KillMode=process" in lines, service  # stopping the service signals the daemon only
        assert "Type=exec" in lines and "--daemon" not in text, service  # systemd supervises the foreground process


# -- issue 12 item 2: --daemon, and only the installed package ---------------------------------------


PROBE = """
import os as _os, sys as _sys


def _probe(what: str) -> None:
    with open({marker!r}, "a") as f:
        f.write(f"{{what}} {{_os.getpid()}} isolated={{_sys.flags.isolated}}\\n")


_probe("import")
# A process forked while this copy is loaded (a daemon that did not re-execute itself) says so.
_os.register_at_fork(after_in_child=lambda: _probe("fork"))
"""


def unbuilt_copy(dest: Path, marker: Path) -> Path:
    """A copy of the source without the compiled module, whose package reports every use of it."""
    src = Path(mshv_libvirt.__file__).parent
    pkg = dest / "mshv_libvirt"
    shutil.copytree(src, pkg, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    init = pkg / "__init__.py"
    init.write_text(init.read_text() + PROBE.format(marker=str(marker)))
    assert not list(pkg.glob("_mshv*"))
    return dest


def daemon_status(pid: int) -> dict[str, str]:
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    status = dict(ln.split(":\t", 1) for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in ln)
    return {"cwd": os.readlink(f"/proc/{pid}/cwd"), "umask": status["Umask"], "sid": stat[3], "tty": stat[4]}


@pytest.mark.parametrize("how", ["cwd", "pythonpath", "python-m"])
def test_daemon_mode_and_the_installed_package(kvm: None, tmp_path: Path, tiny_kernel: Path, how: str) -> None:
    """``virtmshvd --daemon`` started from a directory holding an unbuilt copy of the source (and with
    PYTHONPATH pointing at it, and as ``python -m`` there): the daemon and its VMMs run the installed
    package, the daemon is detached (cwd /, its own session, no terminal, umask 077 for a session)."""
    marker = tmp_path / "imports-of-the-copy"
    checkout = unbuilt_copy(tmp_path / "checkout", marker)
    entry = Path(sys.executable).parent / "virtmshvd"
    if not entry.exists():
        if os.environ.get("CI"):
            raise AssertionError(f"{entry} (the installed entry point) is missing")
        pytest.skip(f"{entry} (the installed entry point) is missing")
    d = DaemonProcess(tmp_path / "d")
    pidfile = tmp_path / "virtmshvd.pid"
    argv = [str(entry)] if how != "python-m" else [sys.executable, "-m", "mshv_libvirt.daemon"]
    argv += ["--session", "--daemon", "--socket", str(d.socket), "--config-dir", str(d.config_dir)]
    argv += ["--run-dir", str(d.run_dir), "--log-dir", str(d.run_dir), "--pidfile", str(pidfile)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if how == "pythonpath":
        env["PYTHONPATH"] = str(checkout)
    res = subprocess.run(argv, cwd=checkout, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res
    # It returns once the daemon serves (readiness reported by the daemon itself).
    assert d.socket.is_socket() and pidfile.exists()
    pid = int(pidfile.read_text())
    vmm = 0
    try:
        st = daemon_status(pid)
        assert st["cwd"] == "/" and st["umask"] == "0077" and st["tty"] == "0"
        assert st["sid"] != str(os.getsid(0))
        assert b"-I" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        define(d, tmp_path, "iso", tiny_kernel)
        virsh(d.uri, "start", "iso")
        wait_for(lambda: TINY_BANNER in serial_log(d, "iso"))
        vmm = vmm_processes(d.run_dir)["iso"]
        argv_vmm = Path(f"/proc/{vmm}/cmdline").read_bytes().split(b"\0")
        assert argv_vmm[1:4] == [b"-I", b"-m", b"mshv_libvirt.vmm"]
        maps = Path(f"/proc/{vmm}/maps").read_text()
        installed = Path(mshv_libvirt.__file__).parent
        assert f" {installed}/_mshv" in maps and str(checkout) not in maps
        uses = marker.read_text().splitlines() if marker.exists() else []
        # At most the launcher read the copy, before it re-executed itself isolated: no process was
        # forked with the copy loaded (the daemon), no VMM and no isolated interpreter imported it.
        assert uses == ([] if how == "cwd" else [f"import {uses[0].split()[1]} isolated=0"]), uses
        assert int(uses[0].split()[1]) not in (pid, vmm) if uses else True
        virsh(d.uri, "destroy", "iso")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        wait_for(lambda: process_gone(pid), timeout=SIGTERM_BOUND)
        kill_pids([vmm] if vmm else [])
    assert not pidfile.exists() and not (d.run_dir / layout.DAEMON_PIDFILE).exists()


# -- issue 19 item 4: a second daemon on the same directories -----------------------------------------------


def _locks_of(pid: int) -> list[str]:
    return [ln for ln in Path("/proc/locks").read_text().splitlines() if ln.split()[4] == str(pid)]


def test_second_daemon_is_refused_and_the_first_keeps_everything(
    kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    define(daemon, tmp_path, "lk", tiny_kernel)
    virsh(daemon.uri, "start", "lk")
    wait_for(lambda: TINY_BANNER in serial_log(daemon, "lk"))
    vmm = daemon.vmm_pid("lk")
    assert daemon.proc is not None
    first = daemon.proc.pid
    pidfile = daemon.run_dir / layout.DAEMON_PIDFILE
    assert pidfile.read_text() == f"{first}\n"
    # libvirt's lock: a POSIX record lock (fcntl), not a flock, held by the daemon only.
    (lock,) = _locks_of(first)
    assert lock.split()[1:4] == ["POSIX", "ADVISORY", "WRITE"]
    assert _locks_of(vmm) == []
    assert not any(os.path.realpath(f"/proc/{vmm}/fd/{fd}") == str(pidfile) for fd in os.listdir(f"/proc/{vmm}/fd"))
    sock_inode = daemon.socket.stat().st_ino
    try:
        # Same socket, config and run directories (and another socket: the lock is the run dir's).
        for socket_path in (daemon.socket, tmp_path / "other-sock"):
            for extra in ((), ("--daemon",)):
                res = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "mshv_libvirt.daemon",
                        "--session",
                        "--socket",
                        str(socket_path),
                        "--config-dir",
                        str(daemon.config_dir),
                        "--run-dir",
                        str(daemon.run_dir),
                        "--log-dir",
                        str(tmp_path / "second-log"),
                        *extra,
                    ],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert res.returncode == 1, res
                if extra:  # the waiting parent says why, as libvirt's daemons do
                    assert "error: Unable to obtain pidfile" in res.stderr
                    log = (tmp_path / "second-log" / "virtmshvd.log").read_text()
                else:
                    log = res.stderr
                assert f"Failed to acquire pid file '{pidfile}': Resource temporarily unavailable" in log
                assert "re-attached" not in log and "listening" not in log
        assert not (tmp_path / "other-sock").exists()
        # The first daemon is untouched: same socket, same lock, still acting on its VMM.
        assert daemon.alive() and daemon.socket.stat().st_ino == sock_inode
        assert pidfile.read_text() == f"{first}\n" and len(_locks_of(first)) == 1
        assert domstate(daemon, "lk") == "running (booted)"
        console_roundtrip(daemon, "lk", b"STILL-FIRST")
        os.kill(vmm, signal.SIGTERM)  # a VMM ending on its own is seen by the first daemon
        wait_for(lambda: domstate(daemon, "lk") == "shut off (destroyed)", timeout=15)

        # kill -9 with a VMM running: the lock dies with the daemon, never held by the VMM.
        virsh(daemon.uri, "start", "lk")
        vmm = daemon.vmm_pid("lk")
        daemon.kill()
        assert process_alive(vmm)
        daemon.start()
        assert daemon.proc is not None and pidfile.read_text() == f"{daemon.proc.pid}\n"
        assert domstate(daemon, "lk") == "running (booted)" and daemon.vmm_pid("lk") == vmm
        virsh(daemon.uri, "destroy", "lk")
        # A clean stop releases it too (and removes the file, as libvirt does).
        daemon.stop()
        assert not pidfile.exists()
    finally:
        kill_pids([vmm])


def dirs_args(tmp_path: Path, run_dir: Path) -> list[str]:
    return ["--config-dir", str(tmp_path / "etc"), "--run-dir", str(run_dir)]


def test_run_dir_too_long_for_control_sockets_is_refused(tmp_path: Path) -> None:
    room = MAX_RUN_DIR_BYTES
    run_dir = tmp_path / ("r" * max(1, room - len(str(tmp_path)) + 1))
    assert len(str(run_dir)) > room
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "mshv_libvirt.daemon",
            "--session",
            "--socket",
            str(tmp_path / "s"),
            *dirs_args(tmp_path, run_dir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1
    assert f"unable to use run directory {run_dir}: run directory {run_dir} is too long" in res.stderr
    assert not (tmp_path / "s").exists()
