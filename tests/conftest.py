from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Generator
from pathlib import Path

import pytest

from mshv_libvirt.rpc import calltrace
from tests.support import prereqs
from tests.support.coverage import undriven
from tests.support.guests import GuestUnavailable, build_tiny_guest
from tests.support.report import ENV, read_reports

ROOT = Path(__file__).resolve().parent.parent
# Under CI a missing prerequisite fails the run instead of skipping tests (see tests/support/prereqs.py).
IN_CI = bool(os.environ.get("CI"))

_needed: dict[str, int] = {}  # prerequisite -> number of selected tests that need it
_collection_skips: list[str] = []


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
    # The default run (`-m "not slow"`) or everything: the slow tests alone are not the suite.
    markers_ok = option.markexpr in ("", "not slow")
    return (
        args == {tests}
        and markers_ok
        and not option.keyword
        and not option.deselect
        and not getattr(option, "lf", False)
    )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail a whole-suite run in which some implemented procedure (or relay path) was never driven by a
    real client."""
    if exitstatus != 0 or not _whole_suite(session.config):
        return
    missing = undriven(Path(os.environ[calltrace.ENV]))
    if missing:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line(
                f"procedures no real client (virsh, libvirt-python) drove: {', '.join(missing)}", red=True
            )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def needs_of(item: pytest.Item) -> set[str]:
    """The prerequisites a test needs: its markers, its fixture closure and its module's entry."""
    names: set[str] = set()
    if item.get_closest_marker("kvm") is not None:
        names.add("kvm")
    for mark in item.iter_markers("needs"):
        names.update(mark.args)
    for fixture in getattr(item, "fixturenames", ()):
        names.update(prereqs.FIXTURE_NEEDS.get(fixture, ()))
    rel = item.path.resolve().relative_to(ROOT).as_posix()
    for prefix, implied in prereqs.PATH_NEEDS.items():
        if rel == prefix or (prefix.endswith("/") and rel.startswith(prefix)):
            names.update(implied)
    unknown = names - prereqs.PREREQUISITES.keys()
    if unknown:
        raise pytest.UsageError(f"{item.nodeid}: unknown prerequisite(s) {sorted(unknown)}")
    return names


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.skipped:  # a module that skipped itself at import (pytest.importorskip ...)
        _collection_skips.append(f"{report.nodeid}: {_skip_reason(report)}")


def pytest_collection_finish(session: pytest.Session) -> None:
    for item in session.items:
        for name in needs_of(item):
            _needed[name] = _needed.get(name, 0) + 1
    absent = {name: prereqs.describe(name) for name in sorted(_needed) if prereqs.missing(name)}
    if IN_CI and (absent or _collection_skips):
        lines = [f"  {why} -- needed by {_needed[name]} test(s)" for name, why in absent.items()]
        lines += [f"  {skip}" for skip in _collection_skips]
        pytest.exit(
            "CI is set and prerequisites of the collected tests are missing (scripts/install-deps.sh installs "
            "them):\n" + "\n".join(lines),
            returncode=pytest.ExitCode.USAGE_ERROR,
        )
    for item in session.items:
        lacking = sorted(n for n in needs_of(item) if n in absent)
        if lacking:
            item.add_marker(pytest.mark.skip(reason="missing prerequisite: " + "; ".join(absent[n] for n in lacking)))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    # Under CI nothing skips for want of a tool: a skip the table above did not foresee fails the test
    # (unless it says the test does not apply to this host at all).
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        if not any(allowed in reason for allowed in prereqs.NOT_APPLICABLE):
            report.outcome = "failed"
            report.longrepr = f"CI is set: this test skipped ({reason}); install what it needs instead"
    return report


def _skip_reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    if _needed or skipped:
        terminalreporter.section("prerequisites and skips")
        present = [f"{name} ({count})" for name, count in sorted(_needed.items()) if not prereqs.missing(name)]
        terminalreporter.write_line(f"present, with the number of selected tests needing each: {', '.join(present)}")
        for name in sorted(n for n in _needed if prereqs.missing(n)):
            terminalreporter.write_line(f"MISSING {prereqs.describe(name)}: {_needed[name]} test(s) skipped")
        reasons = Counter(_skip_reason(r) for r in skipped)
        terminalreporter.write_line(f"{len(skipped)} skipped in total" + (":" if reasons else ""))
        for reason, count in reasons.most_common():
            terminalreporter.write_line(f"  {count:4d}  {reason[:200]}")
    directory = Path(os.environ[ENV])
    reports = read_reports(directory)
    if not reports:
        return
    terminalreporter.section("reliability report (faults injected, bad inputs tried, domains lost)")
    for name, data in reports.items():
        terminalreporter.write_line(f"{name}: {json.dumps(data, sort_keys=True)}")
    (directory / "summary.json").write_text(json.dumps(reports, indent=2, sort_keys=True))
    terminalreporter.write_line(f"(written to {directory / 'summary.json'})")


@pytest.fixture(scope="session")
def kvm() -> None:
    """Guest code runs on this host (one real VM probed per session; see tests/support/prereqs.py).
    Tests marked ``kvm`` or using this fixture (directly or through another fixture) are skipped
    before they start when it does not, or end a CI run at its start."""
    if prereqs.missing("kvm"):
        why = prereqs.describe("kvm")
        if IN_CI:
            pytest.fail(f"CI is set and guests cannot run: {why}")
        pytest.skip(f"missing prerequisite: {why}")


@pytest.fixture(scope="session")
def tiny_kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return build_tiny_guest(tmp_path_factory.mktemp("tiny"))
    except GuestUnavailable as err:
        if IN_CI:
            pytest.fail(f"CI is set and the tiny guest cannot be built: {err}")
        pytest.skip(f"tiny guest cannot be built: {err}")
