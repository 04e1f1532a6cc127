"""virtio-rng proven from guest kernel mode: the tiny guest's virtio-pci driver (key ``v``) booted by the
real, sandboxed VMM, observed through the VMM's control socket.

Each press makes TINY_VIRTIO_ROUNDS requests, each kicked through the doorbell and completed by an
MSI-X interrupt the guest waits for in ``sti; hlt``. The guest runs in its interrupt-driven mode, whose
idle loop makes no exits, so the VMM's exit counter grows only by what the press prints: if kicks
reached the VMM it would grow by at least one per kick. The VMM's own counters say the same from the
other side: no doorbell write reached Python, and every interrupt was an eventfd write on the queue
vector's irqfd line.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.guests import (
    TINY_BANNER,
    TINY_IRQ_FLAG,
    TINY_VIRTIO_BUFFER,
    TINY_VIRTIO_ROUNDS,
    tiny_virtio,
)
from tests.support.waits import wait_for
from tests.vmm.harness import VmmProcess

pytestmark = pytest.mark.kvm

BOOT = 60
CMDLINE = f"console=ttyS0 tiny {TINY_IRQ_FLAG}"
SLOT = 3


@pytest.fixture
def rng_vm(kvm: None, tiny_kernel: Path, tmp_path: Path) -> Iterator[VmmProcess]:
    with VmmProcess.start(
        tmp_path / "vm", tiny_kernel, cmdline=CMDLINE, sandbox=True, rng=[{"slot": SLOT, "backend": "/dev/urandom"}]
    ) as vm:
        yield vm


def press(vm: VmmProcess, nth: int) -> tuple[dict[str, int], dict[str, Any]]:
    """Press ``v`` and wait (bounded) for the ``nth`` complete totals line; then the VMM's status."""
    vm.console_send(b"v")

    def printed() -> list[dict[str, int]] | None:
        assert "TINY-VIRTIO-FAIL" not in vm.serial, vm.diagnostics()
        lines = tiny_virtio(vm.serial)
        return lines if len(lines) >= nth else None

    lines = wait_for(printed, BOOT, what=vm.diagnostics)
    return lines[-1], vm.command("status")


def test_entropy_reaches_the_guest_by_ioeventfd_and_msix_irqfd(rng_vm: VmmProcess) -> None:
    rng_vm.wait_serial(TINY_BANNER, timeout=BOOT)
    before = rng_vm.command("status")
    assert before["sandbox"] is not None  # the device thread runs under its own allow-list
    (dev,) = before["virtio"]
    assert dev["device_id"] == 4 and dev["thread"] is not None and dev["bar"] >= 1 << 32  # 64-bit BAR above RAM

    first, after_first = press(rng_vm, 1)
    second, after_second = press(rng_vm, 2)
    n = TINY_VIRTIO_ROUNDS
    assert first == {"bytes": n * TINY_VIRTIO_BUFFER, "irqs": n, "sum": first["sum"], "kicks": n}
    assert second["bytes"] == 2 * n * TINY_VIRTIO_BUFFER and second["irqs"] == second["kicks"] == 2 * n
    assert first["sum"] != 0 and second["sum"] != first["sum"]  # random bytes, not a zeroed buffer

    (dev,) = after_second["virtio"]
    assert dev["status"] == 0xF  # ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK, as the guest set it
    assert dev["served"] == 2 * n * TINY_VIRTIO_BUFFER and dev["requests"] == 2 * n
    assert dev["notify_exits"] == 0  # not one doorbell write reached the VMM's Python
    # One irqfd line per MSI-X vector (GSIs from 24 up); the guest gave vector 0 to the queue.
    assert dev["irqfd"] == [{"gsi": 24, "fired": 2 * n}, {"gsi": 25, "fired": 0}]
    assert dev["interrupts"] == 2 * n

    # The second press (no setup) made n kicks; the VMM saw only the exits of printing one line.
    grown = after_second["exits"] - after_first["exits"]
    assert grown < n // 4, f"{grown} exits for {n} kicks"


def test_a_rebuilt_vm_gets_a_fresh_device_on_the_same_backend(rng_vm: VmmProcess) -> None:
    rng_vm.wait_serial(TINY_BANNER, timeout=BOOT)
    press(rng_vm, 1)
    old = rng_vm.command("status")["virtio"][0]
    rng_vm.console_send(b"r")  # guest reset: the VMM rebuilds the VM in place (on_reboot=restart)
    rng_vm.wait_serial(TINY_BANNER, timeout=BOOT, count=2)
    status = rng_vm.command("status")
    assert status["boots"] == 2
    (dev,) = status["virtio"]
    assert dev["status"] == 0 and dev["served"] == 0  # a new device, reset, nothing served yet
    assert dev["thread"] is not None and dev["thread"] != old["thread"]  # the old thread ended with its VM
    assert str(old["thread"]) not in set(os.listdir(f"/proc/{rng_vm.proc.pid}/task"))
    # The new guest's driver starts from scratch (its totals are per boot) on the same, still-open backend.
    line, after = press(rng_vm, 2)
    assert line["bytes"] == TINY_VIRTIO_ROUNDS * TINY_VIRTIO_BUFFER and line["irqs"] == TINY_VIRTIO_ROUNDS
    assert after["virtio"][0]["notify_exits"] == 0
