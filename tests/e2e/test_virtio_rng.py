"""virtio-rng end to end: ``<rng model='virtio'>`` through libvirt-python and virsh against the real daemon,
compared with libvirt's own parser (``test:///default``) where libvirt decides, and proven from the guest:
the tiny guest's virtio-pci driver (key ``v``) reads entropy typed for through ``virsh console``.

Deviations from libvirt, each deliberate: the models and backends the VMM cannot provide (the
transitional model, the egd and builtin backends, sources other than /dev/urandom and /dev/random) are
refused with CONFIG_UNSUPPORTED naming them; a live attach or detach is OPERATION_UNSUPPORTED (no
hotplug). The PCI address is assigned as libvirt's QEMU driver assigns it on a bus with nothing else
(slot 2 up; the test driver assigns none), kept in the persistent XML and so stable across restarts.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import DaemonProcess, PtyProcess, running_daemon, virsh, wait_for
from tests.support.guests import TINY_BANNER, TINY_IRQ_FLAG, TINY_VIRTIO_BUFFER, TINY_VIRTIO_ROUNDS, tiny_virtio

libvirt = pytest.importorskip("libvirt")

pytestmark = pytest.mark.virsh

CMDLINE = f"console=ttyS0 {TINY_IRQ_FLAG}"
URANDOM = "<rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>"
ADDRESS = re.compile(r"\s*<address type='pci'[^>]*/>")


def document(virt_type: str, devices: str, *, kernel: str = "/k", name: str = "rng") -> str:
    return f"""<domain type='{virt_type}'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type><kernel>{kernel}</kernel><cmdline>{CMDLINE}</cmdline></os>
  <features><acpi/><apic/></features>
  <devices><serial type='pty'/>{devices}</devices>
</domain>"""


def rng_elements(xml: str) -> list[str]:
    return re.findall(r"<rng .*?</rng>", xml, flags=re.S)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    with running_daemon(tmp_path_factory.mktemp("rng") / "d") as d:
        yield d


@pytest.fixture(scope="module")
def ours(daemon: DaemonProcess) -> Iterator[Any]:
    conn = libvirt.open(daemon.uri)
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def oracle() -> Iterator[Any]:
    libvirt.registerErrorHandler(lambda *_: None, None)
    conn = libvirt.open("test:///default")
    yield conn
    conn.close()


def answer(conn: Any, xml: str) -> tuple[int, int, str] | str:
    """The refusal (code, domain, message), or the defined domain's <rng> elements (then undefined)."""
    try:
        dom = conn.defineXML(xml)
    except libvirt.libvirtError as e:
        return (e.get_error_code(), e.get_error_domain(), e.get_error_message())
    try:
        return "\n".join(rng_elements(dom.XMLDesc(0)))
    finally:
        dom.undefine()


ACCEPTED = {
    "urandom": URANDOM,
    "random": "<rng model='virtio'><backend model='random'>/dev/random</backend></rng>",
    "default source": "<rng model='virtio'><backend model='random'/></rng>",
    "rate with period": "<rng model='virtio'><rate bytes='1234' period='2000'/><backend model='random'/></rng>",
    "rate without period": "<rng model='virtio'><rate bytes='1024'/><backend model='random'/></rng>",
    "non-transitional": "<rng model='virtio-non-transitional'><backend model='random'/></rng>",
    "two devices": URANDOM + URANDOM,
    "empty address": "<rng model='virtio'><backend model='random'/><address type='pci' slot='0'/></rng>",
}

LIBVIRTS_ERRORS = {
    "model missing": "<rng><backend model='random'/></rng>",
    "model unknown": "<rng model='foo'><backend model='random'/></rng>",
    "no backend": "<rng model='virtio'/>",
    "two backends": "<rng model='virtio'><backend model='random'/><backend model='random'/></rng>",
    "backend model missing": "<rng model='virtio'><backend/></rng>",
    "backend model unknown": "<rng model='virtio'><backend model='bogus'/></rng>",
    "rate bytes not a number": "<rng model='virtio'><rate bytes='x'/><backend model='random'/></rng>",
    "rate period not a number": "<rng model='virtio'><rate bytes='1' period='-1'/><backend model='random'/></rng>",
    "address slot not a number": "<rng model='virtio'><backend model='random'/><address type='pci' slot='x'/></rng>",
    "address slot too high": (
        "<rng model='virtio'><backend model='random'/><address type='pci' domain='0x0000' bus='0x00' "
        "slot='0x20' function='0x0'/></rng>"
    ),
}

REFUSED = {  # libvirt accepts these; the VMM cannot provide them
    "transitional model": ("<rng model='virtio-transitional'><backend model='random'/></rng>", "virtio-transitional"),
    "egd backend": (
        "<rng model='virtio'><backend model='egd' type='tcp'><source mode='connect' host='localhost' "
        "service='1234'/><protocol type='raw'/></backend></rng>",
        "'egd'",
    ),
    "builtin backend": ("<rng model='virtio'><backend model='builtin'/></rng>", "'builtin'"),
    "other source": ("<rng model='virtio'><backend model='random'>/dev/hwrng</backend></rng>", "/dev/hwrng"),
}


def test_accepted_rng_is_printed_as_libvirt_prints_it(ours: Any, oracle: Any) -> None:
    for what, devices in ACCEPTED.items():
        theirs = answer(oracle, document("test", devices))
        mine = answer(ours, document("hyperv", devices))
        assert isinstance(theirs, str) and isinstance(mine, str), (what, theirs, mine)
        # The test driver assigns no PCI address; everything else is libvirt's own text.
        assert ADDRESS.sub("", mine) == ADDRESS.sub("", theirs), what
        slots = re.findall(r"slot='(0x[0-9a-f]{2})'", mine)
        assert slots == ["0x02", "0x03"][: len(rng_elements(mine))], what  # libvirt's first free slots


def test_invalid_rng_gets_libvirts_error(ours: Any, oracle: Any) -> None:
    for what, devices in LIBVIRTS_ERRORS.items():
        theirs = answer(oracle, document("test", devices))
        assert isinstance(theirs, tuple), (what, theirs)
        assert answer(ours, document("hyperv", devices)) == theirs, what


def test_a_zero_rate_gets_libvirts_schema_error(ours: Any, oracle: Any) -> None:
    # libvirt's parser reads bytes='0' as no limit; its schema refuses it, and define here always applies it.
    devices = "<rng model='virtio'><rate bytes='0' period='5'/><backend model='random'/></rng>"
    assert isinstance(answer(oracle, document("test", devices)), str)
    try:
        oracle.defineXMLFlags(document("test", devices), 1)  # VIR_DOMAIN_DEFINE_VALIDATE
    except libvirt.libvirtError as e:
        theirs = (e.get_error_code(), e.get_error_domain(), e.get_error_message())
    assert theirs[0] == libvirt.VIR_ERR_XML_INVALID_SCHEMA
    assert answer(ours, document("hyperv", devices)) == theirs


def test_what_the_vmm_cannot_provide_is_refused_by_name(ours: Any, oracle: Any) -> None:
    for what, (devices, names) in REFUSED.items():
        assert isinstance(answer(oracle, document("test", devices)), str), what  # libvirt takes it
        mine = answer(ours, document("hyperv", devices))
        assert isinstance(mine, tuple), (what, mine)
        code, domain, message = mine
        assert (code, domain) == (libvirt.VIR_ERR_CONFIG_UNSUPPORTED, libvirt.VIR_FROM_DOMAIN), what
        assert names in message and "is not supported by the mshv driver" in message, (what, message)


def test_explicit_addresses_are_kept_and_others_fill_around_them(ours: Any) -> None:
    explicit = URANDOM.replace(
        "</rng>", "<address type='pci' domain='0x0000' bus='0x00' slot='2' function='0x0'/></rng>"
    )
    dom = ours.defineXML(document("hyperv", URANDOM + explicit))
    try:
        xml = dom.XMLDesc(0)
        assert re.findall(r"slot='(0x[0-9a-f]{2})'", xml) == ["0x03", "0x02"]  # decimal '2' read as libvirt does
        assert ours.defineXML(xml).XMLDesc(0) == xml  # what define accepted reads back the same
    finally:
        dom.undefine()
    clash = document("hyperv", explicit + explicit)
    with pytest.raises(libvirt.libvirtError, match=r"Attempted double use of PCI Address 0000:00:02\.0") as info:
        ours.defineXML(clash)
    assert (info.value.get_error_code(), info.value.get_error_domain()) == (
        libvirt.VIR_ERR_XML_ERROR,
        libvirt.VIR_FROM_DOMAIN,
    )


def test_domcapabilities_lists_rng(daemon: DaemonProcess) -> None:
    caps = virsh(daemon.uri, "domcapabilities").stdout
    rng = re.search(r"<rng supported='yes'>(.*?)</rng>", caps, flags=re.S)
    assert rng is not None, caps
    assert re.findall(r"<value>([^<]+)</value>", rng.group(1)) == ["virtio", "virtio-non-transitional", "random"]


def test_attach_and_detach_only_with_config(daemon: DaemonProcess, ours: Any, tmp_path: Path) -> None:
    dom = ours.defineXML(document("hyperv", "", name="rng-attach"))
    device = tmp_path / "rng.xml"
    device.write_text(URANDOM)
    try:
        with pytest.raises(libvirt.libvirtError, match="domain is not running") as live_off:
            dom.attachDeviceFlags(URANDOM, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        assert live_off.value.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID
        virsh(daemon.uri, "attach-device", "rng-attach", str(device), "--config")
        assert rng_elements(dom.XMLDesc(0)) == [
            "<rng model='virtio'>\n      <backend model='random'>/dev/urandom</backend>\n"
            "      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/>\n    </rng>"
        ]
        other = "<rng model='virtio'><backend model='random'>/dev/random</backend></rng>"
        with pytest.raises(libvirt.libvirtError, match="no matching RNG device was found") as missing:
            dom.detachDeviceFlags(other, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        assert missing.value.get_error_code() == libvirt.VIR_ERR_DEVICE_MISSING
        with pytest.raises(libvirt.libvirtError) as other_device:
            dom.attachDeviceFlags("<watchdog model='i6300esb'/>", libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        assert other_device.value.get_error_code() == libvirt.VIR_ERR_CONFIG_UNSUPPORTED
        assert "<watchdog>" in str(other_device.value)
        virsh(daemon.uri, "detach-device", "rng-attach", str(device), "--config")
        assert rng_elements(dom.XMLDesc(0)) == []
    finally:
        dom.undefine()


def vmm_status(d: DaemonProcess, name: str) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(d.control_socket(name)))
        s.sendall(b'{"id": 1, "cmd": "status"}\n')
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(65536)
            assert chunk, "VMM closed its control socket"
            buf += chunk
        return dict(json.loads(buf.split(b"\n", 1)[0])["result"])


def test_the_guest_reads_entropy_typed_for_through_virsh_console(
    kvm: None, daemon: DaemonProcess, ours: Any, tiny_kernel: Path
) -> None:
    name = "rng-guest"
    dom = ours.defineXML(document("hyperv", URANDOM, kernel=str(tiny_kernel), name=name))
    persistent = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    try:
        for boot in (1, 2):  # the address is the persistent XML's: the same guest-visible device each start
            dom.create()
            log = daemon.serial_log(name)
            wait_for(lambda log=log: log.exists() and TINY_BANNER in log.read_text(errors="replace"))
            assert rng_elements(dom.XMLDesc(0)) == rng_elements(persistent)
            if boot == 1:  # no hotplug: every live attach or detach is refused, the configs untouched
                live_calls: list[tuple[str, int | None]] = [
                    ("attachDevice", None),
                    ("detachDevice", None),
                    ("attachDeviceFlags", libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG),
                    ("detachDeviceFlags", libvirt.VIR_DOMAIN_AFFECT_CURRENT),
                ]
                for method, flags in live_calls:
                    args = (URANDOM,) if flags is None else (URANDOM, flags)
                    with pytest.raises(libvirt.libvirtError, match="no hotplug") as live:
                        getattr(dom, method)(*args)
                    assert live.value.get_error_code() == libvirt.VIR_ERR_OPERATION_UNSUPPORTED
                assert dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) == persistent
                assert rng_elements(dom.XMLDesc(0)) == rng_elements(persistent)
            con = PtyProcess(["virsh", "-c", daemon.uri, "console", name])
            try:
                con.wait_console_ready()
                before = vmm_status(daemon, name)
                con.write(b"v")
                con.read_until(b"kicks=", timeout=60)
                # the log keeps earlier boots: this boot's line is the boot-th
                wait_for(lambda log=log, boot=boot: len(tiny_virtio(log.read_text(errors="replace"))) == boot)
                after = vmm_status(daemon, name)
                con.write(b"\x1d")
                assert con.wait() == 0
            finally:
                con.kill()
            line = tiny_virtio(log.read_text(errors="replace"))[boot - 1]
            n = TINY_VIRTIO_ROUNDS
            assert line["bytes"] == n * TINY_VIRTIO_BUFFER and line["irqs"] == line["kicks"] == n, line
            assert line["sum"] != 0
            (dev,) = after["virtio"]
            assert after["sandbox"] is not None and dev["thread"] is not None  # the daemon's VMMs are sandboxed
            assert dev["notify_exits"] == 0 and dev["served"] == n * TINY_VIRTIO_BUFFER
            assert dev["irqfd"][0] == {"gsi": 24, "fired": n}  # MSI-X vector 0, the queue's, through its irqfd
            # The first press also set the device up (a few dozen config and BAR accesses) and printed a line:
            # far fewer exits than its n kicks, which would each have been one.
            assert after["exits"] - before["exits"] < n // 2, (boot, after["exits"] - before["exits"])
            dom.destroy()
            wait_for(lambda: not dom.isActive())
        assert dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) == persistent
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefine()
