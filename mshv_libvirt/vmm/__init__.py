"""The VMM: one process per running domain (``python -m mshv_libvirt.vmm --config CONFIG.json``).

config.py   the JSON config the driver writes        builder.py  the build pipeline (steps)
loader.py   Linux x86 boot protocol, 64-bit entry     layout.py   guest memory map, page tables, GDT
acpi.py     RSDP/XSDT/FADT/DSDT/FACS/MADT             mmio.py     MOV decoder for MMIO intercepts
devices/    16550, IOAPIC, i8042 (+ keymap), ACPI PM,  vcpu.py     vCPU threads and exit handling
            pvpanic, buses
console.py  pty + serial log                          control.py  JSON-lines control socket
runtime.py  the process: main loop and lifecycle
"""
