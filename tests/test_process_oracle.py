"""The tests' own "which processes did the daemon leave" scan (tests/support/procfs.py ``run_processes``,
tests/support/daemon.py ``vmm_processes``) on a synthetic process tree shaped like a VMM with a disk: a
session leader whose command line names the run directory (``mshv_libvirt.vmm --config RUN/x/vmm.json``),
a fork of it (the backend's reaper: the same command line) and, below that, a program whose command line
names nothing of the run (qemu-storage-daemon). No driver code is involved: this is the oracle's own test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import kill_pids, vmm_processes
from tests.support.procfs import RUN_MARK, process_gone, run_processes
from tests.support.waits import wait_for

# Leads a new session, forks a "reaper" that forks and execs a "backend" (sleep), prints the three pids.
TREE = r"""
import os, sys
os.setsid()
r, w = os.pipe()
reaper = os.fork()
if reaper == 0:
    backend = os.fork()
    if backend == 0:
        os.execvp("sleep", ["sleep", "600"])
    os.write(w, f"{backend}\n".encode())
    os.waitpid(backend, 0)
    os._exit(0)
backend = int(os.read(r, 64))
print(os.getpid(), reaper, backend, flush=True)
sys.stdin.read()
"""


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[tuple[Path, list[int]]]:
    run = tmp_path / "run"
    (run / "x").mkdir(parents=True)
    config = run / "x" / "vmm.json"
    config.write_text(json.dumps({"name": "dom"}))
    env = {**os.environ, RUN_MARK: str(run)}
    argv = [sys.executable, "-c", TREE, "mshv_libvirt.vmm", "--config", str(config)]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    pids = [int(x) for x in proc.stdout.readline().split()]
    try:
        yield run, pids
    finally:
        kill_pids(pids)
        proc.wait(10)


def test_the_scan_finds_the_session_leader_its_fork_and_the_backend(tree: tuple[Path, list[int]]) -> None:
    run, (vmm, reaper, backend) = tree
    assert set(run_processes(run)) == {vmm, reaper, backend}
    assert run_processes(run, besides=(vmm,)).keys() == {reaper, backend}
    # The VMM, not its fork (which comes later in /proc and has the same command line).
    assert vmm_processes(run) == {"dom": vmm}
    assert run_processes(run.parent / "other") == {}  # another run's directory names none of them


def test_what_outlives_the_vmm_is_still_found(tree: tuple[Path, list[int]]) -> None:
    run, (vmm, reaper, backend) = tree
    os.kill(vmm, signal.SIGKILL)
    wait_for(lambda: process_gone(vmm), 10)
    assert set(run_processes(run)) == {reaper, backend}
    assert vmm_processes(run) == {"dom": reaper}  # a fork left alone is reported as the VMM it was
    os.kill(reaper, signal.SIGKILL)
    wait_for(lambda: process_gone(reaper), 10)
    # An orphan whose command line names nothing, in a session without its leader: found by its environment.
    assert set(run_processes(run)) == {backend}
    os.kill(backend, signal.SIGKILL)
    wait_for(lambda: not run_processes(run), 10)
