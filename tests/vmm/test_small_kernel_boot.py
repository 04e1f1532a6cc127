"""The small guest kernel (scripts/build-test-kernel.sh) boots through the VMM to its root wait.

One boot proves several facts (boots are slow: guest kernel code is emulated on kvm-pvm): the banner,
the PCI root bus the DSDT's PNP0A08 host bridge describes (bus range and windows from its _CRS, the host
bridge 00:00.0 found), the CMOS RTC bound by rtc_cmos through its PNP0B00 device and the system clock
set from it within seconds of the host's UTC, then the wait for /dev/vda (no disk yet). Each serial
line is timestamped when the test first sees it; the milestones' times are in docs/DESIGN.md
("Guest kernels").
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from mshv_libvirt.vmm import layout
from tests.support.guests import KVM_PVM_CLEARCPUID
from tests.support.kernel import require_small_kernel
from tests.support.waits import wait_for
from tests.vmm.harness import VmmProcess

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

BOOT_TIMEOUT = float(os.environ.get("MSHV_LIBVIRT_SMALL_KERNEL_BOOT_TIMEOUT", "1200"))
MEMORY_MIB = 256
CMDLINE = "console=ttyS0 earlyprintk=ttyS0 panic=-1 nowatchdog mitigations=off root=/dev/vda rootwait " + (
    KVM_PVM_CLEARCPUID
)
ROOT_WAIT = "Waiting for root device /dev/vda"
# The host's clock and the guest's may differ by this much: the RTC has second resolution, the line is
# seen up to a poll interval after it is printed, and hctosys reads the RTC a little before printing.
CLOCK_SLACK = 5.0
HCTOSYS = re.compile(r"rtc_cmos (00:0\d): setting system clock to (\S+) UTC \((\d+)\)")


def _mmio64() -> str:
    base, size = layout.pci_mmio64_window(MEMORY_MIB << 20)
    return f"[mem {base:#x}-{base + size - 1:#x} window]"


# In boot order; each must appear (and, with the ones after it, in this order).
MILESTONES: list[tuple[str, re.Pattern[str]]] = [
    ("banner", re.compile(r"Linux version 6\.1\.\d+")),
    ("mmconfig", re.compile(re.escape("PCI: MMCONFIG for domain 0000 [bus 00-00] at [mem 0xe0000000-0xe00fffff]"))),
    ("pci type 1", re.compile(re.escape("PCI: Using configuration type 1 for base access"))),
    ("root bridge", re.compile(re.escape("ACPI: PCI Root Bridge [PCI0] (domain 0000 [bus 00])"))),
    ("host bridge", re.compile(re.escape("PCI host bridge to bus 0000:00"))),
    ("io window", re.compile(re.escape("pci_bus 0000:00: root bus resource [io  0x1000-0xffff window]"))),
    ("mmio32 window", re.compile(re.escape("pci_bus 0000:00: root bus resource [mem 0xc0000000-0xdfffffff window]"))),
    ("mmio64 window", re.compile(re.escape("pci_bus 0000:00: root bus resource " + _mmio64()))),
    ("bus range", re.compile(re.escape("pci_bus 0000:00: root bus resource [bus 00]"))),
    ("00:00.0", re.compile(re.escape("pci 0000:00:00.0: [1b36:0008] type 00 class 0x060000"))),
    ("rtc", re.compile(r"rtc_cmos 00:0\d: registered as rtc0")),
    ("hctosys", HCTOSYS),
    ("root wait", re.compile(re.escape(ROOT_WAIT))),
]
# What a kernel prints when the bus or the RTC is not there (or it gave up): none may appear.
ABSENT = (
    "PCI: Fatal: No config space access function found",
    "PCI: System does not support PCI",
    "rtc_cmos: probe of",
    "registered platform RTC device",  # rtc_cmos's fallback when no PNP0B00 device is found
)
GAVE_UP = ("Kernel panic", "VFS: Cannot open root device")


@pytest.fixture(scope="session")
def small_kernel() -> Path:
    return require_small_kernel()


@pytest.mark.timeout(BOOT_TIMEOUT + 300)
def test_small_kernel_finds_pci_and_rtc_then_waits_for_root(kvm: None, small_kernel: Path, tmp_path: Path) -> None:
    lines: list[tuple[float, float, str]] = []  # (seconds after VMM start, host wall clock, line)
    with VmmProcess.start(tmp_path / "vm", small_kernel, memory_mib=MEMORY_MIB, cmdline=CMDLINE) as vm:
        start = time.monotonic()
        partial = ""
        consumed = 0

        def boot_ended() -> bool:
            """Collect the new serial lines; true at the root wait, a give-up line or the VMM's exit."""
            nonlocal partial, consumed
            out = vm.serial
            chunk, consumed = out[consumed:], len(out)
            now, wall = round(time.monotonic() - start, 1), time.time()
            *complete, partial = (partial + chunk).split("\n")
            lines.extend((now, wall, line.rstrip("\r")) for line in complete)
            ended = any(ROOT_WAIT in line for line in complete) or any(m in chunk for m in GAVE_UP)
            return ended or vm.proc.poll() is not None

        wait_for(boot_ended, timeout=BOOT_TIMEOUT, interval=0.2, what=lambda: [line for _, _, line in lines[-8:]])
        seen: dict[str, float] = {}
        hctosys: tuple[float, int] | None = None
        for at, wall, line in lines:
            for name, pattern in MILESTONES:
                if name not in seen and (match := pattern.search(line)):
                    seen[name] = at
                    if name == "hctosys":
                        hctosys = (wall, int(match.group(3)))
        print(f"small kernel milestones (s after VMM start): {seen}")  # the numbers docs/DESIGN.md quotes
        if hctosys is not None:
            print(f"hctosys: guest {hctosys[1]}, host when seen {hctosys[0]:.1f}")
        text = "\n".join(line for _, _, line in lines)
        tail = [line for _, _, line in lines[-8:]]
        missing = [name for name, _ in MILESTONES if name not in seen]
        assert not missing, f"missing {missing}; seen {seen}; last lines {tail}"
        found_absent = [m for m in ABSENT + GAVE_UP if m in text]
        assert not found_absent, found_absent
        order = [seen[name] for name, _ in MILESTONES]
        assert order == sorted(order), seen
        assert hctosys is not None
        host_seen, guest_epoch = hctosys
        # The guest's clock came from the RTC: host UTC (seconds resolution) at most CLOCK_SLACK before
        # the moment the test saw the line.
        assert 0 <= host_seen - guest_epoch <= CLOCK_SLACK, (host_seen, guest_epoch)
