from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.guests import GuestUnavailable, build_tiny_guest
from tests.vmm.harness import VmmProcess


def kvm_skip_reason() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm: guest code cannot run on this host"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not accessible to this user"
    try:
        import mshv_libvirt.hv  # noqa: F401
    except ImportError as err:
        return f"mshv_libvirt.hv is not built: {err}"
    return None


@pytest.fixture(scope="session")
def tiny_kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return build_tiny_guest(tmp_path_factory.mktemp("tiny"))
    except GuestUnavailable as err:
        pytest.skip(f"tiny guest cannot be built: {err}")


@pytest.fixture
def kvm() -> None:
    reason = kvm_skip_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def tiny_vm(kvm: None, tiny_kernel: Path, tmp_path: Path) -> Iterator[VmmProcess]:
    with VmmProcess.start(tmp_path / "vm", tiny_kernel, cmdline="console=ttyS0 tiny") as vm:
        yield vm
