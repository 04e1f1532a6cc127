"""A fixed port-I/O workload for counting system calls per exit (tests/emu/test_exit_syscalls.py).

Run as ``python -m tests.emu.io_exit_workload ITERATIONS MARKER_DIR``. The guest loops over
``in al, 0x81; out 0x80, al``; every iteration is two exits, completed the way the VMM completes
them (vmm/vcpu.py): the IN by writing RAX and RIP, the OUT by writing RIP, through
``mshv_libvirt.hv``. The OUT shows what the guest got from the IN, so a completion that did not
reach the guest fails the run. Between two marker system calls (``stat`` of MARKER_DIR/begin and
MARKER_DIR/end, which fail) only the exits happen, so a tracer can cut out exactly their system
calls. Prints one JSON line: exits done, the backend, the pid of the thread that ran the VP.
"""

from __future__ import annotations

import json
import os
import sys

from mshv_libvirt.hv import GuestMemory, MshvSystem, Reg, VpFd
from mshv_libvirt.vmm import builder, layout

CODE = 0x1000
IN_PORT, OUT_PORT = 0x81, 0x80
# in al, 0x81 ; out 0x80, al ; jmp back to the in (hand-assembled: e4 ib, e6 ib, eb rel8)
GUEST = bytes([0xE4, IN_PORT, 0xE6, OUT_PORT, 0xEB, 0xFA])
WARM_UP = 8  # iterations before the first marker: first-use checks happen there


def iteration(vp: VpFd, value: int) -> None:
    io = vp.run().as_io_port()
    if io.is_write or io.port != IN_PORT:
        raise SystemExit(f"expected IN from {IN_PORT:#x}, got {io}")
    vp.set_registers({Reg.RAX: (io.rax & ~0xFF) | value, Reg.RIP: io.rip + io.instruction_length})
    io = vp.run().as_io_port()
    if not io.is_write or io.port != OUT_PORT or io.rax & 0xFF != value:
        raise SystemExit(f"expected OUT of {value:#x} to {OUT_PORT:#x}, got {io}")
    vp.set_registers({Reg.RIP: io.rip + io.instruction_length})


def marker(directory: str, name: str) -> None:
    """One system call a tracer can find by its path (the file does not exist)."""
    try:
        os.stat(os.path.join(directory, name))
    except FileNotFoundError:
        pass


def main() -> int:
    iterations, marker_dir = int(sys.argv[1]), sys.argv[2]
    system = MshvSystem.open(mode="auto")
    pt = system.create_partition()
    pt.initialize()
    mem = GuestMemory(0x200000)
    pt.map_memory(0, mem, writable=True, executable=True)
    _, tables = layout.identity_page_tables()
    mem.write(layout.PML4_ADDR, tables)
    mem.write(layout.GDT_ADDR, layout.gdt_bytes())
    mem.write(CODE, GUEST)
    vp = pt.create_vp(0)
    vp.set_registers(builder.boot_registers(CODE))
    for i in range(WARM_UP):
        iteration(vp, i & 0xFF)
    marker(marker_dir, "begin")
    for i in range(iterations):
        iteration(vp, (i * 7 + 1) & 0xFF)
    marker(marker_dir, "end")
    print(json.dumps({"exits": 2 * iterations, "backend": system.backend, "tid": os.getpid()}))
    vp.close()
    pt.close()
    mem.close()
    system.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
