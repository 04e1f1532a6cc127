"""The procedure table's vocabulary: one row per implemented REMOTE_PROGRAM procedure.

A row names the procedure number, its argument types (decoded in order from the call's XDR payload),
its return type and the handler, which receives the decoded values and returns the value to encode
(or an awaitable of it, when it must wait for a VMM or the disk). Everything else comes from
libvirt's own table (``procnames.PROCEDURE_NAMES``): the public API name clients see in errors and
whether that API refuses read-only connections. Dispatch, the read-only policy and the names all
come from here, so no procedure needs a function whose only work is to decode, look up and call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mshv_libvirt.errors import ErrorCode, ErrorDomain, VirtError

from .procnames import PROCEDURE_NAMES
from .protocol import STRING_MAX
from .xdr import Packer, Unpacker

if TYPE_CHECKING:
    from .dispatch import Session

UUID_LEN = 16

Handler = Callable[..., Any]
Encoder = Callable[[Any], bytes]


class Arg:
    """One argument: ``decode`` reads its XDR form; ``finish`` turns it into the handler's value.

    Finishing happens after the whole payload was decoded, flags before domains (``order``): like
    libvirt's drivers, a call with bad flags is refused before the domain is looked up.
    """

    order = 0

    def decode(self, u: Unpacker) -> Any:
        raise NotImplementedError

    def finish(self, s: Session, value: Any, proc: Procedure) -> Any:
        return value


@dataclass(frozen=True)
class _Simple(Arg):
    read: Callable[[Unpacker], Any]

    def decode(self, u: Unpacker) -> Any:
        return self.read(u)


INT = _Simple(lambda u: u.int())
UINT = _Simple(lambda u: u.uint())
HYPER = _Simple(lambda u: u.hyper())
UHYPER = _Simple(lambda u: u.uhyper())
STR = _Simple(lambda u: u.string(STRING_MAX))  # remote_nonnull_string
OPT_STR = _Simple(lambda u: u.opt_string(STRING_MAX))  # remote_string
UUID = _Simple(lambda u: u.opaque_fixed(UUID_LEN))


def unpack_domain(u: Unpacker) -> tuple[str, bytes, int]:
    """remote_nonnull_domain: name, uuid, id."""
    name = u.string(STRING_MAX)
    raw = u.opaque_fixed(UUID_LEN)
    return name, raw, u.int()


class _Domain(Arg):
    """remote_nonnull_domain, resolved to the driver's Domain (by uuid, as libvirt's drivers do)."""

    order = 2

    def decode(self, u: Unpacker) -> Any:
        return unpack_domain(u)

    def finish(self, s: Session, value: Any, proc: Procedure) -> Any:
        name, raw, _ = value
        return s.manager.resolve(name, raw)


DOM = _Domain()


@dataclass(frozen=True)
class Flags(Arg):
    """An ``unsigned int flags`` argument; bits outside ``allowed`` get libvirt's virCheckFlags error."""

    allowed: int
    order = 1

    def decode(self, u: Unpacker) -> Any:
        return u.uint()

    def finish(self, s: Session, value: Any, proc: Procedure) -> Any:
        if value & ~self.allowed:
            raise VirtError(
                ErrorCode.INVALID_ARG, f"unsupported flags (0x{value & ~self.allowed:x}) in function {proc.name}"
            )
        return value


class _Call(Arg):
    """Not on the wire: the call itself, for handlers that need its serial (streams)."""

    def decode(self, u: Unpacker) -> Any:
        return None


CALL = _Call()


# ---- return types ------------------------------------------------------------------------------------------


def ret_none(_value: Any) -> bytes:
    return b""


def ret_raw(value: Any) -> bytes:
    """The handler packed the reply itself (structures with several fields)."""
    assert isinstance(value, bytes)
    return value


def ret_int(value: Any) -> bytes:
    p = Packer()
    p.int(int(value))
    return p.getvalue()


def ret_bool(value: Any) -> bytes:
    return ret_int(1 if value else 0)


def ret_uint(value: Any) -> bytes:
    p = Packer()
    p.uint(int(value))
    return p.getvalue()


def ret_uhyper(value: Any) -> bytes:
    p = Packer()
    p.uhyper(int(value))
    return p.getvalue()


def ret_str(value: Any) -> bytes:
    p = Packer()
    p.string(str(value))
    return p.getvalue()


# ---- rows --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Procedure:
    number: int
    handler: Handler
    args: tuple[Arg, ...] = ()
    ret: Encoder = ret_none
    name: str = ""  # the public API name, from libvirt's table
    readonly_denied: bool = False  # the API refuses read-only connections
    error_domain: ErrorDomain = ErrorDomain.NONE
    finish_order: tuple[int, ...] = field(default=())  # argument indexes in finishing order


def proc(number: int, handler: Handler, *args: Arg, ret: Encoder = ret_none) -> Procedure:
    """A table row; name and read-only policy are libvirt's for that number."""
    name, readonly_check, domain, event = PROCEDURE_NAMES[number]
    if event:
        raise ValueError(f"procedure {number} ({name}) is an event message, not a call")
    order = tuple(sorted(range(len(args)), key=lambda i: args[i].order))
    return Procedure(number, handler, args, ret, name, readonly_check, ErrorDomain(domain), order)


def table(*rows: Procedure) -> dict[int, Procedure]:
    out: dict[int, Procedure] = {}
    for row in rows:
        if row.number in out:
            raise ValueError(f"procedure {row.number} is listed twice")
        out[row.number] = row
    return out


def api_name(number: int) -> str | None:
    """libvirt's public API name for a procedure number (None: not a 9.0 call, or an event message)."""
    info = PROCEDURE_NAMES.get(number)
    return None if info is None or info[3] else info[0]


def readonly_denied(number: int) -> bool:
    info = PROCEDURE_NAMES.get(number)
    return info is not None and info[1]


def error_domain(number: int) -> ErrorDomain:
    info = PROCEDURE_NAMES.get(number)
    return ErrorDomain(info[2]) if info is not None else ErrorDomain.NONE
