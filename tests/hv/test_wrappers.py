"""mshv_libvirt.hv against the emulated device: typed errors, fd ownership, round trips.

Expected values: docs/ABI.md §4.3-4.4 (errno of CREATE_VP and SET_GUEST_MEMORY checks), §3.2 (flag
bits), §5 (status codes and names), §6.4 (property codes), §7 (message layout), §8 (registers) and
§9.5 (the emulated hypervisor's answers); the real-mode guest is plain x86.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterator

import pytest

from mshv_libvirt import hv
from mshv_libvirt.hv import _ffi

kvm = pytest.mark.kvm  # the session probe in tests/conftest.py decides


@pytest.fixture
def system(monkeypatch: pytest.MonkeyPatch) -> Iterator[hv.MshvSystem]:
    monkeypatch.delenv(hv.EMU_KERNEL_ENV, raising=False)  # the newest kernel, whatever the caller exported
    s = hv.MshvSystem.open(mode="emulated")
    yield s
    s.close()


@pytest.fixture
def partition(system: hv.MshvSystem) -> Iterator[hv.PartitionFd]:
    p = system.create_partition()
    p.initialize()
    yield p
    p.close()


def test_emulated_backend_is_reported(system: hv.MshvSystem) -> None:
    assert system.backend == "emulated"
    assert system.fileno() >= 0


def test_auto_mode_falls_back_to_the_emulator_without_dev_mshv() -> None:
    if os.path.exists("/dev/mshv"):
        pytest.skip("/dev/mshv exists: auto mode uses the kernel")
    with hv.MshvSystem.open() as s:
        assert s.backend == "emulated"


def test_kernel_mode_reports_the_missing_device() -> None:
    if os.path.exists("/dev/mshv"):
        pytest.skip("/dev/mshv exists")
    with pytest.raises(hv.MshvError) as exc:
        hv.MshvSystem.open(mode="kernel")
    assert exc.value.errno == errno.ENOENT


def test_children_are_made_only_by_their_parent() -> None:
    with pytest.raises(TypeError):
        hv.PartitionFd(3)
    with pytest.raises(TypeError):
        hv.VpFd(3, 0)


def test_bad_fd_gives_ebadf() -> None:
    assert _ffi.raw_ioctl(-1, 0x0000B800, None) == -errno.EBADF  # MSHV_INITIALIZE_PARTITION (§2.3)


def test_errors_carry_errno_and_ioctl_name(partition: hv.PartitionFd) -> None:
    with pytest.raises(hv.MshvError) as exc:
        partition.create_vp(256)
    assert exc.value.errno == errno.EINVAL
    assert exc.value.ioctl == "MSHV_CREATE_VP"
    assert "MSHV_CREATE_VP" in str(exc.value)


def test_duplicate_vp_is_eexist(partition: hv.PartitionFd) -> None:
    partition.create_vp(1)
    with pytest.raises(hv.MshvError) as exc:
        partition.create_vp(1)
    assert exc.value.errno == errno.EEXIST


def test_create_partition_rejects_unknown_flags(system: hv.MshvSystem) -> None:
    with pytest.raises(hv.MshvError) as exc:
        system.create_partition(flags=1 << 6)  # past 7.0's bits (older generations: tests/hv/test_generations.py)
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(hv.MshvError):
        system.create_partition(isolation=1)


def test_create_partition_v2_is_accepted(system: hv.MshvSystem) -> None:
    # §3.2/§9.5: the 64-byte layout under bit 3 makes an ordinary partition: it initializes, takes VPs
    # (one index once, EEXIST again as in v1) and its fd is the caller's until closed.
    with system.create_partition_v2(hv.DEFAULT_PT_FLAGS, cpu_fbanks=(0x1234, 0xFFFF), disabled_xsave=0xF0) as p:
        fd = p.fileno()
        os.fstat(fd)  # an open descriptor
        p.initialize()
        vp = p.create_vp(0)
        assert vp.fileno() >= 0 and vp.fileno() != fd
        with pytest.raises(hv.MshvError) as exc:
            p.create_vp(0)
        assert exc.value.errno == errno.EEXIST
    with pytest.raises(ValueError, match="closed"):
        p.fileno()
    with pytest.raises(OSError) as err:
        os.fstat(fd)  # closed with its partition (nothing else opened meanwhile)
    assert err.value.errno == errno.EBADF


def test_memory_validation(partition: hv.PartitionFd) -> None:
    mem = hv.GuestMemory(2 * 4096)
    try:
        for size, addr in ((0, mem.address), (4095, mem.address), (4096, mem.address + 1)):
            with pytest.raises(hv.MshvError) as exc:
                partition.set_guest_memory(size, 0, addr, 0)
            assert exc.value.errno == errno.EINVAL
        with pytest.raises(hv.MshvError) as exc:
            partition.set_guest_memory(4096, 0, mem.address, 1 << 3)
        assert exc.value.errno == errno.EINVAL
        partition.map_memory(0x100, mem)
        with pytest.raises(hv.MshvError) as exc:
            partition.map_memory(0x101, mem)  # overlaps in GPA and in userspace
        assert exc.value.errno == errno.EEXIST
        with pytest.raises(hv.MshvError) as exc:
            partition.set_guest_memory(4096, 0x100, mem.address, 1 << 2)  # UNMAP (§3.2), not an exact match
        assert exc.value.errno == errno.EINVAL
        partition.unmap_memory(0x100, mem)
    finally:
        mem.close()


def test_hypercall_errors_carry_the_status(partition: hv.PartitionFd) -> None:
    with pytest.raises(hv.HypercallError) as exc:
        partition.get_property(0x12345678)
    assert exc.value.status == 0x9
    assert exc.value.status_name == "HV_STATUS_UNKNOWN_PROPERTY"
    assert exc.value.errno == errno.EIO


def test_properties_round_trip(partition: hv.PartitionFd) -> None:
    partition.set_property(0x00050017, 1)  # UNIMPLEMENTED_MSR_ACTION
    assert partition.get_property(0x00050017) == 1


@kvm
def test_registers_round_trip(partition: hv.PartitionFd) -> None:
    vp = partition.create_vp(0)
    cs = hv.Segment(0x10000, 0xFFFF, 0x1000, 0x9B)  # valid in real mode
    gdt = hv.TableRegister(0x500, 0x17)
    vp.set_registers({hv.Reg.RIP: 0x1000, hv.Reg.RBX: 0xDEADBEEF, hv.Reg.CS: cs, hv.Reg.GDTR: gdt})
    rip, rbx, got_cs, got_gdt = vp.get_registers([hv.Reg.RIP, hv.Reg.RBX, hv.Reg.CS, hv.Reg.GDTR])
    assert (rip, rbx, got_gdt) == (0x1000, 0xDEADBEEF, gdt)
    assert isinstance(got_cs, hv.Segment) and (got_cs.selector, got_cs.base) == (0x1000, 0x10000)


@kvm
def test_unknown_register_is_rejected_by_the_hypervisor(partition: hv.PartitionFd) -> None:
    vp = partition.create_vp(0)
    with pytest.raises(hv.HypercallError) as exc:
        vp.get_registers([0x7777])
    assert exc.value.status_name == "HV_STATUS_INVALID_PARAMETER"


def test_guest_memory_read_write() -> None:
    with hv.GuestMemory(8192) as mem:
        assert mem.address % 4096 == 0
        mem.write(4090, b"0123456789")
        assert mem.read(4090, 10) == b"0123456789"
        with pytest.raises(IndexError):
            mem.read(8190, 4)
    with pytest.raises(ValueError):
        hv.GuestMemory(100)


def test_message_accessors_check_the_type() -> None:
    raw = bytearray(256)
    struct.pack_into("<I", raw, 0, 0x80010007)  # HVMSG_X64_HALT
    struct.pack_into("<QQ", raw, 16 + 24, 0x1234, 0x202)
    msg = hv.HvMessage.from_bytes(bytes(raw))
    assert msg.kind == "halt"
    assert msg.header().rip == 0x1234 and msg.header().rflags == 0x202
    with pytest.raises(hv.MessageTypeError):
        msg.as_io_port()
    with pytest.raises(hv.MessageTypeError):
        msg.as_memory()


@kvm
def test_guest_out_arrives_as_an_io_intercept(partition: hv.PartitionFd) -> None:
    mem = hv.GuestMemory(1 << 20)
    try:
        partition.map_memory(0, mem)
        # real mode: mov dx,0x3f8; mov al,'R'; out dx,al; cli; hlt
        mem.write(0x1000, bytes([0xBA, 0xF8, 0x03, 0xB0, ord("R"), 0xEE, 0xFA, 0xF4]))
        vp = partition.create_vp(0)
        vp.set_registers({hv.Reg.CS: hv.Segment(0, 0xFFFF, 0, 0x9B), hv.Reg.RIP: 0x1000})
        io = vp.run().as_io_port()
        assert (io.port, io.access_size, io.is_write, io.rax & 0xFF) == (0x3F8, 1, True, ord("R"))
        assert (io.rip, io.instruction_length) == (0x1005, 1)
        vp.set_registers({hv.Reg.RIP: io.rip + io.instruction_length})
        assert vp.get_registers([hv.Reg.RIP]) == [0x1006]
        vp.close()
        partition.unmap_memory(0, mem)
    finally:
        mem.close()
