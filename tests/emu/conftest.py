"""Fixtures for the emulated-device tests: one fresh /dev/mshv handle, partition and VP per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .emutil import close, create_partition, create_vp, initialize, open_dev


@pytest.fixture(autouse=True)
def _newest_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Handles opened by these tests reproduce the newest kernel unless a test picks another
    (MSHV_LIBVIRT_EMU_KERNEL from the caller's environment must not change the expectations)."""
    monkeypatch.delenv("MSHV_LIBVIRT_EMU_KERNEL", raising=False)


@pytest.fixture
def dev() -> Iterator[int]:
    fd = open_dev()
    yield fd
    close(fd)


@pytest.fixture
def pt(dev: int) -> Iterator[int]:
    """A partition that is not initialized yet."""
    fd = create_partition(dev)
    assert fd >= 0
    yield fd
    close(fd)


@pytest.fixture
def ipt(pt: int) -> int:
    """An initialized partition (a KVM VM where /dev/kvm exists)."""
    assert initialize(pt) == 0
    return pt


@pytest.fixture
def vp(ipt: int) -> Iterator[int]:
    fd = create_vp(ipt, 0)
    assert fd >= 0
    yield fd
    close(fd)


@pytest.fixture
def nokvm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Partitions initialized from now on are not backed by KVM (validation-only emulator)."""
    monkeypatch.setenv("MSHV_LIBVIRT_EMU_KVM", "0")
