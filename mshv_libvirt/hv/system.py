"""``MshvSystem``: the /dev/mshv fd (or the emulated device when /dev/mshv is absent)."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Literal

from . import _ffi
from .errors import MshvError
from .ioctls import MSHV_CREATE_PARTITION
from .partition import PartitionFd

# pt_flags bits, and the kernel that introduced each (older kernels answer EINVAL).
PT_LAPIC = 1 << _ffi.const("MSHV_PT_BIT_LAPIC")  # 6.15
PT_X2APIC = 1 << _ffi.const("MSHV_PT_BIT_X2APIC")  # 6.15
PT_GPA_SUPER_PAGES = 1 << _ffi.const("MSHV_PT_BIT_GPA_SUPER_PAGES")  # 6.15
PT_CPU_AND_XSAVE_FEATURES = 1 << _ffi.const("MSHV_PT_BIT_CPU_AND_XSAVE_FEATURES")  # 6.19: the v2 struct
PT_NESTED_VIRTUALIZATION = 1 << _ffi.const("MSHV_PT_BIT_NESTED_VIRTUALIZATION")  # 7.0
PT_SMT_ENABLED_GUEST = 1 << _ffi.const("MSHV_PT_BIT_SMT_ENABLED_GUEST")  # 7.0
DEFAULT_PT_FLAGS = PT_LAPIC | PT_X2APIC | PT_GPA_SUPER_PAGES

_MODES = {"auto": 0, "kernel": 1, "emulated": 2}
# The emulated device's kernel generations (abi/emu/emu_int.h, enum emu_gen), by their code.
EMULATED_KERNELS = {615: "6.15-6.18", 619: "6.19", 700: "7.0"}
EMU_KERNEL_ENV = "MSHV_LIBVIRT_EMU_KERNEL"


@dataclass(frozen=True)
class PartitionFeatures:
    """What MSHV_CREATE_PARTITION accepts on this device: each optional capability, and the errno that
    refused it (0 when it was accepted). EINVAL means the kernel does not know the bit; any other errno is
    the hypervisor (or the emulated one) refusing it."""

    cpu_features_v2: int  # MSHV_PT_BIT_CPU_AND_XSAVE_FEATURES with the 64-byte struct (6.19)
    nested_virtualization: int  # MSHV_PT_BIT_NESTED_VIRTUALIZATION (7.0)
    smt_enabled_guest: int  # MSHV_PT_BIT_SMT_ENABLED_GUEST (7.0)

    @property
    def nested(self) -> bool:
        return self.nested_virtualization == 0

    @property
    def smt(self) -> bool:
        return self.smt_enabled_guest == 0


class MshvSystem:
    """Owns one /dev/mshv descriptor; the only way to make a :class:`PartitionFd`."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.backend: str = "emulated" if _ffi.is_emulated(fd) else "kernel"
        code = _ffi.emulated_kernel(fd) if self.backend == "emulated" else -1
        # The kernel generation the emulated device reproduces (None for a real /dev/mshv).
        self.emulated_kernel: str | None = EMULATED_KERNELS.get(code)

    @classmethod
    def open(cls, mode: Literal["auto", "kernel", "emulated"] = "auto") -> MshvSystem:
        """Probe for /dev/mshv; ``auto`` uses the emulated device only when it does not exist."""
        try:
            return cls(_ffi.open_device(_MODES[mode]))
        except OSError as exc:
            err = exc.errno or errno.EIO
            spec = os.environ.get(EMU_KERNEL_ENV)
            if err == errno.EINVAL and mode != "kernel" and spec:
                detail = f"{EMU_KERNEL_ENV}={spec!r} names no emulated kernel: use 6.15 .. 6.18, 6.19 or 7.0"
                raise MshvError(err, "open(/dev/mshv)", detail) from None
            raise MshvError(err, "open(/dev/mshv)") from None

    @property
    def kvm_backed(self) -> bool:
        """True when guest code can really run (a kernel device, or the emulator over /dev/kvm)."""
        return self.backend == "kernel" or _ffi.kvm_available()

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("MshvSystem is closed")
        return self._fd

    def create_partition(self, flags: int = DEFAULT_PT_FLAGS, isolation: int = 0) -> PartitionFd:
        # SAFETY: struct mshv_create_partition is ours (zero-filled by cffi); no reserved fields.
        arg = _ffi.new("struct mshv_create_partition *", {"pt_flags": flags, "pt_isolation": isolation})
        return self._create(arg)

    def create_partition_v2(
        self,
        flags: int,
        isolation: int = 0,
        cpu_fbanks: tuple[int, int] = (0, 0),
        disabled_xsave: int = 0,
    ) -> PartitionFd:
        """6.19 layout: ``flags`` gets MSHV_PT_BIT_CPU_AND_XSAVE_FEATURES so the kernel reads 64 bytes."""
        # SAFETY: pt_rsvd/pt_rsvd1 stay zero (MBZ, checked by the kernel); pt_num_cpu_fbanks must be 2.
        arg = _ffi.new(
            "struct mshv_create_partition_v2 *",
            {
                "pt_flags": flags | PT_CPU_AND_XSAVE_FEATURES,
                "pt_isolation": isolation,
                "pt_num_cpu_fbanks": 2,
                "pt_cpu_fbanks": list(cpu_fbanks),
                "pt_disabled_xsave": disabled_xsave,
            },
        )
        return self._create(arg)

    def _create(self, arg: object) -> PartitionFd:
        fd, err = _ffi.ioctl(self.fileno(), MSHV_CREATE_PARTITION, arg)
        if err:
            raise MshvError(err, "MSHV_CREATE_PARTITION")
        return PartitionFd._from_fd(fd)

    def refuses(self, flags: int, *, v2: bool = False) -> int:
        """The errno MSHV_CREATE_PARTITION answers for ``flags`` (0: accepted). The partition made to
        find out is closed at once: it is never initialized, so it holds no guest resources."""
        try:
            partition = self.create_partition_v2(flags) if v2 else self.create_partition(flags)
        except MshvError as err:
            return err.errno or errno.EIO
        partition.close()
        return 0

    def probe_features(self) -> PartitionFeatures:
        """Which optional create-partition capabilities this kernel (and hypervisor) offers, one
        MSHV_CREATE_PARTITION per capability on top of :data:`DEFAULT_PT_FLAGS`."""
        return PartitionFeatures(
            cpu_features_v2=self.refuses(DEFAULT_PT_FLAGS, v2=True),
            nested_virtualization=self.refuses(DEFAULT_PT_FLAGS | PT_NESTED_VIRTUALIZATION),
            smt_enabled_guest=self.refuses(DEFAULT_PT_FLAGS | PT_SMT_ENABLED_GUEST),
        )

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            _ffi.close(fd)

    def __enter__(self) -> MshvSystem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
