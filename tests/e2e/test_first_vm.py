"""scripts/first-vm.sh, run as the README tells a newcomer to, against a test daemon's socket."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess, PtyProcess, virsh, wait_for
from tests.support.guests import TINY_BANNER, TINY_POWERBUTTON

pytestmark = pytest.mark.needs("binutils")

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "first-vm.sh"


def first_vm(uri: str, cache: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    res = subprocess.run(
        [str(SCRIPT), "--uri", uri, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,  # not the checkout: the script finds it by its own path
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
    return res


def test_first_vm_script_defines_and_starts_the_tiny_guest(kvm: None, daemon: DaemonProcess, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    out = first_vm(daemon.uri, cache, cwd=tmp_path).stdout
    [kernel] = (cache / "mshv-libvirt").glob("tiny-*/tiny-guest/bzImage")  # keyed by the inputs' hash
    assert f"tiny guest: {kernel}\n" in out
    assert f"virsh -c '{daemon.uri}' define '{kernel.parent.parent / 'first-vm.xml'}'\n" in out
    assert f"virsh -c '{daemon.uri}' start first-vm\n" in out
    assert "Domain 'first-vm' started" in out
    assert virsh(daemon.uri, "domstate", "first-vm").stdout.strip() == "running"
    log = daemon.serial_log("first-vm")
    wait_for(lambda: log.exists() and f"{TINY_BANNER} cmdline=console=ttyS0\n" in log.read_text())

    # The console line it prints works as printed.
    con = PtyProcess(["virsh", "-c", daemon.uri, "console", "first-vm"])
    try:
        con.wait_console_ready()
        con.write(b"hello-42")  # no command keys (q r c f b i n d v g)
        con.read_until(b"hello-42")
        con.write(b"\x1d")
        assert con.wait() == 0
    finally:
        con.kill()

    # Again: the cached image is reused (same file, not rebuilt), the running domain is left alone.
    mtime = kernel.stat().st_mtime_ns
    again = first_vm(daemon.uri, cache, cwd=tmp_path).stdout
    assert "first-vm is already running" in again
    assert kernel.stat().st_mtime_ns == mtime
    assert [p.name for p in (cache / "mshv-libvirt").iterdir() if p.is_dir()] == [kernel.parent.parent.name]

    virsh(daemon.uri, "shutdown", "first-vm")  # the printed shutdown line: the ACPI power button
    wait_for(lambda: virsh(daemon.uri, "domstate", "first-vm").stdout.strip() == "shut off")
    assert TINY_POWERBUTTON in log.read_text()


def test_first_vm_script_print_only_and_irq_mode(daemon: DaemonProcess, tmp_path: Path) -> None:
    out = first_vm(daemon.uri, tmp_path / "cache", "--print", "--irq", "--name", "vm-2", cwd=tmp_path).stdout
    assert "virsh -c" in out and "start vm-2" in out
    [xml] = (tmp_path / "cache" / "mshv-libvirt").glob("tiny-*/vm-2.xml")
    assert "<cmdline>console=ttyS0 tiny.irq</cmdline>" in xml.read_text()
    assert virsh(daemon.uri, "list", "--all", "--name").stdout.strip() == ""  # --print ran nothing


def test_first_vm_script_refuses_a_name_that_needs_quoting(tmp_path: Path) -> None:
    res = subprocess.run([str(SCRIPT), "--print", "--name", "a'b"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "--name must be" in res.stderr
