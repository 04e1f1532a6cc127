"""The real virsh binary against a real virtmshvd, booting the tiny guest on the emulated device."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.daemon import (
    DaemonProcess,
    PtyProcess,
    define,
    domain_xml,
    running_daemon,
    serial_log,
    virsh,
    virsh_event,
    wait_for,
)
from tests.support.guests import TINY_BANNER, TINY_POWERBUTTON
from tests.support.waits import assert_quiet

pytestmark = pytest.mark.virsh


def test_connection_commands(daemon: DaemonProcess) -> None:
    out = virsh(daemon.uri, "version").stdout
    assert "Using API: MSHV 9.0.0" in out and "Running hypervisor: MSHV" in out
    assert virsh(daemon.uri, "uri").stdout.strip() == daemon.uri
    import socket

    assert virsh(daemon.uri, "hostname").stdout.strip() == socket.gethostname()
    info = virsh(daemon.uri, "nodeinfo").stdout
    assert "CPU(s):" in info and "Memory size:" in info
    caps = virsh(daemon.uri, "capabilities").stdout
    assert "<domain type='hyperv'/>" in caps and "<os_type>hvm</os_type>" in caps
    dcaps = virsh(daemon.uri, "domcapabilities").stdout
    assert "<domain>hyperv</domain>" in dcaps
    assert virsh(daemon.uri, "list", "--all", "--name").stdout.strip() == ""


def test_unknown_uri_is_refused(daemon: DaemonProcess) -> None:
    res = virsh(f"mshv+unix:///other?socket={daemon.socket}", "list", check=False)
    assert res.returncode != 0
    assert "no connection driver available for mshv:///other" in res.stderr


def test_define_start_info_suspend_resume_destroy_undefine(
    kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    define(daemon, tmp_path, "vm1", tiny_kernel, vcpus=2, memory_mib=64)
    assert "vm1" in virsh(daemon.uri, "list", "--all", "--name").stdout
    assert virsh(daemon.uri, "list", "--name").stdout.strip() == ""  # honours the ACTIVE flag
    assert virsh(daemon.uri, "domstate", "--reason", "vm1").stdout.strip() == "shut off (unknown)"

    assert "Domain 'vm1' started" in virsh(daemon.uri, "start", "vm1").stdout
    wait_for(lambda: TINY_BANNER in serial_log(daemon, "vm1"))
    assert virsh(daemon.uri, "domstate", "--reason", "vm1").stdout.strip() == "running (booted)"
    info = dict(
        (k.strip(), v.strip())
        for k, v in (ln.split(":", 1) for ln in virsh(daemon.uri, "dominfo", "vm1").stdout.splitlines() if ":" in ln)
    )
    assert info["State"] == "running" and info["CPU(s)"] == "2" and info["Max memory"] == "65536 KiB"
    assert info["Persistent"] == "yes" and info["Id"] == "1"
    assert "id='1'" in virsh(daemon.uri, "dumpxml", "vm1").stdout
    assert "id=" not in virsh(daemon.uri, "dumpxml", "--inactive", "vm1").stdout.splitlines()[0]

    virsh(daemon.uri, "suspend", "vm1")
    assert virsh(daemon.uri, "domstate", "--reason", "vm1").stdout.strip() == "paused (user)"
    virsh(daemon.uri, "resume", "vm1")
    assert virsh(daemon.uri, "domstate", "--reason", "vm1").stdout.strip() == "running (unpaused)"

    res = virsh(daemon.uri, "start", "vm1", check=False)
    assert res.returncode != 0 and "Domain is already active" in res.stderr  # virsh checks this itself

    virsh(daemon.uri, "destroy", "vm1")
    assert virsh(daemon.uri, "domstate", "--reason", "vm1").stdout.strip() == "shut off (destroyed)"
    assert daemon.processes() == {}
    res = virsh(daemon.uri, "suspend", "vm1", check=False)
    assert "Requested operation is not valid: domain is not running" in res.stderr

    virsh(daemon.uri, "undefine", "vm1")
    assert virsh(daemon.uri, "list", "--all", "--name").stdout.strip() == ""
    assert not daemon.config_file("vm1").exists()
    res = virsh(daemon.uri, "dominfo", "vm1", check=False)
    assert "failed to get domain 'vm1'" in res.stderr


def test_guest_shutdown_via_acpi_button(kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path) -> None:
    define(daemon, tmp_path, "vm2", tiny_kernel)
    virsh(daemon.uri, "start", "vm2")
    wait_for(lambda: TINY_BANNER in serial_log(daemon, "vm2"))
    virsh(daemon.uri, "shutdown", "vm2")
    wait_for(lambda: "shut off" in virsh(daemon.uri, "domstate", "vm2").stdout)
    assert virsh(daemon.uri, "domstate", "--reason", "vm2").stdout.strip() == "shut off (shutdown)"
    assert TINY_POWERBUTTON in serial_log(daemon, "vm2")
    assert daemon.stale_runtime("vm2") == []


def test_reboot_keeps_running_and_boots_again(
    kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    define(daemon, tmp_path, "vm3", tiny_kernel)
    virsh(daemon.uri, "start", "vm3")
    wait_for(lambda: serial_log(daemon, "vm3").count(TINY_BANNER) == 1)
    virsh(daemon.uri, "reboot", "vm3")
    wait_for(lambda: serial_log(daemon, "vm3").count(TINY_BANNER) == 2)
    assert virsh(daemon.uri, "domstate", "vm3").stdout.strip() == "running"
    virsh(daemon.uri, "destroy", "vm3")


def test_autostart_and_start_paused(kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path) -> None:
    define(daemon, tmp_path, "vm4", tiny_kernel)
    virsh(daemon.uri, "autostart", "vm4")
    assert daemon.autostart_link("vm4").is_symlink()
    assert "Autostart:      enable" in virsh(daemon.uri, "dominfo", "vm4").stdout
    assert "vm4" in virsh(daemon.uri, "list", "--all", "--autostart", "--name").stdout
    virsh(daemon.uri, "autostart", "--disable", "vm4")
    assert not daemon.autostart_link("vm4").exists()

    virsh(daemon.uri, "start", "--paused", "vm4")
    assert virsh(daemon.uri, "domstate", "--reason", "vm4").stdout.strip() == "paused (user)"
    assert TINY_BANNER not in serial_log(daemon, "vm4")
    virsh(daemon.uri, "resume", "vm4")
    wait_for(lambda: TINY_BANNER in serial_log(daemon, "vm4"))
    virsh(daemon.uri, "destroy", "vm4")


def test_console_is_bidirectional(kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path) -> None:
    define(daemon, tmp_path, "vmc", tiny_kernel)
    virsh(daemon.uri, "start", "vmc")
    con = PtyProcess(["virsh", "-c", daemon.uri, "console", "vmc"])
    try:
        con.wait_console_ready()
        con.read_until(TINY_BANNER.encode())
        con.write(b"HELLO-MSHV-42")
        con.read_until(b"HELLO-MSHV-42")  # echoed back by the guest through the 16550
        con.write(b"q")  # the tiny guest powers off: the console ends with the domain
        assert con.wait() == 0
    finally:
        con.kill()
    wait_for(lambda: "shut off" in virsh(daemon.uri, "domstate", "vmc").stdout)


def test_console_refuses_a_second_session(kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path) -> None:
    define(daemon, tmp_path, "vmd", tiny_kernel)
    virsh(daemon.uri, "start", "vmd")
    first = PtyProcess(["virsh", "-c", daemon.uri, "console", "vmd"])
    try:
        first.read_until(b"Escape character is")
        second = PtyProcess(["virsh", "-c", daemon.uri, "console", "vmd"])
        second.wait()
        assert b"Active console session exists for this domain" in second.output
        forced = PtyProcess(["virsh", "-c", daemon.uri, "console", "--force", "vmd"])
        try:
            forced.wait_console_ready()
            first.wait()  # the old session was ended
            forced.write(b"\x1d")  # Ctrl+]
            assert forced.wait() == 0
        finally:
            forced.kill()
    finally:
        first.kill()
    virsh(daemon.uri, "destroy", "vmd")


def test_define_rejects_unsupported_xml(daemon: DaemonProcess, tmp_path: Path) -> None:
    bad = tmp_path / "bad.xml"
    bad.write_text(
        "<domain type='hyperv'><name>bad</name><memory>65536</memory><os><type>hvm</type></os>"
        "<devices><disk type='file' device='cdrom'><source file='/x'/><target dev='sda'/></disk></devices></domain>"
    )
    res = virsh(daemon.uri, "define", str(bad), check=False)
    assert res.returncode != 0
    assert "unsupported configuration" in res.stderr and "disk" in res.stderr
    bad.write_text("<domain type='hyperv'><name>x</name>")
    res = virsh(daemon.uri, "define", str(bad), check=False)
    # libvirt's syntax error: file:line: message, the line, a pointer under the column
    assert res.returncode != 0 and "(domain_definition):1: Premature end of data in tag domain" in res.stderr
    assert virsh(daemon.uri, "list", "--all", "--name").stdout.strip() == ""


def test_start_without_kernel_fails_clearly(daemon: DaemonProcess, tmp_path: Path) -> None:
    xml = tmp_path / "nok.xml"
    xml.write_text(
        "<domain type='hyperv'><name>nok</name><memory unit='MiB'>64</memory><os><type>hvm</type></os></domain>"
    )
    virsh(daemon.uri, "define", str(xml))
    res = virsh(daemon.uri, "start", "nok", check=False)
    assert res.returncode != 0 and "has no <os><kernel>" in res.stderr
    assert virsh(daemon.uri, "domstate", "nok").stdout.strip() == "shut off"


def test_redefine_while_running_applies_at_next_boot(
    kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    uuid = "4a1c5e0e-8d39-4a47-9d5b-0a4c2b8f1e11"
    define(daemon, tmp_path, "vmr", tiny_kernel, cmdline="console=ttyS0 first", uuid=uuid)
    virsh(daemon.uri, "start", "vmr")
    define(daemon, tmp_path, "vmr", tiny_kernel, cmdline="console=ttyS0 second", uuid=uuid)
    assert "first" in virsh(daemon.uri, "dumpxml", "vmr").stdout
    assert "second" in virsh(daemon.uri, "dumpxml", "--inactive", "vmr").stdout
    virsh(daemon.uri, "destroy", "vmr")
    assert "second" in virsh(daemon.uri, "dumpxml", "vmr").stdout


def test_undefine_running_domain_makes_it_transient(
    kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    define(daemon, tmp_path, "vmt", tiny_kernel)
    virsh(daemon.uri, "start", "vmt")
    virsh(daemon.uri, "undefine", "vmt")
    assert "Persistent:     no" in virsh(daemon.uri, "dominfo", "vmt").stdout
    virsh(daemon.uri, "destroy", "vmt")
    assert virsh(daemon.uri, "list", "--all", "--name").stdout.strip() == ""


def test_name_and_uuid_conflicts_are_refused(daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path) -> None:
    uuid = "0f8b7f62-3f54-4d0e-a0f8-3c1f0f6f2a01"
    define(daemon, tmp_path, "one", tiny_kernel, uuid=uuid)
    other = tmp_path / "other.xml"
    other.write_text(domain_xml("one", tiny_kernel))  # same name, new uuid
    res = virsh(daemon.uri, "define", str(other), check=False)
    assert f"domain 'one' already exists with uuid {uuid}" in res.stderr
    other.write_text(domain_xml("two", tiny_kernel, uuid=uuid))  # same uuid, new name
    res = virsh(daemon.uri, "define", str(other), check=False)
    assert f"domain 'one' is already defined with uuid {uuid}" in res.stderr
    assert virsh(daemon.uri, "list", "--all", "--name").stdout.split() == ["one"]


def test_create_transient(kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path) -> None:
    xml = tmp_path / "tr.xml"
    xml.write_text(domain_xml("tr", tiny_kernel))
    assert "Domain 'tr' created" in virsh(daemon.uri, "create", str(xml)).stdout
    assert "Persistent:     no" in virsh(daemon.uri, "dominfo", "tr").stdout
    assert not daemon.config_file("tr").exists()
    virsh(daemon.uri, "destroy", "tr")
    assert virsh(daemon.uri, "list", "--all", "--name").stdout.strip() == ""


def test_autostart_domains_start_with_the_daemon(kvm: None, tiny_kernel: Path, tmp_path: Path) -> None:
    root = tmp_path / "auto"
    with running_daemon(root) as d:
        define(d, tmp_path, "boot1", tiny_kernel)
        define(d, tmp_path, "manual1", tiny_kernel)
        virsh(d.uri, "autostart", "boot1")
    with running_daemon(root) as d:  # a fresh daemon on the same config dir
        wait_for(lambda: virsh(d.uri, "domstate", "boot1").stdout.strip() == "running")
        assert virsh(d.uri, "domstate", "manual1").stdout.strip() == "shut off"
        wait_for(lambda: TINY_BANNER in serial_log(d, "boot1"))
        virsh(d.uri, "destroy", "boot1")


def test_idle_timeout_exits_only_without_clients_and_running_domains(
    kvm: None, tiny_kernel: Path, tmp_path: Path
) -> None:
    d = DaemonProcess(tmp_path / "idle", ("--timeout", "2")).start()
    try:
        define(d, tmp_path, "keep", tiny_kernel)
        virsh(d.uri, "start", "keep")
        assert_quiet(d.alive, 4, "a running domain keeps the daemon up past its --timeout of 2 s")
        virsh(d.uri, "destroy", "keep")
        assert d.proc is not None
        d.proc.wait(timeout=15)  # then it leaves, like libvirt's --timeout
        assert d.proc.returncode == 0
    finally:
        d.stop()
        d.destroy_all_vmms()


def test_running_dumpxml_shows_the_pty_and_can_be_defined_again(
    kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    define(daemon, tmp_path, "ptyd", tiny_kernel)
    virsh(daemon.uri, "start", "ptyd")
    live = virsh(daemon.uri, "dumpxml", "ptyd").stdout
    pty = live.split("<source path='", 1)[1].split("'", 1)[0]
    assert pty.startswith("/dev/pts/")
    assert f"<console type='pty' tty='{pty}'>" in live and "<alias name='serial0'/>" in live
    # What a running domain's dumpxml prints is accepted back (runtime-only parts ignored, as libvirt does).
    again = tmp_path / "again.xml"
    again.write_text(live)
    virsh(daemon.uri, "define", str(again))
    inactive = virsh(daemon.uri, "dumpxml", "--inactive", "ptyd").stdout
    assert "/dev/pts/" not in inactive and "alias" not in inactive
    virsh(daemon.uri, "destroy", "ptyd")
    assert "/dev/pts/" not in virsh(daemon.uri, "dumpxml", "ptyd").stdout


def test_reset_reboots_at_once_and_sends_the_reboot_event(
    kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    define(daemon, tmp_path, "rst", tiny_kernel)
    virsh(daemon.uri, "start", "rst")
    wait_for(lambda: serial_log(daemon, "rst").count(TINY_BANNER) == 1)
    watcher = virsh_event(daemon, "rst", "--event", "reboot", "--loop")
    try:
        virsh(daemon.uri, "reset", "rst")
        watcher.read_until(b"event 'reboot' for domain 'rst'")
    finally:
        watcher.kill()
    wait_for(lambda: serial_log(daemon, "rst").count(TINY_BANNER) == 2)
    assert virsh(daemon.uri, "domstate", "--reason", "rst").stdout.strip() == "running (booted)"
    virsh(daemon.uri, "suspend", "rst")
    virsh(daemon.uri, "reset", "rst")  # a paused VM is reset and stays paused
    assert virsh(daemon.uri, "domstate", "--reason", "rst").stdout.strip() == "paused (user)"
    virsh(daemon.uri, "destroy", "rst")
    res = virsh(daemon.uri, "reset", "rst", check=False)
    assert "Requested operation is not valid: domain is not running" in res.stderr


def test_title_and_description_with_virsh_desc(
    kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    define(daemon, tmp_path, "ds", tiny_kernel)
    assert "No title for domain: ds" in virsh(daemon.uri, "desc", "ds", "--title").stdout
    virsh(daemon.uri, "desc", "ds", "--title", "A tiny guest")  # shut off: changes the config
    virsh(daemon.uri, "desc", "ds", "--new-desc", "boots in a blink")
    assert virsh(daemon.uri, "desc", "ds", "--title").stdout.strip() == "A tiny guest"
    assert virsh(daemon.uri, "desc", "ds").stdout.strip() == "boots in a blink"
    assert "<title>A tiny guest</title>" in daemon.config_file("ds").read_text()
    assert "A tiny guest" in virsh(daemon.uri, "list", "--all", "--title").stdout
    virsh(daemon.uri, "start", "ds")
    virsh(daemon.uri, "desc", "ds", "--live", "--title", "running title")
    assert "<title>running title</title>" in virsh(daemon.uri, "dumpxml", "ds").stdout
    assert "<title>A tiny guest</title>" in virsh(daemon.uri, "dumpxml", "--inactive", "ds").stdout
    virsh(daemon.uri, "desc", "ds", "--config", "--title", "")  # an empty value removes it
    assert "<title>" not in virsh(daemon.uri, "dumpxml", "--inactive", "ds").stdout
    virsh(daemon.uri, "destroy", "ds")


def test_start_failures_say_why(kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path) -> None:
    xml = tmp_path / "missing.xml"
    xml.write_text(domain_xml("missing", tmp_path / "no-such-kernel"))
    virsh(daemon.uri, "define", str(xml))
    res = virsh(daemon.uri, "start", "missing", check=False)
    assert "Cannot load the kernel" in res.stderr and "no-such-kernel" in res.stderr
    assert virsh(daemon.uri, "domstate", "missing").stdout.strip() == "shut off"
    huge = tmp_path / "huge.xml"
    huge.write_text(domain_xml("huge", tiny_kernel, memory_mib=64 << 20))  # 64 TiB
    virsh(daemon.uri, "define", str(huge))
    started = time.monotonic()
    res = virsh(daemon.uri, "start", "huge", check=False)
    assert "needs 68719476736 KiB of memory but the host has" in res.stderr
    assert time.monotonic() - started < 10
    assert daemon.processes() == {}


def test_setvcpus_setmem_setmaxmem_change_the_config(
    kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    define(daemon, tmp_path, "sz", tiny_kernel, vcpus=1, memory_mib=64)
    virsh(daemon.uri, "setvcpus", "sz", "2", "--config", "--maximum")
    # libvirt's semantics: raising the maximum leaves the current count; it is set on its own
    assert "current      config         1" in virsh(daemon.uri, "vcpucount", "sz").stdout
    virsh(daemon.uri, "setvcpus", "sz", "2", "--config")
    virsh(daemon.uri, "setmaxmem", "sz", "128M", "--config")
    virsh(daemon.uri, "setmem", "sz", "96M", "--config")
    info = virsh(daemon.uri, "dominfo", "sz").stdout
    assert "CPU(s):         2" in info and "Max memory:     131072 KiB" in info and "Used memory:    98304 KiB" in info
    assert "maximum      config         2" in virsh(daemon.uri, "vcpucount", "sz").stdout
    res = virsh(daemon.uri, "setmem", "sz", "256M", "--config", check=False)
    assert "cannot set memory higher than max memory" in res.stderr
    virsh(daemon.uri, "start", "sz")
    wait_for(lambda: TINY_BANNER in serial_log(daemon, "sz"))
    wait_for(lambda: "TINY-AP-UP 1" in serial_log(daemon, "sz"))  # the new config's second vCPU came up
    res = virsh(daemon.uri, "setvcpus", "sz", "1", "--live", check=False)
    assert "not supported by the mshv driver; use --config" in res.stderr
    res = virsh(daemon.uri, "setmem", "sz", "64M", "--live", check=False)
    assert "not supported by the mshv driver; use --config" in res.stderr
    assert "current      live           2" in virsh(daemon.uri, "vcpucount", "sz").stdout
    virsh(daemon.uri, "destroy", "sz")
