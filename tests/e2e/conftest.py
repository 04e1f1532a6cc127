from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess, running_daemon
from tests.support.guests import GuestUnavailable, build_tiny_guest
from tests.vmm.conftest import kvm_skip_reason


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


@pytest.fixture(scope="session", autouse=True)
def _need_virsh() -> None:
    if shutil.which("virsh") is None:
        pytest.skip("virsh (Debian libvirt-clients) is not installed")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    with running_daemon(tmp_path / "d") as d:
        yield d
