"""Rules of the suite itself (issue 20 items 7 and 12), read from the tests' source.

- No bare ``time.sleep`` outside tests/support: a test waits for an observable condition
  (``tests.support.waits.wait_for``); a window in which nothing may happen is ``assert_quiet``; a random
  delay that moves a race is ``jitter``. So every span of time the suite lets pass is named in one place.
- No test module imports from another test module: shared helpers live in tests/support.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
SUPPORT = TESTS / "support"


def sleeps(source: str) -> list[int]:
    """Lines that call ``time.sleep`` (or ``sleep`` imported from ``time``, under any alias)."""
    tree = ast.parse(source)
    time_names = {"time"}
    sleep_names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            time_names |= {a.asname or a.name for a in node.names if a.name == "time"}
        elif isinstance(node, ast.ImportFrom) and node.module == "time":
            sleep_names |= {a.asname or a.name for a in node.names if a.name == "sleep"}
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if (
            isinstance(f, ast.Attribute)
            and f.attr == "sleep"
            and isinstance(f.value, ast.Name)
            and f.value.id in time_names
        ) or (isinstance(f, ast.Name) and f.id in sleep_names):
            out.append(node.lineno)
    return out


def imported_test_modules(source: str) -> list[str]:
    """The test modules (``test_*``) that ``source`` imports from, absolute or relative."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            last = node.module.rsplit(".", 1)[-1]
            if last.startswith("test_"):
                out.append("." * node.level + node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.rsplit(".", 1)[-1].startswith("test_")]
    return out


def sources() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if SUPPORT not in p.parents)


def test_the_scanners_see_what_they_look_for() -> None:
    """The rules' own oracle: each scanner finds its pattern in every spelling, and nothing else."""
    assert sleeps("import time\ntime.sleep(1)\n") == [2]
    assert sleeps("import time as t\nt.sleep(1)\n") == [2]
    assert sleeps("from time import sleep as nap\nnap(0.1)\n") == [2]
    assert sleeps("import asyncio\nasyncio.sleep(1)\nfrom tests.support.waits import jitter\njitter(r, 0, 1)\n") == []
    assert imported_test_modules("from tests.e2e.test_reliability import serial_log\n") == [
        "tests.e2e.test_reliability"
    ]
    assert imported_test_modules("from .test_x import y\nimport tests.vmm.test_linux_guest\n") == [
        ".test_x",
        "tests.vmm.test_linux_guest",
    ]
    assert imported_test_modules("from tests.support.daemon import virsh\nfrom tests.vmm.harness import V\n") == []


def test_no_bare_sleep_outside_tests_support() -> None:
    found = [f"{p.relative_to(TESTS)}:{line}" for p in sources() for line in sleeps(p.read_text())]
    assert found == [], (
        "wait for a condition (tests.support.waits.wait_for), or name the quiet window (assert_quiet) "
        f"or the race's random delay (jitter): {found}"
    )


def test_no_test_module_imports_another() -> None:
    found = [f"{p.relative_to(TESTS)}: {m}" for p in sources() for m in imported_test_modules(p.read_text())]
    assert found == [], f"move shared helpers into tests/support: {found}"
