"""Counts that tests report (faults injected, bad inputs tried, domains lost), gathered into one summary.

Each test writes ``<name>.json`` into ``$MSHV_LIBVIRT_REPORT_DIR``; tests/conftest.py points that at a
directory for the session and prints every report at the end of the run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ENV = "MSHV_LIBVIRT_REPORT_DIR"


def write_report(name: str, data: dict[str, Any]) -> None:
    out = os.environ.get(ENV)
    if not out:
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"{name}.json").write_text(json.dumps(data, indent=2, sort_keys=True))


def read_reports(directory: Path) -> dict[str, Any]:
    reports: dict[str, Any] = {}
    for path in sorted(directory.glob("*.json")):
        if path.name == "summary.json":
            continue
        try:
            reports[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return reports
