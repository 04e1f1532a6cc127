"""Security and limits of a real virtmshvd: the read-only socket, socket modes, packet and string
limits, and clients that stall, flood or send hostile packets (none may hurt the other clients).

Expected limits come from tests/support/limits.py (libvirt's remote_protocol.x / virnetprotocol.x and
docs/DAEMON.md), not from the daemon's modules."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import stat
import struct
import time
from pathlib import Path

import libvirt
import pytest

from mshv_libvirt.rpc.xdr import Packer
from tests.support.daemon import DaemonProcess, domain_xml, virsh, wait_for
from tests.support.limits import HEADER_SIZE, MAX_CLIENTS, MAX_PACKET, MAX_RO_CLIENTS, STRING_MAX
from tests.support.procfs import open_sockets, rss_kib
from tests.support.rawrpc import (
    ERROR,
    OK,
    PROC_AUTH_LIST,
    PROC_DEFINE_XML,
    PROC_GET_HOSTNAME,
    PROC_LIST_DEFINED,
    PROC_LIST_DOMAINS,
    PROC_LOOKUP_BY_NAME,
    PROC_OPEN,
    RawClient,
    error_message,
    hostname_ok,
    raw,
)

pytestmark = pytest.mark.virsh


def check_serving(d: DaemonProcess, conn: libvirt.virConnect | None = None) -> None:
    assert d.alive()
    c = conn if conn is not None else libvirt.open(d.uri)
    try:
        c.listAllDomains()
        assert c.getHostname() == socket.gethostname()
    finally:
        if conn is None:
            c.close()


def define_dummy(d: DaemonProcess, tmp_path: Path, name: str) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"\0" * 4096)
    conn = libvirt.open(d.uri)
    try:
        conn.defineXML(domain_xml(name, kernel))
    finally:
        conn.close()


# ---- (a) the read-only socket and the read-only connect flag -------------------------------------


def test_readonly_socket_allows_reads_refuses_writes(daemon: DaemonProcess, tmp_path: Path) -> None:
    define_dummy(daemon, tmp_path, "rovm")
    ro = daemon.ro_uri
    assert "rovm" in virsh(ro, "list", "--all", "--name").stdout
    assert "shut off" in virsh(ro, "dominfo", "rovm").stdout
    assert "<name>rovm</name>" in virsh(ro, "dumpxml", "rovm").stdout
    assert virsh(ro, "domstate", "rovm").stdout.strip() == "shut off"

    xml = tmp_path / "other.xml"
    xml.write_text(domain_xml("other", tmp_path / "vmlinuz"))
    for args in (
        ("define", str(xml)),
        ("start", "rovm"),
        ("destroy", "rovm"),
        ("undefine", "rovm"),
        ("autostart", "rovm"),
        ("autostart", "--disable", "rovm"),
        ("shutdown", "rovm"),
    ):
        res = virsh(ro, *args, check=False)
        assert res.returncode != 0, args
        assert "operation forbidden" in res.stderr and "read only" in res.stderr, (args, res.stderr)

    # Nothing changed: still defined, not started, not autostarted, and "other" was never defined.
    names = virsh(daemon.uri, "list", "--all", "--name").stdout.split()
    assert names == ["rovm"]
    assert "Autostart:      disable" in virsh(daemon.uri, "dominfo", "rovm").stdout


def test_readonly_flag_on_rw_socket_is_enforced(daemon: DaemonProcess, tmp_path: Path) -> None:
    define_dummy(daemon, tmp_path, "flagvm")
    conn = libvirt.openReadOnly(daemon.uri)
    try:
        dom = conn.lookupByName("flagvm")
        assert dom.info()[0] == libvirt.VIR_DOMAIN_SHUTOFF
        assert "<name>flagvm</name>" in dom.XMLDesc()
        attempts = (
            lambda: conn.defineXML(domain_xml("x", tmp_path / "vmlinuz")),
            dom.create,
            dom.destroy,
            dom.undefine,
            lambda: dom.setAutostart(1),
            dom.suspend,
        )
        for attempt in attempts:
            with pytest.raises(libvirt.libvirtError) as exc:
                attempt()
            assert exc.value.get_error_code() == libvirt.VIR_ERR_OPERATION_DENIED
            assert "read only" in str(exc.value)
    finally:
        conn.close()
    assert [d.name() for d in libvirt.open(daemon.uri).listAllDomains()] == ["flagvm"]


def test_readonly_socket_refuses_writes_raw(daemon: DaemonProcess) -> None:
    """Straight from the wire: a CONNECT_OPEN without the RO flag on -sock-ro is still read-only,
    and re-opening after CONNECT_CLOSE does not drop that."""
    ro_sock = Path(f"{daemon.socket}-ro")
    with raw(ro_sock) as c:
        p = Packer()
        p.string("<domain/>")
        status, payload = c.roundtrip(PROC_DEFINE_XML, p.getvalue())
        assert status == ERROR
        code, msg = error_message(payload)
        assert code == libvirt.VIR_ERR_OPERATION_DENIED and "read only" in msg
        assert c.roundtrip(2)[0] == OK  # CONNECT_CLOSE
        c.handshake()
        status, payload = c.roundtrip(PROC_DEFINE_XML, p.getvalue())
        assert status == ERROR and error_message(payload)[0] == libvirt.VIR_ERR_OPERATION_DENIED


def test_readonly_connect_flag_is_enforced_by_the_daemon(daemon: DaemonProcess, tmp_path: Path) -> None:
    """libvirt's client library refuses writes on a read-only connection by itself; the daemon must
    not rely on that: a raw CONNECT_OPEN with VIR_CONNECT_RO on the read-write socket is read-only."""
    define_dummy(daemon, tmp_path, "rawro")
    with raw(daemon.socket, handshake=False) as c:
        assert c.roundtrip(PROC_AUTH_LIST)[0] == OK
        p = Packer()
        p.opt_string("mshv:///system")
        p.uint(1)  # VIR_CONNECT_RO
        assert c.roundtrip(PROC_OPEN, p.getvalue())[0] == OK
        x = Packer()
        x.string(domain_xml("rawro2", tmp_path / "vmlinuz"))
        status, payload = c.roundtrip(PROC_DEFINE_XML, x.getvalue())
        assert status == ERROR and error_message(payload)[0] == libvirt.VIR_ERR_OPERATION_DENIED
        # Re-opening without the flag after CONNECT_CLOSE does not make it writable.
        assert c.roundtrip(2)[0] == OK
        c.handshake()
        status, payload = c.roundtrip(PROC_DEFINE_XML, x.getvalue())
        assert status == ERROR and error_message(payload)[0] == libvirt.VIR_ERR_OPERATION_DENIED
        assert hostname_ok(c)
    assert [d.name() for d in libvirt.open(daemon.uri).listAllDomains()] == ["rawro"]


# ---- (b) socket permissions ----------------------------------------------------------------------


def test_socket_modes(daemon: DaemonProcess) -> None:
    rw = daemon.socket.stat()
    ro = Path(f"{daemon.socket}-ro").stat()
    assert stat.S_ISSOCK(rw.st_mode) and stat.S_ISSOCK(ro.st_mode)
    assert stat.S_IMODE(rw.st_mode) == 0o600
    assert stat.S_IMODE(ro.st_mode) == 0o666
    assert rw.st_uid == os.getuid() == ro.st_uid


# ---- (c) packet limits ---------------------------------------------------------------------------


@pytest.mark.parametrize("length", [MAX_PACKET + 1, 0xFFFFFFFF, 0, 27])
def test_bad_packet_length_closes_only_that_connection(daemon: DaemonProcess, length: int) -> None:
    other = libvirt.open(daemon.uri)
    try:
        with raw(daemon.socket) as c:
            c.send(struct.pack(">I", length) + bytes(HEADER_SIZE - 4))
            assert c.closed_by_server()
        check_serving(daemon, other)
    finally:
        other.close()


def test_oversized_real_packet_closes_connection(daemon: DaemonProcess) -> None:
    other = libvirt.open(daemon.uri)
    try:
        with raw(daemon.socket) as c:
            p = Packer()
            p.string("a" * (MAX_PACKET + 16))
            data, _ = c.packet(PROC_LOOKUP_BY_NAME, p.getvalue())
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                c.send(data)
            assert c.closed_by_server()
        check_serving(daemon, other)
    finally:
        other.close()


# ---- (d) string and list limits: an error reply, and the connection survives ---------------------


def test_string_and_list_limits_get_error_replies(daemon: DaemonProcess) -> None:
    with raw(daemon.socket) as c:
        # A real string one byte above REMOTE_STRING_MAX (the packet itself is within MAX_PACKET).
        p = Packer()
        p.string("n" * (STRING_MAX + 1))
        status, payload = c.roundtrip(PROC_LOOKUP_BY_NAME, p.getvalue())
        assert status == ERROR
        code, msg = error_message(payload)
        assert code == libvirt.VIR_ERR_RPC and "exceeds the limit" in msg
        assert hostname_ok(c)

        # A length word far beyond the data and the limit.
        status, payload = c.roundtrip(PROC_LOOKUP_BY_NAME, struct.pack(">I", 0xFFFFFFF0) + b"abcd")
        assert status == ERROR and "exceeds the limit" in error_message(payload)[1]
        # A length word within the limit but beyond the packet.
        status, payload = c.roundtrip(PROC_LOOKUP_BY_NAME, struct.pack(">I", 1 << 20) + b"abcd")
        assert status == ERROR and "end of data" in error_message(payload)[1]

        # List requests above REMOTE_DOMAIN_LIST_MAX, and negative ones.
        for proc in (PROC_LIST_DOMAINS, PROC_LIST_DEFINED):
            for n in (16385, 1 << 30, -1):
                status, payload = c.roundtrip(proc, struct.pack(">i", n))
                assert status == ERROR, (proc, n)
                code, msg = error_message(payload)
                assert code == libvirt.VIR_ERR_RPC and "REMOTE_DOMAIN_LIST_MAX" in msg
        status, _ = c.roundtrip(PROC_LIST_DOMAINS, struct.pack(">i", 16384))
        assert status == OK

        # A lookup of the longest legal name: the error reply (which quotes it) must still be sent.
        p = Packer()
        p.string("m" * STRING_MAX)
        status, payload = c.roundtrip(PROC_LOOKUP_BY_NAME, p.getvalue())
        assert status == ERROR and error_message(payload)[0] == libvirt.VIR_ERR_NO_DOMAIN
        assert hostname_ok(c)
    check_serving(daemon)


def test_huge_error_messages_are_bounded(daemon: DaemonProcess) -> None:
    """Errors that quote client input (a 4 MiB name, a 4 MiB garbage XML) still fit in a reply."""
    with raw(daemon.socket) as c:
        for proc, text in ((PROC_DEFINE_XML, "<" * STRING_MAX), (PROC_DEFINE_XML, "<domain>" + "é" * (1 << 20))):
            p = Packer()
            p.string(text)
            status, payload = c.roundtrip(proc, p.getvalue())
            assert status == ERROR
            assert len(payload) <= MAX_PACKET
        assert hostname_ok(c)
    check_serving(daemon)
    assert "Traceback" not in daemon.log.read_text(errors="replace")


# ---- (e) a stalled client blocks nobody ----------------------------------------------------------


def test_half_packet_stall_does_not_block_others(daemon: DaemonProcess) -> None:
    stallers = []
    try:
        for cut in (3, 10, HEADER_SIZE + 2):
            c = RawClient(daemon.socket)
            c.handshake()
            p = Packer()
            p.string("x" * 1000)
            data, _ = c.packet(PROC_LOOKUP_BY_NAME, p.getvalue())
            c.send(data[:cut])
            stallers.append(c)
        # An unopened connection that stalls after a header announcing a 4 MiB packet.
        c = RawClient(daemon.socket)
        c.send(struct.pack(">I", MAX_PACKET) + bytes(20))
        stallers.append(c)

        conn = libvirt.open(daemon.uri)
        try:
            start = time.monotonic()
            for _ in range(20):
                check_serving(daemon, conn)
            assert time.monotonic() - start < 5
        finally:
            conn.close()
        assert "vms" not in virsh(daemon.ro_uri, "list", "--all", "--name").stdout
        # The stalled clients finish their packets later and are answered normally.
        for c in stallers[:3]:
            p = Packer()
            p.string("x" * 1000)
            data, serial = c.packet(PROC_LOOKUP_BY_NAME, p.getvalue(), serial=c.serial - 1)
            cut = {0: 3, 1: 10, 2: HEADER_SIZE + 2}[stallers.index(c)]
            c.send(data[cut:])
            status, payload = c.reply(serial)
            assert status == ERROR and error_message(payload)[0] == libvirt.VIR_ERR_NO_DOMAIN
            assert hostname_ok(c)
    finally:
        for c in stallers:
            c.close()
    check_serving(daemon)


# ---- (f) a client that floods calls and never reads -----------------------------------------------


def _flood(c: RawClient, packet: bytes, seconds: float) -> int:
    """Send ``packet`` repeatedly without reading; stop when the kernel buffers stay full."""
    c.sock.setblocking(False)
    sent = 0
    view = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not view:
            view = packet
        try:
            n = c.sock.send(view)
        except BlockingIOError:
            if not select.select([], [c.sock], [], 0.5)[1]:
                break  # no room for 0.5 s: the daemon has stopped reading us
            continue
        sent += n
        view = view[n:]
    return sent


def test_flooding_client_is_bounded_and_blocks_nobody(daemon: DaemonProcess) -> None:
    sockets = open_sockets(daemon.pid)
    conn = libvirt.open(daemon.uri)
    floods: list[RawClient] = []
    try:
        base = rss_kib(daemon.pid)
        # Small calls (cheap replies), and calls whose error replies quote a 1 MiB name.
        small = RawClient(daemon.socket)
        small.handshake()
        floods.append(small)
        pkt, _ = small.packet(PROC_GET_HOSTNAME, serial=7)
        small_bytes = _flood(small, pkt * 256, 3.0)

        big = RawClient(daemon.socket)
        big.handshake()
        floods.append(big)
        p = Packer()
        p.string("q" * (1 << 20))
        pkt, _ = big.packet(PROC_LOOKUP_BY_NAME, p.getvalue(), serial=9)
        big_bytes = _flood(big, pkt, 6.0)

        start = time.monotonic()
        for _ in range(10):
            check_serving(daemon, conn)
        latency = (time.monotonic() - start) / 10
        assert "Domain" not in virsh(daemon.uri, "list", "--all", "--name").stdout
        peak = rss_kib(daemon.pid)
        print(
            f"flood: small {small_bytes} B, big {big_bytes} B sent unread; RSS {base} -> {peak} KiB; "
            f"other client call latency {latency * 1000:.1f} ms"
        )
        assert peak < 300 * 1024
        assert latency < 1.0
    finally:
        for c in floods:
            c.close()
    check_serving(daemon, conn)
    conn.close()
    wait_for(lambda: open_sockets(daemon.pid) <= sockets, what="the daemon closed every flooding client")
    check_serving(daemon)
    assert "Traceback" not in daemon.log.read_text(errors="replace")


def test_many_stalled_large_packets_keep_memory_bounded(daemon: DaemonProcess) -> None:
    """The read-only socket is world-accessible: clients that each park almost a whole MAX_PACKET
    there must not add up to unbounded memory (they are dropped beyond a shared budget)."""
    base = rss_kib(daemon.pid)
    chunk = struct.pack(">I", MAX_PACKET) + bytes(MAX_PACKET - 4096)
    clients: list[RawClient] = []
    dropped = 0
    try:
        for _ in range(60):
            c = RawClient(Path(f"{daemon.socket}-ro"))
            clients.append(c)
            try:
                c.send(chunk)
            except (BrokenPipeError, ConnectionResetError):
                dropped += 1
        wait_for(lambda: all(c.unsent() == 0 for c in clients), what="the daemon read or dropped every client")
        peak = rss_kib(daemon.pid)
        print(f"60 clients x {len(chunk) >> 20} MiB partial packets: {dropped} dropped, RSS {base} -> {peak} KiB")
        assert dropped > 0
        assert peak < 300 * 1024
        check_serving(daemon)
        assert virsh(daemon.ro_uri, "list", "--all", "--name").returncode == 0
    finally:
        for c in clients:
            c.close()
    check_serving(daemon)


def _eof_now(c: RawClient) -> bool:
    c.sock.setblocking(False)
    try:
        return c.sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b""
    except (BlockingIOError, TimeoutError):
        return False
    except ConnectionResetError:
        return True


def test_readonly_clients_cannot_take_every_slot(daemon: DaemonProcess) -> None:
    sockets = open_sockets(daemon.pid)
    clients = [RawClient(Path(f"{daemon.socket}-ro")) for _ in range(MAX_RO_CLIENTS + 20)]
    try:
        # The surplus read-only clients are refused; the owner's socket still has room.
        refused = wait_for(lambda: (n := sum(map(_eof_now, clients))) >= 20 and n, timeout=10)
        assert refused == 20
        assert MAX_CLIENTS - MAX_RO_CLIENTS > 100
        check_serving(daemon)
    finally:
        for c in clients:
            c.close()
    wait_for(lambda: open_sockets(daemon.pid) <= sockets, what="the daemon closed the refused and the accepted clients")
    with raw(Path(f"{daemon.socket}-ro")) as c:
        assert hostname_ok(c)


def test_many_connections_then_still_serving(daemon: DaemonProcess) -> None:
    clients = [RawClient(daemon.socket) for _ in range(100)]
    try:
        for c in clients[::10]:
            c.handshake()
        check_serving(daemon)
    finally:
        for c in clients:
            c.close()
    check_serving(daemon)
