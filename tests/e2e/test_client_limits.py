"""Per-client limits on the daemon's output: clients that do not read cannot pin its memory.

The reproduction of the robustness issue: 64 read-only clients each send 34 GetXMLDesc calls for a
900 KB domain and never read the replies (before the limits: the daemon grew from 49 MiB to 1.8 GiB).
libvirtd's rule (max_client_requests = 5: a call counts until its reply is completely written to the
socket; past it the client is not read) bounds each such client to a few replies. The daemon's RSS is
read from /proc by the test; the replies are counted by the clients themselves.
"""

from __future__ import annotations

import time
from pathlib import Path

import libvirt
import pytest

from mshv_libvirt.rpc.xdr import Packer, Unpacker
from tests.support.daemon import DaemonProcess, domain_xml
from tests.support.events import ensure_event_loop
from tests.support.procfs import rss_kib
from tests.support.rawrpc import OK, RawClient
from tests.support.report import write_report
from tests.support.waits import settle

pytestmark = pytest.mark.virsh

PROC_LOOKUP_BY_NAME, PROC_GET_XML_DESC = 23, 14
CLIENTS, CALLS, DESCRIPTION = 64, 34, 900_000


def test_non_reading_readonly_clients_hold_a_few_replies_each(daemon: DaemonProcess, tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"\0" * 4096)
    conn = libvirt.open(daemon.uri)
    xml = domain_xml("big", kernel).replace("<memory", f"<description>{'d' * DESCRIPTION}</description>\n  <memory")
    conn.defineXML(xml)
    assert daemon.proc is not None
    pid = daemon.proc.pid
    base = rss_kib(pid)

    clients: list[RawClient] = []
    try:
        lookup = Packer()
        lookup.string("big")
        for _ in range(CLIENTS):
            c = RawClient(Path(f"{daemon.socket}-ro"))
            c.handshake()
            status, dom = c.roundtrip(PROC_LOOKUP_BY_NAME, lookup.getvalue())
            assert status == OK
            call = dom + b"\0\0\0\0"  # remote_nonnull_domain, flags 0
            batch = b"".join(c.packet(PROC_GET_XML_DESC, call)[0] for _ in range(CALLS))
            c.send(batch)  # 34 calls are ~3 KB: all reach the daemon's socket at once
            clients.append(c)

        # Let the daemon do what it will; its memory must settle, not grow call after call.
        peak = settle(lambda: rss_kib(pid), start=base, tolerance=1024, quiet=3, timeout=60)

        # Another client is served meanwhile.
        start = time.monotonic()
        assert conn.lookupByName("big").info()[0] == libvirt.VIR_DOMAIN_SHUTOFF
        other_latency = time.monotonic() - start

        growth_mib = (peak - base) / 1024
        reply_mib = DESCRIPTION / (1 << 20)
        per_client = growth_mib / CLIENTS
        print(f"RSS {base} -> {peak} KiB: {per_client:.2f} MiB per non-reading client ({reply_mib:.2f} MiB replies)")
        write_report(
            "readonly_flood",
            {
                "clients": CLIENTS,
                "calls_per_client": CALLS,
                "reply_bytes": DESCRIPTION,
                "daemon_rss_base_kib": base,
                "daemon_rss_peak_kib": peak,
                "per_client_mib": round(per_client, 2),
                "other_client_latency_s": round(other_latency, 3),
            },
        )
        # "At most a few replies": 3 replies' worth per client (unbounded, it was 34 replies' worth).
        assert per_client < 3 * reply_mib, per_client
        assert other_latency < 2.0

        # Nothing is lost: a client that reads now gets every reply, complete.
        for c in clients[:4]:
            c.sock.settimeout(30)
            got = 0
            while got < CALLS:
                fields, payload = c.recv()
                if fields[4] == 1:  # REPLY
                    assert fields[6] == OK
                    assert len(Unpacker(payload).string(4 << 20)) > DESCRIPTION
                    got += 1
            assert got == CALLS
    finally:
        for c in clients:
            c.close()
        conn.close()


def test_event_callbacks_per_connection_are_bounded(daemon: DaemonProcess) -> None:
    """Every event ID of libvirt 9.0 registers (as with libvirtd); IDs past it get libvirtd's error; a
    connection may hold 64 callbacks (our limit, documented in docs/DAEMON.md), the 65th is refused."""
    ensure_event_loop()
    conn = libvirt.open(daemon.uri)
    try:
        ids = [conn.domainEventRegisterAny(None, event_id, lambda *a: None, None) for event_id in range(27)]
        assert len(set(ids)) == 27
    finally:
        conn.close()
    # libvirt's client refuses duplicate callbacks itself; a raw client can send as many as it likes.
    c = RawClient(daemon.socket)
    try:
        c.handshake()

        def register(event_id: int) -> tuple[int, bytes]:
            p = Packer()
            p.int(event_id)
            p.uint(0)  # no domain filter
            return c.roundtrip(316, p.getvalue())

        def error(payload: bytes) -> tuple[int, int, str | None]:
            u = Unpacker(payload)
            return u.int(), u.int(), u.opt_string(1024)

        status, payload = register(27)
        assert status == 1
        assert error(payload) == (
            libvirt.VIR_ERR_INTERNAL_ERROR,
            libvirt.VIR_FROM_RPC,
            "internal error: unsupported event ID 27",
        )
        for _ in range(64):
            assert register(libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE)[0] == OK
        status, payload = register(libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE)
        assert status == 1
        assert error(payload) == (
            libvirt.VIR_ERR_RPC,
            libvirt.VIR_FROM_RPC,
            "Too many domain event callbacks '65' for limit '64'",
        )
        p = Packer()
        p.int(0)  # deregister callback 0: room for one more
        assert c.roundtrip(317, p.getvalue())[0] == OK
        assert register(libvirt.VIR_DOMAIN_EVENT_ID_REBOOT)[0] == OK
    finally:
        c.close()
