"""The real virt-install (Debian virtinst 4.1) against a real virtmshvd.

virt-install runs under /usr/bin/python3 with python3-libvirt, so it is started as a plain program with
its own HOME (it writes ``~/.cache/virt-manager/virt-install.log``). In virtinst 4.1 a direct kernel
boot is an "install method" only together with ``--import``; ``--boot kernel=…`` alone fails with
"An install method must be specified".
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from lxml import etree

from mshv_libvirt.domain.xml import parse_domain_xml
from tests.support.daemon import DaemonProcess, serial_log, virsh, wait_for
from tests.support.guests import TINY_AP_BANNER, TINY_BANNER

pytestmark = pytest.mark.virsh

VIRT_INSTALL = shutil.which("virt-install")


@pytest.fixture(autouse=True)
def _need_virt_install() -> None:
    if VIRT_INSTALL is None:
        pytest.skip("virt-install (Debian package virtinst) is not installed")


def virt_install(
    d: DaemonProcess, home: Path, *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    assert VIRT_INSTALL is not None
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), XDG_CONFIG_HOME=str(home / ".config"))
    res = subprocess.run(
        [VIRT_INSTALL, "--connect", d.uri, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    if check and res.returncode != 0:
        raise AssertionError(f"virt-install {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def base_args(name: str, kernel: Path, *, cmdline: str = "console=ttyS0") -> list[str]:
    """The smallest invocation that boots a kernel image: no disk, no network, no graphics."""
    return [
        "--name",
        name,
        "--memory",
        "64",
        "--vcpus",
        "1",
        "--import",
        "--boot",
        f"kernel={kernel},kernel_args={cmdline}",
        "--disk",
        "none",
        "--network",
        "none",
        "--graphics",
        "none",
        "--noautoconsole",
        "--osinfo",
        "detect=on,require=off",
    ]


# Every device virt-install can be told to leave out, plus the optional ones we honour.
FULL_EXTRAS = [
    "--controller",
    "usb,model=none",
    "--sound",
    "none",
    "--memballoon",
    "none",
    "--rng",
    "none",
    "--video",
    "none",
    "--input",
    "none",
    "--serial",
    "pty",
    "--console",
    "pty",
    "--cpu",
    "host-passthrough",
]


def names(d: DaemonProcess) -> set[str]:
    return set(virsh(d.uri, "list", "--all", "--name").stdout.split())


@pytest.mark.parametrize("extras", [[], FULL_EXTRAS], ids=["minimal", "full"])
def test_print_xml_is_accepted_and_creates_nothing(
    daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path, extras: list[str]
) -> None:
    res = virt_install(daemon, tmp_path / "home", *base_args("vi1", tiny_kernel), *extras, "--print-xml")
    root = etree.fromstring(res.stdout.encode())
    assert root.tag == "domain" and root.get("type") == "hyperv"
    assert root.findtext("os/kernel") == str(tiny_kernel)
    assert root.findtext("os/cmdline") == "console=ttyS0"
    assert root.find("devices/emulator") is None  # the capabilities advertise no emulator binary
    # Whatever virt-install emits for these options, the daemon's parser takes as it is.
    cfg = parse_domain_xml(res.stdout)
    assert (cfg.name, cfg.kernel, cfg.memory_kib, cfg.vcpus) == ("vi1", str(tiny_kernel), 65536, 1)
    assert len(cfg.serials) == 1 and len(cfg.consoles) == 1
    assert names(daemon) == set()


def test_import_boot_kernel_creates_and_starts(
    kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    res = virt_install(daemon, tmp_path / "home", *base_args("vi1", tiny_kernel))
    assert "Domain creation completed" in res.stdout + res.stderr
    assert virsh(daemon.uri, "domstate", "vi1").stdout.strip() == "running"
    info = virsh(daemon.uri, "dominfo", "vi1").stdout
    assert "Persistent:     yes" in info  # createXML then defineXML: running and persistent
    wait_for(lambda: TINY_BANNER in serial_log(daemon, "vi1"))
    assert f"{TINY_BANNER} cmdline=console=ttyS0" in serial_log(daemon, "vi1")

    assert "Domain 'vi1' destroyed" in virsh(daemon.uri, "destroy", "vi1").stdout
    assert virsh(daemon.uri, "domstate", "vi1").stdout.strip() == "shut off"
    assert "Domain 'vi1' has been undefined" in virsh(daemon.uri, "undefine", "vi1").stdout
    assert names(daemon) == set()


def test_full_options_round_trip(kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path) -> None:
    args = base_args("vi2", tiny_kernel)
    args[args.index("--vcpus") + 1] = "2"
    args[args.index("--osinfo") + 1] = "linux2022"
    virt_install(daemon, tmp_path / "home", *args, *FULL_EXTRAS, "--autostart")
    assert virsh(daemon.uri, "domstate", "vi2").stdout.strip() == "running"
    wait_for(lambda: f"{TINY_AP_BANNER} 1" in serial_log(daemon, "vi2"))
    assert "Autostart:      enable" in virsh(daemon.uri, "dominfo", "vi2").stdout

    xml = virsh(daemon.uri, "dumpxml", "--inactive", "vi2").stdout
    root = etree.fromstring(xml.encode())
    assert root.findtext("vcpu") == "2"
    assert root.find("cpu").get("mode") == "host-passthrough"  # type: ignore[union-attr]
    assert root.find("devices/controller[@type='usb'][@model='none']") is not None
    assert root.find("devices/memballoon[@model='none']") is not None
    assert root.find("devices/serial[@type='pty']") is not None
    ns = {"libosinfo": "http://libosinfo.org/xmlns/libvirt/domain/1.0"}
    assert root.find("metadata/libosinfo:libosinfo/libosinfo:os", ns).get("id") == (  # type: ignore[union-attr]
        "http://libosinfo.org/linux/2022"
    )

    virsh(daemon.uri, "destroy", "vi2")
    virsh(daemon.uri, "undefine", "vi2")
    assert names(daemon) == set()


def test_transient(kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path) -> None:
    virt_install(daemon, tmp_path / "home", *base_args("vi3", tiny_kernel), "--transient")
    assert "Persistent:     no" in virsh(daemon.uri, "dominfo", "vi3").stdout
    wait_for(lambda: TINY_BANNER in serial_log(daemon, "vi3"))
    virsh(daemon.uri, "destroy", "vi3")
    assert names(daemon) == set()  # a transient domain is gone once destroyed


def test_unsupported_device_is_refused_by_name(daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path) -> None:
    """Without --network none virt-install adds an <interface>: refused, and nothing is left behind."""
    args = base_args("vi4", tiny_kernel)
    i = args.index("--network")
    del args[i : i + 2]
    res = virt_install(daemon, tmp_path / "home", *args, check=False)
    assert res.returncode != 0
    assert "device <interface> is not supported by the mshv driver" in res.stderr
    assert names(daemon) == set()
