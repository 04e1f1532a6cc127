"""What the tests need from the host, decided in one place.

Each prerequisite has a probe that answers None (present) or why it is missing, and the Debian
package that provides it (what ``scripts/install-deps.sh`` installs). ``tests/conftest.py`` works out
which prerequisites the collected tests need (markers, fixtures, the module table below), probes each
once, and then either skips the tests that lack one or, under ``CI``, ends the run before any test
with a message naming what is missing.

"kvm" means "guest code really runs here": it is decided by creating a VM and running one guest
instruction through the same ``mshv_libvirt.hv`` path the VMM uses, not by looking at /dev/kvm.
"""

from __future__ import annotations

import functools
import importlib.util
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Prerequisite:
    name: str
    source: str  # where it comes from: a Debian package that scripts/install-deps.sh installs, or how else
    probe: Callable[[], str | None]
    debian: bool = True  # ``source`` is a Debian package name


def _tools(*names: str) -> Callable[[], str | None]:
    def probe() -> str | None:
        absent = [n for n in names if shutil.which(n) is None]
        return f"{', '.join(absent)} not on PATH" if absent else None

    return probe


def _module(name: str) -> Callable[[], str | None]:
    def probe() -> str | None:
        return None if importlib.util.find_spec(name) is not None else f"Python module {name} is not importable"

    return probe


def _file(path: str) -> Callable[[], str | None]:
    def probe() -> str | None:
        return None if Path(path).is_file() else f"{path} does not exist"

    return probe


def _netns() -> str | None:
    """Network namespaces with a tap in them: root (CAP_NET_ADMIN), /dev/net/tun and ip."""
    import os

    if os.geteuid() != 0:
        return "not root: network namespaces and taps need CAP_NET_ADMIN"
    if not Path("/dev/net/tun").exists():
        return "/dev/net/tun does not exist"
    return _tools("ip")()


def probe_guest_execution() -> str | None:
    """Create a partition (a KVM VM on the emulated device), map memory, run ``out`` in real mode and
    expect the port-I/O intercept: None when that works, else the step that failed and its error."""
    try:
        from mshv_libvirt import hv
    except ImportError as err:
        return f"mshv_libvirt is not built: {err}"
    step = "open the hypervisor device"
    try:
        with hv.MshvSystem.open() as system:
            step = "create a partition"
            partition = system.create_partition()
            mem = hv.GuestMemory(1 << 20)
            try:
                step = "initialize the partition"
                partition.initialize()
                step = "map guest memory"
                partition.map_memory(0, mem)
                # real mode at 0x1000: mov dx,0x3f8; mov al,'K'; out dx,al; cli; hlt
                mem.write(0x1000, bytes([0xBA, 0xF8, 0x03, 0xB0, ord("K"), 0xEE, 0xFA, 0xF4]))
                step = "create a VP"
                vp = partition.create_vp(0)
                try:
                    vp.set_registers({hv.Reg.CS: hv.Segment(0, 0xFFFF, 0, 0x9B), hv.Reg.RIP: 0x1000})
                    step = "run guest code"
                    io = vp.run().as_io_port()
                    if (io.port, io.rax & 0xFF) != (0x3F8, ord("K")):
                        return f"guest code ran but its out reached port {io.port:#x} with {io.rax & 0xFF:#x}"
                finally:
                    vp.close()
                partition.unmap_memory(0, mem)
            finally:
                partition.close()
                mem.close()
    except Exception as err:  # any failure means "guests cannot run here": say which step
        return f"cannot {step}: {type(err).__name__}: {err}"
    return None


PREREQUISITES: dict[str, Prerequisite] = {
    p.name: p
    for p in (
        Prerequisite("kvm", "/dev/kvm usable by this user, or /dev/mshv", probe_guest_execution, debian=False),
        Prerequisite("binutils", "binutils", _tools("as", "ld", "objcopy", "nm")),
        Prerequisite("gcc", "gcc", _tools("gcc")),
        Prerequisite("virsh", "libvirt-clients", _tools("virsh")),
        Prerequisite("libvirt-python", "pip: libvirt-python (tox's test extra)", _module("libvirt"), debian=False),
        Prerequisite("libvirt-schemas", "libvirt0", _file("/usr/share/libvirt/schemas/domain.rng")),
        Prerequisite("virt-install", "virtinst", _tools("virt-install")),
        Prerequisite("virt-manager", "virt-manager", _tools("virt-manager")),
        Prerequisite("xvfb", "xvfb", _tools("Xvfb")),
        Prerequisite("qemu-img", "qemu-utils", _tools("qemu-img")),
        Prerequisite("qemu-storage-daemon", "qemu-system-common", _tools("qemu-storage-daemon")),  # virtio-blk
        # libvirt's QEMU driver answers domcapabilities only with its emulator: the oracle for <disk>'s shape
        Prerequisite("qemu-system-x86", "qemu-system-x86", _tools("qemu-system-x86_64")),
        # libvirt's own daemon, whose storage and network drivers the relay tests talk to
        Prerequisite("libvirtd", "libvirt-daemon", _file("/usr/sbin/libvirtd")),
        Prerequisite("dnsmasq", "dnsmasq-base", _file("/usr/sbin/dnsmasq")),  # libvirt's network driver
        Prerequisite("iproute2", "iproute2", _tools("ip", "ss")),  # ss: sockets' queues (procfs.unread_socket_bytes)
        Prerequisite("netns", "root, /dev/net/tun and iproute2", _netns, debian=False),  # virtio-net tests
        Prerequisite("iptables", "iptables", _tools("iptables-save", "ip6tables-save")),
        Prerequisite("ping", "iputils-ping", _tools("ping")),  # the host pings a guest kernel
        Prerequisite("iasl", "acpica-tools", _tools("iasl")),  # reads the generated ACPI tables back
        Prerequisite("systemd-analyze", "systemd", _tools("systemd-analyze")),
        Prerequisite("util-linux", "util-linux", _tools("unshare", "runuser")),
        Prerequisite("busybox-static", "busybox-static", _tools("busybox")),
        Prerequisite("apt", "apt", _tools("apt-get", "apt-cache", "dpkg-deb")),  # the Linux guest's kernel
        Prerequisite("strace", "strace", _tools("strace")),  # counts the system calls of an exit
    )
}

# Prerequisites implied by a fixture anywhere in a test's fixture closure.
FIXTURE_NEEDS: dict[str, tuple[str, ...]] = {
    "kvm": ("kvm",),
    "tiny_kernel": ("binutils",),
}

# Prerequisites of whole directories or modules whose tests skip themselves without them (the module's
# own check stays as the fallback; this table lets a CI run name them before it starts).
PATH_NEEDS: dict[str, tuple[str, ...]] = {
    "tests/e2e/": ("virsh",),
    "tests/e2e/test_python.py": ("libvirt-python", "libvirt-schemas"),
    "tests/e2e/test_policies.py": ("libvirt-python",),
    "tests/e2e/test_reliability.py": ("libvirt-python",),
    "tests/e2e/test_virt_install.py": ("virt-install", "libvirtd", "libvirt-python", "qemu-img", "qemu-storage-daemon"),
    "tests/e2e/test_virt_manager.py": ("virt-manager", "xvfb", "libvirtd", "libvirt-python", "qemu-img"),
    "tests/e2e/test_paths.py": ("systemd-analyze", "util-linux"),
    "tests/e2e/test_disks.py": ("qemu-storage-daemon", "qemu-img", "libvirt-python", "libvirtd", "qemu-system-x86"),
    "tests/e2e/test_disk_survival.py": ("qemu-storage-daemon", "qemu-img"),
    "tests/e2e/test_density.py": ("libvirt-python", "qemu-img", "qemu-storage-daemon", "iproute2"),
    "tests/e2e/test_storage_relay.py": ("libvirtd", "qemu-img", "libvirt-python"),
    "tests/e2e/test_network_relay.py": ("libvirtd", "dnsmasq", "iproute2", "iptables", "libvirt-python"),
    "tests/e2e/test_interfaces.py": ("libvirtd", "dnsmasq", "iproute2", "iptables", "netns", "busybox-static"),
    "tests/e2e/test_interface_traffic.py": ("iproute2", "netns"),
    "tests/e2e/test_kernel_dhcp.py": ("libvirtd", "dnsmasq", "iproute2", "iptables", "libvirt-python", "ping"),
    "tests/driver/test_taps.py": ("netns",),
    "tests/emu/test_c_harness.py": ("gcc",),
    "tests/emu/test_exit_syscalls.py": ("strace",),
    "tests/domain/test_domain_xml.py": ("libvirt-schemas",),
    "tests/vmm/test_mmio_decode.py": ("binutils",),
    "tests/vmm/test_vmm_exit_syscalls.py": ("strace",),
    "tests/vmm/test_vhost_user.py": ("qemu-storage-daemon", "qemu-img"),
    "tests/vmm/test_virtio_blk.py": ("qemu-storage-daemon", "qemu-img"),
    "tests/vmm/test_blk_handover.py": ("qemu-storage-daemon", "qemu-img"),
    "tests/vmm/test_net_io.py": ("netns",),
    "tests/vmm/test_net_handover.py": ("netns",),
    "tests/vmm/test_virtio_net.py": ("netns",),
    "tests/vmm/test_virtio_net_vmm.py": ("netns",),
    "tests/vmm/test_linux_guest.py": ("kvm", "busybox-static", "apt"),
}

# Skips that describe the host rather than a missing tool; a CI run allows these (substring match).
NOT_APPLICABLE = ("/dev/mshv exists", "kvm-pvm only")


@functools.cache
def missing(name: str) -> str | None:
    """Why prerequisite ``name`` is absent (probed once per process), None when present."""
    return PREREQUISITES[name].probe()


def describe(name: str) -> str:
    why = missing(name)
    return f"{name} ({why}; from: {PREREQUISITES[name].source})"


__all__ = [
    "FIXTURE_NEEDS",
    "NOT_APPLICABLE",
    "PATH_NEEDS",
    "PREREQUISITES",
    "Prerequisite",
    "describe",
    "missing",
    "probe_guest_execution",
]
