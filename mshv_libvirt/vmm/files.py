"""Files the VMM hands to the daemon (pidfile, exit file): always replaced atomically."""

from __future__ import annotations

import os


def write_atomically(path: str, data: bytes) -> None:
    """Write to a temporary sibling, fsync, rename: readers see the old file or the whole new one."""
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
