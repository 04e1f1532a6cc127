"""Calls the driver does not implement, and read-only refusals, read like libvirt's own.

The oracle is libvirt itself in the same test: its test:///default driver (in libvirt-python) lacks
virDomainBlockCommit and virDomainGetGuestInfo too, so both must give the same code, domain and
message; read-only refusals are compared with a test:///default connection opened read-only, where
libvirt's public API makes the same check.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import libvirt
import pytest

from mshv_libvirt.rpc.dispatch import PROCEDURES
from mshv_libvirt.rpc.procnames import PROCEDURE_NAMES
from mshv_libvirt.rpc.relay import RELAYED
from mshv_libvirt.rpc.xdr import Packer, Unpacker
from tests.support.daemon import DaemonProcess, domain_xml, virsh
from tests.support.errors import error_of
from tests.support.rawrpc import ERROR, raw

pytestmark = pytest.mark.virsh

API_XML = Path("/usr/share/libvirt/api/libvirt-api.xml")


@pytest.fixture
def ours(daemon: DaemonProcess, tmp_path: Path) -> Iterator[libvirt.virDomain]:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"\0" * 4096)
    conn = libvirt.open(daemon.uri)
    try:
        yield conn.defineXML(domain_xml("nosup", kernel))
    finally:
        conn.close()


@pytest.fixture
def reference() -> Iterator[libvirt.virDomain]:
    conn = libvirt.open("test:///default")
    try:
        yield conn.lookupByName("test")
    finally:
        conn.close()


CALLS: dict[str, Callable[[libvirt.virDomain], object]] = {
    "virDomainBlockCommit": lambda d: d.blockCommit("vda", None, None),
    "virDomainGetGuestInfo": lambda d: d.guestInfo(),
}


@pytest.mark.parametrize("api", sorted(CALLS))
def test_unsupported_api_error_matches_libvirt(api: str, ours: libvirt.virDomain, reference: libvirt.virDomain) -> None:
    expected = error_of(lambda: CALLS[api](reference))
    assert expected[0] == libvirt.VIR_ERR_NO_SUPPORT and api in expected[2]  # the oracle says what we think
    assert error_of(lambda: CALLS[api](ours)) == expected


def test_virsh_prints_libvirts_message(daemon: DaemonProcess, ours: libvirt.virDomain) -> None:
    want = virsh("test:///default", "blockcommit", "test", "vda", check=False)
    got = virsh(daemon.uri, "blockcommit", "nosup", "vda", check=False)
    assert want.returncode == got.returncode == 1
    assert want.stderr == "error: this function is not supported by the connection driver: virDomainBlockCommit\n"
    assert got.stderr == want.stderr


def test_rw_open_of_the_ro_socket_is_refused_like_libvirt(daemon: DaemonProcess, ours: libvirt.virDomain) -> None:
    """The client does not know the socket is read-only (it opened read-write): the daemon refuses
    with the message libvirt's public API gives on a read-only connection."""
    ref = libvirt.openReadOnly("test:///default")
    conn = libvirt.open(daemon.ro_uri)
    try:
        xml = domain_xml("rodefine", Path("/nonexistent"))
        want = error_of(lambda: ref.defineXML(xml.replace("hyperv", "test")))
        assert want == (libvirt.VIR_ERR_OPERATION_DENIED, libvirt.VIR_FROM_DOMAIN, _denied("virDomainDefineXML"))
        assert error_of(lambda: conn.defineXML(xml)) == want
        dom, ref_dom = conn.lookupByName("nosup"), ref.lookupByName("test")
        for flag in (libvirt.VIR_DOMAIN_XML_SECURE, libvirt.VIR_DOMAIN_XML_MIGRATABLE):
            want = error_of(partial(ref_dom.XMLDesc, flag))
            assert want[0] == libvirt.VIR_ERR_OPERATION_DENIED
            assert error_of(partial(dom.XMLDesc, flag)) == want
        assert dom.XMLDesc(0).startswith("<domain type='hyperv'>")
        # A write API we do not implement: the read-only check comes first, as in libvirt.
        want = error_of(lambda: CALLS["virDomainBlockCommit"](ref_dom))
        assert want[0] == libvirt.VIR_ERR_OPERATION_DENIED
        assert error_of(lambda: CALLS["virDomainBlockCommit"](dom)) == want
    finally:
        conn.close()
        ref.close()


def _denied(api: str) -> str:
    return f"operation forbidden: read only access prevents {api}"


def test_every_unimplemented_number_names_its_api(daemon: DaemonProcess) -> None:
    """Straight from the wire, for every number of libvirt 9.0's protocol the driver does not implement:
    "not supported by the connection driver: <a function libvirt's API description lists>", on the
    read-only socket "read only access prevents <it>" where libvirt refuses read-only connections;
    event messages and numbers past 9.0 keep "unknown procedure: N"."""
    public = set(re.findall(r"<function name='(vir\w+)'", API_XML.read_text()))
    internal = re.compile(r"^vir(Auth|DomainMigrate|ConnectSupportsFeature)")
    unsupported = re.compile(r"this function is not supported by the connection driver: (vir\w+)")
    seen_denied = seen_unsupported = seen_unknown = 0
    for path in (daemon.socket, Path(f"{daemon.socket}-ro")):
        readonly = path.name.endswith("-ro")
        with raw(path) as c:
            for number in [*range(1, 444), 444, 1000]:
                if number in PROCEDURES or number in RELAYED:
                    continue  # relayed ones are libvirt's own answers (test_storage_relay, test_network_relay)
                status, payload = c.roundtrip(number, b"")
                assert status == ERROR, number
                u = Unpacker(payload)
                code, _domain, message = u.int(), u.int(), u.opt_string(1 << 20) or ""
                info = PROCEDURE_NAMES.get(number)
                if info is None or info[3]:
                    assert (code, message) == (libvirt.VIR_ERR_RPC, f"unknown procedure: {number}")
                    seen_unknown += 1
                elif readonly and info[1]:
                    assert (code, message) == (libvirt.VIR_ERR_OPERATION_DENIED, _denied(info[0])), number
                    seen_denied += 1
                else:
                    m = unsupported.fullmatch(message)
                    assert code == libvirt.VIR_ERR_NO_SUPPORT and m is not None, (number, message)
                    assert m.group(1) in public or internal.match(m.group(1)), (number, message)
                    seen_unsupported += 1
        # The connection survived 400 refusals.
        with raw(path) as c:
            p = Packer()
            p.string("nosuchdomain")
            status, _ = c.roundtrip(23, p.getvalue())
            assert status == ERROR
    assert seen_denied > 100 and seen_unsupported > 300 and seen_unknown == 2 * (51 + 2)
