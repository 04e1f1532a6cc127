"""Two failure channels, named: a Linux errno, and a hypercall's HV_STATUS."""

from __future__ import annotations

import errno as _errno
import os

HV_STATUS_NAMES = {
    0x0000: "HV_STATUS_SUCCESS",
    0x0002: "HV_STATUS_INVALID_HYPERCALL_CODE",
    0x0003: "HV_STATUS_INVALID_HYPERCALL_INPUT",
    0x0004: "HV_STATUS_INVALID_ALIGNMENT",
    0x0005: "HV_STATUS_INVALID_PARAMETER",
    0x0006: "HV_STATUS_ACCESS_DENIED",
    0x0007: "HV_STATUS_INVALID_PARTITION_STATE",
    0x0008: "HV_STATUS_OPERATION_DENIED",
    0x0009: "HV_STATUS_UNKNOWN_PROPERTY",
    0x000A: "HV_STATUS_PROPERTY_VALUE_OUT_OF_RANGE",
    0x000B: "HV_STATUS_INSUFFICIENT_MEMORY",
    0x000D: "HV_STATUS_INVALID_PARTITION_ID",
    0x000E: "HV_STATUS_INVALID_VP_INDEX",
    0x0010: "HV_STATUS_NOT_FOUND",
    0x0011: "HV_STATUS_INVALID_PORT_ID",
    0x0012: "HV_STATUS_INVALID_CONNECTION_ID",
    0x0013: "HV_STATUS_INSUFFICIENT_BUFFERS",
    0x0014: "HV_STATUS_NOT_ACKNOWLEDGED",
    0x0015: "HV_STATUS_INVALID_VP_STATE",
    0x001D: "HV_STATUS_NO_RESOURCES",
    0x0020: "HV_STATUS_PROCESSOR_FEATURE_NOT_SUPPORTED",
    0x0041: "HV_STATUS_INVALID_LP_INDEX",
    0x0050: "HV_STATUS_INVALID_REGISTER_VALUE",
    0x0071: "HV_STATUS_OPERATION_FAILED",
    0x0078: "HV_STATUS_TIME_OUT",
    0x0079: "HV_STATUS_CALL_PENDING",
    0x0086: "HV_STATUS_VTL_ALREADY_ENABLED",
}

_EINVAL_STATUSES = {0x2, 0x3, 0x5, 0xD, 0xE, 0x11, 0x12, 0x41, 0x50}


def hv_status_to_errno(status: int) -> int:
    """The kernel's hv_result_to_errno(): unknown statuses are EIO."""
    if status == 0:
        return 0
    if status in _EINVAL_STATUSES:
        return _errno.EINVAL
    if status == 0xB:
        return _errno.ENOMEM
    return _errno.EIO


class MshvError(OSError):
    """An mshv ioctl failed; ``errno`` is what the kernel (or the emulated device) returned."""

    def __init__(self, err: int, ioctl: str, detail: str = "") -> None:
        self.ioctl = ioctl
        msg = f"{ioctl}: {os.strerror(err)}"
        if detail:
            msg += f" ({detail})"
        super().__init__(err, msg)


class HypercallError(MshvError):
    """MSHV_ROOT_HVCALL reached the hypervisor, which refused with ``status``."""

    def __init__(self, code: int, status: int, err: int | None = None) -> None:
        self.code = code
        self.status = status
        self.status_name = HV_STATUS_NAMES.get(status, f"HV_STATUS_{status:#06x}")
        super().__init__(
            err if err is not None else hv_status_to_errno(status) or _errno.EIO,
            "MSHV_ROOT_HVCALL",
            f"hypercall {code:#06x}: {self.status_name}",
        )


class MessageTypeError(ValueError):
    """An intercept message was read as a payload type it does not carry."""
