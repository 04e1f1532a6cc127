"""The URIs users type, on the standard socket paths: mshv:///system, -sock-ro, mshv:///session autostart,
systemd socket activation and the shipped units."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest

from tests.support.daemon import virsh, wait_for

UNITS = resources.files("mshv_libvirt") / "data" / "systemd"


def test_units_are_valid_systemd_units() -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    units = [str(UNITS / n) for n in ("virtmshvd.socket", "virtmshvd-ro.socket", "virtmshvd.service")]
    res = subprocess.run([tool, "verify", "--man=no", *units], capture_output=True, text=True, timeout=60)
    complaints = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip() and "/usr/sbin/virtmshvd" not in ln]
    assert complaints == []
    service = (UNITS / "virtmshvd.service").read_text()
    assert "KillMode=process" in service  # VMs survive daemon restarts
    assert "ListenStream=/run/libvirt/virtmshvd-sock\n" in (UNITS / "virtmshvd.socket").read_text()
    assert "ListenStream=/run/libvirt/virtmshvd-sock-ro" in (UNITS / "virtmshvd-ro.socket").read_text()
    assert "ListenStream=%t/libvirt/virtmshvd-sock" in (UNITS / "user" / "virtmshvd.socket").read_text()


def test_systemd_socket_activation(tmp_path: Path) -> None:
    """The daemon serves sockets it inherits as LISTEN_FDS (what systemd passes), read-only by name."""
    rw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ro = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    rw.bind(str(tmp_path / "act-sock"))
    ro.bind(str(tmp_path / "act-sock-ro"))
    rw.listen(8)
    ro.listen(8)

    def place_fds() -> None:  # fds 3 and 4 in the child, as systemd does
        os.dup2(rw.fileno(), 3)
        os.dup2(ro.fileno(), 4)

    cmd = (
        f"LISTEN_PID=$$ LISTEN_FDS=2 exec {sys.executable} -m mshv_libvirt.daemon --session "
        f"--config-dir {tmp_path}/etc --run-dir {tmp_path}/run"
    )
    proc = subprocess.Popen(["sh", "-c", cmd], preexec_fn=place_fds, pass_fds=(3, 4), stderr=subprocess.PIPE, text=True)
    try:
        uri = f"mshv+unix:///system?socket={tmp_path}/act-sock"
        wait_for(lambda: virsh(uri, "hostname", check=False).returncode == 0, timeout=20)
        ro_uri = f"mshv+unix:///system?socket={tmp_path}/act-sock-ro"
        assert virsh(ro_uri, "list", "--all").returncode == 0
        xml = tmp_path / "x.xml"
        xml.write_text("<domain type='hyperv'><name>x</name><memory>65536</memory><os><type>hvm</type></os></domain>")
        res = virsh(ro_uri, "define", str(xml), check=False)
        assert res.returncode != 0 and "read only" in res.stderr
        virsh(uri, "define", str(xml))
    finally:
        proc.terminate()
        proc.wait(10)
        rw.close()
        ro.close()


def _can_unshare() -> str | None:
    if os.geteuid() != 0:
        return "needs root (a private mount namespace over /run/libvirt)"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    res = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return None if res.returncode == 0 else f"cannot create a mount namespace: {res.stderr.decode().strip()}"


def test_system_uri_on_standard_paths(tmp_path: Path) -> None:
    """With the daemon on /run/libvirt/virtmshvd-sock, plain mshv:///system needs no client configuration.

    Runs in a private mount namespace with a fresh /run/libvirt so it cannot disturb an installed daemon.
    """
    reason = _can_unshare()
    if reason:
        pytest.skip(reason)
    script = tmp_path / "inside.sh"
    script.write_text(
        f"""set -e
mount -t tmpfs tmpfs /run/libvirt 2>/dev/null || {{ mkdir -p /run/libvirt; mount -t tmpfs tmpfs /run/libvirt; }}
{sys.executable} -m mshv_libvirt.daemon --system --config-dir {tmp_path}/etc --run-dir {tmp_path}/run \\
    --log-dir {tmp_path}/log > {tmp_path}/daemon.log 2>&1 &
pid=$!
for i in $(seq 200); do [ -S /run/libvirt/virtmshvd-sock-ro ] && break; sleep 0.05; done
stat -c '%a %n' /run/libvirt/virtmshvd-sock /run/libvirt/virtmshvd-sock-ro
virsh -c mshv:///system uri
virsh -c mshv:///system define {tmp_path}/d.xml
virsh -c mshv:///system list --all --name
virsh -r -c mshv:///system list --all --name
virsh -r -c mshv:///system undefine std1 2>&1 || echo RO-REFUSED
virsh -c mshv:///session list --all --name
kill $pid; wait $pid || true
"""
    )
    (tmp_path / "d.xml").write_text(
        "<domain type='hyperv'><name>std1</name><memory>65536</memory><os><type>hvm</type></os></domain>"
    )
    res = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "bash", str(script)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr + (tmp_path / "daemon.log").read_text()
    out = res.stdout
    assert "600 /run/libvirt/virtmshvd-sock\n" in out and "666 /run/libvirt/virtmshvd-sock-ro" in out
    assert "mshv:///system\n" in out
    assert out.count("std1\n") >= 3  # rw list, ro list, and mshv:///session (root uses the system socket)
    assert "RO-REFUSED" in out and "read only" in out


def listener_pid(sock: Path) -> int:
    """The pid of the process serving a UNIX socket, from the kernel (SO_PEERCRED), not from names."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.connect(str(sock))
        creds: tuple[int, int, int] = struct.unpack("3i", c.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return creds[0]


@pytest.fixture
def public_tmp() -> Iterator[tuple[Path, list[int]]]:
    """A directory another user can enter (pytest's own tmp dirs are private to root), and the list
    of daemon pids the test found serving in it, ended at teardown."""
    path = Path(tempfile.mkdtemp(prefix="mshv-session-"))
    path.chmod(0o755)
    pids: list[int] = []
    try:
        yield path, pids
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        shutil.rmtree(path, ignore_errors=True)


def test_session_uri_autostarts_the_daemon(public_tmp: tuple[Path, list[int]]) -> None:
    """A non-root user's mshv:///session spawns `$VIRTD_PATH/virtmshvd --timeout=120` and is served by it."""
    tmp, started = public_tmp
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("needs root and runuser to act as another user")
    probe = subprocess.run(
        ["runuser", "-u", "nobody", "--", sys.executable, "-c", "import mshv_libvirt.daemon"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"the package is not readable by other users here: {probe.stderr.strip()[-200:]}")
    bindir = tmp / "sbin"
    bindir.mkdir()
    wrapper = bindir / "virtmshvd"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m mshv_libvirt.daemon "$@"\n')
    wrapper.chmod(0o755)
    home = tmp / "home"
    runtime = tmp / "xdg"
    for d in (home, runtime):
        d.mkdir()
        os.chown(d, 65534, 65534)
    runtime.chmod(0o700)
    env = [
        f"HOME={home}",
        f"XDG_RUNTIME_DIR={runtime}",
        f"VIRTD_PATH={bindir}",
        "PATH=/usr/sbin:/usr/bin:/bin",
    ]
    # Debian's client is built with remote_mode=legacy: with no socket yet, ?mode=direct (or
    # remote_mode="direct" in ~/.config/libvirt/libvirt.conf, or the user socket unit) selects virtmshvd.
    cmd = ["runuser", "-u", "nobody", "--", "env", *env, "virsh", "-c", "mshv:///session?mode=direct"]
    res = subprocess.run([*cmd, "uri"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip() == "mshv:///session?mode=direct"  # virsh prints the URI it was given
    sock = runtime / "libvirt" / "virtmshvd-sock"
    assert sock.is_socket() and (sock.stat().st_mode & 0o777) == 0o600 and sock.stat().st_uid == 65534
    daemon_pid = listener_pid(sock)
    started.append(daemon_pid)
    # Once the socket exists, the plain URI routes to it with no configuration at all.
    res = subprocess.run([*cmd[:-1], "mshv:///session", "hostname"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    # Spawned exactly the way libvirt's client spawns session daemons, as that user.
    argv = Path(f"/proc/{daemon_pid}/cmdline").read_bytes().split(b"\0")
    assert b"mshv_libvirt.daemon" in argv and b"--timeout=120" in argv, argv
    assert Path(f"/proc/{daemon_pid}").stat().st_uid == 65534
