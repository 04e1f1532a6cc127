"""The compiled vCPU run loop (abi/vmm/runloop.c): MSHV_RUN_VP and the hot exits in C.

The interface between the loop and Python is narrow on purpose:

* :class:`PortTable` (one per VM, filled by the builder before any vCPU runs, read-only after): the
  I/O ports the loop completes itself -- the ACPI PM timer, ports nobody claims (0x80 POST codes), the
  16550A whose registers live in C (vmm/devices/serial.py), reads of PCI configuration mechanism #1
  (vmm/devices/pci/bridge.py; its writes come back as exits), the CMOS RTC's index register and RAM
  reads (vmm/devices/rtc.py; its clock registers come back as exits), the i8042's status register as
  vmm/devices/i8042.py publishes it -- each also registered on the Python bus,
  which answers identically when no loop runs (fake VPs).
* :class:`CompiledRunLoop` (one per vCPU): ``run()`` returns only an exit Python must complete
  (every other intercept: devices that stay in Python, HLT with interrupts off, triple faults, EOIs,
  unknown messages) as the same :class:`HvMessage` ``VpFd.run()`` returns; a kick (EINTR, or
  :meth:`interrupt` before the next RUN_VP) raises InterruptedError; a failed call raises MshvError.
  An access the loop completed that left work for Python (the UART's interrupt line changed, its log
  is at its cap, the host may feed it input again) is passed to ``on_device_events`` in this thread,
  and the loop goes on.
  :meth:`stats` counts what it did, so the exits that still reach Python are measured.

cffi releases the GIL for the whole call: the guest runs while other threads run Python.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mshv_libvirt._mshv import ffi, lib
from mshv_libvirt.hv import HvMessage, MshvError, VpFd

# abi/vmm/runloop.h (kept out of the module's constants, which are the upstream ABI's only).
PORT_SINK = 1
PORT_PM_TIMER = 2
PORT_SERIAL = 3
PORT_PCI = 4
PORT_RTC = 5
PORT_STATUS = 6
LOOP_EXIT = 0
LOOP_KICKED = 1
LOOP_ERROR = 2
LOOP_DEVICE = 3


@dataclass(frozen=True)
class LoopStats:
    runs: int  # RUN_VP calls that returned a message
    fast_io: int  # port accesses completed in C
    halts: int  # HLTs with interrupts enabled, run again in C
    to_python: int  # exits handed to Python
    device_events: int  # completed accesses whose device events Python carried out


class PortTable:
    def __init__(self) -> None:
        table = lib.mshv_port_table_new()
        if table == ffi.NULL:
            raise MemoryError("mshv_port_table_new")
        self._table: Any = ffi.gc(table, lib.mshv_port_table_free)
        self.entries: list[tuple[int, int, int]] = []
        self._owners: list[object] = []

    def add(self, base: int, length: int, kind: int, arg: int = 0, owner: object = None) -> None:
        """``arg``: the PM timer's epoch, or the address of the C model ``owner`` holds, which the table
        keeps alive as long as a loop may use it."""
        rc = int(lib.mshv_port_table_add(self._table, base, length, kind, arg))
        if rc < 0:
            raise ValueError(f"port range {base:#x}+{length:#x}: {errno.errorcode.get(-rc, str(-rc))}")
        self.entries.append((base, length, kind))
        self._owners.append(owner)


class CompiledRunLoop:
    """Runs one VP; holds its table and VP so that neither goes while the loop can use them."""

    def __init__(self, table: PortTable, vp: VpFd, on_device_events: Callable[[int], None] | None = None) -> None:
        self._table = table
        self._vp = vp
        self._on_device_events = on_device_events
        loop = lib.mshv_vcpu_loop_new(table._table, vp.fileno(), vp.index, ffi.cast("void *", vp.run_buffer_address))
        if loop == ffi.NULL:
            raise MemoryError("mshv_vcpu_loop_new")
        self._loop: Any = ffi.gc(loop, lib.mshv_vcpu_loop_free)
        self._stats = ffi.new("struct mshv_loop_stats *")

    def run(self) -> HvMessage:
        rc = int(lib.mshv_vcpu_loop_run(self._loop))
        while rc == LOOP_DEVICE:
            events = int(lib.mshv_vcpu_loop_events(self._loop))
            if self._on_device_events is not None:
                self._on_device_events(events)
            rc = int(lib.mshv_vcpu_loop_run(self._loop))
        if rc == LOOP_EXIT:
            return self._vp.last_message()
        if rc == LOOP_KICKED:
            raise InterruptedError(errno.EINTR, "MSHV_RUN_VP interrupted")
        raise MshvError(int(lib.mshv_vcpu_loop_errno(self._loop)), "compiled run loop")

    def interrupt(self) -> None:
        """Make the loop return (InterruptedError) before its next RUN_VP; a kick ends a running one."""
        lib.mshv_vcpu_loop_interrupt(self._loop)

    def runs(self) -> int:
        return self.stats().runs

    def stats(self) -> LoopStats:
        lib.mshv_vcpu_loop_stats(self._loop, self._stats)
        s = self._stats
        return LoopStats(int(s.runs), int(s.fast_io), int(s.halts), int(s.to_python), int(s.device_events))
