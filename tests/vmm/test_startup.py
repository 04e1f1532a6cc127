"""What a VMM's start costs, as the VMM itself records it (mshv_libvirt/vmm/phases.py).

The start is logged once, as one ``startup phases`` line at the first ``MSHV_RUN_VP``: every phase in
order, each stamp after the one before, the first (the daemon's fork, from /proc) before the VMM's first
line of Python. benchmarks/startup.py reads the same line for its breakdown.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.support.guests import TINY_BANNER
from tests.support.kernel import require_small_kernel
from tests.support.phases import STARTUP_PHASES
from tests.support.procfs import mappings_private_kib, private_kib
from tests.support.waits import wait_for
from tests.vmm.harness import VmmProcess

BOOT = 60  # seconds; the tiny guest is up in well under one on KVM
GUEST_RAM = "memfd:mshv-guest-ram"
# What loading a Linux kernel may leave behind, beyond what a tiny guest's VMM holds: the small test
# kernel's 2 MiB bzImage decompresses to a ~10 MiB ELF whose ~9 MiB of segments are copied into guest RAM.
KERNEL_LOAD_RESIDUE_KIB = 2048
LINE = re.compile(r"startup phases: spawn=(\d+\.\d+)((?: \w+=\+\d+\.\d+)+)\n")


def phase_lines(vm: VmmProcess) -> list[re.Match[str]]:
    return list(LINE.finditer(vm.stderr_path.read_text(errors="replace")))


@pytest.mark.kvm
def test_the_start_is_logged_once_phase_by_phase(kvm: None, tiny_kernel: Path, tmp_path: Path) -> None:
    with VmmProcess.start(tmp_path / "vm", tiny_kernel, vcpus=2, cmdline="console=ttyS0 tiny") as vm:
        vm.wait_serial(TINY_BANNER, timeout=BOOT)
        (line,) = wait_for(lambda: phase_lines(vm), BOOT, what=vm.diagnostics)
        stamps = [(name, float(at)) for name, at in re.findall(r"(\w+)=\+(\d+\.\d+)", line.group(2))]
        assert [name for name, _ in stamps] == list(STARTUP_PHASES), line.group(0)
        offsets = [at for _, at in stamps]
        assert offsets == sorted(offsets), line.group(0)
        # The fork has clock-tick resolution (10 ms): the first line of Python runs after it, or within a tick.
        assert offsets[0] > -0.011, line.group(0)
        vm.command("reset")  # a rebuild is no start: still one line
        vm.wait_serial(TINY_BANNER, timeout=BOOT, count=2)
        assert len(phase_lines(vm)) == 1, vm.diagnostics()


def beyond_guest_ram_kib(pid: int) -> int:
    return private_kib(pid) - mappings_private_kib(pid, lambda head, _size: GUEST_RAM in head)


@pytest.fixture(scope="session")
def small_kernel() -> Path:
    return require_small_kernel()


@pytest.mark.kvm
@pytest.mark.slow  # needs the small test kernel (built on first use); its start takes seconds
def test_a_linux_kernel_load_leaves_no_memory_behind(
    kvm: None, small_kernel: Path, tiny_kernel: Path, tmp_path: Path
) -> None:
    beyond: dict[str, int] = {}
    for name, kernel in (("tiny", tiny_kernel), ("linux", small_kernel)):
        with VmmProcess.start(tmp_path / name, kernel, memory_mib=256, cmdline="console=ttyS0 panic=-1") as vm:
            wait_for(lambda: phase_lines(vm), BOOT, what=vm.diagnostics)  # logged at the first RUN_VP: built
            beyond[name] = beyond_guest_ram_kib(vm.proc.pid)
    assert beyond["linux"] - beyond["tiny"] <= KERNEL_LOAD_RESIDUE_KIB, beyond


IMPORT = re.compile(r"^import time:\s+\d+ \|\s+\d+ \| ( *)(\S+)$", re.M)
# The prebuilt cffi module needs only cffi's C backend; these would mean C is parsed or compiled at start.
COMPILERS = ("cffi", "pycparser", "distutils", "setuptools")
# Everything of the package a VMM without virtio devices imports before its first RUN_VP. virtio, vhost-user,
# keymap and coredump load when a VM has such a device or a command needs them; a new module at start
# must be added here, on purpose.
PACKAGE_AT_START = frozenset(
    {"mshv_libvirt", "mshv_libvirt._mshv", "mshv_libvirt.atomicfile", "mshv_libvirt.proc"}
    | {f"mshv_libvirt.hv{m}" for m in ("", "._ffi", ".errors", ".ioctls", ".memory", ".messages", ".partition")}
    | {f"mshv_libvirt.hv.{m}" for m in ("regs", "system", "vp")}
    | {f"mshv_libvirt.vmm{m}" for m in ("", ".acpi", ".aml", ".builder", ".config", ".console", ".control")}
    | {f"mshv_libvirt.vmm.{m}" for m in ("images", "interrupts", "layout", "loader", "mmio", "mptable", "phases")}
    | {f"mshv_libvirt.vmm.{m}" for m in ("runloop", "runtime", "sandbox", "vcpu")}  # runloop: every VM runs it
    | {f"mshv_libvirt.vmm.devices{m}" for m in ("", ".acpi_pm", ".bus", ".i8042", ".ioapic", ".pvpanic", ".rtc")}
    | {f"mshv_libvirt.vmm.devices.{m}" for m in ("serial", "pci", "pci.bridge", "pci.config")}
)
# Other modules (the standard library's, cffi's backend) the package's code is first to import, in the tox
# environment (whose site hook already imported argparse, json, pathlib, re and more): 45 measured, after
# lazy imports took it from 60 (and the package's from 52 to 42).
OTHERS_AT_START = 45


def startup_imports(stderr: str) -> list[str]:
    """What the VMM's own code imported before its first RUN_VP: each ``-X importtime`` entry above the
    phases line whose outermost import is one of mshv_libvirt's (the interpreter's and site's are not)."""
    head = stderr[: stderr.index("startup phases:")]
    entries = [(len(m.group(1)), m.group(2)) for m in IMPORT.finditer(head)]
    out: list[str] = []
    pending: list[str] = []  # importtime prints an import after the ones it caused, those deeper
    for depth, name in entries:
        pending.append(name)
        if depth == 0:
            if name.startswith("mshv_libvirt"):
                out.extend(pending)
            pending = []
    return out


@pytest.mark.kvm
def test_the_vmm_starts_on_a_stated_set_of_modules(kvm: None, tiny_kernel: Path, tmp_path: Path) -> None:
    flags = ("-X", "importtime")
    with VmmProcess.start(tmp_path / "vm", tiny_kernel, cmdline="console=ttyS0 tiny", interpreter_flags=flags) as vm:
        wait_for(lambda: phase_lines(vm), BOOT, what=vm.diagnostics)
        maps = Path(f"/proc/{vm.proc.pid}/maps").read_text()
        modules = startup_imports(vm.stderr_path.read_text(errors="replace"))
    ours = {m for m in modules if m.startswith("mshv_libvirt")}
    others = sorted(m for m in modules if not m.startswith("mshv_libvirt"))
    assert ours <= PACKAGE_AT_START, sorted(ours - PACKAGE_AT_START)
    assert len(others) <= OTHERS_AT_START, others
    assert not [m for m in modules if m.split(".")[0] in COMPILERS], modules
    # No compilation at start: the cffi module is the extension built at install time, mapped from its file.
    assert re.search(r"/mshv_libvirt/_mshv\.[^/\n]*\.so$", maps, re.M), "the compiled module is not mapped"


@pytest.mark.needs("qemu-system-x86")
def test_qemu_boots_the_tiny_guest_through_its_real_mode_entry(tiny_kernel: Path, tmp_path: Path) -> None:
    """benchmarks/startup.py's baseline runs the same image: QEMU starts a bzImage in its real-mode setup
    code, which enters protected mode for start32, which enters long mode for start64 (our loader's entry)."""
    log = tmp_path / "serial.log"
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-m", "64", "-nodefaults", "-no-user-config", "-display", "none"]
    argv += ["-kernel", str(tiny_kernel), "-append", "console=ttyS0 tiny", "-serial", f"file:{log}"]
    qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        banner = f"{TINY_BANNER} cmdline=console=ttyS0 tiny\n"
        wait_for(
            lambda: log.exists() and banner in log.read_text(errors="replace"), BOOT, what=lambda: log.read_bytes()
        )
    finally:
        qemu.kill()  # the pid this test started
        qemu.wait()
