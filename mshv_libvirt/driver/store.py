"""Persistent domain configs, laid out like libvirt's: ``<config_dir>/<name>.xml`` and autostart links.

Every write goes to a temporary sibling, is fsynced, renamed over the target and the directory is
fsynced: a crash (even SIGKILL) at any point leaves the old file or the new one, never a torn one.
Leftover temporaries from such a crash are ignored and swept on load.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from pathlib import Path

TMP_MARK = ".tmp-"

_tmp_serial = itertools.count()


def _tmp_sibling(path: Path) -> Path:
    """A temporary next to ``path`` that no other writer (process or thread) can be using."""
    return path.with_name(f"{TMP_MARK}{path.name}.{os.getpid()}.{threading.get_native_id()}.{next(_tmp_serial)}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = _tmp_sibling(path)
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
    _fsync_dir(path.parent)


def sweep_temporaries(directory: Path) -> None:
    """Remove the temporaries a crash in the middle of :func:`write_atomic` left behind."""
    for tmp in directory.glob(f"{TMP_MARK}*"):
        with contextlib.suppress(OSError):
            tmp.unlink()


def remove_durable(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
        _fsync_dir(path.parent)


class ConfigStore:
    def __init__(self, config_dir: Path) -> None:
        self.dir = config_dir
        self.autostart_dir = config_dir / "autostart"

    def ensure(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.autostart_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.xml"

    def load_all(self) -> dict[str, str]:
        """name -> XML text of every defined domain; stale temporaries are removed."""
        out: dict[str, str] = {}
        for entry in sorted(self.dir.glob("*.xml")):
            out[entry.name[: -len(".xml")]] = entry.read_text()
        sweep_temporaries(self.dir)
        sweep_temporaries(self.autostart_dir)
        return out

    def save(self, name: str, xml: str) -> None:
        write_atomic(self.path(name), xml.encode())

    def delete(self, name: str) -> None:
        self.set_autostart(name, False)
        remove_durable(self.path(name))

    def autostart(self, name: str) -> bool:
        return (self.autostart_dir / f"{name}.xml").is_symlink()

    def set_autostart(self, name: str, on: bool) -> None:
        link = self.autostart_dir / f"{name}.xml"
        if on:
            if not link.is_symlink():
                self.autostart_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                tmp = _tmp_sibling(link)
                tmp.symlink_to(self.path(name))
                try:
                    os.replace(tmp, link)
                except BaseException:
                    with contextlib.suppress(OSError):
                        tmp.unlink()
                    raise
                _fsync_dir(self.autostart_dir)
        else:
            remove_durable(link)
