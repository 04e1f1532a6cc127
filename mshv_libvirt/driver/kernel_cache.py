"""Decompressed kernel payloads, kept by the daemon so that a VMM does not decompress the same kernel at each start.

The VMM loads a Linux bzImage by decompressing its payload on the host (vmm/loader.py: in the guest it would
take minutes here). For the small test kernel that is 0.2-0.3 s of CPU, the largest part of a start
(benchmarks/RESULTS.md, ``startup.py``). After a VMM started from a kernel file, the daemon decompresses that
file once on a worker thread and keeps the result here; the next VMMs get it as one more descriptor
(``fds.kernel_payload``). An entry holds the digest of the compressed payload it was made from, which the VMM
checks before it uses the entry, so a stale or foreign entry costs a decompression, never a wrong guest.

Entries are named by the kernel file's identity (device, inode, size, modification and change times: any
rewrite moves the change time), written atomically, and at most ``MAX_ENTRIES`` are kept: the least recently
used go (a hit refreshes an entry's modification time).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import threading
from pathlib import Path

from mshv_libvirt.atomicfile import write_atomic
from mshv_libvirt.vmm import images, loader

log = logging.getLogger(__name__)

MAX_ENTRIES = 8
MAX_KERNEL_BYTES = 256 << 20  # a kernel file larger than this is not cached (it is still loaded)
SUFFIX = ".payload"

_filling: set[tuple[Path, str]] = set()  # entries being made, so concurrent starts make each once
_fill_lock = threading.Lock()  # one fill at a time: a decompression is ~10 MiB of memory and a CPU
_filling_lock = threading.Lock()


def entry_name(st: os.stat_result) -> str:
    identity = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
    return hashlib.sha256(identity.encode()).hexdigest()[:32] + SUFFIX


def open_entry(directory: Path, kernel_fd: int) -> int | None:
    """A descriptor of the entry for the kernel open at ``kernel_fd``, or None when there is none."""
    try:
        fd = os.open(directory / entry_name(os.fstat(kernel_fd)), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    with contextlib.suppress(OSError):
        os.utime(fd)  # recently used
    return fd


def fill(directory: Path, kernel: str) -> bool:
    """Make the entry for the kernel file at ``kernel`` unless there is one; True when one was written.

    Runs on a worker thread (it decompresses). A kernel without a payload the host decompresses (the tiny test
    guest, a zstd kernel) gets no entry."""
    try:
        fd, size = images.open_checked("kernel", kernel, MAX_KERNEL_BYTES)
    except images.ImageError:
        return False
    try:
        name = entry_name(os.fstat(fd))
        key = (directory, name)
        with _filling_lock:
            if key in _filling or (directory / name).exists():
                return False
            _filling.add(key)
        try:
            with _fill_lock:
                data = loader.cached_payload(images.read(fd, size, "kernel", kernel))
                if data is None:
                    return False
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                write_atomic(directory / name, data, mode=0o644)
                _evict(directory)
                return True
        except (OSError, ValueError, loader.LoaderError) as err:  # ValueError: images.ImageError
            log.warning("cannot cache the decompressed payload of '%s': %s", kernel, err)
            return False
        finally:
            with _filling_lock:
                _filling.discard(key)
    finally:
        os.close(fd)


def _evict(directory: Path) -> None:
    entries = []
    for path in directory.glob("*" + SUFFIX):
        with contextlib.suppress(OSError):
            st = path.lstat()
            if stat.S_ISREG(st.st_mode):
                entries.append((st.st_mtime_ns, path))
    for _, path in sorted(entries)[: max(0, len(entries) - MAX_ENTRIES)]:
        with contextlib.suppress(OSError):
            path.unlink()
