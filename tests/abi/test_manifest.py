"""The ABI manifest check: breaks fail, additions pass (python -m mshv_libvirt.abicheck).

Expected values: the committed abi/manifest.json (the ABI as recorded, itself pinned to docs/ABI.md by
tests/abi/test_layout.py) and abicheck's contract: a removed or changed ioctl, struct, field or constant
breaks, an addition passes. The messages are the tool's own report format.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mshv_libvirt.abicheck import build_manifest, compare

MANIFEST = Path(__file__).resolve().parents[2] / "abi" / "manifest.json"


def _recorded() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(MANIFEST.read_text())
    return data


def test_committed_manifest_matches_the_build() -> None:
    broken, _ = compare(_recorded(), build_manifest())
    assert broken == []


def _check(tmp_path: Path, manifest: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    return subprocess.run(
        [sys.executable, "-m", "mshv_libvirt.abicheck", "--check", str(path)], capture_output=True, text=True
    )


def test_cli_passes_on_the_committed_manifest(tmp_path: Path) -> None:
    result = _check(tmp_path, _recorded())
    assert result.returncode == 0, result.stderr
    assert "ABI ok" in result.stdout


def test_cli_fails_when_a_recorded_offset_changes(tmp_path: Path) -> None:
    # Pretend the recorded ABI had rsvd one byte later: the current build then "moved" it.
    old = _recorded()
    old["structs"]["struct mshv_user_mem_region"]["fields"]["rsvd"]["offset"] = 26
    result = _check(tmp_path, old)
    assert result.returncode == 1
    assert "struct mshv_user_mem_region.rsvd moved from offset 26" in result.stderr


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: m["ioctls"].__setitem__("MSHV_RUN_VP", 0x8100B8FF), "ioctl MSHV_RUN_VP changed"),
        (lambda m: m["ioctls"].__setitem__("MSHV_OLD_CALL", 0x1234), "ioctl MSHV_OLD_CALL disappeared"),
        (lambda m: m["structs"]["struct mshv_root_hvcall"].__setitem__("size", 24), "size changed from 24"),
        (
            lambda m: m["structs"]["struct mshv_create_vp"]["fields"].__setitem__(
                "gone", {"offset": 4, "size": 4, "type": "uint32_t"}
            ),
            "mshv_create_vp.gone disappeared",
        ),
        (lambda m: m["constants"].__setitem__("MSHV_SET_MEM_FLAGS_MASK", 3), "MSHV_SET_MEM_FLAGS_MASK changed"),
    ],
)
def test_breaking_changes_are_caught(mutate: Any, message: str) -> None:
    recorded = _recorded()
    mutate(recorded)
    broken, _ = compare(recorded, build_manifest())
    assert any(message in b for b in broken), broken


def test_additions_pass(tmp_path: Path) -> None:
    # A manifest recorded before something was added: the current build only grew.
    older = copy.deepcopy(_recorded())
    del older["ioctls"]["MSHV_GET_GPAP_ACCESS_BITMAP"]
    del older["structs"]["struct mshv_create_partition_v2"]
    del older["structs"]["struct mshv_user_ioeventfd"]["fields"]["rsvd"]
    result = _check(tmp_path, older)
    assert result.returncode == 0, result.stderr
    assert "added: ioctl MSHV_GET_GPAP_ACCESS_BITMAP" in result.stdout
    assert "added: struct mshv_create_partition_v2" in result.stdout
