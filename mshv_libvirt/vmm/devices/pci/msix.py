"""The MSI-X capability (PCI 3.0 section 6.8.2): the table and PBA live in one of the device's BARs.

Each vector is an ``MsiLine``: in the VMM an eventfd bound with MSHV_IRQFD to a GSI of its own, whose
MSHV_SET_MSI_ROUTING entry is the vector's address/data while the vector is deliverable (MSI-X enabled,
function and vector unmasked) and absent otherwise. Firing a deliverable vector is one eventfd write
(from any thread; the hypervisor injects it). A masked vector's interrupt sets its pending bit instead
and is sent when the guest unmasks it, as the specification requires.
"""

from __future__ import annotations

import struct
import threading
from typing import Any, Protocol

from ..ioapic import MsiMessage
from .config import PciConfigSpace

CAP_ID = 0x11
ENTRY_SIZE = 16
CONTROL_ENABLE = 1 << 15
CONTROL_FUNCTION_MASK = 1 << 14
VECTOR_MASKED = 1 << 0
MAX_VECTORS = 2048
STATE_VERSION = 1


class MsiLine(Protocol):
    def route(self, msi: MsiMessage | None) -> None:
        """Deliver ``fire()`` as ``msi`` from now on (None: not deliverable)."""

    def fire(self) -> None: ...


class MsixCapability:
    def __init__(
        self, config: PciConfigSpace, lines: list[MsiLine], *, bar: int, table_offset: int, pba_offset: int
    ) -> None:
        n = len(lines)
        if not 1 <= n <= MAX_VECTORS:
            raise ValueError(f"MSI-X needs 1 to {MAX_VECTORS} vectors, not {n}")
        if table_offset % 8 or pba_offset % 8:
            raise ValueError("the MSI-X table and PBA must be 8-byte aligned in their BAR")
        self._config = config
        self._lines = lines
        self._lock = threading.Lock()
        self.table = bytearray(n * ENTRY_SIZE)
        for i in range(n):
            self.table[i * ENTRY_SIZE + 12] = VECTOR_MASKED  # masked at reset
        self.pending = bytearray(self.pba_size(n))
        self._routed: list[MsiMessage | None] = [None] * n
        body = struct.pack("<HII", n - 1, table_offset | bar, pba_offset | bar)
        self.offset = config.add_capability(
            CAP_ID, body, writable=struct.pack("<H", CONTROL_ENABLE | CONTROL_FUNCTION_MASK)
        )
        config.write_hooks.append(self._config_written)

    @staticmethod
    def table_size(vectors: int) -> int:
        return vectors * ENTRY_SIZE

    @staticmethod
    def pba_size(vectors: int) -> int:
        return ((vectors + 63) // 64) * 8

    @property
    def vectors(self) -> int:
        return len(self._lines)

    @property
    def control(self) -> int:
        return self._config.read(self.offset + 2, 2)

    @property
    def enabled(self) -> bool:
        return bool(self.control & CONTROL_ENABLE)

    def _config_written(self, offset: int, size: int) -> None:
        if offset < self.offset + 4 and offset + size > self.offset + 2:
            with self._lock:
                self._update_all()

    def _masked(self, vector: int) -> bool:
        control = self.control
        entry_masked = self.table[vector * ENTRY_SIZE + 12] & VECTOR_MASKED
        return not control & CONTROL_ENABLE or bool(control & CONTROL_FUNCTION_MASK) or bool(entry_masked)

    def _message(self, vector: int) -> MsiMessage:
        lo, hi, data, _ = struct.unpack_from("<IIII", self.table, vector * ENTRY_SIZE)
        return MsiMessage(lo, hi, data)

    def _update(self, vector: int) -> None:
        """Bring the vector's route in line with the table; a pending interrupt goes out once unmasked."""
        msi = None if self._masked(vector) else self._message(vector)
        if msi is not None and msi.address_hi:
            msi = None  # a destination above APIC id 255: the mshv routing table cannot hold it
        if msi != self._routed[vector]:
            self._lines[vector].route(msi)
            self._routed[vector] = msi
        byte, bit = divmod(vector, 8)
        if msi is not None and self.pending[byte] & (1 << bit):
            self.pending[byte] &= ~(1 << bit)
            self._lines[vector].fire()

    def _update_all(self) -> None:
        for vector in range(self.vectors):
            self._update(vector)

    def fire(self, vector: int) -> None:
        """The device signals ``vector`` (any thread)."""
        with self._lock:
            if self._routed[vector] is not None:
                self._lines[vector].fire()
            else:
                byte, bit = divmod(vector, 8)
                self.pending[byte] |= 1 << bit

    # -- BAR accesses ------------------------------------------------------------------------------

    def table_read(self, offset: int, size: int) -> int:
        if size not in (4, 8) or offset % size or offset + size > len(self.table):
            return 0
        with self._lock:
            return int.from_bytes(self.table[offset : offset + size], "little")

    def table_write(self, offset: int, size: int, value: int) -> None:
        if size not in (4, 8) or offset % size or offset + size > len(self.table):
            return  # the specification leaves other accesses undefined
        with self._lock:
            for word in range(size // 4):
                at = offset + 4 * word
                v = (value >> (32 * word)) & 0xFFFFFFFF
                field = at % ENTRY_SIZE
                if field == 0:
                    v &= ~0x3  # the message address is dword aligned
                elif field == 12:
                    v &= VECTOR_MASKED
                self.table[at : at + 4] = v.to_bytes(4, "little")
            for vector in range(offset // ENTRY_SIZE, (offset + size - 1) // ENTRY_SIZE + 1):
                self._update(vector)

    def pba_read(self, offset: int, size: int) -> int:
        if size not in (4, 8) or offset % size or offset + size > len(self.pending):
            return 0
        with self._lock:
            return int.from_bytes(self.pending[offset : offset + size], "little")

    # -- state -------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Table and pending bits (the control word is config space state)."""
        with self._lock:
            return {"version": STATE_VERSION, "table": self.table.hex(), "pending": self.pending.hex()}

    def load_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"MSI-X state version {state.get('version')!r} is not {STATE_VERSION}")
        table, pending = bytes.fromhex(state["table"]), bytes.fromhex(state["pending"])
        if len(table) != len(self.table) or len(pending) != len(self.pending):
            raise ValueError(f"MSI-X state is for {len(table) // ENTRY_SIZE} vectors, not {self.vectors}")
        with self._lock:
            self.table[:], self.pending[:] = table, pending
            self._update_all()
