"""Guest memory as an ELF64 core file, for on_crash = coredump-destroy / coredump-restart.

One PT_LOAD program header per RAM range, with the range's guest-physical address in both p_paddr and
p_vaddr (the guest's own page tables are not walked), so tools that read physical-address cores
(``crash``, ``gdb`` on the raw memory) can use it. Data is written in bounded chunks.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

ELF_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
PROGRAM_HEADER = struct.Struct("<IIQQQQQQ")
ET_CORE = 4
EM_X86_64 = 62
PT_LOAD = 1
PF_RWX = 7
PAGE = 4096
CHUNK = 16 << 20


class Memory(Protocol):
    def read(self, offset: int, length: int) -> bytes: ...


def write_core(path: str | Path, regions: Iterable[tuple[int, int, Memory]], fd: int | None = None) -> int:
    """Write (gpa, size, memory) regions to ``path`` atomically; returns the file size.

    With ``fd`` (a file the daemon opened for a sandboxed VMM, which may create no file) the core goes
    there instead; the daemon gives it its final name once the VMM has exited.
    """
    regions = list(regions)
    phoff = ELF_HEADER.size
    data_off = -(-(phoff + PROGRAM_HEADER.size * len(regions)) // PAGE) * PAGE
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # 64-bit, little-endian, version 1, SysV
    header = ELF_HEADER.pack(
        ident, ET_CORE, EM_X86_64, 1, 0, phoff, 0, 0, ELF_HEADER.size, PROGRAM_HEADER.size, len(regions), 0, 0, 0
    )
    phdrs = b""
    offset = data_off
    for gpa, size, _ in regions:
        phdrs += PROGRAM_HEADER.pack(PT_LOAD, PF_RWX, offset, gpa, gpa, size, size, PAGE)
        offset += size
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if fd is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    else:
        out = fd
        os.ftruncate(out, 0)
        os.lseek(out, 0, os.SEEK_SET)
    try:
        _write_all(out, (header + phdrs).ljust(data_off, b"\0"))
        for _gpa, size, mem in regions:
            for start in range(0, size, CHUNK):
                _write_all(out, mem.read(start, min(CHUNK, size - start)))
        os.fsync(out)
    finally:
        if fd is None:
            os.close(out)
    if fd is None:
        os.replace(tmp, path)
    return offset


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
