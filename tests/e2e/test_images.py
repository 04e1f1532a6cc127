"""Kernels and initrds that are not usable images are refused by ``virsh start`` at once (issue 19 item 6).

Before: /dev/zero made the VMM read until it held 6 GiB, a FIFO, a tty or /dev/urandom hung ``virsh start``
for 60-70 s with an empty reason, a sparse 8 GiB file took 37 s. The daemon now opens each image itself
(O_NONBLOCK: a FIFO cannot block the open), checks it and refuses before anything is spawned.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Generator
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess, domain_xml, virsh, vmm_processes

pytestmark = pytest.mark.virsh

MEMORY_MIB = 64
REFUSED_WITHIN = 10.0  # seconds; the checks are a few system calls, the rest is virsh's own start-up


def _fifo(tmp: Path) -> Generator[str, None, None]:
    path = tmp / "fifo"
    os.mkfifo(path)
    yield str(path)


def _pty(tmp: Path) -> Generator[str, None, None]:
    master, slave = os.openpty()
    try:
        yield os.ttyname(slave)
    finally:
        os.close(master)
        os.close(slave)


def _sparse(tmp: Path) -> Generator[str, None, None]:
    path = tmp / "sparse"
    with open(path, "wb") as f:
        f.truncate(8 << 30)  # 8 GiB of holes, as in the issue
    yield str(path)


def _mode_000(tmp: Path, kernel: Path) -> Generator[str, None, None]:
    path = tmp / "locked-kernel"
    shutil.copy(kernel, path)
    path.chmod(0)
    yield str(path)


def _directory(tmp: Path) -> Generator[str, None, None]:
    yield str(tmp)


def _device(name: str) -> Callable[[Path], Generator[str, None, None]]:
    def make(_tmp: Path) -> Generator[str, None, None]:
        yield name

    return make


CASES: dict[str, tuple[Callable[..., Generator[str, None, None]], str]] = {
    "dev-zero": (_device("/dev/zero"), "is not a regular file: it is a character device"),
    "fifo": (_fifo, "is not a regular file: it is a FIFO"),
    "pty": (_pty, "is not a regular file: it is a character device"),
    "dev-urandom": (_device("/dev/urandom"), "is not a regular file: it is a character device"),
    "sparse-8g": (_sparse, f"is larger than the guest memory (8589934592 bytes > {MEMORY_MIB << 20} bytes)"),
    "mode-000": (_mode_000, "is not readable: its mode is 0000"),
    "directory": (_directory, "is not a regular file: it is a directory"),
}


def _start_refused(d: DaemonProcess, tmp_path: Path, name: str, kernel: Path, initrd: str | None) -> str:
    xml_text = domain_xml(name, kernel, memory_mib=MEMORY_MIB)
    if initrd is not None:
        xml_text = xml_text.replace("</kernel>", f"</kernel><initrd>{initrd}</initrd>")
    xml = tmp_path / f"{name}.xml"
    xml.write_text(xml_text)
    virsh(d.uri, "define", str(xml))
    t0 = time.monotonic()
    res = virsh(d.uri, "start", name, check=False, timeout=REFUSED_WITHIN * 3)
    elapsed = time.monotonic() - t0
    assert res.returncode != 0, res.stdout
    assert elapsed < REFUSED_WITHIN, f"took {elapsed:.1f} s: {res.stderr}"
    assert virsh(d.uri, "domstate", name).stdout.strip() == "shut off"
    assert name not in vmm_processes(d.run_dir), "a VMM was spawned"
    return res.stderr


@pytest.mark.parametrize("case", list(CASES))
def test_unusable_kernel_is_refused_at_once(
    daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path, case: str
) -> None:
    make, reason = CASES[case]
    maker = make(tmp_path, tiny_kernel) if make is _mode_000 else make(tmp_path)
    path = next(maker)
    try:
        err = _start_refused(daemon, tmp_path, f"k-{case}", Path(path), None)
    finally:
        maker.close()
    assert (
        f"error: operation failed: domain 'k-{case}' failed to start: Cannot load the kernel: '{path}' {reason}" in err
    )


@pytest.mark.parametrize("case", ["fifo", "dev-zero", "sparse-8g"])
def test_unusable_initrd_is_refused_at_once(
    daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path, case: str
) -> None:
    make, reason = CASES[case]
    maker = make(tmp_path)
    path = next(maker)
    try:
        err = _start_refused(daemon, tmp_path, f"i-{case}", tiny_kernel, path)
    finally:
        maker.close()
    assert f"failed to start: Cannot load the initrd: '{path}' {reason}" in err


def test_kernel_and_initrd_together_must_fit(daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path) -> None:
    initrd = tmp_path / "big-initrd"
    size = (MEMORY_MIB << 20) - tiny_kernel.stat().st_size + 1  # alone it fits; with the kernel it does not
    with open(initrd, "wb") as f:
        f.truncate(size)
    err = _start_refused(daemon, tmp_path, "sum", tiny_kernel, str(initrd))
    assert "together are larger than the guest memory" in err and str(initrd) in err


def test_missing_kernel_names_the_path(daemon: DaemonProcess, tmp_path: Path) -> None:
    err = _start_refused(daemon, tmp_path, "nokernel", tmp_path / "no-such-kernel", None)
    assert f"Cannot load the kernel: cannot open '{tmp_path / 'no-such-kernel'}': No such file or directory" in err
