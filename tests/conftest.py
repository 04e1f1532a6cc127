from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from tests.support.report import ENV, read_reports


def pytest_configure(config: pytest.Config) -> None:
    # Reliability tests write their counts here; the summary below prints them.
    if not os.environ.get(ENV):
        os.environ[ENV] = tempfile.mkdtemp(prefix="mshv-libvirt-report-")
    for stale in Path(os.environ[ENV]).glob("*.json"):
        stale.unlink()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    directory = Path(os.environ[ENV])
    reports = read_reports(directory)
    if not reports:
        return
    terminalreporter.section("reliability report (faults injected, bad inputs tried, domains lost)")
    for name, data in reports.items():
        terminalreporter.write_line(f"{name}: {json.dumps(data, sort_keys=True)}")
    (directory / "summary.json").write_text(json.dumps(reports, indent=2, sort_keys=True))
    terminalreporter.write_line(f"(written to {directory / 'summary.json'})")
