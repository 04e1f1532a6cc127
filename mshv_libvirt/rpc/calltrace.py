"""Test-only: which procedures real libvirt clients drove, so the suite can fail on an untested row.

Enabled by ``MSHV_LIBVIRT_CALL_TRACE=<directory>`` in the daemon's environment (the test suite sets
it); otherwise nothing is recorded and nothing is opened. A connection counts as a real client when
its first call after CONNECT_OPEN is CONNECT_SUPPORTS_FEATURE or CONNECT_GET_URI, or it probed a feature
before opening: libvirt's client library always does one of these (virsh and libvirt-python alike); the
suite's raw-socket clients do none.
A procedure is recorded once its arguments decoded, i.e. its handler ran.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "MSHV_LIBVIRT_CALL_TRACE"


class CallTrace:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(directory / f"{os.getpid()}.trace", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC)

    def record(self, numbers: list[int]) -> None:
        os.write(self._fd, "".join(f"{n}\n" for n in numbers).encode())


def from_env() -> CallTrace | None:
    directory = os.environ.get(ENV)
    return CallTrace(Path(directory)) if directory else None


def read_traces(directory: Path) -> set[int]:
    """Every procedure number recorded under ``directory``."""
    out: set[int] = set()
    for path in directory.glob("*.trace"):
        out.update(int(line) for line in path.read_text().split() if line.isdigit())
    return out
