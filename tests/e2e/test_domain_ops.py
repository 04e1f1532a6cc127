"""Domain operations of issue 12 item 5 through the real daemon: custom metadata elements, domrename,
``start --autodestroy``, inject-nmi and send-key.

Where libvirt's test:///default driver has the same semantics (metadata, rename) it runs the same calls
in the same test and is the oracle; elsewhere the expectations are libvirt's source (qemu_driver.c,
qemu_process.c, libvirt-domain.c), cited at each test.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import subprocess
import sys
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mshv_libvirt.rpc.xdr import Packer
from tests.support.daemon import DaemonProcess, domain_xml, domstate, serial_log, virsh, wait_for
from tests.support.errors import error_or_none
from tests.support.events import DomainEvents
from tests.support.guests import TINY_BANNER, TINY_NMI, tiny_keys
from tests.support.procfs import process_gone
from tests.support.rawrpc import ERROR, error_message, raw
from tests.support.waits import assert_quiet

libvirt = pytest.importorskip("libvirt")

pytestmark = pytest.mark.virsh

E = libvirt
ELEMENT = libvirt.VIR_DOMAIN_METADATA_ELEMENT
LIVE, CONFIG = libvirt.VIR_DOMAIN_AFFECT_LIVE, libvirt.VIR_DOMAIN_AFFECT_CONFIG
APP1, APP2 = "http://app1.example.org/ns/", "http://app2.example.org/ns/"


def ref_domain(name: str) -> str:
    return f"<domain type='test'><name>{name}</name><memory>65536</memory><os><type>hvm</type></os></domain>"


def outcome(call: Callable[[], object]) -> object:
    """The call's value, or its error (code and message): what a client sees either way."""
    try:
        return ("ok", call())
    except libvirt.libvirtError as err:
        return ("error", err.get_error_code(), str(err))


def metadata_block(xml: str) -> str:
    m = re.search(r"^( *)<metadata>\n.*?^\1</metadata>\n", xml, re.S | re.M)
    assert m, xml
    return m.group(0)


# --- metadata elements --------------------------------------------------------------------------------


def test_metadata_elements_match_libvirt(conn: Any, ref: Any, daemon: DaemonProcess, tiny_kernel: Path) -> None:
    ours = conn.defineXML(domain_xml("meta", tiny_kernel))
    theirs = ref.defineXML(ref_domain("meta"))
    steps: list[Callable[[Any], object]] = [
        lambda d: d.metadata(ELEMENT, APP1, 0),  # nothing yet: NO_DOMAIN_METADATA
        lambda d: d.setMetadata(ELEMENT, "<info><owner>alice</owner><n a='1'>x<b/>y</n></info>", "app1", APP1, 0),
        lambda d: d.metadata(ELEMENT, APP1, 0),
        lambda d: d.setMetadata(ELEMENT, "<other xmlns:z='http://z/'><z:q/></other>", "app2", APP2, CONFIG),
        lambda d: d.metadata(ELEMENT, APP2, CONFIG),
        lambda d: d.setMetadata(ELEMENT, "<info><owner>bob</owner></info>", "a1", APP1, 0),  # replaces app1's
        lambda d: d.metadata(ELEMENT, APP1, 0),
        lambda d: d.metadata(ELEMENT, "http://nobody/", 0),
        lambda d: d.setMetadata(ELEMENT, "not xml", "app1", APP1, 0),
        lambda d: d.setMetadata(ELEMENT, "<a><b></a>", "app1", APP1, 0),
        lambda d: d.setMetadata(ELEMENT, "<a/>", "1bad", APP1, 0),
        lambda d: d.setMetadata(ELEMENT, "<a/>", None, APP1, 0),
        lambda d: d.setMetadata(ELEMENT, "<a/>", "k", None, 0),
        lambda d: d.metadata(ELEMENT, None, 0),
        lambda d: d.metadata(ELEMENT, APP1, LIVE),  # not running
        lambda d: d.setMetadata(7, "<a/>", "k", APP1, 0),
        lambda d: d.metadata(ELEMENT, APP1, 0),  # failed sets changed nothing
        lambda d: d.setMetadata(ELEMENT, None, None, APP1, 0),  # removes it
        lambda d: d.metadata(ELEMENT, APP1, 0),
        lambda d: d.metadata(ELEMENT, APP2, 0),
    ]
    for i, step in enumerate(steps):
        assert outcome(functools.partial(step, ours)) == outcome(functools.partial(step, theirs)), f"step {i}"
    # What dumpxml shows of <metadata> is libvirt's too, also after a daemon restart reads it back.
    ours.setMetadata(ELEMENT, "<info><owner>alice</owner><n a='1'>x<b/>y</n></info>", "app1", APP1, 0)
    theirs.setMetadata(ELEMENT, "<info><owner>alice</owner><n a='1'>x<b/>y</n></info>", "app1", APP1, 0)
    expected = metadata_block(theirs.XMLDesc(0))
    assert metadata_block(ours.XMLDesc(0)) == expected
    conn.close()
    daemon.stop()
    daemon.start()
    again = libvirt.open(daemon.uri)
    try:
        dom = again.lookupByName("meta")
        assert metadata_block(dom.XMLDesc(0)) == expected
        assert dom.metadata(ELEMENT, APP1, 0) == theirs.metadata(ELEMENT, APP1, 0)
    finally:
        again.close()


def test_metadata_of_a_running_domain_live_and_config(
    kvm: None, conn: Any, ref: Any, daemon: DaemonProcess, tiny_kernel: Path
) -> None:
    ours = conn.defineXML(domain_xml("livemeta", tiny_kernel))
    ours.create()
    theirs = ref.lookupByName("test")  # running, persistent
    steps: list[Callable[[Any], object]] = [
        lambda d: d.setMetadata(ELEMENT, "<l>live</l>", "x", APP1, LIVE),
        lambda d: d.metadata(ELEMENT, APP1, LIVE),
        lambda d: d.metadata(ELEMENT, APP1, CONFIG),  # only the live definition has it
        lambda d: d.setMetadata(ELEMENT, "<c>both</c>", "x", APP1, LIVE | CONFIG),
        lambda d: d.metadata(ELEMENT, APP1, 0),  # current = live for a running domain
        lambda d: d.metadata(ELEMENT, APP1, CONFIG),
        lambda d: d.setMetadata(ELEMENT, None, None, APP1, CONFIG),
        lambda d: d.metadata(ELEMENT, APP1, CONFIG),
        lambda d: d.metadata(ELEMENT, APP1, LIVE),
    ]
    for i, step in enumerate(steps):
        assert outcome(functools.partial(step, ours)) == outcome(functools.partial(step, theirs)), f"step {i}"
    ours.destroy()


def test_virsh_metadata_command(daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path) -> None:
    xml = tmp_path / "v.xml"
    xml.write_text(domain_xml("vmeta", tiny_kernel))
    virsh(daemon.uri, "define", str(xml))
    virsh(daemon.uri, "metadata", "vmeta", APP1, "--key", "app", "--set", "<cfg><mode>fast</mode></cfg>")
    assert virsh(daemon.uri, "metadata", "vmeta", APP1).stdout.strip() == "<cfg>\n  <mode>fast</mode>\n</cfg>"
    missing = virsh(daemon.uri, "metadata", "vmeta", APP2, check=False)
    assert missing.returncode == 1
    assert "metadata not found: Requested metadata element is not present" in missing.stderr
    virsh(daemon.uri, "metadata", "vmeta", APP1, "--remove")
    assert virsh(daemon.uri, "metadata", "vmeta", APP1, check=False).returncode == 1


# --- rename ---------------------------------------------------------------------------------------------


def test_rename_matches_libvirt(conn: Any, ref: Any, daemon: DaemonProcess, tiny_kernel: Path) -> None:
    ours_events, ref_events = DomainEvents(conn), DomainEvents(ref)
    try:
        ours = conn.defineXML(domain_xml("old", tiny_kernel))
        conn.defineXML(domain_xml("taken", tiny_kernel))
        theirs = ref.defineXML(ref_domain("old"))
        ref.defineXML(ref_domain("taken"))
        uuid = ours.UUIDString()
        ours.setAutostart(1)
        # (the error domain is each driver's own: VIR_FROM_TEST there; code and message are libvirt's)
        for new in ("old", "taken", "a/b", ""):
            want = error_or_none(functools.partial(theirs.rename, new, 0))
            assert want is not None, new
            got = error_or_none(functools.partial(ours.rename, new, 0))
            assert got is not None and (got[0], got[2]) == (want[0], want[2]), new
        # libvirt's rename checks nothing else, so its parser would refuse to load such a name later;
        # every rule of a define applies here, so the daemon never stores a config it cannot read back.
        got = error_or_none(lambda: ours.rename("two\nlines", 0))
        # Exactly what a define of that name gets (libvirt's parser: XML_DETAIL "invalid char in name").
        assert got is not None and (got[0], got[2]) == (libvirt.VIR_ERR_XML_DETAIL, "invalid char in name: \n"), got
        assert theirs.rename("new", 0) == ours.rename("new", 0) == 0
        assert ours.name() == "new"  # the remote driver renames the client's handle too
        renamed = [("old", E.VIR_DOMAIN_EVENT_UNDEFINED, E.VIR_DOMAIN_EVENT_UNDEFINED_RENAMED)]
        renamed.append(("new", E.VIR_DOMAIN_EVENT_DEFINED, E.VIR_DOMAIN_EVENT_DEFINED_RENAMED))
        ref_events.wait([("old", 0, 0), ("taken", 0, 0), *renamed])
        ours_events.wait([("old", 0, 0), ("taken", 0, 0), *renamed])
        for c in (conn, ref):
            assert error_or_none(functools.partial(c.lookupByName, "old"))[0] == libvirt.VIR_ERR_NO_DOMAIN  # type: ignore[index]
            assert c.lookupByName("new").name() == "new"
        assert conn.lookupByUUIDString(uuid).name() == "new"
        assert ours.autostart() == 1
        assert "<name>new</name>" in ours.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        # Only a shut-off domain can be renamed (the test driver's "test" domain is running).
        running = error_or_none(lambda: ref.lookupByName("test").rename("x", 0))
        assert running is not None and running[2] == "Requested operation is not valid: cannot rename active domain"
    finally:
        ours_events.close()
        ref_events.close()
    # The new name is what the next daemon reads; the old config and its autostart link are gone.
    conn.close()
    daemon.stop()
    files = sorted(str(p.relative_to(daemon.config_dir)) for p in daemon.config_dir.rglob("*") if not p.is_dir())
    assert files == ["autostart/new.xml", "new.xml", "taken.xml"]
    assert (daemon.config_dir / "autostart" / "new.xml").resolve() == (daemon.config_dir / "new.xml").resolve()
    daemon.start()
    names = virsh(daemon.uri, "list", "--all", "--name").stdout.split()
    assert sorted(names) == ["new", "taken"]
    assert virsh(daemon.uri, "domuuid", "new").stdout.strip() == uuid
    assert virsh(daemon.uri, "dominfo", "new").stdout.count("Autostart:      enable") == 1


def test_rename_of_a_running_domain_is_refused(kvm: None, conn: Any, daemon: DaemonProcess, tiny_kernel: Path) -> None:
    dom = conn.defineXML(domain_xml("busy", tiny_kernel))
    dom.create()
    err = error_or_none(lambda: dom.rename("idle", 0))
    assert err == (
        libvirt.VIR_ERR_OPERATION_INVALID,
        libvirt.VIR_FROM_DOMAIN,
        "Requested operation is not valid: cannot rename active domain",
    )
    res = virsh(daemon.uri, "domrename", "busy", "idle", check=False)
    assert res.returncode == 1 and "cannot rename active domain" in res.stderr
    dom.destroy()
    assert virsh(daemon.uri, "domrename", "busy", "idle").returncode == 0
    assert virsh(daemon.uri, "list", "--all", "--name").stdout.split() == ["idle"]


@pytest.mark.parametrize("crash_after", ["journal", "new-config", "autostart-link", "old-removed"])
def test_rename_interrupted_by_a_crash_leaves_one_domain(
    daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path, crash_after: str
) -> None:
    """The files a daemon killed during a rename leaves (at each step), then a new daemon: one domain."""
    xml = tmp_path / "c.xml"
    xml.write_text(domain_xml("before", tiny_kernel))
    virsh(daemon.uri, "define", str(xml))
    virsh(daemon.uri, "autostart", "before")
    uuid = virsh(daemon.uri, "domuuid", "before").stdout.strip()
    stored = (daemon.config_dir / "before.xml").read_text()
    daemon.stop()
    cfg = daemon.config_dir
    (cfg / f".rename-{uuid}.json").write_text('{"old": "before", "new": "after", "autostart": true}')
    if crash_after != "journal":
        (cfg / "after.xml").write_text(stored.replace("<name>before</name>", "<name>after</name>"))
    if crash_after in ("autostart-link", "old-removed"):
        (cfg / "autostart" / "after.xml").symlink_to(cfg / "after.xml")
    if crash_after == "old-removed":
        (cfg / "autostart" / "before.xml").unlink()
        (cfg / "before.xml").unlink()
    daemon.extra_args = ("--no-autostart",)  # the config is all this test is about
    daemon.start()
    want = "before" if crash_after == "journal" else "after"
    assert virsh(daemon.uri, "list", "--all", "--name").stdout.split() == [want]
    assert virsh(daemon.uri, "domuuid", want).stdout.strip() == uuid
    assert sorted(p.name for p in cfg.iterdir() if p.is_file()) == [f"{want}.xml"]
    assert sorted(p.name for p in (cfg / "autostart").iterdir()) == [f"{want}.xml"]


# --- autodestroy ----------------------------------------------------------------------------------------


def test_virsh_start_autodestroy_ends_with_virsh(
    kvm: None, conn: Any, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    events = DomainEvents(conn)
    try:
        xml = tmp_path / "ad.xml"
        xml.write_text(domain_xml("ad", tiny_kernel))
        virsh(daemon.uri, "define", str(xml))
        # virsh exits right after the start: its connection closes, so the domain is destroyed
        # (qemuProcessAutoDestroy: STOPPED/DESTROYED, reason destroyed).
        virsh(daemon.uri, "start", "--autodestroy", "ad")
        wait_for(lambda: domstate(daemon, "ad") == "shut off (destroyed)", timeout=15)
        events.wait(
            [
                ("ad", E.VIR_DOMAIN_EVENT_DEFINED, E.VIR_DOMAIN_EVENT_DEFINED_ADDED),
                ("ad", E.VIR_DOMAIN_EVENT_STARTED, E.VIR_DOMAIN_EVENT_STARTED_BOOTED),
                ("ad", E.VIR_DOMAIN_EVENT_STOPPED, E.VIR_DOMAIN_EVENT_STOPPED_DESTROYED),
            ]
        )
        assert daemon.processes() == {}
        # Without the flag the same start outlives virsh; and a later plain start is not autodestroyed.
        virsh(daemon.uri, "start", "ad")
        assert_quiet(lambda: domstate(daemon, "ad") == "running (booted)", 0.5, "a plain start outlives virsh")
    finally:
        events.close()
    virsh(daemon.uri, "destroy", "ad")


CHILD = r"""
import sys, libvirt
conn = libvirt.open(sys.argv[1])
dom = conn.createXML(open(sys.argv[2]).read(), libvirt.VIR_DOMAIN_START_AUTODESTROY)
print(dom.ID(), flush=True)
sys.stdin.read()  # until killed
"""


def test_autodestroy_follows_its_connection(
    kvm: None, conn: Any, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    # A transient domain made by a connection that closes: destroyed, and gone (it was transient).
    other = libvirt.open(daemon.uri)
    dom = other.createXML(domain_xml("tr", tiny_kernel), libvirt.VIR_DOMAIN_START_AUTODESTROY)
    pid = daemon.vmm_pid("tr")
    assert conn.lookupByName("tr").isActive() == 1
    keep = other.createXML(domain_xml("kept", tiny_kernel), 0)  # no flag: stays
    assert dom.ID() > 0 and keep.ID() > 0
    del dom, keep  # a virDomainPtr holds its connection open: the connection ends with the last reference
    assert other.close() == 0
    wait_for(lambda: error_or_none(lambda: conn.lookupByName("tr")) is not None, timeout=15)
    assert error_or_none(lambda: conn.lookupByName("tr"))[0] == libvirt.VIR_ERR_NO_DOMAIN  # type: ignore[index]
    wait_for(lambda: process_gone(pid), timeout=10)
    assert conn.lookupByName("kept").isActive() == 1
    conn.lookupByName("kept").destroy()

    # A client that dies (SIGKILL) closes its connection as well.
    xml = tmp_path / "k.xml"
    xml.write_text(domain_xml("killed", tiny_kernel))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, daemon.uri, str(xml)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and int(child.stdout.readline()) > 0
        pid = daemon.vmm_pid("killed")
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        wait_for(lambda: error_or_none(lambda: conn.lookupByName("killed")) is not None, timeout=15)
        assert process_gone(pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        child.wait(10)


def test_autodestroy_domains_end_with_the_daemon(
    kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    """libvirtd closes its clients when it stops, and with them runs their autodestroy callbacks."""
    xml = tmp_path / "s.xml"
    xml.write_text(domain_xml("stays", tiny_kernel))
    virsh(daemon.uri, "define", str(xml))
    c = libvirt.open(daemon.uri)
    c.lookupByName("stays").createWithFlags(libvirt.VIR_DOMAIN_START_AUTODESTROY)
    pid = daemon.vmm_pid("stays")
    daemon.stop()
    assert process_gone(pid)
    with contextlib.suppress(libvirt.libvirtError):
        c.close()
    assert not (daemon.run_dir / "stays.json").exists()  # no record: nothing for the next daemon to re-attach
    daemon.start()
    assert domstate(daemon, "stays") == "shut off (unknown)"  # (a shut-off reason is not kept across restarts)
    assert daemon.processes() == {}


# --- inject-nmi and send-key ----------------------------------------------------------------------------


@pytest.fixture
def running(kvm: None, conn: Any, daemon: DaemonProcess, tiny_kernel: Path) -> Any:
    dom = conn.defineXML(domain_xml("keys", tiny_kernel))
    err = error_or_none(lambda: dom.injectNMI(0))
    # qemuDomainInjectNMI / qemuDomainSendKey: virDomainObjCheckActive first
    assert err == (
        libvirt.VIR_ERR_OPERATION_INVALID,
        libvirt.VIR_FROM_DOMAIN,
        "Requested operation is not valid: domain is not running",
    )
    assert error_or_none(lambda: dom.sendKey(0, 0, [30], 1, 0)) == err
    assert error_or_none(lambda: dom.rename("keys", 0)) is not None
    dom.create()
    wait_for(lambda: TINY_BANNER in serial_log(daemon, "keys"))
    return dom


def test_inject_nmi_reaches_the_guest(running: Any, daemon: DaemonProcess) -> None:
    virsh(daemon.uri, "inject-nmi", "keys")
    wait_for(lambda: f"{TINY_NMI} 00000001\n" in serial_log(daemon, "keys"))
    assert running.injectNMI(0) == 0
    wait_for(lambda: f"{TINY_NMI} 00000002\n" in serial_log(daemon, "keys"))
    err = error_or_none(lambda: running.injectNMI(1))
    assert err is not None and err[0] == libvirt.VIR_ERR_INVALID_ARG
    assert err[2] == "invalid argument: unsupported flags (0x1) in function virDomainInjectNMI"


def keys(d: DaemonProcess) -> list[str]:
    return tiny_keys(serial_log(d, "keys"))


def test_send_key_reaches_the_guest_as_set1_scancodes(running: Any, daemon: DaemonProcess) -> None:
    # virsh turns the names into Linux keycodes; the guest reads set-1 make/break codes from port 0x60.
    virsh(daemon.uri, "send-key", "keys", "--holdtime", "20", "KEY_LEFTCTRL", "KEY_LEFTALT", "KEY_DELETE")
    want = ["1d", "38", "e0", "53", "e0", "d3", "b8", "9d"]
    wait_for(lambda: len(keys(daemon)) >= len(want))
    assert keys(daemon) == want
    # The same key in every codeset we translate (xt and atset1 are libvirt's set 1, xt_kbd Linux's xtkbd).
    for codeset, code in [
        (E.VIR_KEYCODE_SET_XT, 0x1E),
        (E.VIR_KEYCODE_SET_ATSET1, 0x1E),
        (E.VIR_KEYCODE_SET_XT_KBD, 0x1E),
    ]:
        assert running.sendKey(codeset, 10, [code], 1, 0) == 0
    assert running.sendKey(E.VIR_KEYCODE_SET_QNUM, 10, [0xC8], 1, 0) == 0  # qnum: Up
    virsh(daemon.uri, "send-key", "keys", "--codeset", "xt", "0xe048")  # Up again, as an extended set-1 code
    want += ["1e", "9e"] * 3 + ["e0", "48", "e0", "c8"] * 2
    wait_for(lambda: len(keys(daemon)) >= len(want))
    assert keys(daemon) == want
    # libvirt's QEMU driver's refusal of a keycode with no translation, before anything is sent.
    err = error_or_none(lambda: running.sendKey(E.VIR_KEYCODE_SET_LINUX, 0, [30, 999], 2, 0))
    assert err == (
        libvirt.VIR_ERR_INTERNAL_ERROR,
        libvirt.VIR_FROM_DOMAIN,
        "internal error: cannot translate keycode 999 of linux codeset to qnum keycode",
    )
    err = error_or_none(lambda: running.sendKey(E.VIR_KEYCODE_SET_USB, 0, [4], 1, 0))
    assert err is not None and err[0] == libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED and "usb codeset" in err[2]
    err = error_or_none(lambda: running.sendKey(0, 0, [30], 1, 4))
    assert err is not None and err[2] == "invalid argument: unsupported flags (0x4) in function virDomainSendKey"
    assert_quiet(lambda: keys(daemon) == want, 0.3, "none of the refused calls sent a key")


# --- what libvirtd checks for clients that skip libvirt's client library -------------------------------


def test_server_side_argument_checks(daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path) -> None:
    """libvirtd calls the public API too, so its checks (libvirt-domain.c) hold for raw RPC clients."""
    xml = tmp_path / "r.xml"
    xml.write_text(domain_xml("rawdom", tiny_kernel))
    virsh(daemon.uri, "define", str(xml))
    raw_uuid = uuidlib.UUID(virsh(daemon.uri, "domuuid", "rawdom").stdout.strip()).bytes

    def call(proc: int, fill: Callable[[Packer], None]) -> tuple[int, str]:
        p = Packer()
        p.string("rawdom")
        p.opaque_fixed(raw_uuid, 16)
        p.int(-1)
        fill(p)
        with raw(daemon.socket) as c:
            status, payload = c.roundtrip(proc, p.getvalue())
        assert status == ERROR
        return error_message(payload)

    def send_key(codeset: int, codes: list[int]) -> Callable[[Packer], None]:
        def fill(p: Packer) -> None:
            p.uint(codeset)
            p.uint(0)
            p.uint(len(codes))
            for code in codes:
                p.uint(code)
            p.uint(0)

        return fill

    inv = libvirt.VIR_ERR_INVALID_ARG
    assert call(226, send_key(0, [])) == (
        inv,
        "invalid argument: nkeycodes in virDomainSendKey must be greater than zero",
    )
    assert call(226, send_key(10, [30])) == (inv, "invalid argument: Unsupported codeset '10'")
    code, message = call(226, send_key(0, [30] * 17))  # over REMOTE_DOMAIN_SEND_KEY_MAX: not even decoded
    assert code == libvirt.VIR_ERR_RPC and message.startswith("Unable to decode message payload")

    def rename(name: str | None) -> Callable[[Packer], None]:
        def fill(p: Packer) -> None:
            p.opt_string(name)
            p.uint(0)

        return fill

    assert call(358, rename(None)) == (inv, "invalid argument: new_name in virDomainRename must not be NULL")
    assert call(358, rename("")) == (inv, "invalid argument: string new_name in virDomainRename must not be empty")

    def set_title(title: str, key: str | None) -> Callable[[Packer], None]:
        def fill(p: Packer) -> None:
            p.int(libvirt.VIR_DOMAIN_METADATA_TITLE)
            p.opt_string(title)
            p.opt_string(key)
            p.opt_string(None)
            p.uint(0)

        return fill

    assert call(264, set_title("a\nb", None)) == (inv, "invalid argument: metadata title can't contain newlines")
    assert call(264, set_title("ab", "k")) == (inv, "invalid argument: key in virDomainSetMetadata must be NULL")
    assert virsh(daemon.uri, "list", "--all", "--name").stdout.split() == ["rawdom"]  # nothing renamed


@pytest.mark.parametrize(
    ("args", "api"),
    [
        (("inject-nmi", "rodom"), "virDomainInjectNMI"),
        (("send-key", "rodom", "KEY_A"), "virDomainSendKey"),
        (("domrename", "rodom", "other"), "virDomainRename"),
        (("metadata", "rodom", APP1, "--key", "k", "--set", "<a/>"), "virDomainSetMetadata"),
    ],
)
def test_read_only_connections_are_refused(
    daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path, args: tuple[str, ...], api: str
) -> None:
    xml = tmp_path / "ro.xml"
    xml.write_text(domain_xml("rodom", tiny_kernel))
    virsh(daemon.uri, "define", str(xml))
    res = virsh(daemon.ro_uri, *args, check=False)
    assert res.returncode == 1
    assert f"operation forbidden: read only access prevents {api}" in res.stderr
