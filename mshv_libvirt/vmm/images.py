"""Kernel and initrd images: opened without blocking, checked before anything is read, read exactly once.

The daemon opens them (the sandboxed VMM opens no files) and refuses, before spawning, anything that is not a
regular file, that no one may read, or that cannot fit in guest memory; the VMM reads the descriptor it was
handed with ``pread`` up to the size it checked, so it never holds more than the image.
"""

from __future__ import annotations

import os
import stat

OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC  # a FIFO or a tty must not block the open
CHUNK = 8 << 20

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


class ImageError(ValueError):
    """A kernel or initrd that cannot be used; the message names the path and the reason.

    ``what`` ("kernel", "initrd") is for the caller's prefix, e.g. "Cannot load the kernel: ..."."""


def file_kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def check(fd: int, what: str, path: str, limit: int) -> int:
    """The size of the image open at ``fd``, after the checks; raises :class:`ImageError`."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"'{path}' is not a regular file: it is {file_kind(st.st_mode)}")
    if st.st_mode & 0o444 == 0:
        # libvirt's DAC driver would chown the image to the VMM's user and keep the mode: with no read
        # bit at all, QEMU could not read it either. Root opening it for the VMM must not change that.
        raise ImageError(f"'{path}' is not readable: its mode is {stat.S_IMODE(st.st_mode):04o}")
    if st.st_size == 0:
        raise ImageError(f"'{path}' is empty")
    if st.st_size > limit:
        raise ImageError(f"'{path}' is larger than the guest memory ({st.st_size} bytes > {limit} bytes)")
    return st.st_size


def open_checked(what: str, path: str, limit: int) -> tuple[int, int]:
    """(fd, size) of a checked image; the caller owns the descriptor."""
    try:
        fd = os.open(path, OPEN_FLAGS)
    except OSError as err:
        raise ImageError(f"cannot open '{path}': {err.strerror or err}") from err
    try:
        return fd, check(fd, what, path, limit)
    except BaseException:
        os.close(fd)
        raise


def read(fd: int, size: int, what: str, path: str) -> bytes:
    """Exactly ``size`` bytes from offset 0 (a file that shrank since the check is an error)."""
    out = bytearray()
    while len(out) < size:
        try:
            chunk = os.pread(fd, min(CHUNK, size - len(out)), len(out))
        except BlockingIOError as err:  # pragma: no cover - regular files never block
            raise ImageError(f"'{path}' cannot be read without blocking") from err
        if not chunk:
            raise ImageError(f"'{path}' shrank while it was read ({len(out)} of {size} bytes)")
        out += chunk
    return bytes(out)


def load(what: str, path: str, fd: int | None, limit: int) -> bytes:
    """The image handed as ``fd`` (checked again: files change), or opened from ``path``."""
    if fd is not None:
        return read(fd, check(fd, what, path, limit), what, path)
    own, size = open_checked(what, path, limit)
    try:
        return read(own, size, what, path)
    finally:
        os.close(own)
