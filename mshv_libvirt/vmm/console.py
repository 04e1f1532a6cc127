"""Host side of the serial port: a pty for interactive consoles and a capped, rotated log of all guest output.

The VMM keeps the pty slave open itself, for two reasons: reads on the master would fail with EIO
whenever no console client has it open, and the raw termios we set would be lost on last close.
The master is non-blocking: when nobody drains the slave and its buffer is full, guest output still
reaches the log and the vCPU never stalls on a console that is not attached.

The log is capped like virtlogd's (``max_size``, ``max_backups``): when the next byte would pass
``max_size`` the backups shift (``.2`` -> ``.3``, ``.1`` -> ``.2``, log -> ``.1``) and the log starts
empty, so a guest can never hold more than ``(max_backups + 1) * max_size`` bytes of the host's disk.
A sandboxed VMM may not rename files (it has no path access at all), so it rotates through descriptors
the daemon opened for the log and each backup: the shift copies contents with ``copy_file_range``
(at most ``max_backups * max_size`` bytes per rotation, done in the kernel) instead of renaming. A kill
in the middle of a rotation can duplicate a backup, never lose one. Sizes are tracked here, so writing
needs no ``fstat`` from the vCPU threads.
"""

from __future__ import annotations

import contextlib
import os
import threading
import tty
from collections.abc import Sequence

from .config import DEFAULT_LOG_MAX_BACKUPS, DEFAULT_LOG_MAX_SIZE


def open_log_files(path: str, backups: int) -> list[int]:
    """The log (appending) and its backups ``path.1`` .. ``path.N``, as the rotation needs them."""
    fds: list[int] = []
    try:
        for i in range(backups + 1):
            name = path if i == 0 else f"{path}.{i}"
            append = os.O_APPEND if i == 0 else 0
            fds.append(os.open(name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | append, 0o600))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


class RotatingLog:
    """Guest output to descriptors ``fds`` (log first, then backups), capped at ``max_size`` each."""

    def __init__(self, fds: Sequence[int], max_size: int = DEFAULT_LOG_MAX_SIZE) -> None:
        if not fds:
            raise ValueError("a rotating log needs at least the log's descriptor")
        self._fds = list(fds)
        self.max_size = max_size
        self._sizes = [os.fstat(fd).st_size for fd in self._fds]
        self.rotations = 0

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            room = self.max_size - self._sizes[0]
            if room <= 0:
                self._rotate()
                continue
            n = os.write(self._fds[0], view[:room])
            self._sizes[0] += n
            view = view[n:]

    @property
    def log_fd(self) -> int:
        return self._fds[0]

    @property
    def room(self) -> int:
        """Bytes the log takes before the next one rotates it."""
        return max(self.max_size - self._sizes[0], 0)

    def account(self, n: int) -> None:
        """``n`` bytes were appended to the log's descriptor by another writer (the serial port in C)."""
        self._sizes[0] += n

    def _copy(self, src: int, dst: int) -> None:
        """Backup ``src``'s content (an index: 0 is the log) into backup ``dst``."""
        os.ftruncate(self._fds[dst], 0)
        size, done = self._sizes[src], 0
        while done < size:
            n = os.copy_file_range(self._fds[src], self._fds[dst], size - done, done, done)
            if n == 0:
                break
            done += n
        self._sizes[dst] = done

    def _rotate(self) -> None:
        try:
            for i in range(len(self._fds) - 1, 0, -1):
                self._copy(i - 1, i)
        finally:
            # Whatever failed above (a full disk), the log itself starts over: the cap holds.
            os.ftruncate(self._fds[0], 0)
            self._sizes[0] = 0
            self.rotations += 1

    def close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []


class Console:
    def __init__(
        self,
        log_path: str | None = None,
        *,
        log_fds: Sequence[int] = (),
        max_size: int = DEFAULT_LOG_MAX_SIZE,
        max_backups: int = DEFAULT_LOG_MAX_BACKUPS,
        pty_fds: tuple[int, int] | None = None,
    ) -> None:
        """``pty_fds`` (master, slave) and ``log_fds`` are handed over by the daemon; else opened here."""
        self._master, self._slave = pty_fds if pty_fds is not None else os.openpty()
        self._log: RotatingLog | None = None
        try:
            tty.setraw(self._slave)
            os.set_blocking(self._master, False)
            self.pty_path = os.ttyname(self._slave)
            if log_fds:
                self._log = RotatingLog(log_fds, max_size)
            elif log_path:
                self._log = RotatingLog(open_log_files(log_path, max_backups), max_size)
        except BaseException:
            os.close(self._master)
            os.close(self._slave)
            for fd in log_fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        self._lock = threading.Lock()
        self.bytes_written = 0

    def fileno(self) -> int:
        """The master side: readable when a console client typed something."""
        return self._master

    @property
    def log(self) -> RotatingLog | None:
        return self._log

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

    def sink(self) -> tuple[int, int, int]:
        """(pty master, log descriptor or -1, the log's room): where the serial port in C writes guest output
        itself; what it cannot write before the log rotates comes back through :meth:`write_log`."""
        with self._lock:
            log = self._log
            return self._master, log.log_fd if log is not None else -1, log.room if log is not None else 0

    def write_log(self, data: bytes, written_elsewhere: int) -> int:
        """``data`` to the log only (the pty has it), after ``written_elsewhere`` bytes that the C writer
        appended; rotates as :meth:`write` does and returns the log's room afterwards."""
        with self._lock:
            if self._log is None:
                return 0
            self._log.account(written_elsewhere)
            try:
                self._log.write(data)
            except OSError:
                pass  # a full disk must not stop the guest
            return self._log.room

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
