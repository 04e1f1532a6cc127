"""What the host's KVM can give a guest, asked of /dev/kvm directly (an oracle independent of abi/emu)."""

from __future__ import annotations

import errno
import fcntl
import os
import struct

KVM_GET_SUPPORTED_CPUID = 0xC008AE05  # _IOWR(KVMIO, 0x05, struct kvm_cpuid2 {u32 nent, padding})
_ENTRY = struct.Struct("<7I12x")  # struct kvm_cpuid_entry2: function, index, flags, eax, ebx, ecx, edx, pad[3]
CPUID1_ECX_VMX = 1 << 5
CPUID80000001_ECX_SVM = 1 << 2


def kvm_supported_cpuid() -> dict[tuple[int, int], tuple[int, int, int, int]]:
    """{(leaf, subleaf): (eax, ebx, ecx, edx)} from KVM_GET_SUPPORTED_CPUID."""
    fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    try:
        n = 128
        while True:
            buf = bytearray(struct.pack("<II", n, 0) + bytes(_ENTRY.size * n))
            try:
                fcntl.ioctl(fd, KVM_GET_SUPPORTED_CPUID, buf)
                break
            except OSError as err:
                if err.errno != errno.E2BIG or n >= 4096:
                    raise
                n *= 2
    finally:
        os.close(fd)
    out = {}
    for i in range(struct.unpack_from("<I", buf)[0]):
        fn, idx, _flags, eax, ebx, ecx, edx = _ENTRY.unpack_from(buf, 8 + i * _ENTRY.size)
        out[(fn, idx)] = (eax, ebx, ecx, edx)
    return out


def kvm_can_nest() -> bool:
    """Whether KVM offers VMX or SVM to its guests (kvm_intel/kvm_amd nested=1 on a capable CPU)."""
    cpuid = kvm_supported_cpuid()
    vmx = cpuid.get((1, 0), (0, 0, 0, 0))[2] & CPUID1_ECX_VMX
    svm = cpuid.get((0x80000001, 0), (0, 0, 0, 0))[2] & CPUID80000001_ECX_SVM
    return bool(vmx or svm)


def missing(reason: str) -> None:
    """A prerequisite is absent: skip, except under CI, where it is a failure."""
    import pytest

    if os.environ.get("CI"):
        pytest.fail(f"CI: prerequisite missing: {reason}")
    pytest.skip(reason)
