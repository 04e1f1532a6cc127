"""What a VMM's start costs, as the VMM itself records it (mshv_libvirt/vmm/phases.py).

The start is logged once, as one ``startup phases`` line at the first ``MSHV_RUN_VP``: every phase in
order, each stamp after the one before, the first (the daemon's fork, from /proc) before the VMM's first
line of Python. benchmarks/startup.py reads the same line for its breakdown.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.guests import TINY_BANNER
from tests.support.waits import wait_for
from tests.vmm.harness import VmmProcess

pytestmark = pytest.mark.kvm

BOOT = 60  # seconds; the tiny guest is up in well under one on KVM
PHASES = (
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
LINE = re.compile(r"startup phases: spawn=(\d+\.\d+)((?: \w+=\+\d+\.\d+)+)\n")


def phase_lines(vm: VmmProcess) -> list[re.Match[str]]:
    return list(LINE.finditer(vm.stderr_path.read_text(errors="replace")))


def test_the_start_is_logged_once_phase_by_phase(kvm: None, tiny_kernel: Path, tmp_path: Path) -> None:
    with VmmProcess.start(tmp_path / "vm", tiny_kernel, vcpus=2, cmdline="console=ttyS0 tiny") as vm:
        vm.wait_serial(TINY_BANNER, timeout=BOOT)
        (line,) = wait_for(lambda: phase_lines(vm), BOOT, what=vm.diagnostics)
        stamps = [(name, float(at)) for name, at in re.findall(r"(\w+)=\+(\d+\.\d+)", line.group(2))]
        assert [name for name, _ in stamps] == list(PHASES), line.group(0)
        offsets = [at for _, at in stamps]
        assert offsets == sorted(offsets), line.group(0)
        # The fork has clock-tick resolution (10 ms): the first line of Python runs after it, or within a tick.
        assert offsets[0] > -0.011, line.group(0)
        vm.command("reset")  # a rebuild is no start: still one line
        vm.wait_serial(TINY_BANNER, timeout=BOOT, count=2)
        assert len(phase_lines(vm)) == 1, vm.diagnostics()
