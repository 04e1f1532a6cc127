"""CI's test steps (.ci/steps, run by .ci/run) with a stand-in ``tox`` first on PATH that records each call
and fails the one a test names: the gates run in order and a failing one fails CI; the mutation report runs
after them and its failure does not."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["", "-e slow", "-e isolation", "-e mutation"]  # what follows `tox` in each call, in order


def run_steps(tmp_path: Path, failing: str | None, **extra: str) -> tuple[int, list[str], str]:
    log = tmp_path / "calls"
    stub = tmp_path / "bin" / "tox"
    stub.parent.mkdir()
    stub.write_text(
        '#!/bin/sh\necho "$*" >> "$STUB_LOG"\n[ "$*" = "$STUB_FAIL" ] && exit 3\nexit 0\n',
    )
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}", "STUB_LOG": str(log)}
    env["STUB_FAIL"] = failing if failing is not None else "(nothing)"
    env.update(extra)
    res = subprocess.run(["bash", str(ROOT / ".ci" / "steps")], env=env, capture_output=True, text=True, timeout=60)
    calls = log.read_text().splitlines() if log.exists() else []
    return res.returncode, calls, res.stdout + res.stderr


def test_every_step_runs_in_order(tmp_path: Path) -> None:
    status, calls, out = run_steps(tmp_path, None)
    assert (status, calls) == (0, STEPS), out


def test_a_failing_gate_fails_ci_and_ends_it(tmp_path: Path) -> None:
    status, calls, out = run_steps(tmp_path, "-e isolation")
    assert (status, calls) == (3, STEPS[:3]), out


def test_the_mutation_report_does_not_gate(tmp_path: Path) -> None:
    status, calls, out = run_steps(tmp_path, "-e mutation")
    assert (status, calls) == (0, STEPS), out
    assert "tox -e mutation exited with status 3 (a report, not a gate)" in out


def test_the_mutation_report_is_left_out_when_the_gates_used_its_time(tmp_path: Path) -> None:
    status, calls, out = run_steps(tmp_path, None, MSHV_CI_MUTATION_START_BY_S="-1")
    assert (status, calls) == (0, STEPS[:3]), out
    assert "tox -e mutation skipped: the gates took" in out
