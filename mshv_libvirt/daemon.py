"""virtmshvd: the mshv driver daemon, speaking libvirt's remote protocol on UNIX sockets.

``virtmshvd`` (root: system instance, /run/libvirt/virtmshvd-sock + -sock-ro; other users: session
instance, $XDG_RUNTIME_DIR/libvirt/virtmshvd-sock). libvirt's client autostarts a session daemon as
``virtmshvd --timeout=120``; systemd socket activation (LISTEN_FDS) is honoured.

Start-up order, as libvirt's daemons: re-execute in Python's isolated mode (so neither the working
directory nor PYTHONPATH can substitute another copy of the package, for the daemon or the VMMs it
starts), fork into the background (``--daemon``), take the pid file lock of the run directory, load
and re-attach, then create the sockets. A second daemon on the same directories stops at the lock.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import fcntl
import functools
import logging
import os
import signal
import sys
from pathlib import Path

from mshv_libvirt.driver import layout
from mshv_libvirt.driver.manager import DomainManager, Paths, user_runtime_dir
from mshv_libvirt.driver.vmm_launch import (
    SYSTEM_CONF,
    SYSTEM_USER,
    LaunchError,
    VmmOptions,
    options_from_conf,
    read_conf,
)
from mshv_libvirt.rpc import host, volumes
from mshv_libvirt.rpc.server import Daemon, Listener
from mshv_libvirt.vmm.config import MAX_LOG_BACKUPS

log = logging.getLogger("virtmshvd")

SYSTEM_SOCKET = Path("/run/libvirt/virtmshvd-sock")
SYSTEM_SOCKET_RO = Path("/run/libvirt/virtmshvd-sock-ro")
SD_LISTEN_FDS_START = 3

# Status a --daemon child reports to the waiting parent (libvirt's virDaemonErr numbering).
READY, ERR_PIDFILE, ERR_RUNDIR, ERR_INIT = 0, 1, 2, 3
_STATUS_TEXT = {ERR_PIDFILE: "Unable to obtain pidfile", ERR_RUNDIR: "Unable to use the run directory"}


class StartupError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def session_socket() -> Path:
    return user_runtime_dir() / "libvirt" / "virtmshvd-sock"


def _systemd_fds() -> list[int]:
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    return list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))


def build_listeners(args: argparse.Namespace, system: bool) -> list[Listener]:
    inherited = _systemd_fds()
    if inherited:
        import socket

        out = []
        for fd in inherited:
            path = socket.socket(fileno=os.dup(fd)).getsockname()
            p = Path(path if isinstance(path, str) else "")
            out.append(Listener(p, p.name.endswith("-ro"), 0, inherited_fd=fd))
        return out
    if args.socket:
        rw = Path(args.socket)
        return [Listener(rw, False, 0o600), Listener(rw.with_name(rw.name + "-ro"), True, 0o666)]
    if system:
        return [Listener(SYSTEM_SOCKET, False, 0o600), Listener(SYSTEM_SOCKET_RO, True, 0o666)]
    return [Listener(session_socket(), False, 0o600)]


def vmm_options(args: argparse.Namespace, system: bool) -> VmmOptions:
    """mshv.conf (system mode: /etc/libvirt/mshv.conf), then the command line's overrides."""
    conf_path = Path(args.vmm_conf) if args.vmm_conf else (SYSTEM_CONF if system else None)
    options = options_from_conf(read_conf(conf_path) if conf_path else {}, system=system)
    overrides = {
        "user": args.vmm_user,
        "group": args.vmm_group,
        "serial_log_max_size": args.serial_log_max_size,
        "serial_log_max_backups": args.serial_log_max_backups,
    }
    options = dataclasses.replace(options, **{k: v for k, v in overrides.items() if v is not None})
    if options.user in ("", "-"):  # explicitly: no switch
        options = dataclasses.replace(options, user=None, group=None)
    if args.vmm_test_hooks:
        options = dataclasses.replace(options, test_hooks=True)
    if options.serial_log_max_size < 4096 or not 0 <= options.serial_log_max_backups <= MAX_LOG_BACKUPS:
        raise LaunchError(f"serial logs need max size >= 4096 and 0 to {MAX_LOG_BACKUPS} backups")
    try:
        options.credentials()
    except LaunchError as err:
        log.error("%s: domains cannot start until it is fixed", err)  # each start then fails with this
    return options


def _reexec_isolated(argv: list[str]) -> None:
    """Run as ``python -I -m mshv_libvirt.daemon``: the installed package of this interpreter, whatever
    the working directory and PYTHON* variables say (the VMMs are started the same way)."""
    if sys.flags.isolated or not sys.executable:
        return
    os.execv(sys.executable, [sys.executable, "-I", "-m", "mshv_libvirt.daemon", *argv])


def _daemonize(log_file: Path, system: bool) -> int:
    """Fork into the background as a daemon does; returns the fd on which to report readiness.

    The caller's process waits until the daemon reports (``READY`` once it serves, or why it could
    not start) and exits with that status, so ``virtmshvd --daemon`` fails when the daemon does.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    status_r, status_w = os.pipe()
    if os.fork() > 0:
        os.close(status_w)
        os.close(log_fd)
        with os.fdopen(status_r, "rb") as status_pipe:
            status = status_pipe.read(1)
        if status == bytes([READY]):
            os._exit(0)
        why = _STATUS_TEXT.get(status[0], "initialization failed") if status else "the daemon exited"
        sys.stderr.write(f"virtmshvd: error: {why}. Check {log_file} or run without --daemon for more info.\n")
        os._exit(1)
    os.close(status_r)
    os.chdir("/")  # hold no caller's directory (mount) busy, and import nothing from it
    os.umask(0o022 if system else 0o077)
    os.setsid()  # no controlling terminal; the caller's session ending does not reach us
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(devnull)
    os.close(log_fd)
    return status_w


def acquire_pidfile(path: Path) -> int:
    """Take the daemon's pid file: a POSIX record lock (``fcntl`` F_SETLK) on an O_CLOEXEC fd, as libvirt.

    A record lock belongs to this process alone: it is not inherited by the VMMs (which outlive the
    daemon; a ``flock`` would be, and would block every restart) and ends when the process does,
    however it dies. Returns the fd, which must stay open (closing any fd of the file drops the lock).
    """
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise StartupError(ERR_PIDFILE, f"Failed to open pid file '{path}': {err.strerror}") from err
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
            # The file locked must still be the one at ``path`` (a stopping daemon unlinks it).
            if os.stat(path).st_ino != os.fstat(fd).st_ino:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        except FileNotFoundError:
            os.close(fd)
        except OSError as err:
            os.close(fd)
            raise StartupError(ERR_PIDFILE, f"Failed to acquire pid file '{path}': {err.strerror}") from err


def release_pidfile(path: Path, fd: int) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
    os.close(fd)


def daemon_paths(args: argparse.Namespace, system: bool) -> Paths:
    paths = Paths.system() if system else Paths.session()
    return Paths(
        Path(args.config_dir) if args.config_dir else paths.config_dir,
        Path(args.run_dir) if args.run_dir else paths.run_dir,
        Path(args.log_dir) if args.log_dir else (Path(args.run_dir) if args.run_dir else paths.log_dir),
        # Explicit directories (tests, benchmarks) keep dumps next to their logs, the cache in the run directory.
        None if (args.log_dir or args.run_dir) else paths.dump_dir,
        None if (args.log_dir or args.run_dir) else paths.cache_dir,
    )


def prepare_run_dir(paths: Paths, system: bool) -> None:
    try:
        layout.check_run_dir(paths.run_dir)
        old = os.umask(0o022 if system else 0o077)  # parents such as /run/libvirt must stay traversable
        try:
            paths.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        finally:
            os.umask(old)
    except (OSError, ValueError) as err:
        raise StartupError(ERR_RUNDIR, f"unable to use run directory {paths.run_dir}: {err}") from err


async def _serve(args: argparse.Namespace, system: bool, paths: Paths, ready: int | None) -> int:
    if not system:
        session_socket().parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Interfaces' network ports: an unprivileged session's own network driver; root's (whose taps join
    # the system's bridges) the system one's.
    ports_session = not system and os.geteuid() != 0
    manager = DomainManager(
        paths, autostart=not args.no_autostart, vmm_options=vmm_options(args, system), session=ports_session
    )
    # libvirt's QEMU driver asks storage:///system when privileged (root), else storage:///session
    # (virGetConnectStorage), whichever mode the daemon runs in.
    manager.translate_volume = functools.partial(volumes.translate, session=os.geteuid() != 0)
    await manager.load()
    daemon = Daemon(manager, "mshv:///system" if system else "mshv:///session")
    await daemon.listen(build_listeners(args, system))
    host.probe_soon()  # what the kernel's mshv driver offers, known before a client asks (in a thread)
    if args.pidfile:
        Path(args.pidfile).write_text(f"{os.getpid()}\n")
    if ready is not None:
        os.write(ready, bytes([READY]))
        os.close(ready)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            if args.timeout and daemon.clients == 0 and not any(d.active for d in manager.domains()):
                if loop.time() - daemon.last_activity > args.timeout:
                    log.info("idle for %d s: exiting", args.timeout)
                    break
            elif daemon.clients:
                daemon.last_activity = loop.time()
    finally:
        log.info("shutting down (running domains keep running)")
        await daemon.close()
        await manager.close()  # running VMs keep running; a restarted daemon re-attaches
        if args.pidfile:
            with contextlib.suppress(FileNotFoundError):
                Path(args.pidfile).unlink()
    return 0


def main(argv: list[str] | None = None, *, reexec: bool = True) -> int:
    """``reexec=False``: stay in this interpreter (a test wrapper that instruments the daemon in-process)."""
    argv = sys.argv[1:] if argv is None else argv
    if reexec:
        _reexec_isolated(argv)
    parser = argparse.ArgumentParser(prog="virtmshvd", description="libvirt driver daemon for /dev/mshv")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--system", action="store_true", help="system instance (default for root)")
    mode.add_argument("--session", action="store_true", help="per-user instance (default for other users)")
    parser.add_argument("--socket", help="listen on this socket path (and PATH-ro, read-only) instead")
    parser.add_argument("--config-dir", help="where defined domains are kept")
    parser.add_argument("--run-dir", help="where runtime state of running domains is kept")
    parser.add_argument("--log-dir", help="VMM logs and serial logs")
    parser.add_argument("-t", "--timeout", type=int, default=0, help="exit after N idle seconds")
    parser.add_argument("-d", "--daemon", action="store_true", help="run in the background")
    parser.add_argument("-p", "--pidfile", help="also write the pid here (the lock is <run dir>/virtmshvd.pid)")
    parser.add_argument("--no-autostart", action="store_true", help="do not start autostart domains")
    parser.add_argument("-v", "--verbose", action="store_true")
    vmm = parser.add_argument_group("VMM processes (defaults from mshv.conf; docs/SECURITY.md)")
    vmm.add_argument("--vmm-conf", help=f"read VMM settings from this file (system default {SYSTEM_CONF})")
    vmm.add_argument("--vmm-user", help=f"run VMMs as this user (system default {SYSTEM_USER}; '-': no switch)")
    vmm.add_argument("--vmm-group", help="run VMMs with this group (default: the user's primary group)")
    vmm.add_argument("--serial-log-max-size", type=int, help="rotate a serial log at this size (default 2 MiB)")
    vmm.add_argument("--serial-log-max-backups", type=int, help="rotated serial logs kept (default 3)")
    vmm.add_argument("--vmm-test-hooks", action="store_true", help=argparse.SUPPRESS)  # tests only
    args = parser.parse_args(argv)
    # Relative paths mean the caller's directory, which --daemon leaves.
    for attr in ("socket", "config_dir", "run_dir", "log_dir", "pidfile"):
        if getattr(args, attr):
            setattr(args, attr, os.path.abspath(getattr(args, attr)))
    system = args.system or (not args.session and os.geteuid() == 0)
    paths = daemon_paths(args, system)
    ready: int | None = None
    if args.daemon:
        default_log = (Paths.system() if system else Paths.session()).log_dir.parent / "virtmshvd.log"
        ready = _daemonize(Path(args.log_dir) / "virtmshvd.log" if args.log_dir else default_log, system)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s virtmshvd[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    pidfile = paths.run_dir / layout.DAEMON_PIDFILE
    try:
        prepare_run_dir(paths, system)
        lock = acquire_pidfile(pidfile)  # before anything touches the directories or the sockets
    except StartupError as err:
        log.error("%s", err)
        if ready is not None:
            os.write(ready, bytes([err.status]))
        return 1
    try:
        return asyncio.run(_serve(args, system, paths, ready))
    except KeyboardInterrupt:
        return 0
    except LaunchError as err:
        log.error("%s", err)
        return 2
    finally:
        release_pidfile(pidfile, lock)


if __name__ == "__main__":
    sys.exit(main())
