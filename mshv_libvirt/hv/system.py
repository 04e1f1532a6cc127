"""``MshvSystem``: the /dev/mshv fd (or the emulated device when /dev/mshv is absent)."""

from __future__ import annotations

import errno
from typing import Literal

from . import _ffi
from .errors import MshvError
from .ioctls import MSHV_CREATE_PARTITION
from .partition import PartitionFd

PT_LAPIC = 1 << 0
PT_X2APIC = 1 << 1
PT_GPA_SUPER_PAGES = 1 << 2
PT_CPU_AND_XSAVE_FEATURES = 1 << 3
DEFAULT_PT_FLAGS = PT_LAPIC | PT_X2APIC | PT_GPA_SUPER_PAGES

_MODES = {"auto": 0, "kernel": 1, "emulated": 2}


class MshvSystem:
    """Owns one /dev/mshv descriptor; the only way to make a :class:`PartitionFd`."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.backend: str = "emulated" if _ffi.is_emulated(fd) else "kernel"

    @classmethod
    def open(cls, mode: Literal["auto", "kernel", "emulated"] = "auto") -> MshvSystem:
        """Probe for /dev/mshv; ``auto`` uses the emulated device only when it does not exist."""
        try:
            return cls(_ffi.open_device(_MODES[mode]))
        except OSError as exc:
            raise MshvError(exc.errno or errno.EIO, "open(/dev/mshv)") from None

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
