"""A starting domain's <disk> images, opened by the daemon and handed to its VMM.

For each disk the daemon opens the image itself (O_RDWR, or O_RDONLY for <readonly/>; O_CLOEXEC) with
libvirt's error when it cannot ("Cannot access storage file ..."), and takes an open-file-description
write lock on every writable one, so a second domain on an image another VMM writes is refused at start
with QEMU's lock-failure wording. The descriptors go to the VMM (its config's ``disks[].fd``); its
qemu-storage-daemon opens its inherited copy. The daemon closes its own copies once the VMM has them: the
lock then belongs to the VMM's (and its backend's) copy and ends with them, a SIGKILL included.

The lock covers byte 0 only: QEMU's own image locks (which qemu-storage-daemon takes on its own open of
the file) are on bytes 100 and up, so the two never conflict.

Volume disks (<source pool volume>) come here with the path libvirt's storage driver gave for their volume
at this start (rpc/volumes.py); they are then opened and locked like the others.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from dataclasses import dataclass, field
from typing import Any

from mshv_libvirt.domain import DomainConfig
from mshv_libvirt.errors import ErrorCode, ErrorDomain, VirtError, unsupported

from .vmm_launch import HeldFds

# struct flock on Linux x86_64: l_type, l_whence (short), l_start, l_len (off_t), l_pid (int), padding.
_FLOCK = "hhqqi4x"
LOCK_START, LOCK_LEN = 0, 1


def _write_lock(fd: int) -> bool:
    """Take an OFD write lock on byte 0 of ``fd``'s file; False when another open file holds one."""
    request = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, LOCK_START, LOCK_LEN, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def cannot_access(path: str, err: OSError) -> VirtError:
    """libvirt's virStorageSourceReportBrokenChain: a system error from the storage layer naming who tried
    (libvirt 9.0's QEMU driver names the qemu user; the daemon opens the image itself, so its own ids)."""
    reason = os.strerror(err.errno) if err.errno else str(err)
    who = f"(as uid:{os.geteuid()}, gid:{os.getegid()})"
    return VirtError(
        ErrorCode.SYSTEM_ERROR, f"Cannot access storage file '{path}' {who}: {reason}", ErrorDomain.STORAGE
    )


def lock_failed(path: str) -> VirtError:
    """What libvirt's QEMU driver reports when QEMU cannot lock an image another process writes."""
    return VirtError(
        ErrorCode.INTERNAL_ERROR,
        f'Failed to get "write" lock\nIs another process using the image [{path}]?',
        ErrorDomain.DOMAIN,
    )


@dataclass
class OpenedDisks(HeldFds):
    """The VMM config's ``disks`` entries and the daemon's descriptors behind them (closed by :meth:`close`)."""

    config: list[dict[str, Any]] = field(default_factory=list)


def open_disks(cfg: DomainConfig) -> OpenedDisks:
    """Open, check and lock every disk of ``cfg``; raise libvirt's error for the first that cannot be used."""
    opened = OpenedDisks()
    try:
        for disk in cfg.disks:
            if disk.path is None:  # a volume disk the start did not resolve (DomainManager._translate_volumes)
                raise unsupported(f"disk '{disk.target}' of type='volume' has no path: its volume was not resolved")
            flags = (os.O_RDONLY if disk.readonly else os.O_RDWR) | os.O_CLOEXEC
            try:
                fd = os.open(disk.path, flags)
            except OSError as err:
                raise cannot_access(disk.path, err) from err
            opened.keep(fd)
            if not disk.readonly and not _write_lock(fd):
                raise lock_failed(disk.path)
            opened.config.append(
                {
                    "slot": disk.address.slot,
                    "path": disk.path,
                    "format": disk.format or "raw",
                    "readonly": disk.readonly,
                    "serial": disk.serial,
                    "cache": disk.cache or "default",
                    "io": disk.io,
                    "fd": fd,
                }
            )
    except BaseException:
        opened.close()
        raise
    return opened
