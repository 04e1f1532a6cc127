"""System calls per port-I/O exit through the emulated /dev/mshv (issue 15, part 1).

With the kernel driver an exit costs the VMM two system calls: MSHV_RUN_VP, and the register
hypercall that completes the intercept. The emulated device runs inside the VMM, so its own work is
what counts: at most 2 system calls per exit on the thread that runs the VP, one of them the
KVM_RUN the exit needs -- registers from KVM_CAP_SYNC_REGS (no KVM_GET/SET_REGS), KVM's pending
completion merged into the next KVM_RUN, no kcmp, no process_vm_readv/writev probes of buffers
already checked, the signal mask left alone.

Oracle: strace, outside the code under test, tracing a helper process (tests/emu/io_exit_workload.py)
that runs a fixed workload -- a guest looping over IN and OUT, completed as vmm/vcpu.py completes
them -- and counting only the system calls of the VP's thread between two marker calls. Measured
before the change (2026-12-04, same workload shape): 24.1 per exit (10 process_vm_readv, 4 kcmp,
2 each of KVM_RUN, KVM_GET_REGS, KVM_SET_REGS, rt_sigprocmask, process_vm_writev).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import straced

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.usefixtures("kvm"),
    pytest.mark.skipif(shutil.which("strace") is None, reason="strace not on PATH"),  # CI: tests/support/prereqs.py
]

ROOT = Path(__file__).resolve().parents[2]
ITERATIONS = 1000  # two exits each
LIMIT = 2.0
# What the slow exit path cost; none of it may come back between the markers.
SLOW_PATH = (
    "ioctl KVM_GET_REGS",
    "ioctl KVM_SET_REGS",
    "ioctl KVM_GET_SREGS",
    "ioctl KVM_SET_SREGS",
    "kcmp",
    "process_vm_readv",
    "process_vm_writev",
    "rt_sigprocmask",
)


def test_a_port_io_exit_costs_at_most_two_system_calls(tmp_path: Path) -> None:
    out = tmp_path / "strace.txt"
    proc = subprocess.run(
        [
            "strace",
            "-f",
            "-qq",
            "-o",
            str(out),
            sys.executable,
            "-m",
            "tests.emu.io_exit_workload",
            str(ITERATIONS),
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    if report["backend"] != "emulated":
        pytest.skip("/dev/mshv exists: the kernel's driver, not the emulated device, serves the exits")
    exits = report["exits"]
    calls = straced.between(out.read_text().splitlines(), f"{tmp_path}/begin", f"{tmp_path}/end", report["tid"])
    per_exit = {name: round(n / exits, 3) for name, n in calls.most_common()}
    assert {name: per_exit[name] for name in SLOW_PATH if name in calls} == {}, per_exit
    assert calls["ioctl KVM_RUN"] == exits, per_exit  # one KVM_RUN per exit, none to complete it
    assert sum(calls.values()) / exits <= LIMIT, per_exit
