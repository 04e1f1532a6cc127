"""The small guest kernel (scripts/build-test-kernel.sh) boots through the VMM to its root wait.

Proof that the image the disk and network tests will use is right: its banner, what it says about PCI,
and the wait for /dev/vda (no disk yet). Slow (minutes: guest kernel code is emulated on kvm-pvm);
the measured timings are in docs/DESIGN.md ("Guest kernels").
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from tests.support.guests import KVM_PVM_CLEARCPUID
from tests.support.kernel import require_small_kernel
from tests.vmm.harness import VmmProcess

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

BOOT_TIMEOUT = float(os.environ.get("MSHV_LIBVIRT_SMALL_KERNEL_BOOT_TIMEOUT", "1200"))
CMDLINE = "console=ttyS0 earlyprintk=ttyS0 panic=-1 nowatchdog mitigations=off root=/dev/vda rootwait " + (
    KVM_PVM_CLEARCPUID
)
BANNER = re.compile(r"Linux version 6\.1\.\d+")
ROOT_WAIT = "Waiting for root device /dev/vda"
# What the kernel says about PCI config space: today the VMM has no PCI bus (the first line); once it
# has one, the kernel enumerates bus 00 (the second).
PCI_NONE = "PCI: Fatal: No config space access function found"
PCI_BUS = re.compile(r"PCI host bridge to bus 0000:00|pci 0000:00:00\.0")
GAVE_UP = ("Kernel panic", "VFS: Cannot open root device")


@pytest.fixture(scope="session")
def small_kernel() -> Path:
    return require_small_kernel()


@pytest.mark.timeout(BOOT_TIMEOUT + 300)
def test_small_kernel_reaches_the_root_wait(kvm: None, small_kernel: Path, tmp_path: Path) -> None:
    seen: dict[str, float] = {}
    with VmmProcess.start(tmp_path / "vm", small_kernel, memory_mib=256, cmdline=CMDLINE) as vm:
        start = time.monotonic()
        deadline = start + BOOT_TIMEOUT
        while time.monotonic() < deadline and vm.proc.poll() is None:
            out = vm.serial
            for name, found in (
                ("first byte", bool(out)),
                ("banner", bool(BANNER.search(out))),
                ("pci", PCI_NONE in out or bool(PCI_BUS.search(out))),
                ("root wait", ROOT_WAIT in out),
            ):
                if found and name not in seen:
                    seen[name] = round(time.monotonic() - start, 1)
            if "root wait" in seen or any(m in out for m in GAVE_UP):
                break
            time.sleep(0.5)
        out = vm.serial
        print(f"small kernel milestones (s after VMM start): {seen}")  # the numbers docs/DESIGN.md quotes
        tail = out.strip().splitlines()[-5:]
        assert "root wait" in seen, f"no {ROOT_WAIT!r} in {BOOT_TIMEOUT:.0f} s; seen {seen}; last lines {tail}"
        assert BANNER.search(out), tail
        assert "pci" in seen, f"the kernel said nothing about PCI config space: {tail}"
        assert not any(m in out for m in GAVE_UP), tail
        # In order: the PCI probe comes from an initcall, the root wait after all of them.
        assert seen["banner"] <= seen["pci"] <= seen["root wait"], seen
