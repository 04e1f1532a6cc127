"""A real virtmshvd on a temporary socket, and the real clients that talk to it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import termios
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mshv_libvirt.driver import layout
from mshv_libvirt.rpc import calltrace
from tests.support.procfs import RUN_MARK, Proc, run_processes
from tests.support.waits import wait_for as wait_for  # re-exported: most tests import it from here

VIRSH = "virsh"

_LOG_NAME = re.compile(r"\.log(\.[0-9]+)?$")  # a log or one of its rotated backups


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def vmm_processes(run_dir: Path) -> dict[str, int]:
    """name -> pid of every live VMM of ``run_dir``'s daemon, from the tests' own scan (``run_processes``):
    a process running ``mshv_libvirt.vmm`` whose ``--config`` lies in ``run_dir`` or one level below (the
    name is read from that file), not counting its forks (a disk backend's reaper runs the same command
    line until it is replaced; its parent is the VMM). Two VMMs for one name fail the test."""
    procs = run_processes(run_dir)
    out: dict[str, int] = {}
    root = os.path.realpath(run_dir)
    for pid, p in procs.items():
        argv = p.argv
        if "mshv_libvirt.vmm" not in argv or "--config" not in argv[:-1]:
            continue
        parent = procs.get(p.ppid)
        if parent is not None and parent.argv == argv:
            continue  # a fork of the VMM, not another VMM
        config = os.path.realpath(argv[argv.index("--config") + 1])
        if os.path.dirname(config) != root and os.path.dirname(os.path.dirname(config)) != root:
            continue
        try:
            name = str(json.loads(Path(config).read_text())["name"])
        except (OSError, ValueError, KeyError):
            name = f"?{config}"
        assert name not in out, f"two VMMs for {name!r}: {procs[out[name]]!r} and {p!r}"
        out[name] = pid
    return out


@dataclass
class DaemonProcess:
    root: Path
    extra_args: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    module: str = "mshv_libvirt.daemon"  # or a test wrapper of it (tests/support/validator_hook.py)
    system: bool = False  # the system instance (libvirt's "privileged" driver), still on the paths below
    run_dir_arg: str | None = None  # another spelling of run_dir to pass (a symlink, a relative path)
    # a network namespace of the test's to run it in (``ip netns exec``, which also mounts that namespace's
    # /sys): its taps, and the bridges it joins, are the namespace's, never the host's
    netns: str | None = None

    @property
    def socket(self) -> Path:
        return self.root / "sock"

    @property
    def config_dir(self) -> Path:
        return self.root / "etc"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def log(self) -> Path:
        return self.root / "daemon.log"

    @property
    def log_dir(self) -> Path:
        return self.run_dir  # the daemon's default when only --run-dir is given

    # -- where the daemon keeps a domain's files (docs/DAEMON.md, "On-disk layout") --
    def config_file(self, name: str) -> Path:
        return layout.config_file(self.config_dir, name)

    def autostart_link(self, name: str) -> Path:
        return layout.autostart_link(self.config_dir, name)

    def serial_log(self, name: str) -> Path:
        return layout.serial_log(self.log_dir, name)

    def vmm_log(self, name: str) -> Path:
        return layout.vmm_log(self.log_dir, name)

    def records(self) -> dict[str, Path]:
        """name -> runtime directory of every domain with a runtime record."""
        out = {}
        for record in self.run_dir.glob(f"*/{layout.RECORD}"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                out[str(json.loads(record.read_text())["name"])] = record.parent
        return out

    def runtime_dir(self, name: str) -> Path:
        found = self.records().get(name)
        assert found is not None, f"no runtime record for {name!r} in {self.run_dir}"
        return found

    def vmm_file(self, name: str, kind: str) -> Path:
        """A file of the domain's VMM as its runtime record names it (for a VMM an earlier version started
        these are that version's paths, see driver/migrate.py)."""
        record = json.loads((self.runtime_dir(name) / layout.RECORD).read_text())
        return Path(record["files"][kind])

    def vmm_pid(self, name: str) -> int:
        """The pid the VMM itself wrote (its pidfile), not the daemon's record of it."""
        return int(self.vmm_file(name, "pidfile").read_text())

    def control_socket(self, name: str) -> Path:
        return self.vmm_file(name, "control")

    def try_vmm_pid(self, name: str) -> int | None:
        with contextlib.suppress(AssertionError, OSError, ValueError):
            return self.vmm_pid(name)
        return None

    def stale_runtime(self, name: str) -> list[str]:
        """Runtime directories left for ``name`` (by its record or VMM config), or of no readable domain."""
        out = []
        for d in self.run_dir.iterdir():
            if layout.runtime_dir_id(d.name) is None:
                continue
            owner = None
            for f in (layout.RECORD, layout.VMM_CONFIG):
                with contextlib.suppress(OSError, ValueError, KeyError):
                    owner = str(json.loads((d / f).read_text())["name"])
                    break
            if owner in (None, name):
                out.append(f"{d.name}/{','.join(sorted(x.name for x in d.iterdir()))}")
        return out

    def runtime_leftovers(self) -> list[str]:
        """Everything in the run dir besides logs (and their rotated backups ``x.log.N``), the pid file and the
        log-layout mark (empty when no VM runs): logs outlive their VM, as libvirt's do."""
        keep = {layout.DAEMON_PIDFILE, layout.SERIAL, layout.LOG_LAYOUT_MARK, "dump"}
        return sorted(p.name for p in self.run_dir.iterdir() if p.name not in keep and not _LOG_NAME.search(p.name))

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the daemon was never started"
        return self.proc.pid

    def calls(self, number: int) -> int:
        """How often real clients called procedure ``number`` of this daemon (its call trace, rpc/calltrace.py,
        recorded as the handler runs: a count that reached N means the Nth call was handled)."""
        trace = Path(os.environ[calltrace.ENV]) / f"{self.pid}.trace"
        try:
            return trace.read_text().split().count(str(number))
        except FileNotFoundError:
            return 0

    @property
    def uri(self) -> str:
        return f"mshv+unix:///system?socket={self.socket}"

    @property
    def ro_uri(self) -> str:
        return f"mshv+unix:///system?socket={self.socket}-ro"

    def start(self, timeout: float = 20.0) -> DaemonProcess:
        self.root.mkdir(parents=True, exist_ok=True)
        sockets = (self.socket, Path(f"{self.socket}-ro"))  # --socket PATH also listens on PATH-ro
        for sock in sockets:
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
        log = open(self.log, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [
                *(["ip", "netns", "exec", self.netns] if self.netns else []),  # execs: the pid is the daemon's
                sys.executable,
                "-m",
                self.module,
                "--system" if self.system else "--session",
                "--socket",
                str(self.socket),
                "--config-dir",
                str(self.config_dir),
                "--run-dir",
                self.run_dir_arg or str(self.run_dir),
                "-v",
                *self.extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            # A mark the tests' process scan follows into everything the daemon spawns (procfs.RUN_MARK).
            env={**os.environ, **self.env, RUN_MARK: str(self.run_dir)},
        )
        log.close()
        deadline = time.monotonic() + timeout
        # Ready once both sockets accept connections (a socket file exists between bind and listen).
        while not all(_accepts(sock) for sock in sockets):
            if self.proc.poll() is not None:
                raise RuntimeError(f"virtmshvd exited with {self.proc.returncode}:\n{self.log.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"virtmshvd did not listen within {timeout} s:\n{self.log.read_text()}")
            time.sleep(0.02)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, like a crash."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def processes(self) -> dict[int, Proc]:
        """Every live process of this daemon's run besides the daemon itself (VMMs, their backends, anything
        they forked), by the tests' own /proc scan (``procfs.run_processes``), not the daemon's pidfiles."""
        return run_processes(self.run_dir, besides=(self.pid,) if self.alive() else ())

    def destroy_all_vmms(self) -> None:
        """Test clean-up: no process of the run may outlive its test (also VMMs that never wrote a pidfile)."""
        pids = set(self.processes()) - {os.getpid()}
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


SIGTERM_BOUND = 5.0  # seconds (issue 12 item 1)


def sigterm(d: DaemonProcess) -> float:
    """SIGTERM the daemon; the seconds until it exited (it must exit with 0 within SIGTERM_BOUND)."""
    assert d.proc is not None
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    try:
        code = d.proc.wait(SIGTERM_BOUND)
    except subprocess.TimeoutExpired as err:
        d.proc.kill()
        d.proc.wait()
        raise AssertionError(
            f"virtmshvd still running {SIGTERM_BOUND} s after SIGTERM:\n{d.log.read_text()[-3000:]}"
        ) from err
    assert code == 0, d.log.read_text()[-3000:]
    return time.monotonic() - t0


def virsh(uri: str, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        [VIRSH, "-c", uri, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if check and res.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


class PtyProcess:
    """A client that insists on a terminal (``virsh console``), run on a pty we drive."""

    def __init__(self, argv: list[str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # child
            try:
                os.execvp(argv[0], argv)
            finally:
                os._exit(127)
        self.output = b""
        self.status: int | None = None

    def read_until(self, marker: bytes, timeout: float = 30.0) -> bytes:
        deadline = time.monotonic() + timeout
        while marker not in self.output:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{marker!r} not seen within {timeout} s; output: {self.output!r}")
            r, _, _ = select.select([self.fd], [], [], min(left, 0.2))
            if r:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:
                    chunk = b""
                if not chunk:
                    if marker not in self.output:
                        raise AssertionError(f"EOF before {marker!r}; output: {self.output!r}")
                    break
                self.output += chunk
        return self.output

    def write(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait_console_ready(self, timeout: float = 30.0) -> None:
        """``virsh console`` prints its banner, then switches the terminal to raw mode (tcsetattr with
        TCSAFLUSH, which drops what was typed before): wait for the banner, then for the terminal itself to
        be raw (ECHO and ICANON off, seen from our side of the pty), so no keystroke is lost."""
        self.read_until(b"Escape character is", timeout)
        wait_for(self._raw, timeout, interval=0.01, what="virsh console's terminal in raw mode")

    def _raw(self) -> bool:
        lflag = termios.tcgetattr(self.fd)[3]
        return not lflag & (termios.ECHO | termios.ICANON)

    def wait(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                r, _, _ = select.select([self.fd], [], [], 0.1)
                if r:
                    self.output += os.read(self.fd, 4096)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
                os.close(self.fd)
                return self.status
        raise AssertionError(f"process did not exit; output: {self.output!r}")

    def kill(self) -> None:
        if self.status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.status = -9


def domain_xml(
    name: str,
    kernel: Path,
    *,
    memory_mib: int = 64,
    vcpus: int = 1,
    cmdline: str = "console=ttyS0",
    extra: str = "",
    uuid: str | None = None,
) -> str:
    uuid_el = f"<uuid>{uuid}</uuid>" if uuid else ""
    return f"""<domain type='hyperv'>
  <name>{name}</name>{uuid_el}
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>{vcpus}</vcpu>
  <os><type arch='x86_64'>hvm</type><kernel>{kernel}</kernel><cmdline>{cmdline}</cmdline></os>
  <features><acpi/><apic/></features>
  {extra}
  <devices><serial type='pty'/></devices>
</domain>
"""


@contextlib.contextmanager
def running_daemon(root: Path, *extra_args: str) -> Iterator[DaemonProcess]:
    d = DaemonProcess(root, tuple(extra_args)).start()
    try:
        yield d
    finally:
        d.stop()
        d.destroy_all_vmms()


# -- what many tests ask of a daemon's domains ----------------------------------------------------------

EVENT_REGISTER_ANY = 316  # REMOTE_PROC_CONNECT_DOMAIN_EVENT_CALLBACK_REGISTER_ANY (libvirt's remote_protocol.x)
DOMAIN_EVENT_IDS = 27  # VIR_DOMAIN_EVENT_ID_LAST in libvirt 9.0's libvirt-domain.h: what `virsh event --all` asks for


def serial_log(d: DaemonProcess, name: str) -> str:
    """The domain's serial log as text so far ('' before the VMM created it)."""
    path = d.serial_log(name)
    return path.read_text(errors="replace") if path.exists() else ""


def domstate(d: DaemonProcess, name: str, *, reason: bool = True) -> str:
    """``virsh domstate [--reason]``: e.g. ``running (booted)``."""
    return virsh(d.uri, "domstate", *(("--reason",) if reason else ()), "--domain", name).stdout.strip()


def define(d: DaemonProcess, tmp_path: Path, name: str, kernel: Path, **kw: Any) -> Path:
    """``virsh define`` of :func:`domain_xml` (``name`` escaped: it is data); the XML file written."""
    xml = tmp_path / f"define-{hashlib.sha256(name.encode()).hexdigest()[:16]}.xml"
    xml.write_text(domain_xml(name.replace("&", "&amp;").replace("<", "&lt;"), kernel, **kw))
    out = virsh(d.uri, "define", str(xml)).stdout
    assert f"Domain '{name}' defined" in out, out
    return xml


def console_roundtrip(d: DaemonProcess, name: str, text: bytes) -> None:
    """``virsh console``: what we type reaches the guest, and its echo comes back; Ctrl+] leaves with 0."""
    con = PtyProcess([VIRSH, "-c", d.uri, "console", "--domain", name])
    try:
        con.wait_console_ready()
        con.write(text)
        con.read_until(text)
        con.write(b"\x1d")
        assert con.wait() == 0
    finally:
        con.kill()


def virsh_event(d: DaemonProcess, *args: str, registrations: int = 1) -> PtyProcess:
    """``virsh event ARGS`` on a pty, once the daemon has handled its ``registrations`` callback
    registrations (``DOMAIN_EVENT_IDS`` for ``--all``): events after that reach it."""
    before = d.calls(EVENT_REGISTER_ANY)
    watcher = PtyProcess([VIRSH, "-c", d.uri, "event", *args])
    try:
        wait_for(
            lambda: d.calls(EVENT_REGISTER_ANY) >= before + registrations,
            what=lambda: f"virsh event registered {d.calls(EVENT_REGISTER_ANY) - before} callbacks: {watcher.output!r}",
        )
    except BaseException:
        watcher.kill()
        raise
    return watcher


def vmm_request_at(control: Path, cmd: str) -> dict[str, Any]:
    """One request on a VMM's control socket, past the daemon (which may be dead); its result."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(control))
        s.sendall(json.dumps({"id": 1, "cmd": cmd}).encode() + b"\n")
        buf = b""
        while True:
            chunk = s.recv(65536)
            assert chunk, "the VMM closed its control socket"
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line)
                if msg.get("id") == 1:
                    assert msg["ok"], msg
                    return dict(msg["result"])


def vmm_request(d: DaemonProcess, name: str, cmd: str) -> dict[str, Any]:
    return vmm_request_at(d.control_socket(name), cmd)


def kill_pids(pids: Iterable[int]) -> None:
    """SIGKILL the processes a test started (by pid, never by name)."""
    for pid in list(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
