"""Typed access to /dev/mshv: one Python type per kernel fd.

``MshvSystem`` (the /dev/mshv fd, or the emulated device) makes ``PartitionFd``s, which make
``VpFd``s. Nothing above this package sees cffi data.
"""

from .errors import HypercallError, MessageTypeError, MshvError
from .memory import PAGE_SIZE, GuestMemory
from .messages import ApicEoi, HvMessage, InterceptHeader, IoPort, MemAccess, Msr, _Header
from .partition import HvcallResult, MsiRoute, PartitionFd
from .regs import Reg, RegisterValue, Segment, TableRegister
from .system import (
    DEFAULT_PT_FLAGS,
    EMU_KERNEL_ENV,
    EMULATED_KERNELS,
    PT_CPU_AND_XSAVE_FEATURES,
    PT_GPA_SUPER_PAGES,
    PT_LAPIC,
    PT_NESTED_VIRTUALIZATION,
    PT_SMT_ENABLED_GUEST,
    PT_X2APIC,
    MshvSystem,
    PartitionFeatures,
)
from .vp import VpFd

__all__ = [
    "DEFAULT_PT_FLAGS",
    "EMULATED_KERNELS",
    "EMU_KERNEL_ENV",
    "PAGE_SIZE",
    "PT_CPU_AND_XSAVE_FEATURES",
    "PT_GPA_SUPER_PAGES",
    "PT_LAPIC",
    "PT_NESTED_VIRTUALIZATION",
    "PT_SMT_ENABLED_GUEST",
    "PT_X2APIC",
    "ApicEoi",
    "GuestMemory",
    "HvMessage",
    "HvcallResult",
    "HypercallError",
    "InterceptHeader",
    "IoPort",
    "MemAccess",
    "MessageTypeError",
    "MshvError",
    "MshvSystem",
    "MsiRoute",
    "Msr",
    "PartitionFd",
    "PartitionFeatures",
    "Reg",
    "RegisterValue",
    "Segment",
    "TableRegister",
    "VpFd",
    "_Header",
]
