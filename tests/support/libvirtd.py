"""libvirt's own libvirtd for the relay tests: the system daemon, and private session daemons.

The system daemon (``/run/libvirt/libvirt-sock``, what ``scripts/install.sh`` starts) is used as it
is when it runs; otherwise the tests start it and end it by the pid they started. Under ``CI`` a
missing libvirtd binary fails the test instead of skipping it. A session daemon is libvirtd run as
an unprivileged user with its home and runtime directory in a throw-away directory, so a test can
stop, freeze or kill it (by its pid) without touching anyone else's daemon.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import libvirt
import pytest

from tests.support.daemon import DaemonProcess, wait_for


def unique(prefix: str = "mshvr") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


SYSTEM_SOCKET = Path("/run/libvirt/libvirt-sock")
SESSION_USER = "nobody"


def missing(message: str) -> NoReturn:
    """A prerequisite is absent: under ``CI`` that fails the test, elsewhere it skips it."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def libvirtd_binary() -> str:
    path = shutil.which("libvirtd") or ("/usr/sbin/libvirtd" if os.path.exists("/usr/sbin/libvirtd") else None)
    if path is None:
        missing("libvirtd is not installed (scripts/install-deps.sh installs libvirt-daemon)")
    return path


def answers(path: Path) -> bool:
    """Something accepts connections on the UNIX socket ``path``."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(str(path))
    except OSError:
        return False
    finally:
        s.close()
    return True


@contextlib.contextmanager
def system_libvirtd(log: Path) -> Iterator[None]:
    binary = libvirtd_binary()
    if answers(SYSTEM_SOCKET):
        yield
        return
    if os.geteuid() != 0:
        missing("the system libvirtd is not running and only root can start it")
    with open(log, "ab") as out:
        proc = subprocess.Popen([binary], stdout=out, stderr=subprocess.STDOUT, cwd="/", start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not answers(SYSTEM_SOCKET):
            if proc.poll() is not None:
                if answers(SYSTEM_SOCKET):  # another test run started it at the same moment
                    break
                pytest.fail(f"libvirtd exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"libvirtd did not listen within 30 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        yield
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class SessionLibvirtd:
    """libvirtd as SESSION_USER, in ``root`` (its HOME and XDG_RUNTIME_DIR)."""

    root: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def runtime_dir(self) -> Path:
        return self.root / "run"

    @property
    def socket(self) -> Path:
        return self.runtime_dir / "libvirt" / "libvirt-sock"

    @property
    def log(self) -> Path:
        return self.root / "libvirtd.log"

    def uri(self, scheme: str) -> str:
        return f"{scheme}+unix:///session?socket={self.socket}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> SessionLibvirtd:
        user = pwd.getpwnam(SESSION_USER)
        env = {
            "HOME": str(self.root / "home"),
            "XDG_RUNTIME_DIR": str(self.runtime_dir),
            "XDG_CONFIG_HOME": str(self.root / "home" / ".config"),
            "XDG_CACHE_HOME": str(self.root / "home" / ".cache"),
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        }
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [libvirtd_binary()],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                env=env,
                user=user.pw_uid,
                group=user.pw_gid,
                extra_groups=[],
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while not answers(self.socket):
            if self.proc.poll() is not None:
                raise AssertionError(f"session libvirtd exited with {self.proc.returncode}:\n{self.log.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"session libvirtd did not listen within 30 s:\n{self.log.read_text()}")
            time.sleep(0.05)
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None and self.proc.poll() is None
        os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)  # a frozen daemon cannot act on SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


def unread_bytes(pid: int) -> int:
    """Bytes sent to process ``pid`` on its UNIX sockets that it has not read yet (``ss``'s Recv-Q)."""
    out = subprocess.run(["ss", "-xpH"], capture_output=True, text=True, check=True, timeout=30).stdout
    return sum(int(line.split()[2]) for line in out.splitlines() if f"pid={pid}," in line)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def session_uri(d: DaemonProcess) -> str:
    """``mshv:///session`` on the test daemon's socket."""
    return f"mshv+unix:///session?socket={d.socket}"


@contextlib.contextmanager
def session_libvirtd() -> Iterator[SessionLibvirtd]:
    """A private session libvirtd; its directory is outside pytest's root-only tmp tree so the
    unprivileged user can reach it, and is removed afterwards."""
    libvirtd_binary()
    if os.geteuid() != 0:
        missing("running libvirtd as another user needs root")
    user = pwd.getpwnam(SESSION_USER)
    root = Path(tempfile.mkdtemp(prefix="mshv-relay-session-"))
    try:
        for sub in ("", "home", "run"):
            (root / sub).mkdir(exist_ok=True)
            os.chown(root / sub, user.pw_uid, user.pw_gid)
        os.chmod(root / "run", 0o700)
        d = SessionLibvirtd(root).start()
        try:
            yield d
        finally:
            d.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---- virt-admin: libvirtd's own view of its clients (the oracle for "one connection per client") ---------


@dataclass(frozen=True)
class AdminClient:
    id: int
    pid: int
    readonly: bool


def libvirtd_clients(pid: int | None = None) -> list[AdminClient]:
    """The system libvirtd's clients (those of process ``pid`` only, if given)."""
    listing = subprocess.run(
        ["virt-admin", "srv-clients-list", "libvirtd"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    out = []
    for m in re.finditer(r"^\s*(\d+)\s+unix\s", listing, re.M):
        info = subprocess.run(
            ["virt-admin", "client-info", "libvirtd", m.group(1)], capture_output=True, text=True, timeout=30
        ).stdout
        fields = dict((k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in info.splitlines()) if v)
        if "unix_process_id" not in fields:
            continue  # it disconnected in between
        c = AdminClient(int(m.group(1)), int(fields["unix_process_id"]), fields.get("readonly") == "yes")
        if pid is None or c.pid == pid:
            out.append(c)
    return out


def wait_clients(pid: int, count: int, timeout: float = 20) -> list[AdminClient]:
    found: list[AdminClient] = []

    def check() -> bool:
        nonlocal found
        found = libvirtd_clients(pid)
        return len(found) == count

    try:
        wait_for(check, timeout, interval=0.2)
    except AssertionError as err:
        raise AssertionError(f"libvirtd has {len(found)} clients of pid {pid}, expected {count}") from err
    return found


class EventLoop:
    """``virsh <event command> --loop`` in the background, its lines collected."""

    def __init__(self, uri: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            ["virsh", "-c", uri, *args, "--loop"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip():
                self.lines.append(line.strip())

    def wait(self, pred: Callable[[list[str]], bool], timeout: float = 20) -> None:
        try:
            wait_for(lambda: pred(list(self.lines)), timeout)
        except AssertionError as err:
            raise AssertionError(f"events seen: {self.lines}") from err

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self._reader.join(5)


# Where virt-manager (virtinst's StoragePool.build_default_pool) puts the 'default' pool it defines, builds
# and autostarts on every connection it opens to a system URI with no such pool, ours included.
VIRTINST_DEFAULT_POOL_DIR = Path("/var/lib/libvirt/images")


@contextlib.contextmanager
def storage_pools_as_found(uri: str = "storage:///system") -> Iterator[None]:
    """The host's storage pools as they were: a pool defined during the block by someone else (virt-manager)
    is stopped and undefined, straight through libvirt (not through the code under test); its volumes are
    never deleted, and virtinst's default directory is removed only if the block created it (and it is empty)."""

    def names(conn: libvirt.virConnect) -> set[str]:
        return {p.name() for p in conn.listAllStoragePools()}

    conn = libvirt.open(uri)
    try:
        before = names(conn)
        dir_existed = VIRTINST_DEFAULT_POOL_DIR.exists()
        yield
        for name in sorted(names(conn) - before):
            with contextlib.suppress(libvirt.libvirtError):
                pool = conn.storagePoolLookupByName(name)
                if pool.isActive():
                    pool.destroy()
                pool.undefine()
        if not dir_existed:
            with contextlib.suppress(OSError):
                VIRTINST_DEFAULT_POOL_DIR.rmdir()
    finally:
        conn.close()
