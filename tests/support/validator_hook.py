"""``python -m tests.support.validator_hook <virtmshvd args>``: the real daemon with its one RelaxNG
validator call (``mshv_libvirt.domain.xml._validate``) observed, for tests that must see whether (and
where) it runs. Test-only: production code has no such hook.

* ``MSHV_LIBVIRT_TEST_VALIDATOR_LOG=<file>``: one line per call, ``enter <thread> <schema>`` before it
  runs and ``leave <thread>`` after;
* ``MSHV_LIBVIRT_TEST_VALIDATOR_GATE=<file>``: while that file exists, a call waits before validating
  (bounded: 60 s), so a test can hold a validator blocked and watch the rest of the daemon.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from lxml import etree

from mshv_libvirt.domain import xml as domain_xml

LOG_ENV = "MSHV_LIBVIRT_TEST_VALIDATOR_LOG"
GATE_ENV = "MSHV_LIBVIRT_TEST_VALIDATOR_GATE"
_real_validate = domain_xml._validate
_log_lock = threading.Lock()


def _note(line: str) -> None:
    path = os.environ.get(LOG_ENV)
    if path:
        with _log_lock, open(path, "a") as f:
            f.write(line + "\n")


def _observed_validate(root: etree._Element, path: Path) -> None:
    who = threading.current_thread().name
    _note(f"enter {who} {path.name}")
    gate = os.environ.get(GATE_ENV)
    deadline = time.monotonic() + 60
    while gate and os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        _real_validate(root, path)
    finally:
        _note(f"leave {who}")


def main() -> int:
    domain_xml._validate = _observed_validate
    from mshv_libvirt.daemon import main as daemon_main

    return daemon_main(reexec=False)  # the re-exec would drop the instrumentation


if __name__ == "__main__":
    raise SystemExit(main())
