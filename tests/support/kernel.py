"""The small guest kernel (scripts/build-test-kernel.sh) for the disk and network proofs.

The script caches the image under ~/.cache/mshv-libvirt/test-kernel/<key>/ (key: fragment, script,
source package version), so only the first caller on a host pays for the build (~8 minutes on 2
cores). Boot tests take it through ``require_small_kernel()``, which skips when it cannot be built,
except under ``CI``, where a missing kernel is a failure.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support.guests import GuestUnavailable

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "scripts" / "build-test-kernel.sh"
# Generous: the measured cold build is ~8 minutes on an idle 2-core host, slower when shared.
BUILD_TIMEOUT = float(os.environ.get("MSHV_TEST_KERNEL_BUILD_TIMEOUT", "3600"))


def small_kernel(*, jobs: int = 2) -> Path:
    """The cached bzImage, built (niced) first when absent; GuestUnavailable says why it cannot be."""
    cmd = ["nice", "-n", "10", str(BUILD_SCRIPT), "-j", str(jobs)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False)
    except subprocess.TimeoutExpired as err:
        raise GuestUnavailable(f"{BUILD_SCRIPT.name} did not finish in {BUILD_TIMEOUT:.0f} s") from err
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise GuestUnavailable(f"{BUILD_SCRIPT.name} failed ({done.returncode}):\n{tail}")
    lines = done.stdout.strip().splitlines()
    image = Path(lines[-1]) if lines else Path()
    if not image.is_file():
        raise GuestUnavailable(f"{BUILD_SCRIPT.name} printed no image path: {done.stdout!r}")
    return image


def require_small_kernel() -> Path:
    """For fixtures: the image, or a skip (a failure under CI) carrying why it is unavailable."""
    try:
        return small_kernel()
    except GuestUnavailable as err:
        if os.environ.get("CI"):
            pytest.fail(f"small guest kernel unavailable under CI: {err}")
        pytest.skip(f"small guest kernel unavailable: {err}")
