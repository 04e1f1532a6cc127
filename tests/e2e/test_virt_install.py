"""The real virt-install (Debian virtinst 4.1) against a real virtmshvd.

virt-install runs under /usr/bin/python3 with python3-libvirt, so it is started as a plain program with
its own HOME (it writes ``~/.cache/virt-manager/virt-install.log``). In virtinst 4.1 a direct kernel
boot is an "install method" only together with ``--import``; ``--boot kernel=…`` alone fails with
"An install method must be specified".

Disks: virtinst 4.1 decides every qemu-only default by the URI's scheme (``VirtinstConnection.is_qemu``), so
against mshv:// it never picks bus='virtio' (``Guest.supports_virtiodisk`` needs qemu://: the default is
'ide') and writes no ``<driver>`` (``conn_disk_driver_name_qemu``). The daemon refuses the IDE default by
name; ``bus=virtio`` is the one disk option these tests add. Pools are libvirt's own
(``storage:///system``, relayed); each test's pools are those whose directory is under its tmp_path,
removed straight through libvirt afterwards.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from lxml import etree

from mshv_libvirt.domain.xml import parse_domain_xml
from tests.support.daemon import DaemonProcess, serial_log, virsh, wait_for
from tests.support.disks import SECTOR, assert_image_holds, qemu_img_info, write_through_console
from tests.support.guests import TINY_AP_BANNER, TINY_BANNER, TINY_IRQ_FLAG
from tests.support.libvirtd import unique
from tests.support.networks import isolated_network, net_ports
from tests.support.procfs import image_locked

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


def base_args(
    name: str, kernel: Path, *, cmdline: str = "console=ttyS0", disk: tuple[str, ...] = ("none",)
) -> list[str]:
    """The smallest invocation that boots a kernel image: no disk (unless ``disk`` gives --disk's
    values), no network, no graphics."""
    disks = [arg for value in disk for arg in ("--disk", value)]
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
        *disks,
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
    """Without --network none virt-install adds an <interface> with its default model for a non-QEMU
    connection (e1000: virtinst offers virtio only to QEMU): refused naming it, and nothing is left behind."""
    args = base_args("vi4", tiny_kernel)
    i = args.index("--network")
    del args[i : i + 2]
    res = virt_install(daemon, tmp_path / "home", *args, check=False)
    assert res.returncode != 0
    assert "interface model 'e1000' is not supported by the mshv driver; use type='virtio'" in res.stderr
    assert names(daemon) == set()


# ---- disks ------------------------------------------------------------------------------------

BLK_CMDLINE = f"console=ttyS0 tiny {TINY_IRQ_FLAG}"  # the tiny guest's virtio-blk driver runs interrupt-driven
IDE_REFUSAL = "unsupported configuration: disk bus 'ide' is not supported by the mshv driver; use bus='virtio'"


def pools_under(conn: libvirt.virConnect, root: Path) -> list[libvirt.virStoragePool]:
    """libvirt's own pools whose directory is ``root`` or under it."""
    found = []
    for pool in conn.listAllStoragePools():
        target = etree.fromstring(pool.XMLDesc(0).encode()).findtext("target/path") or ""
        if Path(target) == root or Path(target).is_relative_to(root):
            found.append(pool)
    return found


@pytest.fixture
def storage(system_libvirtd: None, tmp_path: Path) -> Iterator[libvirt.virConnect]:
    """libvirt's storage driver itself (the oracle, not the relay); every pool defined during the test with
    its directory under tmp_path (the test's, or one virtinst defines for a disk path) is removed after."""
    conn = libvirt.open("storage:///system")
    try:
        yield conn
    finally:
        for pool in pools_under(conn, tmp_path):
            with contextlib.suppress(libvirt.libvirtError):
                if pool.isActive():
                    pool.destroy()
                pool.undefine()
        conn.close()


def dir_pool(conn: libvirt.virConnect, root: Path) -> libvirt.virStoragePool:
    name = unique("mshvvi")
    pool = conn.storagePoolDefineXML(
        f"<pool type='dir'><name>{name}</name><target><path>{root / name}</path></target></pool>"
    )
    pool.build(0)
    pool.create(0)
    return pool


def test_the_default_ide_disk_is_refused_by_name_and_its_volume_removed(
    daemon: DaemonProcess, storage: libvirt.virConnect, tiny_kernel: Path, tmp_path: Path
) -> None:
    """Needs no KVM: refused at createXML. virt-install allocated the volume first and removes it itself."""
    pool = dir_pool(storage, tmp_path)
    args = base_args("vi5", tiny_kernel, disk=(f"pool={pool.name()},size=0.01",))
    res = virt_install(daemon, tmp_path / "home", *args, check=False)
    assert res.returncode != 0
    assert "Allocating 'vi5.img'" in res.stdout and IDE_REFUSAL in res.stderr, res.stdout + res.stderr
    assert names(daemon) == set()
    pool.refresh(0)
    assert pool.listVolumes() == []  # libvirt's own listing: virt-install deleted what it allocated


def written_disk(d: DaemonProcess, name: str) -> etree._Element:
    disks = etree.fromstring(virsh(d.uri, "dumpxml", name).stdout.encode()).findall("devices/disk")
    assert len(disks) == 1
    return disks[0]


def test_a_volume_it_allocates_in_a_pool_is_written_by_the_guest(
    kvm: None, daemon: DaemonProcess, storage: libvirt.virConnect, tiny_kernel: Path, tmp_path: Path
) -> None:
    pool = dir_pool(storage, tmp_path)
    args = base_args("vi6", tiny_kernel, cmdline=BLK_CMDLINE, disk=(f"pool={pool.name()},size=0.01,bus=virtio",))
    res = virt_install(daemon, tmp_path / "home", *args)
    assert "Domain creation completed" in res.stdout + res.stderr
    vol = pool.storageVolLookupByName("vi6.img")  # libvirt's storage driver has the volume virt-install made
    path = Path(vol.path())
    disk = written_disk(daemon, "vi6")
    assert (disk.get("type"), disk.get("device")) == ("file", "disk")
    assert (disk.find("source").get("file"), disk.find("target").get("bus")) == (str(path), "virtio")  # type: ignore[union-attr]
    line = write_through_console(daemon, "vi6", 1)
    # virtinst sized it 0.01 GiB, not a whole number of sectors; QEMU's block layer, which serves it, rounds up
    assert line["press"] == 1 and line["capacity"] == int(qemu_img_info(path)["virtual-size"]) // SECTOR, line
    assert_image_holds(path, 1)  # the guest flushed: the host reads its bytes from the volume's file
    virsh(daemon.uri, "destroy", "vi6")
    wait_for(lambda: not image_locked(path))
    virsh(daemon.uri, "undefine", "vi6")
    assert names(daemon) == set()


def test_an_image_path_outside_any_pool_is_written_by_the_guest(
    kvm: None, daemon: DaemonProcess, storage: libvirt.virConnect, tiny_kernel: Path, tmp_path: Path
) -> None:
    """virtinst makes a pool of the image's directory (through the relay); the storage fixture removes it."""
    img = tmp_path / unique("mshvvi") / "disk.raw"
    img.parent.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(img), "2M"], check=True, timeout=30)
    args = base_args("vi7", tiny_kernel, cmdline=BLK_CMDLINE, disk=(f"path={img},bus=virtio",))
    virt_install(daemon, tmp_path / "home", *args)
    assert written_disk(daemon, "vi7").find("source").get("file") == str(img)  # type: ignore[union-attr]
    line = write_through_console(daemon, "vi7", 2)
    assert line["press"] == 2 and line["capacity"] == (2 << 20) // SECTOR, line
    assert_image_holds(img, 2)
    virsh(daemon.uri, "destroy", "vi7")
    wait_for(lambda: not image_locked(img))
    virsh(daemon.uri, "undefine", "vi7")
    assert names(daemon) == set()


@pytest.mark.usefixtures("system_libvirtd")
def test_network_interface_on_an_isolated_network(
    kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    """``--network network=NET,model=virtio`` (virtinst offers virtio only to QEMU connections, so the model
    is named): the domain runs with a tap on the network's bridge and a port of libvirt's network driver,
    and the port goes with the domain."""
    with isolated_network(tmp_path) as net:
        args = base_args("vi5", tiny_kernel)
        i = args.index("--network")
        args[i + 1] = f"network={net},model=virtio,mac=52:54:00:6e:00:0a"
        virt_install(daemon, tmp_path / "home", *args)
        try:
            wait_for(lambda: TINY_BANNER in serial_log(daemon, "vi5"))
            listed = virsh(daemon.uri, "domiflist", "vi5").stdout
            assert re.search(rf"vnet\d+\s+network\s+{net}\s+virtio\s+52:54:00:6e:00:0a", listed), listed
            assert len(net_ports(net)) == 1
            virsh(daemon.uri, "destroy", "vi5")
            wait_for(lambda: net_ports(net) == [], what=lambda: net_ports(net))
        finally:
            virsh(daemon.uri, "destroy", "vi5", check=False)
            virsh(daemon.uri, "undefine", "vi5", check=False)
