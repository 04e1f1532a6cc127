from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from mshv_libvirt.rpc import calltrace
from tests.support.guests import GuestUnavailable, build_tiny_guest
from tests.support.report import ENV, read_reports


def pytest_configure(config: pytest.Config) -> None:
    # Reliability tests write their counts here; the summary below prints them.
    if not os.environ.get(ENV):
        os.environ[ENV] = tempfile.mkdtemp(prefix="mshv-libvirt-report-")
    for stale in Path(os.environ[ENV]).glob("*.json"):
        stale.unlink()
    # Every daemon the tests start records the procedures real clients drove (rpc/calltrace.py).
    os.environ[calltrace.ENV] = tempfile.mkdtemp(prefix="mshv-libvirt-calls-")


def _whole_suite(config: pytest.Config) -> bool:
    """The run collects every test module (markers may still select), so coverage can be judged."""
    tests = (Path(str(config.rootpath)) / "tests").resolve()
    args = {Path(a.split("::")[0]).resolve() for a in config.args}
    option = config.option
    return args == {tests} and not option.keyword and not option.deselect and not getattr(option, "lf", False)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail a whole-suite run in which some implemented procedure was never driven by a real client."""
    if exitstatus != 0 or not _whole_suite(session.config):
        return
    from mshv_libvirt.rpc.dispatch import PROCEDURES

    driven = calltrace.read_traces(Path(os.environ[calltrace.ENV]))
    missing = sorted(set(PROCEDURES) - driven)
    if missing:
        names = ", ".join(f"{n} {PROCEDURES[n].name}" for n in missing)
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line(f"procedures no real client (virsh, libvirt-python) drove: {names}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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
