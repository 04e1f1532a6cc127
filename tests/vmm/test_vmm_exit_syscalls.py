"""System calls per port-I/O exit of a real VMM's vCPU thread (issue 15, part 1).

The tiny guest under ``python -m mshv_libvirt.vmm``, on the console command ``b``, executes
TINY_BENCH_EXITS OUTs to port 0x80 (each completed by the compiled run loop, vmm/runloop.py).
strace attaches to the running VMM from outside (by the pid the harness started) before ``b`` and is
stopped, by its own pid, after ``BENCH-DONE``; the vCPU thread is the one that issued the KVM_RUNs.
Its calls per exit must stay within 2 (the kernel driver's RUN_VP plus the register hypercall), and
the emulated device's slow exit path (KVM_GET/SET_REGS, kcmp, process_vm_*) must stay off it: a
handful of those belong to the other exits of the window (the console's input interrupt, HLT), never
one per exit. Measured 2026-12-04 over the VMM's whole life with this workload: 1.067 per KVM_RUN
(KVM_RUN 20104, futex 1212, write 95, 4 each of KVM_GET_REGS and KVM_SET_REGS) while Python completed
every exit; in the window alone once the compiled loop did: KVM_RUN 20091, futex 80-152, write 20, 3 process_vm_*.
Python's part is checked twice: the VMM's count of the exits it handed to Python, and the futex calls
of GIL hand-overs that a Python completion per exit costs (strace's count, not the VMM's).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.support import straced
from tests.support.guests import TINY_BANNER, TINY_BENCH_DONE, TINY_BENCH_EXITS
from tests.support.waits import wait_for
from tests.vmm.harness import VmmProcess

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(shutil.which("strace") is None, reason="strace not on PATH"),  # CI: tests/support/prereqs.py
]

LIMIT = 2.0
OTHER_EXITS = 100  # bound on the window's exits besides the OUTs: console input, its interrupt, HLT
SLOW_PATH = ("ioctl KVM_GET_REGS", "ioctl KVM_SET_REGS", "kcmp", "process_vm_readv", "process_vm_writev")


def test_the_vcpu_thread_makes_at_most_two_system_calls_per_exit(tiny_vm: VmmProcess, tmp_path: Path) -> None:
    vm = tiny_vm
    vm.wait_serial(TINY_BANNER, timeout=120)
    if Path("/dev/mshv").exists():
        pytest.skip("/dev/mshv exists: the kernel's driver, not the emulated device, serves the exits")
    out = tmp_path / "strace.txt"
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-o", str(out), "-p", str(vm.proc.pid)])
    try:
        # Its halt monitor makes a call every 10 ms: the first line means every thread is attached.
        wait_for(lambda: out.exists() and out.stat().st_size > 0, timeout=30, what="strace attached to the VMM")
        python_before = vm.command("status")["python_exits"]
        vm.console_send(b"b")
        vm.wait_console(TINY_BENCH_DONE.encode(), timeout=600)
        python_exits = vm.command("status")["python_exits"] - python_before
    finally:
        tracer.send_signal(signal.SIGINT)  # strace detaches and writes out what it has
        tracer.wait(timeout=60)
    threads = straced.by_thread(out.read_text().splitlines())
    vcpu = max(threads.values(), key=lambda c: c["ioctl KVM_RUN"])
    exits = TINY_BENCH_EXITS  # the window's few other exits are charged to these
    per_exit = {name: round(n / exits, 4) for name, n in vcpu.most_common()}
    assert exits <= vcpu["ioctl KVM_RUN"] <= exits + OTHER_EXITS, per_exit  # one KVM_RUN per exit
    assert sum(vcpu[name] for name in SLOW_PATH) <= OTHER_EXITS, per_exit
    assert sum(vcpu.values()) / exits <= LIMIT, per_exit
    # The OUTs never reached Python; what did is the guest's idle polling (i8042 status and PM1_STS once per
    # LAPIC timer tick) while strace slows the window down: 152 of those seen, and as many futex calls.
    assert python_exits <= exits // 20, python_exits
    assert vcpu["futex"] <= exits // 50, per_exit
