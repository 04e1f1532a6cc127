"""mshv-libvirt: a libvirt driver for the Microsoft Hypervisor (/dev/mshv)."""

__version__ = "0.1.0"
