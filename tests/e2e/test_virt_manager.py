"""The real virt-manager (Debian 4.1) against a real virtmshvd, driven through its UI as its own uitests do:
dogtail over AT-SPI (tests/support/uitest.py) on Xvfb, with a D-Bus session and the accessibility bus the
harness starts itself. Assertions are on what its windows show (their accessible names and texts) and on the
daemon's state through virsh; a screenshot of each step is kept in the test's tmp dir.

virt-manager and dogtail run under /usr/bin/python3 (Debian's python3-libvirt, GTK from gir1.2-*); the test
only talks to them. The expected texts are virt-manager 4.1's own (its ui/*.ui files and createvm.py).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest
from lxml import etree

from tests.support import libvirtd, uitest
from tests.support.daemon import DaemonProcess, domain_xml, domstate, virsh, wait_for
from tests.support.disks import SECTOR, assert_image_holds
from tests.support.guests import TINY_BANNER, TINY_BLK, TINY_IRQ_FLAG, tiny_blk
from tests.support.networks import isolated_network, net_ports, sh
from tests.support.procfs import image_locked
from tests.support.report import write_report
from tests.support.uitest import Desktop, Ui, node

pytestmark = [pytest.mark.virsh, pytest.mark.slow]

VIRT_MANAGER = shutil.which("virt-manager")
TIMEOUT = 60.0
MANAGER = node("frame", "Virtual Machine Manager")
WIZARD = node("frame", "New VM")


@pytest.fixture(autouse=True)
def _need_tools() -> None:
    missing = ([] if VIRT_MANAGER else ["virt-manager"]) + uitest.missing_tools()
    if missing:
        message = f"missing for the virt-manager UI tests: {', '.join(missing)} (scripts/install-deps.sh)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(autouse=True)
def _host_storage_as_found(system_libvirtd: None) -> Iterator[None]:
    """Storage calls are relayed to the host's libvirtd, where virt-manager builds its 'default' pool on
    connecting (as against qemu:///system): each test leaves the host's pools as it found them."""
    with libvirtd.storage_pools_as_found():
        yield


def default_pool_available_gib() -> float:
    """What libvirt itself says the 'default' pool has free (the oracle for the wizard's storage line)."""
    conn = libvirt.open("storage:///system")
    try:
        return float(conn.storagePoolLookupByName("default").info()[3]) / 1024**3
    finally:
        conn.close()


class VirtManager:
    def __init__(self, desktop: Desktop, uri: str, *args: str) -> None:
        assert VIRT_MANAGER is not None
        self.desktop = desktop
        self.stderr = desktop.root / "virt-manager.stderr"
        self.shots = 0
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                [VIRT_MANAGER, "--no-fork", "--debug", "--connect", uri, *args],
                stdout=err,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=desktop.env,
                start_new_session=True,
            )
        self.ui = Ui(desktop, "virt-manager")

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    def screenshot(self, step: str) -> Path:
        self.shots += 1
        return self.desktop.screenshot(self.desktop.root / f"{self.shots:02d}-{step}.png")

    def alive(self) -> None:
        assert self.proc.poll() is None, self.log()[-3000:]
        assert "Uncaught exception" not in self.log()

    def close(self) -> None:
        self.ui.close()
        uitest.stop(self.proc)


@contextlib.contextmanager
def virt_manager(d: DaemonProcess, tmp_path: Path, *args: str) -> Iterator[VirtManager]:
    with uitest.desktop(tmp_path / "ui") as desktop:
        vm = VirtManager(desktop, d.uri, *args)
        try:
            yield vm
        except BaseException:
            with contextlib.suppress(Exception):
                print(f"screenshot of the failure: {vm.screenshot('failure')}")
            raise
        finally:
            vm.close()
    assert "Traceback" not in d.log.read_text(errors="replace")


def define_vm1(d: DaemonProcess, kernel: Path, tmp_path: Path, *, start: bool) -> None:
    xml = tmp_path / "vm1.xml"
    xml.write_text(domain_xml("vm1", kernel))
    virsh(d.uri, "define", str(xml))
    if start:
        virsh(d.uri, "start", "vm1")
        wait_for(lambda: TINY_BANNER in d.serial_log("vm1").read_text(errors="replace"), timeout=TIMEOUT)


def need_no_libvirt_network() -> None:
    """The tests of the wizard's no-network default need libvirt's network driver to have no network: with one
    (another run's on this shared host), virt-manager picks it."""
    names = virsh("network:///system", "net-list", "--all", "--name").stdout.split()
    if names:
        message = f"libvirt's network driver has networks {names} (another run's?): this test needs none"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def row(name: str, state: str) -> dict[str, Any]:
    return node("table cell", f"{name}\n{state}")


def qemu_refusal(xml: str) -> str:
    """libvirt's QEMU driver's (qemu:///system, the host's libvirtd) refusal to define ``xml``, the oracle."""
    conn = libvirt.open("qemu:///system")
    try:
        dom = conn.defineXML(xml)
    except libvirt.libvirtError as err:
        return str(err.get_error_message())
    else:
        dom.undefine()
        raise AssertionError(f"libvirt's QEMU driver accepted {xml}")
    finally:
        conn.close()


def test_manager_window_shows_and_drives_the_domain(
    kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    define_vm1(daemon, tiny_kernel, tmp_path, start=True)
    with virt_manager(daemon, tmp_path) as vm:
        ui = vm.ui
        ui.find(MANAGER, row("vm1", "Running"), timeout=TIMEOUT)
        assert "mshv" in ui.shown(MANAGER, node("tree table", "vm-list"))  # the connection's row
        vm.screenshot("manager-running")
        # The list is live: another client's lifecycle changes show up.
        virsh(daemon.uri, "suspend", "vm1")
        ui.find(MANAGER, row("vm1", "Paused"), timeout=TIMEOUT)
        vm.screenshot("manager-paused")
        # And the window's own buttons act on the daemon: select the row, toggle Pause off and on.
        ui.click(MANAGER, row("vm1", "Paused"), mouse=True)
        ui.click(MANAGER, node("toggle button", "Pause"))
        ui.find(MANAGER, row("vm1", "Running"), timeout=TIMEOUT)
        assert domstate(daemon, "vm1", reason=False) == "running"
        ui.click(MANAGER, node("toggle button", "Pause"))
        ui.find(MANAGER, row("vm1", "Paused"), timeout=TIMEOUT)
        assert domstate(daemon, "vm1", reason=False) == "paused"
        virsh(daemon.uri, "destroy", "vm1")
        ui.find(MANAGER, row("vm1", "Shutoff"), timeout=TIMEOUT)
        vm.screenshot("manager-shutoff")
        ui.click(MANAGER, node("push button", "Run"))  # starts the shut-off domain
        ui.find(MANAGER, row("vm1", "Running"), timeout=TIMEOUT)
        assert domstate(daemon, "vm1", reason=False) == "running"
        virsh(daemon.uri, "destroy", "vm1")
        vm.alive()
    virsh(daemon.uri, "undefine", "vm1")


def test_new_vm_wizard_manual_install_to_its_last_page(
    daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    """Needs no KVM: the wizard only reads the daemon's capabilities, and is cancelled on its last page."""
    # virt-manager builds this pool itself on connecting, but reads its size when the wizard opens, which
    # with --show-domain-creator can be before its pool list has it ("Unknown GiB"): as a user who has
    # run virt-manager before, have it already (made through the relay; removed by the fixture).
    if "default" not in virsh(daemon.uri, "pool-list", "--all", "--name").stdout.split():
        target = str(libvirtd.VIRTINST_DEFAULT_POOL_DIR)
        for args in (("pool-define-as", "default", "dir", "--target", target), ("pool-build", "default")):
            virsh(daemon.uri, *args)
        virsh(daemon.uri, "pool-start", "default")
    need_no_libvirt_network()
    with virt_manager(daemon, tmp_path, "--show-domain-creator") as vm:
        ui = vm.ui
        ui.find(WIZARD, node("label", "pagenum-label", text="Step 1 of 5"), timeout=TIMEOUT)
        first = ui.shown(WIZARD)
        assert "mshv" in first and "Connection:" in first
        for method in ("Import existing disk image", "Manual install"):
            assert ui.find(WIZARD, node("radio button", method))["sensitive"], method
        vm.screenshot("wizard-1-method")
        ui.click(WIZARD, node("radio button", "Manual install"))
        ui.click(WIZARD, node("push button", "Forward"))

        ui.find(WIZARD, node("label", "pagenum-label", text="Step 2 of 5"), timeout=TIMEOUT)
        ui.keys(WIZARD, node("text", "oslist-entry"), text="generic")
        ui.find(WIZARD, node("table cell", "Generic Linux 2022 (linux2022)"), timeout=TIMEOUT)
        ui.keys(WIZARD, node("text", "oslist-entry"), press=("Return",))
        ui.find(WIZARD, node("text", "oslist-entry", text="Generic Linux 2022"), timeout=TIMEOUT)
        vm.screenshot("wizard-2-os")
        ui.click(WIZARD, node("push button", "Forward"))

        ui.find(WIZARD, node("label", "pagenum-label", text="Step 3 of 5"), timeout=TIMEOUT)
        cpus = ui.find(WIZARD, node("spin button", "cpus"))
        host_cpus = os.cpu_count() or 1
        assert int(cpus["text"]) == min(2, host_cpus)  # virt-manager's default, bounded by the host's CPUs
        assert f"Up to {host_cpus} available" in ui.shown(WIZARD)
        vm.screenshot("wizard-3-memory-cpu")
        ui.click(WIZARD, node("push button", "Forward"))

        # Storage: libvirt's storage driver, through the relay: virt-manager built its default pool on
        # connecting, and the page shows that pool's free space as libvirt reports it.
        ui.find(WIZARD, node("label", "pagenum-label", text="Step 4 of 5"), timeout=TIMEOUT)
        storage = ui.shown(WIZARD)
        assert "Enable storage for this virtual machine" in storage
        free = [m for line in storage if (m := re.fullmatch(r"([0-9.]+) GiB available in the default location", line))]
        assert len(free) == 1, " | ".join(storage)
        assert abs(float(free[0][1]) - default_pool_available_gib()) < 0.2, (free[0][0], default_pool_available_gib())
        vm.screenshot("wizard-4-storage")
        ui.click(WIZARD, node("check box", "Enable storage for this virtual machine"))
        ui.click(WIZARD, node("push button", "Forward"))

        ui.find(WIZARD, node("label", "pagenum-label", text="Step 5 of 5"), timeout=TIMEOUT)
        last = ui.shown(WIZARD)
        vm.screenshot("wizard-5-ready")
        assert "Ready to begin the installation" in last, last
        for shown in ("Generic Linux 2022", "Manual install", "4096 MiB", "None"):  # OS, install, memory, storage
            assert shown in last, (shown, last)
        assert ui.find(WIZARD, node("text", text="linux2022"))["sensitive"]  # the proposed name, editable
        # No virtual network on the daemon yet: the page says so and offers a bridge instead.
        assert "Failed to find a suitable default network." in last, last
        assert ui.find(WIZARD, node("push button", "Finish"))["sensitive"]
        vm.alive()
        ui.click(WIZARD, node("push button", "Cancel"))
        assert vm.proc.wait(TIMEOUT) == 0  # its only window closed: virt-manager exits normally
    assert virsh(daemon.uri, "list", "--all", "--name").stdout.strip() == ""  # nothing was created


def test_console_shows_the_guest_serial_terminal(
    kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    define_vm1(daemon, tiny_kernel, tmp_path, start=True)
    with virt_manager(daemon, tmp_path, "--show-domain-console", "vm1") as vm:
        ui = vm.ui
        window = node("frame", {"re": "vm1 on .*"})
        terminal = node("terminal")
        ui.find(window, terminal, timeout=TIMEOUT)
        # The banner came before the console opened: reset the guest, its new banner reaches the terminal.
        virsh(daemon.uri, "reset", "vm1")
        ui.find(window, node("terminal", text={"contains": TINY_BANNER}), timeout=TIMEOUT)
        # Typing into the terminal reaches the guest, which echoes it back.
        ui.keys(window, terminal, text="hello")
        ui.find(window, node("terminal", text={"contains": "hello"}), timeout=TIMEOUT)
        wait_for(lambda: "hello" in daemon.serial_log("vm1").read_text(errors="replace"), timeout=TIMEOUT)
        vm.screenshot("console")
        vm.alive()
    virsh(daemon.uri, "destroy", "vm1")
    virsh(daemon.uri, "undefine", "vm1")


def test_details_page_shows_the_domain(kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path) -> None:
    define_vm1(daemon, tiny_kernel, tmp_path, start=True)
    with virt_manager(daemon, tmp_path, "--show-domain-editor", "vm1") as vm:
        ui = vm.ui
        window = node("frame", {"re": "vm1 on .*"})
        ui.find(window, node("table cell", "Overview"), timeout=TIMEOUT)
        hardware = ui.shown(window, node("table", "hw-list"))
        assert hardware == ["Overview", "OS information", "Performance", "CPUs", "Memory", "Boot Options", "Serial 1"]
        overview = ui.shown(window)
        uuid = virsh(daemon.uri, "domuuid", "vm1").stdout.strip()
        for shown in ("vm1", uuid, "Running (Booted)", "hyperv", "x86_64"):
            assert shown in overview, (shown, overview)
        vm.screenshot("details-overview")
        # Boot Options shows the domain's direct kernel boot; an edit applied there reaches the daemon.
        ui.click(window, node("table cell", "Boot Options"), mouse=True)
        assert ui.find(window, node("check box", "Enable direct kernel boot"), timeout=TIMEOUT)["checked"] is True
        ui.find(window, node("text", text=str(tiny_kernel)))
        ui.keys(window, node("text", text="console=ttyS0"), press=("End",), text=" tiny")
        ui.find(window, node("text", text="console=ttyS0 tiny"))
        vm.screenshot("details-boot")
        ui.click(window, node("push button", "config-apply"))
        wait_for(
            lambda: "<cmdline>console=ttyS0 tiny</cmdline>" in virsh(daemon.uri, "dumpxml", "--inactive", "vm1").stdout,
            timeout=TIMEOUT,
        )
        vm.alive()
    assert "Error fetching domcapabilities XML" not in vm.log()
    virsh(daemon.uri, "destroy", "vm1")
    virsh(daemon.uri, "undefine", "vm1")


def test_storage_tab_lists_the_pools_and_creates_a_volume(daemon: DaemonProcess, tmp_path: Path) -> None:
    """Needs no KVM. Connection Details' Storage tab shows the pools of libvirt's storage driver (relayed),
    and its Add a Storage Volume dialog creates a qcow2 volume that libvirt itself then lists."""
    name = libvirtd.unique("mshvui")
    target = tmp_path / name
    for args in (("pool-define-as", name, "dir", "--target", str(target)), ("pool-build", name), ("pool-start", name)):
        virsh(daemon.uri, *args)
    with virt_manager(daemon, tmp_path, "--show-host-summary") as vm:
        ui = vm.ui
        window = node("frame", {"re": ".* - Connection Details"})
        ui.click(window, node("page tab", "Storage"), mouse=True, timeout=TIMEOUT)
        pools = node("table", "pool-list")
        ui.find(window, pools, node("table cell", {"contains": name}), timeout=TIMEOUT)
        listed = {line.split("\n")[0] for line in ui.shown(window, pools) if "\n" in line}
        assert listed == set(virsh("storage:///system", "pool-list", "--all", "--name").stdout.split()), listed
        ui.click(window, pools, node("table cell", {"contains": name}), mouse=True)
        vm.screenshot("storage-pool")
        ui.click(window, node("push button", "vol-new"))
        dialog = node("frame", "Add a Storage Volume")
        ui.find(dialog, node("text", text="vol"), timeout=TIMEOUT)  # virt-manager's proposed name
        ui.keys(dialog, node("text", text="vol"), press=("End",), text="-ui")
        # virt-manager proposes qcow2 only to its qemu and test drivers; for any other it proposes raw, fully
        # allocated (20 GiB here): a user picks qcow2, which it then makes sparse.
        ui.click(dialog, node("combo box"), action="press")
        ui.click(node("menu item", "qcow2", showing=True), timeout=TIMEOUT)
        ui.find(dialog, node("label", ".qcow2"), timeout=TIMEOUT)  # the name follows the format
        assert ui.find(dialog, node("check box", "Allocate entire volume now"))["checked"] is False
        ui.click(dialog, node("push button", "Finish"))
        ui.find(window, node("table", "vol-list"), node("table cell", "vol-ui.qcow2"), timeout=TIMEOUT)
        vm.screenshot("storage-volume-created")
        vm.alive()
    # libvirt's own driver has it, and the image is what qemu-img says a qcow2 is.
    vols = virsh("storage:///system", "vol-list", name).stdout
    assert f"vol-ui.qcow2   {target}/vol-ui.qcow2" in vols, vols
    info = subprocess.run(
        ["qemu-img", "info", str(target / "vol-ui.qcow2")], capture_output=True, text=True, check=True
    )
    assert "file format: qcow2" in info.stdout, info.stdout
    assert (target / "vol-ui.qcow2").stat().st_blocks * 512 < 16 << 20  # sparse: qcow2 metadata only


def test_new_vm_wizard_creates_a_direct_kernel_boot_domain(
    kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    """Manual install, no storage, then 'Customize configuration before install': the kernel in Boot Options,
    then Begin Installation."""
    need_no_libvirt_network()
    with virt_manager(daemon, tmp_path, "--show-domain-creator") as vm:
        ui = vm.ui
        manual_install_to_last_page(ui)
        ui.keys(WIZARD, node("text", text="linux2022"), press=("End",), text="-dkb")
        ui.click(WIZARD, node("check box", "Customize configuration before install"))
        ui.click(WIZARD, node("push button", "Finish"), mouse=True, reply=False)  # builds the window (slow)
        custom = node("frame", {"re": "linux2022-dkb on .*"})
        ui.find(custom, HW_LIST, node("table cell", "Boot Options"), timeout=3 * TIMEOUT)
        vm.screenshot("customize")
        direct_kernel_boot(vm, custom, tiny_kernel, None)
        vm.screenshot("customize-kernel")
        ui.click(custom, node("push button", "Begin Installation"), mouse=True, reply=False)  # runs a modal dialog
        # With no libvirt network and no host bridge, virt-manager's default NIC is a bridge without a source
        # (netlist.py: the first row, "Bridge device...", with an empty name). The daemon refuses it as
        # libvirt's QEMU driver on this host refuses the very XML virt-manager sent, and nothing is left defined.
        dialog = node("alert", "vmm dialog")
        ui.find(dialog, timeout=TIMEOUT)
        shown = " ".join(" ".join(ui.shown(dialog)).split())  # virt-manager wraps the message
        sent = vm.log().split("Generated final_xml: \n", 1)[1].split("\n\n[", 1)[0]
        assert '<interface type="bridge">' in sent and "<source" not in sent, sent
        refusal = qemu_refusal(sent)
        assert refusal == "XML error: interface type='bridge' requires a 'source' element", refusal
        assert f"Unable to complete install: '{refusal}'" in shown, shown
        vm.screenshot("install-refused")
        assert virsh(daemon.uri, "list", "--all", "--name").stdout.strip() == ""
        vm.alive()


BLK_CMDLINE = f"console=ttyS0 tiny {TINY_IRQ_FLAG}"  # the tiny guest's virtio-blk driver runs interrupt-driven
HW_LIST = node("table", "hw-list")
# The bold title of each details page the import test opens (virt-manager 4.1's details.ui and details.py).
PAGE_TITLES = {
    "Boot Options": "Boot device order",
    "IDE Disk 1": "Virtual Disk",
    "Tablet": "Virtual Input Device",
    "Display VNC": "VNC Server",
    "Video VGA": "Video",
    "NIC": "Virtual Network Interface",
}
UNAPPLIED = node("label", {"contains": "There are unapplied changes"}, showing=True)


def dismiss_unapplied_prompt(ui: Ui) -> bool:
    """virt-manager 4.1 repopulates its network list on every network event of the connection (other clients'
    included) and then counts its NIC page as edited, so leaving a page may ask to apply changes nobody made:
    answered No (nothing of ours is pending then: each edit here is applied before the page is left)."""
    if ui.exists(UNAPPLIED) is None:
        return False
    ui.click(node("push button", "No", showing=True), reply=False, timeout=TIMEOUT)
    return True


def open_page(vm: VirtManager, window: dict[str, Any], row: str) -> None:
    vm.ui.click(window, HW_LIST, node("table cell", row), mouse=True, reply=False, timeout=TIMEOUT)
    title = node("label", PAGE_TITLES[row.split(" :")[0]], showing=True)
    wait_for(
        lambda: not dismiss_unapplied_prompt(vm.ui) and vm.ui.exists(window, title) is not None,
        timeout=TIMEOUT,
        what=lambda: f"the {row} page: {vm.screenshot('page-' + row.split()[0])}",
    )


def test_new_vm_wizard_imports_a_pool_volume_and_the_guest_writes_it(
    kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    """The wizard's "Import existing disk image" with a raw volume of a dir pool made through libvirt itself, then in
    'Customize configuration before install': the kernel in Boot Options, the disk's bus (its combo offers
    what domcapabilities lists: VirtIO only), and the defaults the daemon refuses by name removed (NIC,
    tablet, VNC display, VGA video: virt-manager adds them whatever domcapabilities says). The guest then
    writes through the disk and the host finds the bytes in the volume."""
    storage = libvirt.open("storage:///system")
    name = libvirtd.unique("mshvui")
    pool = storage.storagePoolDefineXML(
        f"<pool type='dir'><name>{name}</name><target><path>{tmp_path / name}</path></target></pool>"
    )
    try:
        pool.build(0)
        pool.create(0)
        volume = (
            "<volume><name>import.raw</name><capacity>2097152</capacity><target><format type='raw'/></target></volume>"
        )
        image = Path(pool.createXML(volume, 0).path())
        # From the manager window, not --show-domain-creator: with only the wizard open, virt-manager exits
        # once the install completes and its wizard closes.
        with virt_manager(daemon, tmp_path) as vm:
            vm.ui.click(MANAGER, node("push button", "New"), timeout=TIMEOUT)
            import_and_customize(vm, image, tiny_kernel)

            def started() -> bool:
                return not dismiss_unapplied_prompt(vm.ui) and "vm-import" in virsh(daemon.uri, "list", "--name").stdout

            wait_for(started, timeout=3 * TIMEOUT)
            # virt-manager then shows the guest's serial console (no graphics): 'j' typed there makes the
            # tiny guest write, flush and read back through its virtio-blk disk.
            window, terminal = node("frame", "vm-import on mshv"), node("terminal")
            vm.ui.find(window, terminal, timeout=TIMEOUT)
            vm.ui.keys(window, terminal, text="j")
            vm.ui.find(window, node("terminal", text={"contains": f"{TINY_BLK} press="}), timeout=TIMEOUT)
            shot = vm.screenshot("guest-wrote-its-disk")
            write_report("virt_manager_import_disk", {"screenshot": str(shot)})
            print(f"screenshot of the guest's console after it wrote its disk: {shot}")
            vm.alive()
        xml = etree.fromstring(virsh(daemon.uri, "dumpxml", "vm-import").stdout.encode())
        disk = xml.find("devices/disk")
        assert disk is not None and disk.find("source").get("file") == str(image)  # type: ignore[union-attr]
        assert disk.find("target").get("bus") == "virtio"  # type: ignore[union-attr]
        assert [el.tag for el in xml.find("devices")] == ["disk", "serial", "console"]  # type: ignore[union-attr]
        log = daemon.serial_log("vm-import").read_text(errors="replace")
        assert f"{TINY_BANNER} cmdline={BLK_CMDLINE}" in log and "TINY-BLK-FAIL" not in log, log[-2000:]
        assert [(w["press"], w["capacity"]) for w in tiny_blk(log)] == [(1, (2 << 20) // SECTOR)], log[-2000:]
        assert_image_holds(image, 1)  # the guest flushed: the host reads its bytes from the volume's file
        virsh(daemon.uri, "destroy", "vm-import")
        wait_for(lambda: not image_locked(image))
        virsh(daemon.uri, "undefine", "vm-import")
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            pool.destroy()
        pool.undefine()
        storage.close()


def forward(ui: Ui) -> None:
    """The wizard's Forward, as a pointer click asking nothing back: its handler checks the page (the import
    path's storage through libvirt) in virt-manager's main loop, which once outlasted AT-SPI's call timeout
    ("timeout from dbind") on a loaded host. The caller waits for the next page's label."""
    ui.click(WIZARD, node("push button", "Forward"), mouse=True, reply=False)


def import_and_customize(vm: VirtManager, image: Path, kernel: Path) -> None:
    ui = vm.ui
    ui.click(WIZARD, node("radio button", "Import existing disk image"), timeout=TIMEOUT)
    forward(ui)
    ui.find(WIZARD, node("label", "pagenum-label", text="Step 2 of 4"), timeout=TIMEOUT)
    ui.keys(WIZARD, node("text", "import-entry"), text=str(image))
    ui.keys(WIZARD, node("text", "oslist-entry"), text="generic")
    ui.find(WIZARD, node("table cell", "Generic Linux 2022 (linux2022)"), timeout=TIMEOUT)
    ui.keys(WIZARD, node("text", "oslist-entry"), press=("Return",))
    ui.find(WIZARD, node("text", "oslist-entry", text="Generic Linux 2022"), timeout=TIMEOUT)
    vm.screenshot("import-1-path")
    forward(ui)
    ui.find(WIZARD, node("label", "pagenum-label", text="Step 3 of 4"), timeout=TIMEOUT)
    forward(ui)
    ui.find(WIZARD, node("label", "pagenum-label", text="Step 4 of 4"), timeout=TIMEOUT)
    assert str(image) in ui.shown(WIZARD)  # the summary's storage line
    ui.keys(WIZARD, node("text", text="linux2022"), press=("BackSpace",) * len("linux2022"), text="vm-import")
    ui.find(WIZARD, node("text", text="vm-import"), timeout=TIMEOUT)
    ui.click(WIZARD, node("check box", "Customize configuration before install"))
    vm.screenshot("import-2-ready")
    # Finish builds the customize window in its click handler: long enough on a loaded host to outlast
    # AT-SPI's call timeout, so the click asks nothing more of virt-manager.
    ui.click(WIZARD, node("push button", "Finish"), mouse=True, reply=False)
    custom = node("frame", "vm-import on mshv")
    ui.find(custom, HW_LIST, node("table cell", "IDE Disk 1"), timeout=3 * TIMEOUT)
    vm.screenshot("import-3-customize")

    direct_kernel_boot(vm, custom, kernel, BLK_CMDLINE)

    open_page(vm, custom, "IDE Disk 1")
    bus = node("combo box", showing=True)
    offered = [t["name"] for t in ui.texts(custom, bus) if t["role"] == "menu item"]
    assert offered == ["VirtIO"], offered  # virt-manager lists domcapabilities' <disk> bus enum
    ui.request("combo", custom, bus, item="VirtIO")
    vm.screenshot("import-4-disk-bus")
    ui.click(custom, node("push button", "config-apply"))
    ui.find(custom, HW_LIST, node("table cell", "VirtIO Disk 1"), timeout=TIMEOUT)

    refused = remove_rows(vm, custom, ("NIC :", "Tablet", "Display", "Video"))
    assert len(refused) == 4, refused
    shown = ui.shown(custom, HW_LIST)
    assert shown == ["Overview", "OS information", "CPUs", "Memory", "Boot Options", "VirtIO Disk 1", "Console 1"]
    vm.screenshot("import-5-customized")
    ui.click(custom, node("push button", "Begin Installation"), mouse=True, reply=False)


def manual_install_to_last_page(ui: Ui) -> None:
    """The wizard from its first page to its last: Manual install, Generic Linux 2022, the proposed memory
    and CPUs, no storage."""
    ui.click(WIZARD, node("radio button", "Manual install"), timeout=TIMEOUT)
    ui.click(WIZARD, node("push button", "Forward"))
    ui.keys(WIZARD, node("text", "oslist-entry"), text="generic")
    ui.find(WIZARD, node("table cell", "Generic Linux 2022 (linux2022)"), timeout=TIMEOUT)
    ui.keys(WIZARD, node("text", "oslist-entry"), press=("Return",))
    ui.find(WIZARD, node("text", "oslist-entry", text="Generic Linux 2022"), timeout=TIMEOUT)
    ui.click(WIZARD, node("push button", "Forward"))
    ui.find(WIZARD, node("label", "pagenum-label", text="Step 3 of 5"), timeout=TIMEOUT)
    ui.click(WIZARD, node("push button", "Forward"))
    ui.click(WIZARD, node("check box", "Enable storage for this virtual machine"), timeout=TIMEOUT)
    ui.click(WIZARD, node("push button", "Forward"))
    ui.find(WIZARD, node("label", "pagenum-label", text="Step 5 of 5"), timeout=TIMEOUT)


def direct_kernel_boot(vm: VirtManager, window: dict[str, Any], kernel: Path, cmdline: str | None) -> None:
    """Boot Options: the kernel and its command line (if any), applied."""
    ui = vm.ui
    open_page(vm, window, "Boot Options")
    ui.click(window, node("toggle button", "Direct kernel boot", showing=True), action="activate", timeout=TIMEOUT)
    ui.click(window, node("check box", "Enable direct kernel boot", showing=True), timeout=TIMEOUT)
    # The page's entries have no accessible names; in tree order the empty ones are args, kernel, initrd.
    ui.set_text(window, node("text", text="", showing=True, index=1), text=str(kernel))
    ui.find(window, node("text", text=str(kernel)), timeout=TIMEOUT)
    if cmdline is not None:
        ui.set_text(window, node("text", text="", showing=True, index=0), text=cmdline)
        ui.find(window, node("text", text=cmdline), timeout=TIMEOUT)
    ui.click(window, node("push button", "config-apply"))


def remove_rows(vm: VirtManager, window: dict[str, Any], prefixes: tuple[str, ...]) -> list[str]:
    """Remove the devices whose hardware-list rows start with one of ``prefixes``; returns those rows."""
    ui = vm.ui
    rows = [r for r in ui.shown(window, HW_LIST) if r.startswith(prefixes)]
    for n, row in enumerate(rows):
        open_page(vm, window, row)
        ui.click(window, node("push button", "config-remove"), mouse=True, reply=False, timeout=TIMEOUT)
        if n == 0:  # the first removal asks; its "Don't ask me again" spares the others
            ui.click(node("check box", "Don't ask me again", showing=True), timeout=TIMEOUT)
            ui.click(node("push button", "Yes", showing=True), reply=False, timeout=TIMEOUT)
        wait_for(lambda row=row: row not in ui.shown(window, HW_LIST), timeout=TIMEOUT)
    return rows


# virt-manager 4.1's NIC models for a domain type other than kvm, qemu, vz, test and xen
# (addhardware.interface_recommended_models), its default the first of libosinfo's that it prefers (e1000):
# the daemon's one model is virtio, which is what "Hypervisor default" (no <model>) gives.
NIC_MODELS = ["Hypervisor default", "e1000", "rtl8139"]


def test_new_vm_wizard_puts_the_guest_on_a_libvirt_network(
    kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    """The wizard's last page, its "Network selection": an isolated libvirt network (relayed from libvirt's
    network driver), then in 'Customize configuration before install' the kernel and the NIC's model (virt-
    manager proposes e1000, which the daemon refuses by name: "Hypervisor default" instead), the other
    defaults the daemon refuses removed. The guest runs on a port of that network, as libvirt itself lists."""
    name = "linux2022-net"
    with isolated_network(tmp_path) as network:
        with virt_manager(daemon, tmp_path) as vm:
            ui = vm.ui
            ui.click(MANAGER, node("push button", "New"), timeout=TIMEOUT)
            manual_install_to_last_page(ui)
            ui.click(WIZARD, node("toggle button", "Network selection"), action="activate")
            source = node("combo box", "net-source", showing=True)
            offered = [t["name"] for t in ui.texts(WIZARD, source, timeout=TIMEOUT) if t["role"] == "menu item"]
            choice = f"Virtual network '{network}' : Isolated network"
            assert choice in offered and offered[-2:] == ["Bridge device...", "Macvtap device..."], offered
            ui.request("combo", WIZARD, source, item=choice)
            assert "Failed to find a suitable default network." not in ui.shown(WIZARD)
            vm.screenshot("net-1-last-page")
            ui.keys(WIZARD, node("text", text="linux2022"), press=("End",), text="-net")
            ui.click(WIZARD, node("check box", "Customize configuration before install"))
            ui.click(WIZARD, node("push button", "Finish"), mouse=True, reply=False)  # builds the window (slow)
            custom = node("frame", f"{name} on mshv")
            ui.find(custom, HW_LIST, node("table cell", "Boot Options"), timeout=3 * TIMEOUT)
            direct_kernel_boot(vm, custom, tiny_kernel, "console=ttyS0")
            (nic,) = [r for r in ui.shown(custom, HW_LIST) if r.startswith("NIC :")]
            open_page(vm, custom, nic)
            model = node("combo box", "e1000", showing=True)  # a combo's accessible name is its choice
            assert [t["name"] for t in ui.texts(custom, model) if t["role"] == "menu item"] == NIC_MODELS
            ui.request("combo", custom, model, item="Hypervisor default")
            vm.screenshot("net-2-nic")
            ui.click(custom, node("push button", "config-apply"))
            assert remove_rows(vm, custom, ("Tablet", "Display", "Video")) == ["Tablet", "Display VNC", "Video VGA"]
            ui.click(custom, node("push button", "Begin Installation"), mouse=True, reply=False)

            def started() -> bool:
                return not dismiss_unapplied_prompt(ui) and name in virsh(daemon.uri, "list", "--name").stdout

            wait_for(started, timeout=3 * TIMEOUT)
            wait_for(lambda: TINY_BANNER in daemon.serial_log(name).read_text(errors="replace"), timeout=TIMEOUT)
            ui.find(node("frame", f"{name} on mshv"), node("terminal"), timeout=TIMEOUT)
            shot = vm.screenshot("net-3-running")
            write_report("virt_manager_network", {"screenshot": str(shot)})
            print(f"screenshot of the running guest's console: {shot}")
            vm.alive()
        # The running guest's interface is on the network, with the port libvirt's network driver lists.
        live = etree.fromstring(virsh(daemon.uri, "dumpxml", name).stdout.encode())
        (iface,) = live.findall("devices/interface")
        (port,) = net_ports(network)
        assert iface.get("type") == "network", etree.tostring(iface)
        source_el = iface.find("source")
        assert source_el is not None
        assert {str(k): str(v) for k, v in source_el.attrib.items()} == {
            "network": network,
            "portid": port,
            "bridge": network,
        }
        assert iface.find("model").get("type") == "virtio"  # type: ignore[union-attr]
        mac = iface.find("mac").get("address")  # type: ignore[union-attr]
        assert mac is not None and mac.endswith(nic.removeprefix("NIC ")), (mac, nic)
        tap = iface.find("target").get("dev")  # type: ignore[union-attr]
        assert tap is not None and f" master {network} " in sh(
            "ip", "-o", "link", "show", "dev", tap
        )  # the kernel's view
        virsh(daemon.uri, "destroy", name)
        wait_for(lambda: net_ports(network) == [], TIMEOUT, what=lambda: net_ports(network))
        virsh(daemon.uri, "undefine", name)


def inactive_interfaces(d: DaemonProcess, name: str) -> list[Any]:
    return etree.fromstring(virsh(d.uri, "dumpxml", "--inactive", name).stdout.encode()).findall("devices/interface")


def test_add_hardware_network_on_a_shut_off_domain_and_its_removal(
    daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    """Needs no KVM. The details window's Add Hardware -> Network on a shut-off domain: an isolated libvirt
    network, and virtio typed as the model (the e1000 virt-manager proposes is refused by name first); Finish
    changes the persistent config only (as attach-interface --config), and the NIC page's Remove takes the
    interface out again."""
    define_vm1(daemon, tiny_kernel, tmp_path, start=False)
    with isolated_network(tmp_path) as network, virt_manager(daemon, tmp_path, "--show-domain-editor", "vm1") as vm:
        ui = vm.ui
        window = node("frame", {"re": "vm1 on .*"})
        ui.find(window, HW_LIST, node("table cell", "Overview"), timeout=TIMEOUT)
        ui.click(window, node("push button", "add-hardware"), reply=False)
        dialog = node("frame", "Add New Virtual Hardware")
        ui.click(dialog, node("table cell", "Network"), mouse=True, timeout=TIMEOUT)
        source = node("combo box", "net-source", showing=True)
        choice = f"Virtual network '{network}' : Isolated network"
        ui.find(dialog, source, node("menu item", choice), timeout=TIMEOUT)
        ui.request("combo", dialog, source, item=choice)
        model = node("combo box", "e1000", showing=True)  # a combo's accessible name is its choice
        assert [t["name"] for t in ui.texts(dialog, model) if t["role"] == "menu item"] == NIC_MODELS
        # The page's default model is refused by name, and nothing is added.
        ui.click(dialog, node("push button", "Finish"), reply=False)
        alert = node("alert", "vmm dialog")
        ui.find(alert, timeout=TIMEOUT)
        shown = " ".join(" ".join(ui.shown(alert)).split())  # virt-manager wraps the message
        refusal = "unsupported configuration: interface model 'e1000' is not supported by the mshv driver"
        assert f"Unable to add device: {refusal}; use type='virtio'" in shown, shown
        vm.screenshot("add-nic-e1000-refused")
        ui.click(alert, node("push button", "Close"), reply=False)
        assert inactive_interfaces(daemon, "vm1") == []
        # Here "Hypervisor default" is virt-manager's own default (virtinst fills in e1000 before it defines):
        # the model is typed into the combo's entry instead.
        ui.set_text(dialog, model, node("text", text="e1000"), text="virtio")
        ui.find(dialog, node("text", text="virtio", showing=True), timeout=TIMEOUT)
        mac = ui.find(dialog, node("text", "MAC Address Field"))["text"]
        shot = vm.screenshot("add-nic")
        write_report("virt_manager_add_nic", {"screenshot": str(shot)})
        ui.click(dialog, node("push button", "Finish"), reply=False)
        wait_for(lambda: inactive_interfaces(daemon, "vm1") != [], timeout=TIMEOUT)
        (iface,) = inactive_interfaces(daemon, "vm1")
        assert iface.get("type") == "network" and iface.find("source").attrib == {"network": network}
        assert iface.find("mac").get("address") == mac and iface.find("model").get("type") == "virtio"
        assert domstate(daemon, "vm1", reason=False) == "shut off" and net_ports(network) == []
        row = f"NIC {mac[-9:]}"
        ui.find(window, HW_LIST, node("table cell", row), timeout=TIMEOUT)
        vm.screenshot("added-nic")
        open_page(vm, window, row)
        ui.click(window, node("push button", "config-remove"), mouse=True, reply=False, timeout=TIMEOUT)
        ui.click(node("push button", "Yes", showing=True), reply=False, timeout=TIMEOUT)
        wait_for(lambda: inactive_interfaces(daemon, "vm1") == [], timeout=TIMEOUT)
        wait_for(lambda: row not in ui.shown(window, HW_LIST), timeout=TIMEOUT)
        vm.alive()
    virsh(daemon.uri, "undefine", "vm1")
