"""The prerequisite gate (tests/conftest.py, tests/support/prereqs.py), exercised on real pytest runs.

A nested pytest runs a real test of this suite with guests made unable to run
(``MSHV_LIBVIRT_EMU_KVM=0``: the emulated device then refuses to run a VP): without ``CI`` the test is
skipped and the summary counts it; with ``CI`` the run ends before any test, naming what is missing;
a skip the table does not foresee fails under ``CI``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.support import prereqs

ROOT = Path(__file__).resolve().parent.parent
GUEST_TEST = "tests/hv/test_wrappers.py::test_guest_out_arrives_as_an_io_intercept"


def nested_pytest(
    tmp_path: Path, *args: str, ci: bool, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**{k: v for k, v in os.environ.items() if k != "CI"}, **(env or {})}
    env.update(MSHV_LIBVIRT_EMU_KVM="0", MSHV_LIBVIRT_REPORT_DIR=str(tmp_path / "reports"))
    if ci:
        env["CI"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_without_ci_a_test_needing_guests_is_skipped_and_counted(tmp_path: Path) -> None:
    res = nested_pytest(tmp_path, GUEST_TEST, ci=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 skipped" in res.stdout
    assert re.search(r"MISSING kvm \(cannot create a VP: .*No such device.*\): 1 test\(s\) skipped", res.stdout), (
        res.stdout
    )
    assert "1 skipped in total:" in res.stdout


def test_under_ci_the_run_stops_at_its_start_naming_kvm(tmp_path: Path) -> None:
    res = nested_pytest(tmp_path, GUEST_TEST, ci=True)
    assert res.returncode == 4, res.stdout + res.stderr  # pytest's usage-error exit code
    out = res.stdout + res.stderr
    assert "CI is set and prerequisites of the collected tests are missing" in out
    assert "kvm (cannot create a VP: " in out and "needed by 1 test(s)" in out
    assert "passed" not in out and "failed" not in out  # nothing ran


def test_under_ci_a_skip_the_table_does_not_foresee_fails(tmp_path: Path) -> None:
    # A plugin skips a test that needs nothing from the table (the C harness's validation half) as it
    # starts, as a test's own check would: the CI run gets that far and the skip becomes a failure.
    (tmp_path / "unforeseen_skip.py").write_text(
        "import pytest\n\n\n@pytest.hookimpl(tryfirst=True)\ndef pytest_runtest_call(item):\n"
        "    pytest.skip('a skip no table foresees')\n"
    )
    target = "tests/emu/test_c_harness.py::test_c_harness_validation_half[plain]"
    extra = {"PYTHONPATH": str(tmp_path)}
    res = nested_pytest(tmp_path, target, "-p", "unforeseen_skip", ci=True, env=extra)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "CI is set: this test skipped (a skip no table foresees)" in res.stdout
    assert "1 failed" in res.stdout
    res = nested_pytest(tmp_path, target, "-p", "unforeseen_skip", ci=False, env=extra)
    assert res.returncode == 0 and "1 skipped" in res.stdout, res.stdout


def test_the_c_harness_guest_half_is_gated_on_the_one_probe(tmp_path: Path) -> None:
    """Its own exit 77 ("no usable /dev/kvm") used to be a skip of its own; now the ``kvm`` fixture decides."""
    target = "tests/emu/test_c_harness.py::test_c_harness_guest_half[plain]"
    res = nested_pytest(tmp_path, target, ci=True)
    assert res.returncode == 4 and "no tests ran" in res.stdout, res.stdout + res.stderr
    assert re.search(r"CI is set and prerequisites .*\n  kvm \(.*\) -- needed by 1 test\(s\)", res.stdout + res.stderr)


def test_the_tables_name_real_paths_and_packages_install_deps_installs() -> None:
    for path in prereqs.PATH_NEEDS:
        assert (ROOT / path).exists(), path
    for names in (*prereqs.PATH_NEEDS.values(), *prereqs.FIXTURE_NEEDS.values()):
        assert set(names) <= prereqs.PREREQUISITES.keys()
    script = (ROOT / "scripts" / "install-deps.sh").read_text()
    array = script.split("packages=(", 1)[1].split("\n)", 1)[0]
    listed = set(re.sub(r"#.*", "", array).split())
    for p in prereqs.PREREQUISITES.values():
        if p.debian:
            assert p.source in listed, f"{p.name}: scripts/install-deps.sh does not install {p.source}"
