"""A deterministic raw-socket fuzzer against a real virtmshvd.

Thousands of random and mutated packets (random bytes, bit flips, truncations, changed length words,
random procedures with random payloads, wrong program/version/type/status, huge string and array
counts). The oracle: a well-framed CALL always gets a REPLY with its serial (an ERROR one when the
payload cannot decode), a packet the protocol forbids closes only its own connection, nothing hangs,
and after every batch the daemon is alive and a separate libvirt-python connection is served.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest

from mshv_libvirt.rpc.protocol import (
    HEADER,
    HEADER_SIZE,
    KEEPALIVE_PROGRAM,
    MAX_PACKET,
    REMOTE_PROGRAM,
    STRING_MAX,
)
from mshv_libvirt.rpc.relay import RELAYED
from mshv_libvirt.rpc.xdr import Packer, Unpacker, XdrError
from tests.support.daemon import DaemonProcess, running_daemon
from tests.support.procfs import rss_kib
from tests.support.rawrpc import RawClient, ServerClosed

pytestmark = pytest.mark.virsh

SEED = int(os.environ.get("MSHV_FUZZ_SEED", "20240501"))
BATCH = 250
CALL, REPLY, MESSAGE, STREAM, CALL_WITH_FDS = 0, 1, 2, 3, 4
OK, ERROR = 0, 1
PROC_GET_HOSTNAME = 59

STATS: Counter[str] = Counter()


# ---- valid packets for real procedures ------------------------------------------------------------


def _dom(p: Packer, rng: random.Random) -> None:
    p.string(rng.choice(["", "vm", "x" * rng.randrange(1, 300)]))
    p.opaque_fixed(rng.randbytes(16), 16)
    p.int(rng.choice([-1, 0, 1, 7]))


def _build(fields: Callable[[Packer, random.Random], None]) -> Callable[[random.Random], bytes]:
    def build(rng: random.Random) -> bytes:
        p = Packer()
        fields(p, rng)
        return p.getvalue()

    return build


def _nothing(p: Packer, rng: random.Random) -> None:
    pass


def _uint0(p: Packer, rng: random.Random) -> None:
    p.uint(0)


def _seq(*fields: Callable[[Packer, random.Random], None]) -> Callable[[Packer, random.Random], None]:
    """The arguments' fields one after the other (in order: the random draws stay as they were)."""

    def each(p: Packer, rng: random.Random) -> None:
        for f in fields:
            f(p, rng)

    return each


VALID: dict[int, Callable[[random.Random], bytes]] = {
    66: _build(_nothing),  # AUTH_LIST
    60: _build(lambda p, r: p.int(r.randrange(0, 20))),  # SUPPORTS_FEATURE
    3: _build(_nothing),  # GET_TYPE
    4: _build(_nothing),  # GET_VERSION
    157: _build(_nothing),  # GET_LIB_VERSION
    59: _build(_nothing),  # GET_HOSTNAME
    110: _build(_nothing),  # GET_URI
    5: _build(lambda p, r: p.opt_string(r.choice([None, "kvm", "hyperv"]))),  # GET_MAX_VCPUS
    6: _build(_nothing),  # NODE_GET_INFO
    122: _build(_nothing),  # NODE_GET_SECURITY_MODEL
    273: _build(
        _seq(lambda p, r: p.int(r.randrange(0, 2)), lambda p, r: p.uint(r.randrange(0, 1 << 16)))
    ),  # LIST_ALL_DOMAINS
    51: _build(_nothing),  # NUM_OF_DOMAINS
    37: _build(lambda p, r: p.int(r.randrange(0, 100))),  # LIST_DOMAINS
    25: _build(_nothing),  # NUM_OF_DEFINED
    21: _build(lambda p, r: p.int(r.randrange(0, 100))),  # LIST_DEFINED
    22: _build(lambda p, r: p.int(r.randrange(-2, 10))),  # LOOKUP_BY_ID
    23: _build(lambda p, r: p.string("vm" * r.randrange(0, 50))),  # LOOKUP_BY_NAME
    24: _build(lambda p, r: p.opaque_fixed(r.randbytes(16), 16)),  # LOOKUP_BY_UUID
    212: _build(_seq(_dom, _uint0)),  # GET_STATE
    16: _build(_dom),  # GET_INFO
    14: _build(_seq(_dom, lambda p, r: p.uint(r.randrange(0, 16)))),  # GET_XML_DESC
    19: _build(_dom),  # GET_OS_TYPE
    150: _build(_dom),  # IS_ACTIVE
    151: _build(_dom),  # IS_PERSISTENT
    15: _build(_dom),  # GET_AUTOSTART
    183: _build(_seq(_dom, _uint0)),  # HAS_MANAGED_SAVE
    316: _build(_seq(lambda p, r: p.int(r.randrange(-1, 4)), _uint0)),  # EVENT_REGISTER_ANY
    317: _build(lambda p, r: p.int(r.randrange(-1, 4))),  # EVENT_DEREGISTER_ANY
    342: _build(
        _seq(
            lambda p, r: p.opt_string(None),
            lambda p, r: p.opt_string("x86_64"),
            lambda p, r: p.opt_string(None),
            lambda p, r: p.opt_string(None),
            _uint0,
        )
    ),
    360: _build(_nothing),  # REGISTER_CLOSE_CALLBACK
    361: _build(_nothing),  # UNREGISTER_CLOSE_CALLBACK
}

# Calls whose leading item is a length or count word we can make huge, and where it sits.
HUGE_COUNT_AT = {23: 0, 212: 0, 16: 0, 14: 0, 19: 0, 5: 0, 342: 0, 316: 4, 37: 0, 21: 0}
HUGE = [STRING_MAX + 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xFFFFFFF0, 1 << 24]


def open_payload() -> bytes:
    p = Packer()
    p.opt_string("mshv:///system")
    p.uint(0)
    return p.getvalue()


def valid_packet(rng: random.Random, serial: int) -> bytes:
    proc = rng.choice(list(VALID))
    payload = VALID[proc](rng)
    return HEADER.pack(HEADER_SIZE + len(payload), REMOTE_PROGRAM, 1, proc, CALL, serial, OK) + payload


# ---- checking what comes back ---------------------------------------------------------------------


def check_packet(fields: tuple[int, ...], payload: bytes) -> None:
    """Whatever the daemon sends must be a sane packet: a REPLY (or keepalive), status OK or ERROR,
    and an ERROR carries a decodable remote_error."""
    length, prog, vers, _proc, mtype, _serial, status = fields
    assert length == HEADER_SIZE + len(payload) <= MAX_PACKET
    assert vers == 1
    if prog == KEEPALIVE_PROGRAM:
        assert mtype == MESSAGE and status == OK
        return
    assert mtype in (REPLY, MESSAGE), fields
    assert status in (OK, ERROR), fields
    if status == ERROR:
        u = Unpacker(payload)
        u.int()
        u.int()
        message = u.opt_string(STRING_MAX)
        assert message
        STATS["error_replies"] += 1
    else:
        STATS["ok_replies"] += 1


def read_until_eof(c: RawClient, timeout: float = 10.0) -> list[tuple[tuple[int, ...], bytes]]:
    c.sock.settimeout(timeout)
    out: list[tuple[tuple[int, ...], bytes]] = []
    while True:
        try:
            fields, payload = c.recv()
        except ServerClosed:
            return out
        except TimeoutError as err:
            raise AssertionError("the daemon neither answered nor closed the connection") from err
        check_packet(fields, payload)
        out.append((fields, payload))


def send_sloppy(c: RawClient, data: bytes) -> bool:
    """Send; False when the daemon already closed the connection."""
    try:
        c.send(data)
    except (BrokenPipeError, ConnectionResetError):
        return False
    STATS["packets_sent"] += 1
    STATS["bytes_sent"] += len(data)
    return True


# ---- the daemon -----------------------------------------------------------------------------------


class Fuzz:
    def __init__(self, d: DaemonProcess) -> None:
        self.d = d
        self.watch = libvirt.open(d.uri)
        self.started = time.monotonic()

    def connect(self, rng: random.Random, handshake: bool | None = None) -> RawClient:
        c = RawClient(self.d.socket, timeout=10.0)
        STATS["connections"] += 1
        if handshake if handshake is not None else rng.random() < 0.8:
            c.handshake()
        return c

    def check_serving(self) -> None:
        assert self.d.alive(), self.d.log.read_text(errors="replace")[-5000:]
        self.watch.listAllDomains()
        assert self.watch.getHostname() == socket.gethostname()
        STATS["batches_checked"] += 1


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzz]:
    with running_daemon(tmp_path_factory.mktemp("fuzz") / "d") as d:
        f = Fuzz(d)
        yield f
        f.watch.close()
        STATS["daemon_rss_kib"] = rss_kib(d.pid)
        STATS["seconds"] = round(time.monotonic() - f.started)
    report = {"seed": SEED, **dict(STATS)}
    print("rpc fuzz summary:", json.dumps(report, sort_keys=True))
    out = os.environ.get("MSHV_LIBVIRT_REPORT_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "rpc_fuzz.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


# ---- (i) random byte strings ----------------------------------------------------------------------


def random_bytes(rng: random.Random) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 200))
    if kind == 1:  # a plausible length word, then noise
        n = rng.randrange(HEADER_SIZE, 400)
        return struct.pack(">I", n) + rng.randbytes(n - 4)
    if kind == 2:  # a plausible header with random fields, then noise
        n = rng.randrange(0, 64)
        head = HEADER.pack(HEADER_SIZE + n, *(rng.getrandbits(32) for _ in range(2)), 0, 0, 0, 0)
        return head[:12] + rng.randbytes(16) + rng.randbytes(n)
    return bytes(rng.choice([0, 0xFF, 0x20])) * rng.randrange(1, 100)


@contextlib.contextmanager
def sends_at_least(n: int) -> Iterator[None]:
    """The fuzzer's own oracle that it ran: the test sent ``n`` packets or more (each test checks its own
    count, so that none depends on which others ran before it)."""
    before = STATS["packets_sent"]
    yield
    sent = STATS["packets_sent"] - before
    print(f"packets sent: {sent}")
    assert sent >= n


@sends_at_least(3500)
def test_random_bytes(fuzz: Fuzz) -> None:
    rng = random.Random(SEED)
    total = 4000
    for _batch in range(total // BATCH):
        for _ in range(BATCH // 4):
            c = fuzz.connect(rng)
            try:
                for _ in range(4):
                    if not send_sloppy(c, random_bytes(rng)):
                        STATS["closed_by_server"] += 1
                        break
                _finish(c)
            finally:
                c.close()
        fuzz.check_serving()


def _finish(c: RawClient) -> None:
    """Send a sentinel call and EOF; the daemon must answer what it can and close (never hang)."""
    sentinel = 0x5E57
    data, _ = c.packet(PROC_GET_HOSTNAME, serial=sentinel)
    try:
        c.send(data)
        c.sock.shutdown(socket.SHUT_WR)
    except (BrokenPipeError, ConnectionResetError):
        STATS["closed_by_server"] += 1
        return
    packets = read_until_eof(c)
    STATS["replies_before_eof"] += len(packets)
    if not any(f[4] == REPLY and f[5] == sentinel and f[3] == PROC_GET_HOSTNAME for f, _ in packets):
        STATS["closed_by_server"] += 1


# ---- (ii) mutated valid packets -------------------------------------------------------------------


def mutate(rng: random.Random, pkt: bytes) -> bytes:
    b = bytearray(pkt)
    kind = rng.randrange(6)
    if kind == 0:  # bit flips anywhere
        for _ in range(rng.randrange(1, 9)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == 1:  # truncation
        return bytes(b[: rng.randrange(1, len(b))])
    if kind == 2:  # the length word changed
        n = rng.choice(
            [0, 1, 27, 28, len(b) - 4, len(b) + 4, len(b) + rng.randrange(1, 64), MAX_PACKET, MAX_PACKET + 1]
        )
        n = max(0, min(n, 0xFFFFFFFF))
        struct.pack_into(">I", b, 0, n)
        return bytes(b)
    if kind == 3:  # a header field replaced
        field = rng.randrange(1, 7)
        struct.pack_into(">I", b, 4 * field, rng.choice([0, 1, 2, 3, 7, 0xFFFFFFFF, rng.getrandbits(32)]))
        return bytes(b)
    if kind == 4:  # payload bytes overwritten with random ones
        if len(b) > HEADER_SIZE:
            i = rng.randrange(HEADER_SIZE, len(b))
            b[i : i + 4] = rng.randbytes(min(4, len(b) - i))
        return bytes(b)
    # two packets spliced at random points
    other = valid_packet(rng, 1)
    return bytes(b[: rng.randrange(len(b))]) + other[rng.randrange(len(other)) :]


@sends_at_least(3500)
def test_mutated_packets(fuzz: Fuzz) -> None:
    rng = random.Random(SEED + 1)
    total = 4000
    for _batch in range(total // BATCH):
        left = BATCH
        while left > 0:
            c = fuzz.connect(rng)
            n = min(left, rng.randrange(1, 5))
            left -= n
            try:
                for i in range(n):
                    pkt = valid_packet(rng, 100 + i)
                    if not send_sloppy(c, mutate(rng, pkt) if rng.random() < 0.9 else pkt):
                        STATS["closed_by_server"] += 1
                        break
                _finish(c)
            finally:
                c.close()
        fuzz.check_serving()


# ---- (iii) well-framed hostile calls on a reused connection: a strict oracle ----------------------


def hostile_call(rng: random.Random) -> tuple[str, int, int, int, int, int, bytes]:
    """(expectation, prog, vers, proc, type, status, payload); expectation is "error", "reply",
    "close", "ignore" or "pong"."""
    kind = rng.randrange(8)
    if kind <= 1:  # a random procedure with a payload that can never be valid XDR (length % 4 != 0)
        n = rng.randrange(0, 200) * 4 + rng.randrange(1, 4)
        proc = rng.randrange(0, 501)
        # A relayed call gets libvirt's own answer (libvirtd ignores the payload of a call without
        # arguments, CONNECT_NUM_OF_DEFINED_STORAGE_POOLS say): some reply, whatever it is.
        return "reply" if proc in RELAYED else "error", REMOTE_PROGRAM, 1, proc, CALL, OK, rng.randbytes(n)
    if kind == 2:  # a random procedure with random XDR-aligned words: some reply, whatever it is
        return "reply", REMOTE_PROGRAM, 1, rng.randrange(0, 501), CALL, OK, rng.randbytes(4 * rng.randrange(0, 12))
    if kind == 3:  # a real call with a huge string/array length or optional marker
        proc = rng.choice(list(HUGE_COUNT_AT))
        payload = bytearray(VALID[proc](rng))
        if proc in (37, 21):
            payload[0:4] = struct.pack(">I", rng.choice(HUGE))
        else:
            at = HUGE_COUNT_AT[proc]
            payload[at : at + 4] = struct.pack(">I", rng.choice(HUGE))
        return "error", REMOTE_PROGRAM, 1, proc, CALL, OK, bytes(payload)
    if kind == 4:  # wrong program or version
        proc = rng.choice(list(VALID))
        prog = rng.choice([0, 0x20008087, 0x00068000, rng.getrandbits(32)])
        vers = rng.choice([0, 2, 0xFFFFFFFF])
        if rng.random() < 0.5:
            return "error", prog, 1, proc, CALL, OK, VALID[proc](rng)
        return "error", REMOTE_PROGRAM, vers, proc, CALL, OK, VALID[proc](rng)
    if kind == 5:  # packets a client may send that need no answer
        mtype = rng.choice([REPLY, MESSAGE, STREAM, 5])
        status = rng.choice([OK, ERROR]) if mtype != STREAM else rng.choice([0, 1, 2])
        return "ignore", REMOTE_PROGRAM, 1, rng.randrange(0, 501), mtype, status, rng.randbytes(4 * rng.randrange(5))
    if kind == 6:  # what the protocol forbids: bad type, bad status, a CALL with a non-OK status, holes
        if rng.random() < 0.4:
            return "close", REMOTE_PROGRAM, 1, 59, CALL, rng.choice([1, 2, 3, -1]), b""
        mtype = rng.choice([6, 7, 100, -1, 0x7FFFFFFF])
        return "close", REMOTE_PROGRAM, 1, 59, mtype, OK, b""
    # keepalive: a real PING, or a malformed keepalive packet
    if rng.random() < 0.5:
        return "pong", KEEPALIVE_PROGRAM, 1, 1, MESSAGE, OK, b""
    bad = rng.choice([(1, CALL, b""), (3, MESSAGE, b""), (1, MESSAGE, b"\0\0\0\0")])
    return "close", KEEPALIVE_PROGRAM, 1, bad[0], bad[1], OK, bad[2]


@sends_at_least(3500)
def test_well_framed_hostile_calls(fuzz: Fuzz) -> None:
    rng = random.Random(SEED + 2)
    total = 4000
    c = fuzz.connect(rng, handshake=True)
    serial = 1000
    try:
        for _batch in range(total // BATCH):
            for _ in range(BATCH):
                expect, prog, vers, proc, mtype, status, payload = hostile_call(rng)
                serial += 1
                data = struct.pack(">IIIiiIi", HEADER_SIZE + len(payload), prog, vers, proc, mtype, serial, status)
                c.send(data + payload)
                STATS["packets_sent"] += 1
                STATS["bytes_sent"] += len(data) + len(payload)
                STATS[f"expect_{expect}"] += 1
                if expect == "close":
                    c.sock.settimeout(10)
                    assert c.closed_by_server(), (prog, proc, mtype, status)
                    STATS["closed_by_server"] += 1
                    c.close()
                    c = fuzz.connect(rng, handshake=True)
                    continue
                if expect == "ignore":  # a sentinel call proves the connection still works
                    serial += 1
                    c.call(PROC_GET_HOSTNAME, serial=serial)
                fields, _body = _next(c)
                if expect == "pong":
                    assert (fields[1], fields[3], fields[4]) == (KEEPALIVE_PROGRAM, 2, MESSAGE)
                    continue
                assert fields[4] == REPLY and fields[5] == serial, (expect, proc, fields)
                if expect == "error":
                    assert fields[6] == ERROR, (prog, vers, proc, payload[:64])
                    assert fields[1] == prog and fields[3] == proc
                if expect == "ignore":
                    assert fields[6] == OK and fields[3] == PROC_GET_HOSTNAME
                if fields[3] == 2 and fields[6] == OK:  # a random CONNECT_CLOSE worked: open again
                    c.handshake()
            fuzz.check_serving()
    finally:
        c.close()


def _next(c: RawClient) -> tuple[tuple[int, ...], bytes]:
    """The next reply or keepalive packet (events are skipped)."""
    c.sock.settimeout(10)
    while True:
        try:
            fields, payload = c.recv()
        except TimeoutError as err:
            raise AssertionError("no reply within 10 s") from err
        check_packet(fields, payload)
        if fields[1] == KEEPALIVE_PROGRAM or fields[4] == REPLY:
            return fields, payload


# ---- the end: nothing crashed ---------------------------------------------------------------------


def test_daemon_survived(fuzz: Fuzz) -> None:
    """After whatever fuzzing ran before it (all of it in file order; each fuzz test counts its own
    packets): the daemon serves a new client and logged no traceback."""
    fuzz.check_serving()
    fresh = libvirt.open(fuzz.d.uri)
    try:
        assert fresh.listAllDomains() == []
    finally:
        fresh.close()
    log = fuzz.d.log.read_text(errors="replace")
    assert "Traceback" not in log, log[log.index("Traceback") - 2000 :][:6000]
    with pytest.raises(XdrError):  # the checker itself rejects garbage (sanity)
        Unpacker(b"\0\0\0\5ab").string(10)
