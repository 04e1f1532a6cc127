"""The procedure-coverage check (tests/support/coverage.py, run by tests/conftest.py at the end of a
whole-suite run) on synthetic call traces written as a daemon writes them (rpc/calltrace.py): a run that
drove every row passes; one that left a table row or a relay path undriven fails naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from mshv_libvirt.rpc.calltrace import CallTrace
from tests.support.coverage import RELAY_PATHS, required, undriven

DEFINE_XML = 11  # REMOTE_PROC_DOMAIN_DEFINE_XML in libvirt's remote_protocol.x
NETWORK_UPDATE = 291  # REMOTE_PROC_NETWORK_UPDATE


def traced(tmp_path: Path, numbers: list[int]) -> Path:
    trace = CallTrace(tmp_path / "calls")  # one daemon's trace file, <pid>.trace
    trace.record(numbers)
    return tmp_path / "calls"


def test_a_run_that_drove_everything_passes(tmp_path: Path) -> None:
    assert undriven(traced(tmp_path, sorted(required()))) == []


@pytest.mark.parametrize(("number", "name"), [(DEFINE_XML, "virDomainDefineXML"), (NETWORK_UPDATE, "virNetworkUpdate")])
def test_an_undriven_procedure_fails_by_name(tmp_path: Path, number: int, name: str) -> None:
    need = required()
    assert need[number] == name  # a table row (define) and a relay path (network update)
    assert undriven(traced(tmp_path, [n for n in need if n != number])) == [f"{number} {name}"]


def test_nothing_driven_names_every_row(tmp_path: Path) -> None:
    missing = undriven(traced(tmp_path, []))
    assert len(missing) == len(required()) > len(RELAY_PATHS)
    assert f"{DEFINE_XML} virDomainDefineXML" in missing
