from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from tests.support.guests import GuestUnavailable, build_tiny_guest
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


# Shared by the VMM and end-to-end tests.
def kvm_skip_reason() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm: guest code cannot run on this host"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not accessible to this user"
    try:
        import mshv_libvirt.hv  # noqa: F401
    except ImportError as err:
        return f"mshv_libvirt.hv is not built: {err}"
    return None


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
