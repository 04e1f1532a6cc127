"""Which processes count as VMMs when a daemon starts (driver/vmm_client.py find_vmm_processes): a VMM's
child forked without an exec (a disk backend's reaper, abi/shim.c mshv_spawn_helper) shares its command
line and is not one; a daemon that took it for an orphan VMM stopped it, and the guest lost its disk."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mshv_libvirt.driver import layout
from mshv_libvirt.driver.vmm_client import find_vmm_processes
from tests.support.daemon import kill_pids, vmm_processes
from tests.support.procfs import process_gone
from tests.support.waits import wait_for

# A stand-in VMM: its command line names mshv_libvirt.vmm and a config in the run dir, as a real one does;
# it forks a child that keeps that command line (as the reaper does) and writes the child's pid.
FORKER = """
import os, sys, time
child = os.fork()
if child == 0:
    time.sleep(120)
    os._exit(0)
with open(sys.argv[-1] + ".child", "w") as f:
    f.write(str(child))
time.sleep(120)
"""


@pytest.fixture
def vmm_with_a_forked_child(tmp_path: Path) -> Iterator[tuple[Path, Path, int, int]]:
    run = tmp_path / "run"
    config = layout.runtime_dir(run, 1) / layout.VMM_CONFIG
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps({"name": "forked"}))
    proc = subprocess.Popen([sys.executable, "-c", FORKER, "mshv_libvirt.vmm", "--config", str(config)])
    child_file = Path(f"{config}.child")
    pids = [proc.pid]
    try:
        wait_for(lambda: child_file.exists() and child_file.read_text(), what="the forked child's pid")
        child = int(child_file.read_text())
        pids.append(child)
        yield run, config, proc.pid, child
    finally:
        kill_pids(pids)
        proc.wait()
        wait_for(lambda: all(process_gone(p) for p in pids))


def test_a_vmms_forked_child_is_not_a_vmm(vmm_with_a_forked_child: tuple[Path, Path, int, int]) -> None:
    run, config, vmm, child = vmm_with_a_forked_child
    assert vmm != child
    assert find_vmm_processes(run) == [(config, vmm)]
    assert vmm_processes(run) == {"forked": vmm}  # the tests' own scan agrees
