"""A running or paused domain with a disk outlives its daemon (issue 12 item 1, with disks): after a SIGTERM
(which must end the daemon within 5 s) or a SIGKILL of the daemon, the VMM and its qemu-storage-daemon run
on and the image stays locked; the next daemon re-attaches the domain with its disk: virsh lists it in its
state with the disk, the guest answers on its console and writes and reads its disk, a second domain on
the same image is refused with the lock error; its destroy then ends the backend and frees the image.

Every process and lock is read from /proc by the test (tests/support/procfs.py), not asked of the daemon.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.support.daemon import (
    DaemonProcess,
    console_roundtrip,
    domstate,
    kill_pids,
    sigterm,
    virsh,
    wait_for,
)
from tests.support.disks import SECTOR, assert_image_holds, disk_xml, document, write_through_console
from tests.support.procfs import descendants, image_locked, process_gone

pytestmark = pytest.mark.virsh

MiB = 1 << 20
STORAGE_DAEMON = "qemu-storage-daemon"


def backends(vmm: int) -> set[int]:
    """The qemu-storage-daemon processes under the VMM (each runs under a reaper the VMM started)."""
    return {pid for pid, exe in descendants(vmm).items() if exe == STORAGE_DAEMON}


def lock_refusal(image: Path) -> str:
    # libvirt's QEMU driver wording (driver/disks.py lock_failed)
    return f'Failed to get "write" lock\nIs another process using the image [{image}]?'


# Every signal with every format while running; paused (issue 12 item 1: "running and paused VMs") once each.
CASES = [(how, fmt, "running") for how in ("sigterm", "sigkill") for fmt in ("raw", "qcow2")] + [
    ("sigterm", "qcow2", "paused"),
    ("sigkill", "raw", "paused"),
]


@pytest.mark.parametrize(("how", "fmt", "state"), CASES, ids=["-".join(c) for c in CASES])
def test_a_domain_with_a_disk_survives_its_daemon(
    kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path, how: str, fmt: str, state: str
) -> None:
    img = tmp_path / f"disk.{fmt}"
    size = 2 * MiB
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(img), str(size)], check=True, timeout=30)
    for name in ("keep", "rival"):
        xml = tmp_path / f"{name}.xml"
        xml.write_text(document(name, tiny_kernel, disk_xml(img, fmt)))
        virsh(daemon.uri, "define", str(xml))
    virsh(daemon.uri, "start", "keep")
    vmm = daemon.vmm_pid("keep")
    tree: dict[int, str] = {}
    try:
        assert write_through_console(daemon, "keep", 1)["press"] == 1
        tree = descendants(vmm)  # the backend and its reaper
        serving = backends(vmm)
        assert len(serving) == 1, tree
        assert image_locked(img)
        if state == "paused":
            virsh(daemon.uri, "suspend", "keep")

        if how == "sigterm":
            print(f"SIGTERM to exit, a domain with a {fmt} disk {state}: {sigterm(daemon):.2f} s")
        else:
            daemon.kill()
        assert not process_gone(vmm) and descendants(vmm) == tree, (tree, descendants(vmm))
        assert image_locked(img)

        daemon.start()
        # the new daemon left the VMM's children alone (a backend's reaper shares the VMM's command line)
        assert descendants(vmm) == tree, (tree, descendants(vmm), daemon.log.read_text()[-2000:])
        listed = virsh(daemon.uri, "list").stdout
        assert re.search(rf"^\s*\d+\s+keep\s+{state}\s*$", listed, flags=re.M), listed
        assert domstate(daemon, "keep") == ("running (booted)" if state == "running" else "paused (user)")
        assert daemon.vmm_pid("keep") == vmm
        blklist = virsh(daemon.uri, "domblklist", "keep").stdout
        assert re.search(rf"^\s*vda\s+{re.escape(str(img))}\s*$", blklist, flags=re.M), blklist
        if state == "paused":
            virsh(daemon.uri, "resume", "keep")
        console_roundtrip(daemon, "keep", b"AFTER-RESTART")
        line = write_through_console(daemon, "keep", 1)  # written, flushed and read back by the guest
        assert line["press"] == 2 and line["capacity"] == size // SECTOR, line
        if fmt == "raw":
            assert_image_holds(img, 2)  # on the image itself, past the backend the restart left running

        started = virsh(daemon.uri, "start", "rival", check=False)
        assert started.returncode != 0 and lock_refusal(img) in started.stderr, started.stderr
        assert domstate(daemon, "rival", reason=False) == "shut off"
        assert backends(vmm) == serving

        virsh(daemon.uri, "destroy", "keep")
        wait_for(lambda: process_gone(vmm) and all(process_gone(p) for p in tree), timeout=10)
        wait_for(lambda: not image_locked(img), timeout=10)
        if fmt == "qcow2":
            raw = tmp_path / "converted.raw"
            subprocess.run(
                ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(img), str(raw)], check=True, timeout=30
            )
            assert_image_holds(raw, 2)
        virsh(daemon.uri, "start", "rival")  # the image is free for the next domain
        virsh(daemon.uri, "destroy", "rival")
        assert daemon.runtime_leftovers() == []
    finally:
        kill_pids([vmm, *tree])
