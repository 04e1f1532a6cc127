"""XDR (RFC 4506) as libvirt's rpcgen uses it: big-endian, 4-byte alignment.

rpcgen encodes ``char``/``short`` (and their unsigned forms) as 4-byte ints, so callers use
``int``/``uint`` for them. Every variable-length item is bounded by the caller's maximum, so a
hostile length word can never make us allocate or loop more than the protocol allows.
"""

from __future__ import annotations

import struct

# The codec's method names (int, bool, ...) shadow the builtins inside the classes.
_Int = int
_Bool = bool

_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")
_U64 = struct.Struct(">Q")
_F64 = struct.Struct(">d")


class XdrError(ValueError):
    """The bytes are not a valid encoding of the expected type (or exceed a limit)."""


def _pad(n: _Int) -> _Int:
    return (4 - n % 4) % 4


class Packer:
    def __init__(self) -> None:
        self._buf = bytearray()

    def getvalue(self) -> bytes:
        return bytes(self._buf)

    def int(self, v: _Int) -> None:
        self._buf += _I32.pack(v)

    def uint(self, v: _Int) -> None:
        self._buf += _U32.pack(v)

    def hyper(self, v: _Int) -> None:
        self._buf += _I64.pack(v)

    def uhyper(self, v: _Int) -> None:
        self._buf += _U64.pack(v)

    def bool(self, v: _Bool) -> None:
        self._buf += _I32.pack(1 if v else 0)

    def double(self, v: float) -> None:
        self._buf += _F64.pack(v)

    def encoded(self, data: bytes) -> None:
        """Bytes that already are XDR (another Packer's output)."""
        self._buf += data

    def opaque_fixed(self, data: bytes, n: _Int) -> None:
        if len(data) != n:
            raise XdrError(f"fixed opaque needs {n} bytes, got {len(data)}")
        self._buf += data + b"\0" * _pad(n)

    def opaque(self, data: bytes) -> None:
        self.uint(len(data))
        self._buf += data + b"\0" * _pad(len(data))

    def string(self, s: str) -> None:
        self.opaque(s.encode())

    def opt_string(self, s: str | None) -> None:
        if s is None:
            self.uint(0)
        else:
            self.uint(1)
            self.string(s)


class Unpacker:
    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._pos = 0

    def _take(self, n: _Int) -> memoryview:
        end = self._pos + n
        if n < 0 or end > len(self._data):
            raise XdrError("unexpected end of data")
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def int(self) -> _Int:
        return _Int(_I32.unpack(self._take(4))[0])

    def uint(self) -> _Int:
        return _Int(_U32.unpack(self._take(4))[0])

    def hyper(self) -> _Int:
        return _Int(_I64.unpack(self._take(8))[0])

    def uhyper(self) -> _Int:
        return _Int(_U64.unpack(self._take(8))[0])

    def bool(self) -> _Bool:
        v = self.int()
        if v not in (0, 1):
            raise XdrError(f"invalid boolean {v}")
        return v == 1

    def double(self) -> float:
        return float(_F64.unpack(self._take(8))[0])

    def opaque_fixed(self, n: _Int) -> bytes:
        data = bytes(self._take(n))
        self._take(_pad(n))
        return data

    def opaque(self, maximum: _Int) -> bytes:
        n = self.uint()
        if n > maximum:
            raise XdrError(f"length {n} exceeds the limit {maximum}")
        return self.opaque_fixed(n)

    def string(self, maximum: _Int) -> str:
        raw = self.opaque(maximum)
        try:
            return raw.decode()
        except UnicodeDecodeError as err:
            raise XdrError("string is not valid UTF-8") from err

    def opt_string(self, maximum: _Int) -> str | None:
        present = self.uint()
        if present == 0:
            return None
        if present != 1:
            raise XdrError(f"invalid optional marker {present}")
        return self.string(maximum)

    def array_len(self, maximum: _Int) -> _Int:
        n = self.uint()
        if n > maximum:
            raise XdrError(f"array of {n} exceeds the limit {maximum}")
        return n

    def done(self) -> None:
        if self._pos != len(self._data):
            raise XdrError(f"{len(self._data) - self._pos} trailing bytes")
