"""Guest RAM owned by Python: page-aligned shared pages of a memfd sealed at its size."""

from __future__ import annotations

import os
from typing import Any

from . import _ffi

PAGE_SIZE = 4096


class GuestMemory:
    """A page-aligned mapping handed to the partition with ``map_memory``.

    The mapping lives until ``close()``; the partition must unmap it first (the kernel pins
    the pages while they are mapped). ``fd`` is the memfd behind it (close-on-exec, sealed against
    shrinking and growing): a vhost-user backend maps guest RAM from it.
    """

    def __init__(self, size: int) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"guest memory size must be a positive multiple of {PAGE_SIZE}, not {size}")
        self._ptr: Any
        self._ptr, self.fd = _ffi.alloc_memfd_pages(size)
        self.size = size
        self.address = _ffi.address(self._ptr)

    def _check(self, offset: int, length: int) -> None:
        if self._ptr is None:
            raise ValueError("guest memory is closed")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise IndexError(f"range {offset:#x}+{length:#x} outside guest memory of {self.size:#x} bytes")

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return _ffi.memmove_from(self.address + offset, length)

    def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        _ffi.memmove_to(self.address + offset, data)

    @property
    def closed(self) -> bool:
        return self._ptr is None

    def close(self) -> None:
        if self._ptr is not None:
            _ffi.free_pages(self._ptr, self.size)
            self._ptr = None
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
