"""libvirt-style errors shared by every layer above hv/.

Numbers are libvirt's (``virErrorNumber`` / ``virErrorDomain``) so the RPC layer can
send them unchanged and clients print the messages they already know.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    INTERNAL_ERROR = 1
    NO_MEMORY = 2
    NO_SUPPORT = 3
    NO_CONNECT = 5
    INVALID_ARG = 8
    OPERATION_FAILED = 9
    NO_TARGET = 20
    NO_NAME = 21
    XML_ERROR = 27
    DOM_EXIST = 28
    OPERATION_DENIED = 29
    XML_DETAIL = 35
    SYSTEM_ERROR = 38
    RPC = 39
    NO_DOMAIN = 42
    NO_NETWORK = 43
    AUTH_FAILED = 45
    NO_STORAGE_POOL = 49
    NO_STORAGE_VOL = 50
    OPERATION_INVALID = 55
    CONFIG_UNSUPPORTED = 67
    OPERATION_TIMEOUT = 68
    ARGUMENT_UNSUPPORTED = 74
    NO_DOMAIN_METADATA = 80
    OVERFLOW = 82
    OPERATION_UNSUPPORTED = 84
    XML_INVALID_SCHEMA = 92
    DEVICE_MISSING = 99
    NO_NETWORK_PORT = 107


class ErrorDomain(IntEnum):
    NONE = 0
    XML = 5
    DOM = 6
    RPC = 7
    CONF = 9
    REMOTE = 13
    STORAGE = 18
    NETWORK = 19
    DOMAIN = 20
    NODEDEV = 22
    INTERFACE = 26
    SECRET = 30
    CPU = 31
    NWFILTER = 33
    DOMAIN_SNAPSHOT = 35
    SYSINFO = 37
    STREAMS = 38
    HYPERV = 43
    DOMAIN_CHECKPOINT = 69


# libvirt prefixes messages by code; clients print "error: <prefix>: <detail>".
_PREFIX = {
    ErrorCode.INTERNAL_ERROR: "internal error",
    ErrorCode.NO_SUPPORT: "this function is not supported by the connection driver",
    ErrorCode.INVALID_ARG: "invalid argument",
    ErrorCode.OPERATION_FAILED: "operation failed",
    ErrorCode.XML_ERROR: "XML error",
    ErrorCode.DOM_EXIST: "operation failed",
    ErrorCode.OPERATION_DENIED: "operation forbidden",
    ErrorCode.NO_DOMAIN: "Domain not found",
    ErrorCode.NO_STORAGE_POOL: "Storage pool not found",
    ErrorCode.NO_STORAGE_VOL: "Storage volume not found",
    ErrorCode.NO_NETWORK: "Network not found",
    ErrorCode.NO_NETWORK_PORT: "network port not found",
    ErrorCode.OPERATION_INVALID: "Requested operation is not valid",
    ErrorCode.CONFIG_UNSUPPORTED: "unsupported configuration",
    ErrorCode.OPERATION_TIMEOUT: "Timed out during operation",
    ErrorCode.ARGUMENT_UNSUPPORTED: "argument unsupported",
    ErrorCode.NO_DOMAIN_METADATA: "metadata not found",
    ErrorCode.OVERFLOW: "numerical overflow",
    ErrorCode.OPERATION_UNSUPPORTED: "Operation not supported",
    ErrorCode.OVERFLOW: "numerical overflow",
    ErrorCode.XML_INVALID_SCHEMA: "XML document failed to validate against schema",
    ErrorCode.DEVICE_MISSING: "device not found",
}
# Codes whose message is not "<prefix>: <detail>" (libvirt's virErrorMsgStrings): (without, with detail).
_FORMATS = {
    ErrorCode.NO_TARGET: ("missing target information for device", "missing target information for device {}"),
    ErrorCode.NO_NAME: ("missing name information", "missing name information in {}"),
    ErrorCode.XML_DETAIL: ("parser error", "{}"),
}


class VirtError(Exception):
    """An error reported to libvirt clients as ``remote_error``."""

    def __init__(
        self,
        code: ErrorCode,
        detail: str,
        domain: ErrorDomain = ErrorDomain.DOMAIN,
    ) -> None:
        self.code = code
        self.domain = domain
        # No error reaches a client without a reason: an empty detail is a bug, but still says what failed.
        self.detail = detail if detail.strip() else "no reason was given"
        prefix = _PREFIX.get(code)
        detail = detail.strip() and detail  # whitespace alone is no detail
        if code in _FORMATS:
            bare, fmt = _FORMATS[code]
            self.message = fmt.format(detail) if detail else bare
        elif prefix:
            # libvirt prints the bare prefix when there is no detail (virErrorMsg with info NULL)
            self.message = f"{prefix}: {detail}" if detail else prefix
        else:
            self.message = self.detail
        super().__init__(self.message)


def unsupported(detail: str) -> VirtError:
    return VirtError(ErrorCode.CONFIG_UNSUPPORTED, detail, ErrorDomain.DOMAIN)


def invalid_operation(detail: str) -> VirtError:
    return VirtError(ErrorCode.OPERATION_INVALID, detail, ErrorDomain.DOMAIN)


def no_domain(detail: str) -> VirtError:
    return VirtError(ErrorCode.NO_DOMAIN, detail, ErrorDomain.DOMAIN)


def invalid_argument(detail: str, domain: ErrorDomain = ErrorDomain.DOMAIN) -> VirtError:
    """libvirt's virReportInvalidArg and its virCheck*Arg checks: INVALID_ARG whose message is the bare
    text (no "invalid argument: " prefix, unlike virReportError's)."""
    err = VirtError(ErrorCode.INVALID_ARG, detail, domain)
    err.message = detail
    err.args = (detail,)
    return err


def describe(err: BaseException) -> str:
    """``str(err)``, never empty: an exception without a message is named by its type."""
    text = str(err).strip()
    return text if text else type(err).__name__
