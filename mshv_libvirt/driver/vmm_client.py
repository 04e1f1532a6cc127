"""The daemon's side of one VMM process: spawn or re-attach, JSON-lines control, exit detection.

The VMM is deliberately not tied to the daemon's lifetime (its own session, no pipes the daemon must
drain), so a daemon restart finds it still running and re-attaches through the control socket. The
end of a VMM is seen as EOF on that socket; the pid is then waited for (or polled when the VMM is not
our child) and the exit file says why it ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mshv_libvirt.proc import pid_alive

from . import vmm_launch
from .vmm_launch import LaunchError, VmmOptions

JsonObject = dict[str, Any]

READY_TIMEOUT = 60.0
REQUEST_TIMEOUT = 30.0


class VmmError(Exception):
    """A control request failed or the VMM is gone."""


@dataclass(frozen=True)
class VmmFiles:
    """Per-domain runtime paths under the run dir."""

    config: Path
    control: Path
    pidfile: Path
    exit_file: Path
    serial_log: Path
    stderr_log: Path

    @classmethod
    def for_domain(cls, run_dir: Path, log_dir: Path, name: str) -> VmmFiles:
        return cls(
            config=run_dir / f"{name}.vmm.json",
            control=run_dir / f"{name}.ctl",
            pidfile=run_dir / f"{name}.pid",
            exit_file=run_dir / f"{name}.exit",
            serial_log=log_dir / f"{name}.serial.log",
            stderr_log=log_dir / f"{name}.log",
        )

    def remove_runtime(self) -> None:
        for path in (self.config, self.control, self.pidfile, self.exit_file):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def read_exit(self) -> JsonObject | None:
        try:
            data = json.loads(self.exit_file.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None


def is_our_vmm(pid: int, files: VmmFiles) -> bool:
    """Whether ``pid`` is a VMM started for this domain's ``files.config`` (not a recycled pid).

    The config is matched by file name only: a daemon restarted with another spelling of the same
    run dir (a symlink, a relative path) must still recognise its VMMs rather than stop them.
    """
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if b"mshv_libvirt.vmm" not in argv:
        return False
    want = os.fsencode(files.config.name)
    return any(arg == want or arg.endswith(b"/" + want) for arg in argv)


def find_vmm_processes(run_dir: Path) -> list[tuple[str, int]]:
    """(domain name, pid) of every live VMM process whose ``--config`` lies in ``run_dir``.

    Found in /proc rather than through pidfiles: a VMM killed-over during start-up may not have
    written its pidfile yet, and must still be found.
    """
    out: list[tuple[str, int]] = []
    try:
        entries = list(Path("/proc").iterdir())
    except OSError:
        return out
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"mshv_libvirt.vmm" not in argv:
            continue
        for i, arg in enumerate(argv[:-1]):
            if arg != b"--config":
                continue
            config = Path(os.fsdecode(argv[i + 1]))
            if not config.name.endswith(".vmm.json"):
                continue
            try:
                same = config.parent == run_dir or os.path.samefile(config.parent, run_dir)
            except OSError:
                same = False
            if same and pid_alive(int(entry.name)):
                out.append((config.name[: -len(".vmm.json")], int(entry.name)))
    return out


class VmmHandle:
    """A connected VMM. ``on_event`` receives pushed events; ``exited`` resolves when it is gone."""

    def __init__(self, name: str, files: VmmFiles, pid: int, proc: asyncio.subprocess.Process | None) -> None:
        self.name = name
        self.files = files
        self.pid = pid
        self._proc = proc
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._next_id = 1
        self._pending: dict[int, asyncio.Future[JsonObject]] = {}
        self.on_event: Callable[[JsonObject], None] = lambda _e: None
        self.exited: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._read_task: asyncio.Task[None] | None = None
        self.pty: str | None = None

    # -- creation --------------------------------------------------------------------------------
    @classmethod
    async def spawn(
        cls, name: str, files: VmmFiles, vmm_config: JsonObject, options: VmmOptions | None = None
    ) -> VmmHandle:
        files.remove_runtime()
        try:
            # Every descriptor the sandboxed VMM needs, opened and checked here (vmm_launch.py).
            launch = vmm_launch.prepare(
                vmm_config, options or VmmOptions(), config_path=files.config, stderr_dir=files.stderr_log.parent
            )
        except LaunchError as err:
            files.remove_runtime()
            raise VmmError(str(err)) from err
        with launch, open(files.stderr_log, "ab") as log:
            proc = await cls._exec(
                files,
                sys.executable,
                "-m",
                "mshv_libvirt.vmm",
                "--config",
                str(files.config),
                *launch.args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # a daemon restart or a signal to its group leaves VMs running
                pass_fds=launch.pass_fds,
                cwd="/",
                **launch.credentials,  # the unprivileged VMM user (system mode)
            )
            vmm_launch.write_pidfile(files.pidfile, proc.pid)
        handle = cls(name, files, proc.pid, proc)
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
        return handle

    @staticmethod
    async def _exec(files: VmmFiles, *argv: str, **kwargs: Any) -> asyncio.subprocess.Process:
        try:
            return await asyncio.create_subprocess_exec(*argv, **kwargs)
        except OSError as err:  # e.g. a user switch without the privilege for it
            files.remove_runtime()
            raise VmmError(f"cannot start the VMM: {err}") from err

    @classmethod
    async def attach(cls, name: str, files: VmmFiles, pid: int) -> VmmHandle:
        handle = cls(name, files, pid, None)
        await handle._connect(5.0)
        status = await handle.request("status", timeout=10.0)
        handle.pty = status.get("pty")
        return handle

    async def _connect(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                self._reader, self._writer = await asyncio.open_unix_connection(str(self.files.control))
                break
            except (FileNotFoundError, ConnectionRefusedError) as err:
                if self._proc is not None and self._proc.returncode is not None:
                    raise VmmError(self._failure_detail()) from err
                if self._proc is None and not pid_alive(self.pid):
                    raise VmmError("the VMM process is gone") from err
                if loop.time() > deadline:
                    raise VmmError(f"timed out waiting for the VMM control socket {self.files.control}") from err
                await asyncio.sleep(0.02)
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
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(VmmError("the VMM closed its control connection"))
            self._pending.clear()
            if self._writer is not None:
                self._writer.close()
            await self._wait_gone()
            if not self.exited.done():
                self.exited.set_result(None)

    async def _wait_gone(self) -> None:
        if self._proc is not None:
            await self._proc.wait()
            return
        while pid_alive(self.pid):
            await asyncio.sleep(0.05)

    async def request(self, cmd: str, timeout: float = REQUEST_TIMEOUT, args: JsonObject | None = None) -> JsonObject:
        if self._writer is None or self.exited.done():
            raise VmmError("the VMM is not running")
        rid = self._next_id
        self._next_id += 1
        fut: asyncio.Future[JsonObject] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            self._writer.write(json.dumps({**(args or {}), "id": rid, "cmd": cmd}).encode() + b"\n")
            await self._writer.drain()
            reply = await asyncio.wait_for(fut, timeout)
        except (ConnectionError, OSError) as err:
            raise VmmError(f"the VMM control connection failed: {err}") from err
        except TimeoutError as err:
            raise VmmError(f"the VMM did not answer {cmd!r} within {timeout:.0f} s") from err
        finally:
            self._pending.pop(rid, None)
        if not reply.get("ok"):
            raise VmmError(str(reply.get("error", "request failed")))
        result = reply.get("result")
        return result if isinstance(result, dict) else {}

    # -- ending ----------------------------------------------------------------------------------
    @staticmethod
    async def reap(name: str, files: VmmFiles, pid: int, grace: float = 5.0) -> None:
        """Stop a VMM we hold no connection to: SIGTERM (it reports "destroyed"), then SIGKILL."""
        loop = asyncio.get_running_loop()
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
            deadline = loop.time() + wait
            while pid_alive(pid) and loop.time() < deadline:
                await asyncio.sleep(0.02)
            if not pid_alive(pid):
                return

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
        if self._read_task is not None and await self.wait_exit(5.0):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.pid, signal.SIGKILL)
        if self._read_task is None:
            if self._proc is not None:
                await self._proc.wait()
            if not self.exited.done():
                self.exited.set_result(None)
            return
        await self.wait_exit(10.0)
