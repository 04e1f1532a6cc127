"""Guest RAM lives in a memfd sealed at its size: another mapping of the fd (a vhost-user backend's)
sees the same bytes, and the file can neither shrink nor grow under the partition's mapping. Guest RAM
no other process maps (``shareable=False``) is private anonymous memory instead (read from /proc here)."""

from __future__ import annotations

import fcntl
import mmap
import os
import re
from pathlib import Path

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


def smaps_entry(address: int) -> str:
    """This process's /proc/self/smaps entry of the mapping that starts at ``address``."""
    for entry in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path("/proc/self/smaps").read_text()):
        if int(entry.split("-", 1)[0], 16) == address:
            return entry
    raise AssertionError(f"no mapping starts at {address:#x}")


def test_private_guest_memory_has_no_fd_asks_for_huge_pages_and_stays_out_of_forks() -> None:
    # A VM without a vhost-user backend: no other process maps its RAM, so it need not be a memfd.
    with GuestMemory(SIZE, shareable=False) as mem:
        assert mem.fd == -1
        mem.write(0x1234, b"private")
        assert mem.read(0x1234, 7) == b"private"
        entry = smaps_entry(mem.address)
        head = entry.split("\n", 1)[0].split()
        assert head[1] == "rw-p" and len(head) == 5, head  # private and anonymous: no file behind it
        flags = re.search(r"^VmFlags:(.*)$", entry, re.M)
        assert flags is not None, entry
        # hg: MADV_HUGEPAGE (the kernel may back it with transparent huge pages); dc: MADV_DONTFORK.
        assert {"hg", "dc"} <= set(flags.group(1).split()), flags.group(1)
    assert mem.fd == -1 and mem.closed
