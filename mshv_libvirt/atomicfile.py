"""Files replaced atomically: a temporary sibling, fsync, rename, directory fsync.

A crash (even SIGKILL) at any point leaves readers the old file or the whole new one. Used for the
driver's configs and runtime records and for the files a VMM hands to the daemon (pidfile, exit file).

Temporaries are named ``.tmp-<pid>-<thread>-<serial>``: no part of the target's name (so a long
name cannot make the temporary exceed NAME_MAX) and a prefix no file the driver names after a domain
can have (those never start with ``.``: see ``driver/layout.py``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import threading
from pathlib import Path

from mshv_libvirt.proc import pid_alive

TMP_MARK = ".tmp-"

_tmp_serial = itertools.count()


# ``.tmp-<pid>-<tid>-<n>``, and the formats of earlier versions, ``.tmp-<target>.<pid>.<tid>.<n>`` and
# ``.tmp-<target>.<pid>`` (none of them ends like a file the driver keeps: those end in a letter).
_TMP_WRITER = re.compile(r"\.tmp-(\d+)-\d+-\d+|\.tmp-.*\.(\d+)\.\d+\.\d+|\.tmp-.*\.(\d+)", re.DOTALL)


def tmp_sibling(path: Path) -> Path:
    """A temporary next to ``path`` that no other writer (process or thread) can be using."""
    return path.with_name(f"{TMP_MARK}{os.getpid()}-{threading.get_native_id()}-{next(_tmp_serial)}")


def temporary_writer(name: str) -> int | None:
    """The pid that wrote temporary ``name``, or None when ``name`` is not a temporary's name."""
    m = _TMP_WRITER.fullmatch(name)
    if m is None:
        return None
    return int(next(g for g in m.groups() if g is not None))


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

    Only names of the temporary formats are touched (a legacy config such as ``.tmp-victim.xml`` is a
    domain's, and is migrated, not swept). A temporary whose writer is still alive (e.g. a running VMM
    replacing its exit file) is not a leftover.
    """
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return
    for tmp in entries:
        writer = temporary_writer(tmp.name)
        if writer is None or (writer != os.getpid() and pid_alive(writer)):
            continue
        with contextlib.suppress(OSError):
            tmp.unlink()


def remove_durable(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
        fsync_dir(path.parent)
