"""The only module that touches the compiled cffi core (C data is untyped here).

Everything else in mshv_libvirt.hv works with typed Python values built on these helpers.
"""

from __future__ import annotations

import errno as _errno
import os
from typing import Any

import mshv_libvirt

try:
    from mshv_libvirt._mshv import ffi, lib
except ImportError as exc:  # pragma: no cover - depends on how the package was installed
    raise ImportError(
        "mshv_libvirt._mshv is not built: run `pip install -e .` (or `pip install .`) to compile the cffi module"
    ) from exc

# A stale build would read structs with the wrong layout; refuse it loudly instead.
_built_for = ffi.string(lib.mshv_libvirt_version).decode()
if _built_for != mshv_libvirt.__version__:  # pragma: no cover
    raise ImportError(
        f"mshv_libvirt._mshv was built for version {_built_for}, but the package is "
        f"{mshv_libvirt.__version__}: rebuild with `pip install -e .`"
    )

NULL = ffi.NULL


def new(ctype: str, init: Any = None) -> Any:
    """Zero-filled C object: every reserved field starts out zero."""
    return ffi.new(ctype, init)


def sizeof(ctype: str) -> int:
    return int(ffi.sizeof(ctype))


def address(cdata: Any) -> int:
    return int(ffi.cast("uintptr_t", cdata))


def buffer(cdata: Any, size: int | None = None) -> bytes:
    if size is None:
        return bytes(ffi.buffer(cdata))
    return bytes(ffi.buffer(cdata, size))


def const(name: str) -> int:
    return int(getattr(lib, name))


def open_device(mode: int) -> int:
    fd = int(lib.mshv_dev_open(mode))
    if fd < 0:
        err = ffi.errno
        raise OSError(err, f"open /dev/mshv: {os.strerror(err)}")
    return fd


def is_emulated(fd: int) -> bool:
    return bool(lib.mshv_dev_is_emulated(fd))


def kvm_available() -> bool:
    return bool(lib.mshv_emu_kvm_available())


def emulated_kernel(fd: int) -> int:
    """major * 100 + minor of the kernel an emulated /dev/mshv handle reproduces, -1 if none."""
    return int(lib.mshv_emu_kernel(fd))


def ioctl(fd: int, request: int, arg: Any) -> tuple[int, int]:
    """(return value, errno); errno is 0 on success."""
    r = int(lib.mshv_dev_ioctl(fd, request, arg if arg is not None else NULL))
    return (r, 0) if r >= 0 else (r, int(ffi.errno))


def close(fd: int) -> None:
    if lib.mshv_dev_close(fd) < 0:
        err = ffi.errno
        if err != _errno.EBADF:
            raise OSError(err, os.strerror(err))


def mmap(fd: int, length: int, offset: int) -> tuple[int, int]:
    """(address, errno): maps a VP state page read/write, shared."""
    import mmap as _mmap

    p = lib.mshv_dev_mmap(NULL, length, _mmap.PROT_READ | _mmap.PROT_WRITE, _mmap.MAP_SHARED, fd, offset)
    if p == ffi.cast("void *", -1):
        return 0, int(ffi.errno)
    return address(p), 0


def alloc_pages(size: int) -> Any:
    p = lib.mshv_alloc_pages(size)
    if p == NULL:
        raise MemoryError(f"cannot map {size} bytes of guest memory")
    return p


def alloc_memfd_pages(size: int) -> tuple[Any, int]:
    """(mapping, memfd): shared pages backed by a size-sealed memfd another process may map."""
    fd_out = ffi.new("int *")
    p = lib.mshv_alloc_memfd_pages(size, fd_out)
    if p == NULL:
        err = int(ffi.errno)
        raise MemoryError(f"cannot map {size} bytes of guest memory in a memfd: {os.strerror(err)}")
    return p, int(fd_out[0])


def spawn_helper(argv: list[str], keep: tuple[int, ...]) -> tuple[int, int, int, int]:
    """(pid, lifeline, reaper pid, reaper pidfd or -1): ``argv`` run under a reaper that SIGKILLs it when
    the lifeline (a pipe's write end, ours alone) closes, which it does when this process dies."""
    args = [ffi.new("char[]", a.encode()) for a in argv]
    c_argv = ffi.new("char *[]", [*args, NULL])
    c_keep = ffi.new("int[]", list(keep) or [0])
    out = ffi.new("int[3]")
    pid = int(lib.mshv_spawn_helper(args[0], c_argv, c_keep, len(keep), out, out + 1, out + 2))
    if pid < 0:
        raise OSError(-pid, f"cannot start {argv[0]}: {os.strerror(-pid)}")
    return pid, int(out[0]), int(out[1]), int(out[2])


def free_pages(p: Any, size: int) -> None:
    lib.mshv_free_pages(p, size)


def memmove_from(address_: int, size: int) -> bytes:
    return bytes(ffi.buffer(ffi.cast("char *", address_), size))


def memmove_to(address_: int, data: bytes) -> None:
    ffi.memmove(ffi.cast("char *", address_), data, len(data))


def raw_ioctl(fd: int, request: int, arg: Any) -> int:
    """Escape hatch for validation tests: returns -errno or the result."""
    r, err = ioctl(fd, request, arg)
    return -err if err else r


def cast_ptr(ctype: str, addr: int) -> Any:
    return ffi.cast(ctype, addr)
