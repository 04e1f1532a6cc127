"""The virtio-rng device thread under the VMM's sandbox, in a throw-away process: its allow-list serves
entropy (the real device path: poll on the ioeventfd, read the backend, write guest memory, fire the
irqfd) and anything beyond it ends the process with the device filter named."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SIGSYS_EXIT = 128 + 31

PRELUDE = """
import os, struct, time
from mshv_libvirt.vmm import builder, layout, sandbox
from mshv_libvirt.vmm.devices.bus import Bus
from mshv_libvirt.vmm.devices.pci.bridge import BarAllocator
from mshv_libvirt.vmm.devices.virtio import pci as vpci
from mshv_libvirt.vmm.devices.virtio.queue import DeviceMemory
from mshv_libvirt.vmm.devices.virtio.rng import VirtioRng
from mshv_libvirt.vmm.interrupts import MsiRouting
from tests.vmm.test_virtio import USED, BUFS, Rig, wait_for

system = builder.open_hypervisor("emulated")
partition = system.create_partition()
partition.initialize()
ram = builder.map_memory(partition, 16 << 20)
mmio = Bus("mmio")
routing = MsiRouting(partition)
source = os.open("/dev/urandom", os.O_RDONLY | os.O_CLOEXEC)
rng = VirtioRng(source)
function = vpci.VirtioPciFunction(rng, DeviceMemory(ram), routing, partition, mmio)
BarAllocator((layout.PCI_MMIO32_START, layout.PCI_MMIO32_SIZE), layout.pci_mmio64_window(16 << 20)).place(
    function.config
)
function.sync_bar()
sandbox.enter()  # everything is open: from here on the process list, and the device list on its thread
rng.start(function)
r = Rig(partition, ram, mmio, function, rng, [])
r.driver_init()
"""


def run(code: str) -> subprocess.CompletedProcess[str]:
    source = textwrap.dedent(PRELUDE) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, timeout=60)


def test_the_device_thread_serves_entropy_under_its_allow_list(kvm: None) -> None:
    res = run(
        """
        for i in range(20):  # enough rounds for the allocator and the locks to show every call they make
            r.post(i % 8, [4096], i)
            r.kick()
            wait_for(lambda: r.used_idx() == i + 1)
        wait_for(lambda: function.lines[0].fired == 20)
        print("served", rng.served, rng.thread.is_alive(), rng.error, flush=True)
        rng.stop()
        print("stopped", flush=True)
        """
    )
    assert res.returncode == 0, res
    assert res.stdout.splitlines() == ["served 81920 True None", "stopped"]


def test_a_call_beyond_the_device_list_ends_the_vmm() -> None:
    res = run(
        """
        nr = sandbox.syscall_number("openat")
        rng._serve = lambda queue: sandbox.issue_syscall(nr) and False  # as if a backend opened a file
        r.post(0, [16], 0)
        r.kick()
        time.sleep(10)
        print("not reached", flush=True)
        """
    )
    assert res.returncode == SIGSYS_EXIT, res
    line = res.stderr.strip().splitlines()[-1]
    assert "seccomp: thread virtio-rng (tid " in line, line
    assert "device filter) made the forbidden system call openat (257)" in line, line


def test_a_vcpu_thread_remaps_the_bar_as_linux_sizes_it(kvm: None) -> None:
    """Linux's BAR sizing turns memory decoding off and on again (pci_read_bases, each a config-space write
    exit on a vCPU thread): the doorbells' MSHV_IOEVENTFD deassign and assign run on that thread, under the
    vCPU list (measured: the emulated device's eventfd checks made the Linux test kernel's VMM exit on
    fcntl (72) while probing a virtio-blk disk)."""
    res = run(
        """
        import errno, threading
        from mshv_libvirt.vmm.devices.pci.config import COMMAND, COMMAND_MEMORY
        at = function.mapped_at
        def vcpu():
            sandbox.enter_thread(sandbox.VCPU, "vcpu0")
            command = function.config_read(COMMAND, 2)
            for _ in range(2):
                function.config_write(COMMAND, 2, command & ~COMMAND_MEMORY)
                function.config_write(COMMAND, 2, command)
        thread = threading.Thread(target=vcpu)
        thread.start()
        thread.join()
        try:  # registered again at the same address: a second registration is refused
            partition.ioeventfd(function.kicks[0], at + vpci.NOTIFY_OFFSET, 0)
        except OSError as err:
            print("doorbell", function.mapped_at == at, errno.errorcode[err.errno], flush=True)
        rng.stop()
        """
    )
    assert res.returncode == 0, res
    assert res.stdout.splitlines() == ["doorbell True EEXIST"]
