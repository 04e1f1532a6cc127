"""Host side of the serial port: a pty for interactive consoles and a log of all guest output.

The VMM keeps the pty slave open itself, for two reasons: reads on the master would fail with EIO
whenever no console client has it open, and the raw termios we set would be lost on last close.
The master is non-blocking: when nobody drains the slave and its buffer is full, guest output still
reaches the log and the vCPU never stalls on a console that is not attached.
"""

from __future__ import annotations

import os
import threading
import tty
from typing import BinaryIO


class Console:
    def __init__(self, log_path: str | None = None) -> None:
        self._master, self._slave = os.openpty()
        try:
            tty.setraw(self._slave)
            os.set_blocking(self._master, False)
            self.pty_path = os.ttyname(self._slave)
            self._log: BinaryIO | None = open(log_path, "ab", buffering=0) if log_path else None  # noqa: SIM115
        except BaseException:
            os.close(self._master)
            os.close(self._slave)
            raise
        self._lock = threading.Lock()
        self.bytes_written = 0

    def fileno(self) -> int:
        """The master side: readable when a console client typed something."""
        return self._master

    def write(self, data: bytes) -> None:
        """Guest output (called from vCPU threads)."""
        with self._lock:
            self.bytes_written += len(data)
            if self._log is not None:
                try:
                    self._log.write(data)
                except OSError:
                    pass  # a full disk must not stop the guest
            try:
                os.write(self._master, data)
            except (BlockingIOError, OSError):
                pass  # no reader and the pty buffer is full: drop, the log has it

    def read_input(self, limit: int) -> bytes:
        """Up to ``limit`` bytes typed on the console, b"" if none."""
        if limit <= 0:
            return b""
        try:
            return os.read(self._master, limit)
        except (BlockingIOError, OSError):
            return b""

    def close(self) -> None:
        with self._lock:
            for fd in (self._master, self._slave):
                try:
                    os.close(fd)
                except OSError:
                    pass
            if self._log is not None:
                self._log.close()
                self._log = None
