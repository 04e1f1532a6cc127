from __future__ import annotations

import struct
from pathlib import Path

from mshv_libvirt.vmm.coredump import write_core


class Bytes:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]


def test_core_has_one_load_segment_per_range_with_the_bytes(tmp_path: Path) -> None:
    low, high = Bytes(b"A" * 8192), Bytes(b"B" * 4096)
    core = tmp_path / "g.core"
    size = write_core(core, [(0, 8192, low), (0x1_0000_0000, 4096, high)])
    data = core.read_bytes()
    assert len(data) == size and data[:4] == b"\x7fELF"
    assert struct.unpack_from("<HH", data, 16) == (4, 62)
    phoff, phnum = struct.unpack_from("<Q", data, 32)[0], struct.unpack_from("<H", data, 56)[0]
    assert phnum == 2
    segs = [struct.unpack_from("<IIQQQQQQ", data, phoff + 56 * i) for i in range(phnum)]
    for (ptype, _flags, offset, vaddr, paddr, filesz, memsz, _align), (gpa, body) in zip(
        segs, [(0, b"A" * 8192), (0x1_0000_0000, b"B" * 4096)], strict=True
    ):
        assert ptype == 1 and vaddr == paddr == gpa and filesz == memsz == len(body)
        assert offset % 4096 == 0 and data[offset : offset + filesz] == body
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically
