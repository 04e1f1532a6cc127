"""Drive a real VMM process (``python -m mshv_libvirt.vmm``) the way the daemon does."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from mshv_libvirt.driver.vmm_client import vmm_command
from tests.support.waits import wait_for


class VmmProcess:
    def __init__(
        self,
        workdir: Path,
        config: dict[str, Any],
        pass_fds: tuple[int, ...] = (),
        *,
        interpreter_flags: tuple[str, ...] = (),
    ) -> None:
        """``interpreter_flags`` go to the interpreter, after the daemon's own (e.g. ``-X importtime``)."""
        self.workdir = workdir
        self.config = config
        self.config_path = workdir / "vm.json"
        self.config_path.write_text(json.dumps(config))
        self.stderr_path = workdir / "vmm.stderr"
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115
        python, isolated, *rest = vmm_command(self.config_path)  # the daemon's own command line (python -I -m ...)
        self.proc = subprocess.Popen(
            [python, isolated, *interpreter_flags, *rest],
            stdin=subprocess.DEVNULL,
            stdout=self._stderr,
            stderr=self._stderr,
            cwd=str(workdir),
            start_new_session=True,  # like the daemon: the VMM outlives whoever started it
            pass_fds=pass_fds,  # e.g. a tap the config's "net" names, as the daemon hands it over
        )
        self._sock: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._replies: dict[int, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._next_id = 0
        self._pty_fd: int | None = None
        self._console_buf = b""

    @classmethod
    def start(
        cls,
        workdir: Path,
        kernel: Path,
        *,
        initrd: Path | None = None,
        vcpus: int = 1,
        memory_mib: int = 64,
        cmdline: str = "console=ttyS0",
        pass_fds: tuple[int, ...] = (),
        interpreter_flags: tuple[str, ...] = (),
        **extra: Any,
    ) -> VmmProcess:
        workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "name": "test",
            "uuid": "00000000-0000-0000-0000-000000000001",
            "memory_bytes": memory_mib << 20,
            "vcpus": vcpus,
            "kernel": str(kernel),
            "initrd": str(initrd) if initrd else None,
            "cmdline": cmdline,
            "acpi": True,
            "on_reboot": "restart",
            "start_paused": False,
            "control_socket": str(workdir / "vm.ctl"),
            "pidfile": str(workdir / "vm.pid"),
            "exit_file": str(workdir / "vm.exit"),
            "serial_log": str(workdir / "serial.log"),
            **extra,
        }
        return cls(workdir, config, pass_fds, interpreter_flags=interpreter_flags)

    def __enter__(self) -> VmmProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- files -----------------------------------------------------------------------------------
    @property
    def serial(self) -> str:
        try:
            return Path(self.config["serial_log"]).read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_serial(self, text: str, *, timeout: float, count: int = 1) -> str:
        def seen() -> str | None:
            out = self.serial
            if out.count(text) >= count:
                return out
            if self.proc.poll() is not None:
                raise AssertionError(f"VMM exited ({self.proc.returncode}) before {text!r}: {self.diagnostics()}")
            return None

        return wait_for(seen, timeout, what=lambda: f"{text!r} on serial: {self.diagnostics()}")

    def exit_record(self) -> dict[str, Any] | None:
        try:
            record: dict[str, Any] = json.loads(Path(self.config["exit_file"]).read_text())
            return record
        except FileNotFoundError:
            return None

    def wait_exit(self, *, timeout: float) -> dict[str, Any]:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"VMM still running after {timeout}s: {self.diagnostics()}") from None
        record = self.exit_record()
        assert record is not None, f"VMM exited without an exit file: {self.diagnostics()}"
        return record

    def diagnostics(self) -> str:
        err = self.stderr_path.read_text(errors="replace")[-3000:] if self.stderr_path.exists() else ""
        return f"\n--- serial ---\n{self.serial[-3000:]}\n--- vmm stderr ---\n{err}"

    # -- control socket --------------------------------------------------------------------------
    def connect(self, timeout: float = 30) -> None:
        def connected() -> socket.socket | None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.config["control_socket"])
                return sock
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if self.proc.poll() is not None:
                    raise AssertionError(f"control socket never came up: {self.diagnostics()}") from None
                return None

        sock = wait_for(connected, timeout, what=lambda: f"the control socket up: {self.diagnostics()}")
        self._sock = sock
        self._reader = threading.Thread(target=self._read_loop, args=(sock,), daemon=True)
        self._reader.start()

    def disconnect(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _read_loop(self, sock: socket.socket) -> None:
        buf = b""
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line)
                with self._cond:
                    if "event" in msg:
                        self.events.append(msg)
                    else:
                        self._replies[msg["id"]] = msg
                    self._cond.notify_all()

    def request(self, cmd: str, timeout: float = 30, **args: Any) -> dict[str, Any]:
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        self._next_id += 1
        req_id = self._next_id
        self._sock.sendall(json.dumps({"id": req_id, "cmd": cmd, **args}).encode() + b"\n")
        with self._cond:
            if not self._cond.wait_for(lambda: req_id in self._replies, timeout):
                raise AssertionError(f"no reply to {cmd}: {self.diagnostics()}")
            return self._replies.pop(req_id)

    def command(self, cmd: str, timeout: float = 30, **args: Any) -> dict[str, Any]:
        reply = self.request(cmd, timeout, **args)
        assert reply["ok"], reply
        result: dict[str, Any] = reply["result"]
        return result

    def wait_event(self, name: str, *, timeout: float, count: int = 1) -> dict[str, Any]:
        with self._cond:
            ok = self._cond.wait_for(lambda: sum(e["event"] == name for e in self.events) >= count, timeout)
            if not ok:
                raise AssertionError(f"no {name!r} event (have {self.events}): {self.diagnostics()}")
            return [e for e in self.events if e["event"] == name][count - 1]

    # -- console pty -----------------------------------------------------------------------------
    def _pty(self) -> int:
        if self._pty_fd is None:
            path = self.command("status")["pty"]
            self._pty_fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        return self._pty_fd

    def console_send(self, data: bytes) -> None:
        os.write(self._pty(), data)

    def wait_console(self, needle: bytes, *, timeout: float) -> bytes:
        fd = self._pty()
        deadline = time.monotonic() + timeout
        while needle not in self._console_buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{needle!r} not seen on the console pty: {self._console_buf[-500:]!r}")
            ready, _, _ = select.select([fd], [], [], min(left, 0.2))
            if ready:
                try:
                    self._console_buf += os.read(fd, 65536)
                except BlockingIOError:
                    pass
        head, _, tail = self._console_buf.partition(needle)
        self._console_buf = tail
        return head + needle

    def close(self) -> None:
        self.disconnect()
        if self._pty_fd is not None:
            os.close(self._pty_fd)
            self._pty_fd = None
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._stderr.close()
