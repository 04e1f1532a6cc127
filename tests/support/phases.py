"""The VMM's startup phases, in the order its ``startup phases:`` line states them (mshv_libvirt/vmm/phases.py).

Written out here, not read from the VMM, so tests/vmm/test_startup.py checks the VMM against it;
benchmarks/startup.py prints its breakdown in the same order.
"""

STARTUP_PHASES = (
    "main",
    "imports",
    "config",
    "setup",
    "partition",
    "memory_map",
    "devices",
    "kernel_load",
    "tables",
    "first_run_vp",
)
