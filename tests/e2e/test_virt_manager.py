"""The real virt-manager (Debian 4.1) under Xvfb against a real virtmshvd, observed through its debug log.

virt-manager runs under /usr/bin/python3 with python3-libvirt and GTK from the gir1.2-* packages
(Debian package virt-manager pulls them in). It gets its own HOME; ``GSETTINGS_BACKEND=memory`` keeps it
away from dconf (which would need a D-Bus session bus and dbus-launch) and ``NO_AT_BRIDGE=1`` away from
the accessibility bus.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess, domain_xml, virsh, wait_for
from tests.support.guests import TINY_BANNER

pytestmark = [pytest.mark.virsh, pytest.mark.slow]

VIRT_MANAGER = shutil.which("virt-manager")
XVFB = shutil.which("Xvfb")
SYSTEM_PYTHON = "/usr/bin/python3"
TIMEOUT = 60.0

# A screenshot without ImageMagick: GDK from the same gir packages virt-manager uses.
GDK_SCREENSHOT = """
import sys
import gi
gi.require_version("Gdk", "3.0")
from gi.repository import Gdk
root = Gdk.get_default_root_window()
pixbuf = Gdk.pixbuf_get_from_window(root, 0, 0, root.get_width(), root.get_height())
pixbuf.savev(sys.argv[1], "png", [], [])
"""


@pytest.fixture(autouse=True)
def _need_virt_manager() -> None:
    if VIRT_MANAGER is None:
        pytest.skip("virt-manager is not installed (apt-get install --no-install-recommends virt-manager)")
    if XVFB is None:
        pytest.skip("Xvfb is not installed (Debian package xvfb)")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL, to the process group this test started for it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def xvfb(log: Path) -> Iterator[str]:
    """An Xvfb on a display number it picks itself (``-displayfd``), so parallel runs never collide."""
    assert XVFB is not None
    rfd, wfd = os.pipe()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [XVFB, "-displayfd", str(wfd), "-screen", "0", "1280x800x24", "-nolisten", "tcp"],
            pass_fds=(wfd,),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    os.close(wfd)
    try:
        number = b""
        with os.fdopen(rfd, "rb") as r:
            while not number.endswith(b"\n"):
                chunk = r.read(1)
                if not chunk:
                    raise AssertionError(f"Xvfb did not report a display:\n{log.read_text(errors='replace')}")
                number += chunk
        yield f":{int(number)}"
    finally:
        _stop(proc)


@dataclass
class VirtManager:
    proc: subprocess.Popen[bytes]
    stderr: Path
    home: Path
    env: dict[str, str]

    @property
    def logfile(self) -> Path:
        return self.home / ".cache" / "virt-manager" / "virt-manager.log"

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if self.proc.poll() is not None:
                raise AssertionError(f"virt-manager exited ({self.proc.returncode}) before {text!r}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in virt-manager's log within {timeout} s:\n{self.log()}")
            time.sleep(0.1)

    def screenshot(self, path: Path) -> bool:
        """Best effort: ImageMagick's ``import`` when present, else GDK; False when neither works."""
        importer = shutil.which("import")
        if importer is not None:
            cmd = [importer, "-window", "root", str(path)]
        else:
            cmd = [SYSTEM_PYTHON, "-c", GDK_SCREENSHOT, str(path)]
        res = subprocess.run(cmd, env=self.env, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
        return res.returncode == 0 and path.exists() and path.stat().st_size > 0


@contextlib.contextmanager
def virt_manager(uri: str, display: str, root: Path, *args: str) -> Iterator[VirtManager]:
    assert VIRT_MANAGER is not None
    home = root / "home"
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "XDG_", "DBUS_"))}
    env.update(
        HOME=str(home),
        XDG_CACHE_HOME=str(home / ".cache"),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_DATA_HOME=str(home / ".local" / "share"),
        DISPLAY=display,
        GSETTINGS_BACKEND="memory",
        NO_AT_BRIDGE="1",
        GDK_BACKEND="x11",
    )
    env.pop("WAYLAND_DISPLAY", None)
    stderr = root / "virt-manager.stderr"
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(
            [VIRT_MANAGER, "--no-fork", "--debug", "--connect", uri, *args],
            stdout=err,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    try:
        yield VirtManager(proc, stderr, home, env)
    finally:
        _stop(proc)


def serial_log(d: DaemonProcess, name: str) -> str:
    path = d.serial_log(name)
    return path.read_text(errors="replace") if path.exists() else ""


def define_vm1(d: DaemonProcess, kernel: Path, tmp_path: Path, *, start: bool) -> None:
    xml = tmp_path / "vm1.xml"
    xml.write_text(domain_xml("vm1", kernel))
    virsh(d.uri, "define", str(xml))
    if start:
        virsh(d.uri, "start", "vm1")
        wait_for(lambda: TINY_BANNER in serial_log(d, "vm1"))


def check_clean(d: DaemonProcess, vm: VirtManager) -> None:
    assert "Uncaught exception" not in vm.log()
    assert "Traceback" not in d.log.read_text(errors="replace")


def test_manager_window_lists_running_domain(
    kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    define_vm1(daemon, tiny_kernel, tmp_path, start=True)
    t0 = time.monotonic()
    with xvfb(tmp_path / "xvfb.log") as display, virt_manager(daemon.uri, display, tmp_path) as vm:
        vm.wait_log(f"conn={daemon.uri} changed to state=Active")
        vm.wait_log("domain=vm1 status=Running added")
        connected = time.monotonic() - t0
        # The domain list is live: lifecycle events from another client reach the GUI.
        virsh(daemon.uri, "destroy", "vm1")
        vm.wait_log("domain lifecycle event: domain=vm1 state=VIR_DOMAIN_EVENT_STOPPED")
        virsh(daemon.uri, "start", "vm1")
        vm.wait_log("domain lifecycle event: domain=vm1 state=VIR_DOMAIN_EVENT_STARTED")
        time.sleep(1)  # let the window draw the new state
        shot = tmp_path / "virt-manager.png"
        if vm.screenshot(shot):
            print(f"screenshot: {shot}")
        assert vm.proc.poll() is None, vm.log()
        assert vm.logfile.exists()  # the log file in its own HOME, where users would look for it
    print(f"virt-manager connected and listed vm1 in {connected:.1f} s")
    check_clean(daemon, vm)
    virsh(daemon.uri, "destroy", "vm1")
    virsh(daemon.uri, "undefine", "vm1")


def test_details_window_fetches_domcaps_and_opens_console(
    kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    define_vm1(daemon, tiny_kernel, tmp_path, start=True)
    with (
        xvfb(tmp_path / "xvfb.log") as display,
        virt_manager(daemon.uri, display, tmp_path, "--show-domain-editor", "vm1") as vm,
    ):
        vm.wait_log("Fetched domain capabilities for (None,x86_64,None,hyperv): <domainCapabilities>")
        vm.wait_log("Opening console stream for dev=<DeviceSerial")
        vm.wait_log("Showing VM details: <vmmDomain name=vm1")
        time.sleep(1)
        shot = tmp_path / "virt-manager-details.png"
        if vm.screenshot(shot):
            print(f"screenshot: {shot}")
        assert vm.proc.poll() is None, vm.log()
    assert "Error fetching domcapabilities XML" not in vm.log()
    check_clean(daemon, vm)
    virsh(daemon.uri, "destroy", "vm1")
    virsh(daemon.uri, "undefine", "vm1")


def test_new_vm_wizard_sees_hyperv_guest(daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path) -> None:
    """Needs no KVM: a shut-off domain in the list, and the wizard picks the guest type from the capabilities."""
    define_vm1(daemon, tiny_kernel, tmp_path, start=False)
    with (
        xvfb(tmp_path / "xvfb.log") as display,
        virt_manager(daemon.uri, display, tmp_path, "--show-domain-creator") as vm,
    ):
        vm.wait_log("domain=vm1 status=Shutoff added")
        vm.wait_log("Guest type set to os_type=hvm, arch=x86_64, dom_type=hyperv")
        vm.wait_log("Showing new vm wizard")
        time.sleep(1)
        shot = tmp_path / "virt-manager-wizard.png"
        if vm.screenshot(shot):
            print(f"screenshot: {shot}")
        assert vm.proc.poll() is None, vm.log()
    check_clean(daemon, vm)
    virsh(daemon.uri, "undefine", "vm1")
