"""MSHV_CREATE_PARTITION as each upstream kernel generation answers it.

The emulated device reproduces the generation named by MSHV_LIBVIRT_EMU_KERNEL when a /dev/mshv
handle is opened (default: the newest). Expected values: docs/ABI.md §4.1 (upstream, with the patches
named in §1) and §9.2 (how the emulator selects and reports a generation), §9.5 for the nested-
virtualization refusal and §9.7 for the debug trace:

    6.15-6.18  pt_flags & ~0x7 -> EINVAL; 16 bytes copied
    6.19       pt_flags & ~0xF -> EINVAL; bit 3 (CPU_AND_XSAVE_FEATURES): 64 bytes copied and checked
    7.0        pt_flags & ~0x3F -> EINVAL; + bit 4 (NESTED_VIRTUALIZATION), bit 5 (SMT_ENABLED_GUEST)
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable, Iterator

import pytest
from mshv_libvirt._mshv import ffi, lib

from tests.abi import facts as F
from tests.support.hostcpu import CPUID1_ECX_VMX, CPUID80000001_ECX_SVM, kvm_can_nest

from .emutil import EMU_MODE, PAGE, buf, close, create_partition, ioctl, open_dev, tail_of_page, unmap
from .guest import CODE, HLT, OUT_DX_EAX, Guest, mov_dx

ENV = "MSHV_LIBVIRT_EMU_KERNEL"
V2 = 1 << 3
NESTED = 1 << 4
SMT = 1 << 5
# spec -> (generation code, accepted pt_flags)
GENERATIONS = {
    "6.15": (615, 0x7),
    "6.16": (615, 0x7),
    "6.17": (615, 0x7),
    "6.18": (615, 0x7),
    "6.18.9": (615, 0x7),
    "6.19": (619, 0xF),
    "7.0": (700, 0x3F),
    "7.0.2": (700, 0x3F),
}


def v2(flags: int, nbanks: int = 2) -> bytes:
    return struct.pack("<QQH6s2Q16sQ", flags | V2, 0, nbanks, bytes(6), 0, 0, bytes(16), 0)


Opener = Callable[[str], int]


@pytest.fixture
def at(monkeypatch: pytest.MonkeyPatch) -> Iterator[Opener]:
    """``at(spec)`` opens an emulated /dev/mshv handle behaving as that kernel."""
    opened: list[int] = []

    def open_as(spec: str) -> int:
        monkeypatch.setenv(ENV, spec)
        fd = open_dev()
        opened.append(fd)
        return fd

    yield open_as
    for fd in opened:
        close(fd)


@pytest.mark.parametrize("spec", sorted(GENERATIONS))
def test_handle_reports_its_generation(at: Opener, spec: str) -> None:
    assert lib.mshv_emu_kernel(at(spec)) == GENERATIONS[spec][0]


def test_default_is_the_newest(monkeypatch: pytest.MonkeyPatch) -> None:
    for value in (None, ""):
        if value is None:
            monkeypatch.delenv(ENV, raising=False)
        else:
            monkeypatch.setenv(ENV, value)
        fd = open_dev()
        assert lib.mshv_emu_kernel(fd) == 700
        pt = create_partition(fd, 0x7 | SMT)
        assert pt >= 0 and lib.mshv_emu_kernel(pt) == -1  # only /dev/mshv handles have one
        close(pt)
        close(fd)


@pytest.mark.parametrize("spec", ["6.14", "6.20", "7.1", "8.0", "7", "7.", ".0", "7.0-rc1", "seven", "6.19 ", "6..19"])
def test_unknown_generation_is_refused_at_open(monkeypatch: pytest.MonkeyPatch, spec: str) -> None:
    monkeypatch.setenv(ENV, spec)
    assert lib.mshv_dev_open(EMU_MODE) == -1 and ffi.errno == errno.EINVAL
    if not os.path.exists("/dev/mshv"):  # auto mode falls back to the emulator, which refuses too
        assert lib.mshv_dev_open(0) == -1 and ffi.errno == errno.EINVAL


@pytest.mark.parametrize("spec", ["6.15", "6.19", "7.0"])
@pytest.mark.parametrize("bit", [b for b in range(64) if b != 3])
def test_each_flag_bit(at: Opener, nokvm: None, spec: str, bit: int) -> None:
    dev = at(spec)
    fd = create_partition(dev, 1 << bit)
    if GENERATIONS[spec][1] >> bit & 1:
        assert fd >= 0
        close(fd)
    else:
        assert fd == -errno.EINVAL


@pytest.mark.parametrize("spec", ["6.15", "6.19", "7.0"])
def test_every_known_combination(at: Opener, nokvm: None, spec: str) -> None:
    dev = at(spec)
    mask = GENERATIONS[spec][1] & ~V2
    for flags in range(0x40):
        if flags & V2:
            continue
        fd = create_partition(dev, flags)
        assert (fd >= 0) == (flags & ~mask == 0), hex(flags)
        if fd >= 0:
            close(fd)


def test_6_15_has_no_v2_layout(at: Opener) -> None:
    dev = at("6.18")
    assert ioctl(dev, F.MSHV_CREATE_PARTITION, buf(v2(0x7))) == -errno.EINVAL
    # ... and decides from the 16-byte struct alone: nothing past it is read (no EFAULT).
    addr, base = tail_of_page(struct.pack("<QQ", 0x7 | V2, 0))
    try:
        assert ioctl(dev, F.MSHV_CREATE_PARTITION, addr) == -errno.EINVAL
    finally:
        unmap(base, PAGE)


@pytest.mark.parametrize("spec", ["6.19", "7.0"])
def test_v2_layout_from_6_19(at: Opener, spec: str) -> None:
    dev = at(spec)
    fd = ioctl(dev, F.MSHV_CREATE_PARTITION, buf(v2(0x7)))
    assert fd >= 0
    close(fd)
    assert ioctl(dev, F.MSHV_CREATE_PARTITION, buf(v2(0x7, nbanks=1))) == -errno.EINVAL
    addr, base = tail_of_page(struct.pack("<QQ", 0x7 | V2, 0))
    try:
        assert ioctl(dev, F.MSHV_CREATE_PARTITION, addr) == -errno.EFAULT  # 64 bytes are copied
    finally:
        unmap(base, PAGE)


def test_new_bits_in_the_v2_layout(at: Opener, nokvm: None) -> None:
    old, new = at("6.19"), at("7.0")
    for bits in (NESTED, SMT, NESTED | SMT):
        assert ioctl(old, F.MSHV_CREATE_PARTITION, buf(v2(0x7 | bits))) == -errno.EINVAL
        fd = ioctl(new, F.MSHV_CREATE_PARTITION, buf(v2(0x7 | bits)))
        assert fd >= 0
        close(fd)


def test_generation_is_fixed_when_the_handle_opens(at: Opener, monkeypatch: pytest.MonkeyPatch) -> None:
    old = at("6.19")
    monkeypatch.setenv(ENV, "7.0")
    assert create_partition(old, 0x7 | SMT) == -errno.EINVAL  # still 6.19
    new = open_dev()
    fd = create_partition(new, 0x7 | SMT)
    assert fd >= 0
    close(fd)
    close(new)


def test_debug_trace_names_what_reached_the_device(
    at: Opener, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MSHV_LIBVIRT_EMU_DEBUG", "1")
    old, new = at("6.19"), at("7.0")
    assert create_partition(old, 0x27) == -errno.EINVAL
    fd = create_partition(new, 0x27)
    assert fd >= 0
    close(fd)
    err = capfd.readouterr().err
    assert "mshv-emu: Linux 6.19: MSHV_CREATE_PARTITION pt_flags=0x27: errno 22 (Invalid argument)" in err
    assert f"mshv-emu: Linux 7.0: MSHV_CREATE_PARTITION pt_flags=0x27: fd {fd}" in err


# ---- nested virtualization needs the backing KVM to nest ------------------------------------


@pytest.fixture
def kvm_nests(kvm: None) -> bool:
    return kvm_can_nest()


def test_nested_partition_needs_a_kvm_that_nests(at: Opener, kvm_nests: bool) -> None:
    # The hypervisor's answer (inferred): PROCESSOR_FEATURE_NOT_SUPPORTED -> EIO, not the kernel's EINVAL.
    fd = create_partition(at("7.0"), 0x7 | NESTED)
    if kvm_nests:
        assert fd >= 0
        close(fd)
    else:
        assert fd == -errno.EIO


def guest_cpuid_ecx(g: Guest, leaf: int) -> int:
    """ECX of CPUID ``leaf`` as the guest's own CPUID instruction sees it."""
    code = b"\xb8" + struct.pack("<I", leaf) + b"\x31\xc9\x0f\xa2\x89\xc8" + mov_dx(0x80) + OUT_DX_EAX + HLT
    g.load(CODE, code)
    g.long_mode()
    msg = g.run()
    assert msg.type == F.HVMSG_X64_IO_PORT_INTERCEPT
    return int(msg.io.rax) & 0xFFFFFFFF


def test_guest_sees_vmx_svm_only_in_a_nested_partition(kvm_nests: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "7.0")
    plain = Guest()
    try:
        assert not guest_cpuid_ecx(plain, 1) & CPUID1_ECX_VMX
        assert not guest_cpuid_ecx(plain, 0x80000001) & CPUID80000001_ECX_SVM
    finally:
        plain.close()
    if not kvm_nests:
        return  # no nested partition can exist here (the test above shows the refusal)
    nested = Guest(flags=0x7 | NESTED)
    try:
        both = (
            guest_cpuid_ecx(nested, 1) & CPUID1_ECX_VMX or guest_cpuid_ecx(nested, 0x80000001) & CPUID80000001_ECX_SVM
        )
        assert both
    finally:
        nested.close()
