from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vmm.harness import VmmProcess


@pytest.fixture
def tiny_vm(kvm: None, tiny_kernel: Path, tmp_path: Path) -> Iterator[VmmProcess]:
    with VmmProcess.start(tmp_path / "vm", tiny_kernel, cmdline="console=ttyS0 tiny") as vm:
        yield vm
