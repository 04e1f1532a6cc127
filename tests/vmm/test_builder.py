"""The build pipeline against the real hv layer: what it writes, and that failures unwind."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import pytest

from mshv_libvirt.hv import Reg, Segment, TableRegister
from mshv_libvirt.vmm import builder, layout
from mshv_libvirt.vmm.config import VmmConfig
from mshv_libvirt.vmm.vcpu import VmExit


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def warm_backend() -> None:
    """The emulated device keeps one /dev/kvm fd for the whole process: open it before counting."""
    with builder.open_hypervisor() as system:
        system.create_partition().close()


def config(kernel: Path, **extra: Any) -> VmmConfig:
    return VmmConfig.from_dict({"name": "t", "memory_bytes": 64 << 20, "kernel": str(kernel), **extra})


def test_build_error_messages_are_the_docstrings() -> None:
    assert str(builder.LoadKernelError("bad magic")) == "Cannot load the kernel: bad magic"
    assert str(builder.CreateVpsError()) == "Cannot create the virtual processors"
    assert issubclass(builder.MapMemoryError, builder.BuildError)


def test_a_failing_step_unwinds_everything(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus"
    bogus.write_bytes(b"\0" * 8192)
    before = open_fds()
    with pytest.raises(builder.LoadKernelError, match="no Linux setup header"):
        builder.build_vm(config(bogus), lambda data: None, lambda exit_: None, paused=True)
    assert open_fds() == before  # partition, irqfd eventfds and device fd all closed
    with pytest.raises(builder.LoadKernelError, match="No such file"):
        builder.build_vm(config(tmp_path / "missing"), lambda data: None, lambda exit_: None, paused=True)
    assert open_fds() == before


def test_initrd_that_does_not_fit_is_a_load_error(tmp_path: Path, tiny_kernel: Path) -> None:
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"\0" * (63 << 20))
    with pytest.raises(builder.LoadKernelError, match="does not fit"):
        builder.build_vm(config(tiny_kernel, initrd=str(initrd)), lambda data: None, lambda exit_: None, paused=True)


def test_built_vm_state_before_the_first_instruction(kvm: None, tmp_path: Path, tiny_kernel: Path) -> None:
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"INITRD" * 1000)
    exits: list[VmExit] = []
    before = open_fds()
    vm = builder.build_vm(
        config(tiny_kernel, initrd=str(initrd), cmdline="console=ttyS0 x=1", vcpus=2),
        lambda data: None,
        exits.append,
        paused=True,
    )
    try:
        assert [t.state.value for t in vm.vcpus] == ["paused", "paused"]
        regs = vm.vps[0].get_registers([Reg.RIP, Reg.RSI, Reg.CR3, Reg.EFER, Reg.CS, Reg.GDTR])
        assert regs[:4] == [0x100200, layout.BOOT_PARAMS_ADDR, layout.PML4_ADDR, layout.BOOT_EFER]
        cs, gdtr = regs[4], regs[5]
        assert isinstance(cs, Segment) and cs.selector == 0x10 and cs.attributes == layout.CODE64_ATTRIBUTES
        assert isinstance(gdtr, TableRegister) and gdtr.base == layout.GDT_ADDR and gdtr.limit == 31
        bp = vm.ram.read(layout.BOOT_PARAMS_ADDR, 4096)
        assert bp[0x202:0x206] == b"HdrS"
        (cmdline_ptr,) = struct.unpack_from("<I", bp, 0x228)
        assert vm.ram.read(cmdline_ptr, 18) == b"console=ttyS0 x=1\0"
        ramdisk, size = struct.unpack_from("<II", bp, 0x218)
        assert size == 6000 and vm.ram.read(ramdisk, 6) == b"INITRD"
        assert ramdisk + size <= 64 << 20 and ramdisk % 4096 == 0
        assert vm.ram.read(layout.ACPI_START, 8) == b"RSD PTR "
        assert struct.unpack_from("<Q", bp, 0x70)[0] == layout.ACPI_START
    finally:
        vm.close()
    assert open_fds() == before
    assert exits == []
