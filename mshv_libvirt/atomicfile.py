"""Files replaced atomically: a temporary sibling, fsync, rename, directory fsync.

A crash (even SIGKILL) at any point leaves readers the old file or the whole new one. Used for the
driver's configs and runtime records and for the files a VMM hands to the daemon (pidfile, exit file).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from pathlib import Path

from mshv_libvirt.proc import pid_alive

TMP_MARK = ".tmp-"

_tmp_serial = itertools.count()


def tmp_sibling(path: Path) -> Path:
    """A temporary next to ``path`` that no other writer (process or thread) can be using."""
    return path.with_name(f"{TMP_MARK}{path.name}.{os.getpid()}.{threading.get_native_id()}.{next(_tmp_serial)}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = tmp_sibling(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def sweep_temporaries(directory: Path) -> None:
    """Remove the temporaries a crash in the middle of :func:`write_atomic` left behind.

    A temporary whose writer is still alive (e.g. a running VMM replacing its exit file) is not a leftover.
    """
    for tmp in directory.glob(f"{TMP_MARK}*"):
        try:
            writer = int(tmp.name.rsplit(".", 3)[-3])
        except (IndexError, ValueError):
            writer = 0
        if writer and writer != os.getpid() and pid_alive(writer):
            continue
        with contextlib.suppress(OSError):
            tmp.unlink()


def remove_durable(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
        fsync_dir(path.parent)
