"""The pvpanic ISA device (QEMU's ``pvpanic``, port 0x505): how a guest tells the host that it panicked.

Reading the port gives the events the device supports; writing bit 0 (PANICKED) reports a guest panic,
which QEMU turns into its GUEST_PANICKED event and libvirt into CRASHED/PANICKED and ``on_crash``. Only
PANICKED is offered: CRASH_LOADED (bit 1, "a kdump kernel took over") would need no host action.

The port is always there but not described in the ACPI tables (QEMU0001), since domain XML has no
``<panic>`` device here yet: Linux's pvpanic driver does not bind to it, guests that know the port (the
test guest) use it directly. It is the one way a guest crash reaches on_crash; a triple fault is a reset.
"""

from __future__ import annotations

from collections.abc import Callable

PORT = 0x505
PANICKED = 0x01


class PvPanic:
    def __init__(self, on_panic: Callable[[], None]) -> None:
        self._on_panic = on_panic

    def read(self, offset: int, size: int) -> int:
        return PANICKED

    def write(self, offset: int, size: int, value: int) -> None:
        if value & PANICKED:
            self._on_panic()
