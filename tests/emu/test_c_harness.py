"""The emulator without Python: tests/emu/c/emu_smoke.c built against abi/ and run, once as
is (-Wall -Werror) and once under ASan/UBSan where the toolchain supports it. Its validation half runs
everywhere; its guest half is gated like every guest test, on the ``kvm`` fixture (tests/conftest.py), so
under CI missing KVM ends the run at its start instead of skipping.

Expected values: those of the C file (docs/ABI.md §4, §7, §9; its header names pinned at compile time
to the literal values of §2.3, §3.2, §4.9, §7.2 and §8.2).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [ROOT / "tests" / "emu" / "c" / "emu_smoke.c", *sorted((ROOT / "abi" / "emu").glob("*.c"))]
FLAGS = [
    "-O1",
    "-g",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-D_GNU_SOURCE",
    f"-I{ROOT / 'abi' / 'include'}",
    f"-I{ROOT / 'abi' / 'emu'}",
]
SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all"]


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "asan-ubsan"])
def harness(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The harness built once per flavour (gcc is in prereqs.PATH_NEEDS for this module)."""
    sanitize: bool = request.param
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    exe = tmp_path_factory.mktemp("emu_smoke") / "emu_smoke"
    cmd = [cc, *FLAGS, *(SANITIZE if sanitize else []), *map(str, SOURCES), "-o", str(exe), "-lpthread"]
    build = subprocess.run(cmd, capture_output=True, text=True)
    if build.returncode and sanitize:
        pytest.skip(f"sanitizers unavailable: {build.stderr[-300:]}")
    assert build.returncode == 0, build.stderr
    return exe


def run(exe: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(exe)], capture_output=True, text=True, timeout=120, env={**os.environ, **env})


def test_c_harness_validation_half(harness: Path) -> None:
    """With KVM backing forced off (the emulator's own switch) only the validation half runs: 77 says so."""
    res = run(harness, MSHV_LIBVIRT_EMU_KVM="0")
    assert res.returncode == 77, res.stderr


def test_c_harness_guest_half(kvm: None, harness: Path) -> None:
    """Gated on the session's one KVM probe (the ``kvm`` fixture): where it ran a guest, the harness must
    run its guest too; its 77 ("no usable /dev/kvm") is then a failure, not a skip."""
    res = run(harness)
    assert res.returncode != 77, f"the harness found no usable KVM where the session's probe ran a guest: {res.stderr}"
    assert res.returncode == 0, res.stderr
