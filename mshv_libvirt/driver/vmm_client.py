"""The daemon's side of one VMM process: spawn or re-attach, JSON-lines control, exit detection.

The VMM is deliberately not tied to the daemon's lifetime (its own session, no pipes the daemon must
drain), so a daemon restart finds it still running and re-attaches through the control socket. Every
VMM, spawned or re-attached, is watched the same way: a pidfd registered with the event loop, readable
once the process has exited (a spawned VMM, our child, is then reaped with ``waitid(P_PIDFD, WNOHANG)``).
No thread ever blocks in ``waitpid``, so nothing keeps a stopping daemon waiting for its VMs.

The VMM runs as ``sys.executable -I -m mshv_libvirt.vmm``: Python's isolated mode ignores PYTHON*
variables, the user's site directory and the working directory, so it imports the installed package
of the interpreter the daemon runs on (the daemon re-executes itself the same way: see daemon.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mshv_libvirt.atomicfile import remove_durable, sweep_temporaries
from mshv_libvirt.errors import describe
from mshv_libvirt.proc import pid_alive

from . import kernel_cache, layout, vmm_launch
from .vmm_launch import LaunchError, VmmOptions

JsonObject = dict[str, Any]

READY_TIMEOUT = 60.0
REQUEST_TIMEOUT = 30.0
VMM_MODULE = "mshv_libvirt.vmm"


class VmmError(Exception):
    """A control request failed or the VMM is gone."""


@dataclass(frozen=True)
class VmmFiles:
    """Everything on disk that belongs to one VMM instance of one domain (names: ``layout.py``).

    ``dir`` is the instance's runtime directory, holding the daemon's record. The other paths are the
    ones the VMM was given; for a VMM started by an earlier version (migrated, see ``migrate.py``)
    they are that version's and stay so until it ends, which is why the record stores them.
    """

    dir: Path
    config: Path
    control: Path
    pidfile: Path
    exit_file: Path
    serial_log: Path
    stderr_log: Path

    @classmethod
    def for_domain(cls, run_dir: Path, log_dir: Path, dom_id: int, name: str) -> VmmFiles:
        d = layout.runtime_dir(run_dir, dom_id)
        return cls(
            dir=d,
            config=d / layout.VMM_CONFIG,
            control=d / layout.CONTROL,
            pidfile=d / layout.VMM_PIDFILE,
            exit_file=d / layout.EXIT_FILE,
            serial_log=layout.serial_log(log_dir, name),
            stderr_log=layout.vmm_log(log_dir, name),
        )

    @property
    def record(self) -> Path:
        return self.dir / layout.RECORD

    def to_json(self) -> dict[str, str]:
        return {f.name: str(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, raw: object) -> VmmFiles:
        if not isinstance(raw, dict):
            raise ValueError("runtime files are not an object")
        paths = {}
        for f in dataclasses.fields(cls):
            value = raw.get(f.name)
            if not isinstance(value, str) or not value.startswith("/"):
                raise ValueError(f"runtime file {f.name!r} is not an absolute path")
            paths[f.name] = Path(value)
        return cls(**paths)

    def remove_vmm_files(self) -> None:
        for path in (self.config, self.control, self.pidfile, self.exit_file):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def remove_runtime(self) -> None:
        """Remove the instance's files, its record and its runtime directory (the VMM is gone)."""
        self.remove_vmm_files()
        remove_durable(self.record)
        sweep_temporaries(self.dir)  # of the VMM's own atomic writes, if it was killed in one
        with contextlib.suppress(FileNotFoundError):
            self.dir.rmdir()

    def read_exit(self) -> JsonObject | None:
        try:
            data = json.loads(self.exit_file.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None


def vmm_command(config: Path) -> list[str]:
    return [sys.executable, "-I", "-m", VMM_MODULE, "--config", str(config)]


def vmm_config_of(pid: int) -> Path | None:
    """The absolute ``--config`` path of VMM process ``pid``, or None if ``pid`` is not a VMM."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if VMM_MODULE.encode() not in argv:
        return None
    for i, arg in enumerate(argv[:-1]):
        if arg == b"--config":
            config = os.fsdecode(argv[i + 1])
            if not config.startswith("/"):
                # Relative to the VMM's working directory (what it opened), read while it lives.
                try:
                    config = os.path.join(os.readlink(f"/proc/{pid}/cwd"), config)
                except OSError:
                    return None
            return Path(os.path.normpath(config))
    return None


def same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.normpath(a) == os.path.normpath(b)


def is_our_vmm(pid: int, files: VmmFiles) -> bool:
    """Whether ``pid`` is the VMM started with ``files.config`` (not a recycled pid, nor another domain's).

    Compared as files, not as strings: a daemon restarted with another spelling of the same run dir
    (a symlink, a relative path) must still recognise its VMMs rather than stop them.
    """
    config = vmm_config_of(pid)
    return config is not None and same_file(config, files.config)


def find_vmm_processes(run_dir: Path) -> list[tuple[Path, int]]:
    """(config path, pid) of every live VMM process whose ``--config`` lies in ``run_dir``.

    That is ``<run_dir>/<id>/vmm.json``, or ``<run_dir>/<name>.vmm.json`` for VMMs started by an
    earlier version. Found in /proc rather than through pidfiles: a VMM killed-over during start-up
    may not have written its pidfile yet, and must still be found. A VMM's own children with its
    command line are not VMMs: the reaper of each disk backend is forked without an exec
    (abi/shim.c ``mshv_spawn_helper``), and stopping it as an orphan would kill the running guest's disk.
    """
    out: list[tuple[Path, int]] = []
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return out
    found = _vmm_candidates(entries, run_dir)
    for pid, config in found.items():
        parent = _parent_of(pid)
        if parent in found and same_file(found[parent], config):
            continue  # a forked helper of that VMM
        out.append((config, pid))
    return out


def _parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _vmm_candidates(entries: list[str], run_dir: Path) -> dict[int, Path]:
    """pid -> config of every live process running a VMM command line with its config in ``run_dir``."""
    out: dict[int, Path] = {}
    for entry in entries:
        pid = int(entry)
        config = vmm_config_of(pid)
        if config is None:
            continue
        if config.name == layout.VMM_CONFIG and layout.runtime_dir_id(config.parent.name) is not None:
            home = config.parent.parent
        elif config.name.endswith(".vmm.json"):
            home = config.parent
        else:
            continue
        if same_file(home, run_dir) and pid_alive(pid):
            out[pid] = config
    return out


async def _readable(fd: int, timeout: float) -> bool:
    """Whether ``fd`` becomes readable within ``timeout`` seconds (waited for on the event loop)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await asyncio.wait_for(fut, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)


def _reap(pidfd: int) -> None:
    """Collect the exit status if the process was our child (a re-attached VMM is not: ECHILD)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)


_cache_fills: set[asyncio.Task[bool]] = set()  # running fills (the loop keeps only weak references)


def _fill_kernel_cache(directory: Path, kernel: str) -> None:
    """After a start that decompressed its kernel: keep the payload for the next ones, on a worker thread."""
    task = asyncio.get_running_loop().create_task(asyncio.to_thread(kernel_cache.fill, directory, kernel))
    _cache_fills.add(task)
    task.add_done_callback(_cache_fills.discard)


class VmmHandle:
    """A connected VMM. ``on_event`` receives pushed events; ``exited`` resolves when the process is gone."""

    def __init__(
        self, name: str, files: VmmFiles, pid: int, pidfd: int, child: subprocess.Popen[bytes] | None = None
    ) -> None:
        self.name = name
        self._child = child  # a VMM we spawned: reaped through its Popen (no watcher thread, no waitpid wait)
        self.files = files
        self.pid = pid
        self._loop = asyncio.get_running_loop()
        self._pidfd: int | None = pidfd
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._next_id = 1
        self._pending: dict[int, asyncio.Future[JsonObject]] = {}
        self.on_event: Callable[[JsonObject], None] = lambda _e: None
        self.exited: asyncio.Future[None] = self._loop.create_future()
        self._read_task: asyncio.Task[None] | None = None
        self.pty: str | None = None
        self._loop.add_reader(pidfd, self._process_exited)

    def _process_exited(self) -> None:
        self._release_pidfd(reap=True)
        if not self.exited.done():
            self.exited.set_result(None)

    def _release_pidfd(self, reap: bool) -> None:
        fd, self._pidfd = self._pidfd, None
        if fd is None:
            return
        self._loop.remove_reader(fd)
        if reap and self._child is not None:
            self._child.poll()  # exited (the pidfd is readable): collects the status at once
        elif reap:
            _reap(fd)
        os.close(fd)

    def _signal(self, sig: int) -> None:
        if self._pidfd is not None:  # never a recycled pid: the pidfd names this process
            with contextlib.suppress(ProcessLookupError, PermissionError):
                signal.pidfd_send_signal(self._pidfd, sig)

    # -- creation --------------------------------------------------------------------------------
    @classmethod
    async def spawn(
        cls,
        name: str,
        files: VmmFiles,
        vmm_config: JsonObject,
        options: VmmOptions | None = None,
        *,
        pass_fds: Sequence[int] = (),
    ) -> VmmHandle:
        """Start a VMM for ``vmm_config``; ``pass_fds`` are the caller's descriptors it also inherits
        (the caller keeps and closes them, e.g. disk images, whose numbers the config names)."""
        try:
            files.dir.mkdir(mode=0o700, exist_ok=True)
            files.remove_vmm_files()
            files.stderr_log.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            log = open(files.stderr_log, "ab")  # noqa: SIM115 - closed below, once the child has it
        except OSError as err:
            raise VmmError(f"cannot prepare the VMM's files: {describe(err)}") from err
        try:
            # Every descriptor the sandboxed VMM needs, opened and checked here; writes its config.
            launch = vmm_launch.prepare(
                vmm_config, options or VmmOptions(), config_path=files.config, stderr_dir=files.stderr_log.parent
            )
        except LaunchError as err:
            log.close()
            files.remove_vmm_files()
            raise VmmError(str(err)) from err
        with launch, log:
            try:
                # A plain fork+exec (in C: no Python code runs in the child, safe with threads), in a new
                # session so a signal to the daemon's group leaves the VM running; not asyncio's
                # subprocess, whose child watcher blocks a thread in waitpid until the VM ends.
                child = subprocess.Popen(
                    [*vmm_command(files.config), *launch.args],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                    pass_fds=[*launch.pass_fds, *pass_fds],
                    cwd="/",
                    **launch.credentials,  # the unprivileged VMM user (system mode)
                )
            except OSError as err:  # e.g. a user switch without the privilege for it
                files.remove_vmm_files()
                raise VmmError(f"cannot start the VMM ({sys.executable}): {describe(err)}") from err
            vmm_launch.write_pidfile(files.pidfile, child.pid)
        handle = cls(name, files, child.pid, os.pidfd_open(child.pid), child)  # unreaped child: no pid reuse
        try:
            await handle._connect(READY_TIMEOUT)
            status = await handle.request("status", timeout=READY_TIMEOUT)  # answered once the VM is built
        except VmmError as err:
            await handle.kill()
            # The VMM's own account (its exit file) says why, e.g. which build step failed.
            info = files.read_exit()
            if info and info.get("detail"):
                raise VmmError(str(info["detail"])) from err
            raise
        handle.pty = status.get("pty")
        cache = (options or VmmOptions()).kernel_cache
        if cache is not None and launch.config.get("kernel") and "kernel_payload" not in launch.config["fds"]:
            _fill_kernel_cache(cache, str(launch.config["kernel"]))
        return handle

    @classmethod
    async def attach(cls, name: str, files: VmmFiles, pid: int) -> VmmHandle:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError as err:
            raise VmmError("the VMM process is gone") from err
        except OSError as err:
            raise VmmError(f"cannot watch VMM pid {pid}: {describe(err)}") from err
        if not is_our_vmm(pid, files):  # checked after pidfd_open: the pidfd cannot name a recycled pid
            os.close(pidfd)
            raise VmmError(f"pid {pid} is not this domain's VMM")
        handle = cls(name, files, pid, pidfd)
        try:
            await handle._connect(5.0)
            status = await handle.request("status", timeout=10.0)
        except VmmError:
            handle.close()
            raise
        handle.pty = status.get("pty")
        return handle

    async def _connect(self, timeout: float) -> None:
        deadline = self._loop.time() + timeout
        while True:
            try:
                self._reader, self._writer = await asyncio.open_unix_connection(str(self.files.control))
                break
            except (FileNotFoundError, ConnectionRefusedError) as err:
                if self.exited.done():
                    raise VmmError(self._failure_detail()) from err
                if self._loop.time() > deadline:
                    raise VmmError(f"timed out waiting for the VMM control socket {self.files.control}") from err
                await asyncio.sleep(0.02)
            except OSError as err:
                raise VmmError(f"cannot connect to the VMM control socket: {describe(err)}") from err
        self._read_task = asyncio.create_task(self._read_loop())

    def _failure_detail(self) -> str:
        info = self.files.read_exit()
        if info and info.get("detail"):
            return str(info["detail"])
        return f"the VMM exited early (see {self.files.stderr_log})"

    # -- control protocol ------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        assert self._reader is not None
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(msg, dict):
                    continue
                if "event" in msg:
                    self.on_event(msg)
                elif isinstance(msg.get("id"), int):
                    fut = self._pending.pop(msg["id"], None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
        except (ConnectionError, OSError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            # Nothing awaited here: a cancelled loop (daemon shutdown) must end at once.
            self._fail_pending("the VMM closed its control connection")
            if self._writer is not None:
                self._writer.close()

    def _fail_pending(self, why: str) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(VmmError(why))
        self._pending.clear()

    async def request(self, cmd: str, timeout: float = REQUEST_TIMEOUT, args: JsonObject | None = None) -> JsonObject:
        if self._writer is None or self.exited.done() or self._writer.is_closing():
            raise VmmError("the VMM is not running")
        rid = self._next_id
        self._next_id += 1
        fut: asyncio.Future[JsonObject] = self._loop.create_future()
        self._pending[rid] = fut
        try:
            self._writer.write(json.dumps({**(args or {}), "id": rid, "cmd": cmd}).encode() + b"\n")
            await self._writer.drain()
            reply = await asyncio.wait_for(fut, timeout)
        except (ConnectionError, OSError) as err:
            raise VmmError(f"the VMM control connection failed: {describe(err)}") from err
        except TimeoutError as err:
            raise VmmError(f"the VMM did not answer {cmd!r} within {timeout:.0f} s") from err
        finally:
            self._pending.pop(rid, None)
        if not reply.get("ok"):
            raise VmmError(str(reply.get("error") or f"the VMM refused {cmd!r} without a reason"))
        result = reply.get("result")
        return result if isinstance(result, dict) else {}

    # -- ending ----------------------------------------------------------------------------------
    @staticmethod
    async def reap(pid: int, config: Path, grace: float = 5.0) -> None:
        """Stop a VMM we hold no connection to: SIGTERM (it reports "destroyed"), then SIGKILL.

        Only while ``pid`` still is the VMM started with ``config`` (checked through a pidfd).
        """
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return  # gone
        try:
            if not same_file(vmm_config_of(pid) or Path("/nonexistent"), config):
                return
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    signal.pidfd_send_signal(pidfd, sig)
                if await _readable(pidfd, wait):
                    _reap(pidfd)
                    return
        finally:
            os.close(pidfd)

    async def wait_exit(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(asyncio.shield(self.exited), timeout)
            return True
        except TimeoutError:
            return False

    async def kill(self) -> None:
        """Ask the VMM to destroy the VM; SIGKILL it if it does not go within a few seconds."""
        with contextlib.suppress(VmmError):
            await self.request("destroy", timeout=3.0)
        if await self.wait_exit(5.0):
            return
        self._signal(signal.SIGKILL)
        await self.wait_exit(10.0)

    def close(self) -> None:
        """Stop watching and talking to the VMM (daemon shutdown): the VM keeps running."""
        self._release_pidfd(reap=False)
        if self._read_task is not None:
            self._read_task.cancel()
        self._fail_pending("the daemon is shutting down")
        if self._writer is not None:
            self._writer.close()
