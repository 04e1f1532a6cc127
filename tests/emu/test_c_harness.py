"""The emulator without Python: tests/emu/c/emu_smoke.c built against abi/ and run, once as
is (-Wall -Werror) and once under ASan/UBSan where the toolchain supports it.

Expected values: those of the C file (docs/ABI.md §4, §7, §9; its header names pinned at compile time
to the literal values of §2.3, §3.2, §4.9, §7.2 and §8.2).
"""

from __future__ import annotations

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


@pytest.mark.parametrize("sanitize", [False, True], ids=["plain", "asan-ubsan"])
def test_c_harness(tmp_path: Path, sanitize: bool) -> None:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler")
    exe = tmp_path / "emu_smoke"
    cmd = [cc, *FLAGS, *(SANITIZE if sanitize else []), *map(str, SOURCES), "-o", str(exe), "-lpthread"]
    build = subprocess.run(cmd, capture_output=True, text=True)
    if build.returncode and sanitize:
        pytest.skip(f"sanitizers unavailable: {build.stderr[-300:]}")
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    if run.returncode == 77:
        pytest.skip("no usable /dev/kvm: only the validation half ran (and passed)")
    assert run.returncode == 0, run.stderr
