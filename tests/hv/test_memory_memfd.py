"""Guest RAM lives in a memfd sealed at its size: another mapping of the fd (a vhost-user backend's)
sees the same bytes, and the file can neither shrink nor grow under the partition's mapping."""

from __future__ import annotations

import fcntl
import mmap
import os

import pytest

from mshv_libvirt.hv import GuestMemory

SIZE = 64 * 4096


def test_guest_memory_is_a_sealed_memfd_shared_with_other_mappings() -> None:
    with GuestMemory(SIZE) as mem:
        assert os.readlink(f"/proc/self/fd/{mem.fd}").startswith("/memfd:mshv-guest-ram")
        assert not os.get_inheritable(mem.fd)
        seals = fcntl.fcntl(mem.fd, fcntl.F_GET_SEALS)
        assert seals == fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
        assert os.fstat(mem.fd).st_size == SIZE
        with pytest.raises(PermissionError):
            os.ftruncate(mem.fd, SIZE // 2)
        with pytest.raises(PermissionError):
            os.ftruncate(mem.fd, SIZE * 2)
        other = mmap.mmap(mem.fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            mem.write(0x1234, b"from the VMM")
            assert other[0x1234 : 0x1234 + 12] == b"from the VMM"
            other[SIZE - 7 : SIZE] = b"backend"
            assert mem.read(SIZE - 7, 7) == b"backend"
        finally:
            other.close()
    assert mem.fd == -1 and mem.closed
