"""Storage pools and volumes through mshv:// come from libvirt's own storage driver (rpc/relay.py).

Real virsh and libvirt-python against our daemon and, in the same test, against libvirt's own
``storage:///system`` (the oracle): the same commands must print the same things. Pool names and
directories are unique per test and removed afterwards. libvirtd's own view of its clients
(``virt-admin``) is the oracle for "one upstream connection per client, read-only for read-only
clients, closed with it"; the session tests use a private session libvirtd run as an unprivileged
user, which they stop, freeze and kill by its pid.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest

from mshv_libvirt.rpc import client as rpc_client
from mshv_libvirt.rpc.xdr import Packer
from tests.support import rawrpc
from tests.support.daemon import DaemonProcess, virsh, wait_for
from tests.support.events import ensure_event_loop
from tests.support.libvirtd import (
    SYSTEM_SOCKET,
    EventLoop,
    SessionLibvirtd,
    libvirtd_clients,
    rss_bytes,
    session_uri,
    unique,
    unread_bytes,
    wait_clients,
)

pytestmark = pytest.mark.usefixtures("system_libvirtd")

ORACLE = "storage:///system"
PROC_STORAGE_VOL_UPLOAD = 208  # remote_protocol.x


def remove_pool(uri: str, name: str) -> None:
    """Clean-up straight through libvirt (not through the code under test)."""
    with contextlib.suppress(libvirt.libvirtError):
        conn = libvirt.open(uri)
        try:
            pool = conn.storagePoolLookupByName(name)
            if pool.isActive():
                for vol in pool.listAllVolumes():
                    with contextlib.suppress(libvirt.libvirtError):
                        vol.delete(0)
                with contextlib.suppress(libvirt.libvirtError):
                    pool.delete(0)
                pool.destroy()
            pool.undefine()
        finally:
            conn.close()


@contextlib.contextmanager
def pools(uri: str, *names: str) -> Iterator[None]:
    try:
        yield
    finally:
        for name in names:
            remove_pool(uri, name)


def run(uri: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return virsh(uri, *args, check=check)


def pool_sequence(uri: str, name: str, target: Path, data: Path, out: Path) -> list[str]:
    """What virsh prints for a pool's life, with the pool's name and directory made generic."""
    steps: list[tuple[str, ...]] = [
        ("pool-define-as", name, "dir", "--target", str(target)),
        ("pool-build", name),
        ("pool-start", name),
        ("pool-autostart", name),
        ("vol-create-as", name, "disk.qcow2", "16M", "--format", "qcow2"),
        ("vol-create-as", name, "data.raw", "4M", "--format", "raw"),
        ("vol-upload", "--pool", name, "data.raw", str(data)),
        ("vol-download", "--pool", name, "data.raw", str(out)),
        ("vol-list", name, "--details"),
        ("vol-info", "--pool", name, "disk.qcow2"),
        ("vol-path", "--pool", name, "disk.qcow2"),
        ("pool-info", name),
        ("pool-list", "--all"),
        ("pool-refresh", name),
        ("vol-delete", "--pool", name, "data.raw"),
        ("vol-delete", "--pool", name, "disk.qcow2"),
        ("pool-destroy", name),
        ("pool-delete", name),
        ("pool-undefine", name),
        ("pool-info", name),
    ]
    printed = []
    for step in steps:
        res = run(uri, *step, check=False)
        text = f"{res.returncode}\n{res.stdout}{res.stderr}".replace(str(target), "DIR").replace(name, "NAME")
        if step[0] == "pool-info":  # capacity and free space are the filesystem's, which changes
            text = "\n".join(
                line for line in text.splitlines() if not re.match(r"(UUID|Capacity|Allocation|Available):", line)
            )
        if step[0] == "pool-list":  # other pools may exist: our line, whitespace-collapsed
            text = (
                " ".join(line.split()).strip()
                if (line := next((x for x in text.splitlines() if "NAME" in x), ""))
                else ""
            )
        if step[0] == "vol-create-as" and "qcow2" in step and res.returncode == 0:
            info = subprocess.run(
                ["qemu-img", "info", "--output=json", str(target / "disk.qcow2")],
                capture_output=True,
                text=True,
                check=True,
            )
            assert '"format": "qcow2"' in info.stdout
        printed.append(text)
    return printed


def test_pool_and_volume_commands_print_what_libvirt_prints(daemon: DaemonProcess, tmp_path: Path) -> None:
    data = tmp_path / "data.bin"
    data.write_bytes(os.urandom(3 * 1024 * 1024 + 123))
    ours, ref = unique(), unique()
    assert len(ours) == len(ref)  # pool-list pads columns to the longest name
    with pools(ORACLE, ours, ref):
        # Equal-length names and directories: virsh pads its tables to the longest entry.
        got = pool_sequence(daemon.uri, ours, tmp_path / ours, data, tmp_path / "ours.out")
        want = pool_sequence(ORACLE, ref, tmp_path / ref, data, tmp_path / "ref.out")
        assert got == want
        assert want[0].startswith("0\nPool NAME defined") and want[-1].startswith("1\n")  # the oracle did the work
        assert "NAME active yes" in want[12] and "Pool NAME deleted" in want[-3]
        downloaded = (tmp_path / "ours.out").read_bytes()
        assert downloaded == (tmp_path / "ref.out").read_bytes()
        assert downloaded[: data.stat().st_size] == data.read_bytes()
        assert (
            len(downloaded) == 4 << 20
            and downloaded[data.stat().st_size :].count(0) == len(downloaded) - data.stat().st_size
        )
        assert not (tmp_path / ours).exists()  # pool-delete removed the directory
        assert not Path(f"/etc/libvirt/storage/autostart/{ours}.xml").exists()


def test_sparse_upload_and_download_pass_stream_holes(daemon: DaemonProcess, tmp_path: Path) -> None:
    sparse = tmp_path / "sparse.bin"
    with open(sparse, "wb") as f:
        f.truncate(24 << 20)
        f.seek(10 << 20)
        f.write(b"middle")
        f.seek((24 << 20) - 3)
        f.write(b"end")
    results, allocated = {}, {}
    ours, ref = unique(), unique()
    with pools(ORACLE, ours, ref):
        for uri, name in ((daemon.uri, ours), (ORACLE, ref)):
            run(uri, "pool-create-as", name, "dir", "--build", "--target", str(tmp_path / name))
            run(uri, "vol-create-as", name, "sp.raw", "24M", "--format", "raw")
            run(uri, "vol-upload", "--sparse", "--pool", name, "sp.raw", str(sparse))
            run(uri, "vol-download", "--sparse", "--pool", name, "sp.raw", str(tmp_path / f"{name}.out"))
            out = tmp_path / f"{name}.out"
            results[uri] = out.read_bytes()
            allocated[uri] = out.stat().st_blocks * 512
    assert results[daemon.uri] == results[ORACLE] == sparse.read_bytes()
    # The holes reached virsh as holes (it skipped them when writing), not as zeroes: as much of the
    # downloaded file is allocated as of libvirt's own, and less than all of it.
    assert allocated[daemon.uri] == allocated[ORACLE] < 20 << 20, allocated


def registered(loop: EventLoop, uri: str, kind: str, tmp_path: Path) -> None:
    """Until ``loop`` has its callback: a throw-away pool (or network) is defined and undefined until
    the loop reports it."""
    probe = unique("probe")

    def reported() -> bool:
        if any(probe in line for line in loop.lines):
            return True
        if kind == "pool":
            run(uri, "pool-define-as", probe, "dir", "--target", str(tmp_path / probe))
            run(uri, "pool-undefine", probe)
        return False

    wait_for(reported, timeout=20, interval=0.1, what=lambda: f"the event loop reporting the probe: {loop.lines}")


def test_pool_event_loop_sees_what_libvirt_sees(daemon: DaemonProcess, tmp_path: Path) -> None:
    name = unique()
    ours = EventLoop(daemon.uri, "pool-event", "--event", "lifecycle")
    ref = EventLoop(ORACLE, "pool-event", "--event", "lifecycle")
    refresh = EventLoop(daemon.uri, "pool-event", "--event", "refresh")
    try:
        with pools(ORACLE, name):
            registered(ours, ORACLE, "pool", tmp_path)
            registered(ref, ORACLE, "pool", tmp_path)
            run(daemon.uri, "pool-define-as", name, "dir", "--target", str(tmp_path / name))
            run(daemon.uri, "pool-build", name)
            run(daemon.uri, "pool-start", name)
            run(daemon.uri, "pool-refresh", name)
            run(daemon.uri, "pool-destroy", name)
            run(daemon.uri, "pool-undefine", name)
            want = [
                f"event 'lifecycle' for storage pool {name}: {e}"
                for e in ("Defined", "Created", "Started", "Stopped", "Undefined")
            ]
            ref.wait(lambda lines: [x for x in lines if name in x] == want)
            ours.wait(lambda lines: [x for x in lines if name in x] == want)
            refresh.wait(lambda lines: f"event 'refresh' for storage pool {name}" in lines)
    finally:
        for loop in (ours, ref, refresh):
            loop.stop()


def test_python_pool_and_network_callbacks_as_virt_manager_registers_them(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    """virt-manager registers storage pool and network event callbacks when it connects, then lists."""
    ensure_event_loop()
    conn = libvirt.open(daemon.uri)
    seen: list[tuple[str, int]] = []
    name = unique()
    try:
        ids = [
            conn.storagePoolEventRegisterAny(
                None,
                libvirt.VIR_STORAGE_POOL_EVENT_ID_LIFECYCLE,
                lambda c, p, ev, det, o: seen.append((p.name(), ev)),
                None,
            ),
            conn.storagePoolEventRegisterAny(
                None, libvirt.VIR_STORAGE_POOL_EVENT_ID_REFRESH, lambda c, p, o: seen.append((p.name(), -1)), None
            ),
            conn.networkEventRegisterAny(
                None, libvirt.VIR_NETWORK_EVENT_ID_LIFECYCLE, lambda c, n, ev, det, o: seen.append((n.name(), ev)), None
            ),
        ]
        assert isinstance(conn.listAllStoragePools(), list) and isinstance(conn.listAllNetworks(), list)
        with pools(ORACLE, name):
            target = tmp_path / name
            pool = conn.storagePoolDefineXML(
                f"<pool type='dir'><name>{name}</name><target><path>{target}</path></target></pool>"
            )
            pool.build(0)
            pool.create(0)
            pool.refresh(0)
            vol = pool.createXML(
                "<volume><name>v.qcow2</name><capacity unit='M'>8</capacity>"
                "<target><format type='qcow2'/></target></volume>",
                0,
            )
            assert vol.path() == str(target / "v.qcow2") and conn.storageVolLookupByPath(vol.path()).name() == "v.qcow2"
            assert [v.name() for v in pool.listAllVolumes()] == ["v.qcow2"]
            pool.destroy()
            pool.undefine()
            E = libvirt
            want = [
                (name, E.VIR_STORAGE_POOL_EVENT_DEFINED),
                (name, E.VIR_STORAGE_POOL_EVENT_CREATED),  # pool-build
                (name, E.VIR_STORAGE_POOL_EVENT_STARTED),
                (name, -1),
                (name, E.VIR_STORAGE_POOL_EVENT_STOPPED),
                (name, E.VIR_STORAGE_POOL_EVENT_UNDEFINED),
            ]
            try:
                wait_for(lambda: [s for s in seen if s[0] == name] == want)
            except AssertionError as err:
                raise AssertionError(f"events seen: {seen}") from err
        for cb in ids[:2]:
            conn.storagePoolEventDeregisterAny(cb)
        conn.networkEventDeregisterAny(ids[2])
    finally:
        conn.close()


def test_read_only_clients_are_relayed_read_only(daemon: DaemonProcess, tmp_path: Path) -> None:
    name = unique()
    with pools(ORACLE, name):
        run(ORACLE, "pool-define-as", name, "dir", "--target", str(tmp_path / name))
        # Reads work; writes get exactly libvirt's refusal on its own read-only connection.
        assert name in run(daemon.ro_uri, "pool-list", "--all", "--name").stdout.split()
        for args in (
            ("pool-define-as", unique(), "dir", "--target", str(tmp_path / "x")),
            ("pool-start", name),
            ("pool-undefine", name),
        ):
            want = virsh_ro(ORACLE, *args)
            got = run(daemon.ro_uri, *args, check=False)
            assert (got.returncode, got.stderr) == (want.returncode, want.stderr)
            assert "operation forbidden: read only access prevents virStoragePool" in got.stderr
        # libvirtd itself sees one read-only connection from us while a read-only client is connected.
        conn = libvirt.openReadOnly(daemon.uri)
        try:
            assert name in [p.name() for p in conn.listAllStoragePools()]
            assert daemon.proc is not None
            (client,) = wait_clients(daemon.proc.pid, 1)
            assert client.readonly
        finally:
            conn.close()
        wait_clients(daemon.proc.pid, 0)


def virsh_ro(uri: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["virsh", "-r", "-c", uri, *args], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )


def test_one_upstream_connection_per_client_and_driver_closed_with_it(daemon: DaemonProcess) -> None:
    assert daemon.proc is not None
    pid = daemon.proc.pid
    a = libvirt.open(daemon.uri)
    b = libvirt.open(daemon.uri)
    try:
        a.listAllDomains()
        assert libvirtd_clients(pid) == []  # nothing is opened before a storage or network call
        a.listAllStoragePools()
        a.listAllStoragePools()
        (first,) = wait_clients(pid, 1)
        assert not first.readonly
        a.listAllNetworks()
        wait_clients(pid, 2)
        b.listAllStoragePools()
        b.numOfStoragePools()
        wait_clients(pid, 3)
        a.close()
        a = None
        (left,) = wait_clients(pid, 1)  # a's two connections closed with it; b's remains
        b.listAllStoragePools()
        assert libvirtd_clients(pid) == [left]
    finally:
        if a is not None:
            a.close()
        b.close()
    wait_clients(pid, 0)


# ---- session clients and a session libvirtd that stops, freezes or dies ---------------------------------------


def session_pool(lv: SessionLibvirtd, name: str) -> Path:
    target = lv.root / "home" / name
    run(lv.uri("storage"), "pool-define-as", name, "dir", "--target", str(target))
    run(lv.uri("storage"), "pool-build", name)
    run(lv.uri("storage"), "pool-start", name)
    return target


def test_session_clients_reach_the_session_daemon_never_the_system_one(
    session_daemon: DaemonProcess, session_libvirtd: SessionLibvirtd, tmp_path: Path
) -> None:
    mine, system = unique(), unique()
    with pools(ORACLE, system):
        run(ORACLE, "pool-define-as", system, "dir", "--target", str(tmp_path / system))
        session_pool(session_libvirtd, mine)
        want = run(session_libvirtd.uri("storage"), "pool-list", "--all").stdout
        assert mine in want and system not in want
        assert run(session_uri(session_daemon), "pool-list", "--all").stdout == want
        assert session_daemon.proc is not None
        assert libvirtd_clients(session_daemon.proc.pid) == []  # the system libvirtd never saw us
        # The same daemon's system clients see the system pools.
        names = run(session_daemon.uri, "pool-list", "--all", "--name").stdout.split()
        assert system in names and mine not in names


def not_supported(call: Callable[[], object]) -> tuple[int, int, str, float]:
    start = time.monotonic()
    with pytest.raises(libvirt.libvirtError) as exc:
        call()
    e = exc.value
    return e.get_error_code(), e.get_error_domain(), e.get_error_message(), time.monotonic() - start


def test_libvirtd_stopped_gives_not_supported_at_once_and_a_restart_is_used(
    session_daemon: DaemonProcess, session_libvirtd: SessionLibvirtd
) -> None:
    conn = libvirt.open(session_uri(session_daemon))
    try:
        assert conn.listAllStoragePools() == []
        session_libvirtd.stop()
        code, domain, message, took = not_supported(conn.listAllStoragePools)
        assert (code, domain) == (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_FROM_STORAGE)
        assert message == "this function is not supported by the connection driver: virConnectListAllStoragePools"
        assert took < 2
        code, domain, message, took = not_supported(lambda: conn.networkLookupByName("default"))
        assert (code, domain, took < 2) == (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_FROM_NETWORK, True)
        assert message.endswith(": virNetworkLookupByName")
        res = virsh(session_uri(session_daemon), "pool-list", "--all", check=False, timeout=20)
        assert res.returncode == 1
        assert "this function is not supported by the connection driver: virConnectNumOfStoragePools" in res.stderr
        session_libvirtd.start()
        name = unique()
        session_pool(session_libvirtd, name)
        assert [p.name() for p in conn.listAllStoragePools()] == [name]  # same client connection, reconnected
    finally:
        conn.close()


def test_libvirtd_dying_mid_call_fails_each_pending_call_and_the_next_call_reconnects(
    session_daemon: DaemonProcess, session_libvirtd: SessionLibvirtd
) -> None:
    conn = libvirt.open(session_uri(session_daemon))
    try:
        conn.listAllStoragePools()
        assert session_daemon.proc is not None
        session_libvirtd.signal(signal.SIGSTOP)
        errors: list[tuple[int, str, float]] = []

        def call() -> None:
            with pytest.raises(libvirt.libvirtError) as exc:
                conn.listAllStoragePools()
            errors.append((exc.value.get_error_code(), exc.value.get_error_message(), time.monotonic()))

        threads = [threading.Thread(target=call) for _ in range(3)]
        for t in threads:
            t.start()
        # Each relayed CONNECT_LIST_ALL_STORAGE_POOLS is 36 bytes, unread by the frozen daemon.
        wait_for(lambda: unread_bytes(session_libvirtd.pid) >= 3 * 36)
        killed = time.monotonic()
        session_libvirtd.kill()
        for t in threads:
            t.join(10)
        assert len(errors) == 3
        for code, message, when in errors:
            assert code == libvirt.VIR_ERR_SYSTEM_ERROR
            assert message.endswith("End of file while reading data: Input/output error"), message
            assert "storage:///session" in message
            assert when - killed < 3
        session_libvirtd.start()
        assert conn.listAllStoragePools() == []
    finally:
        conn.close()


def test_a_frozen_libvirtd_is_given_up_after_the_keepalive_bound(
    session_daemon: DaemonProcess, session_libvirtd: SessionLibvirtd
) -> None:
    # count+1 silent intervals, the first of which may start up to one interval late (the timer ticks per
    # interval), and 2 s for a loaded host: measured 25.001 s once against a bound of exactly 25.
    bound = rpc_client.KEEPALIVE_INTERVAL * (rpc_client.KEEPALIVE_COUNT + 2) + 2
    conn = libvirt.open(session_uri(session_daemon))
    try:
        conn.listAllStoragePools()
        session_libvirtd.signal(signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(libvirt.libvirtError) as exc:
            conn.listAllStoragePools()
        took = time.monotonic() - start
        assert exc.value.get_error_code() == libvirt.VIR_ERR_SYSTEM_ERROR
        assert exc.value.get_error_message().endswith("connection closed due to keepalive timeout")
        assert took < bound
        session_libvirtd.signal(signal.SIGCONT)
        assert conn.listAllStoragePools() == []
    finally:
        conn.close()


# ---- bounded buffering in both directions ------------------------------------------------------------------


def test_a_slow_download_is_not_buffered_by_the_daemon(daemon: DaemonProcess, tmp_path: Path) -> None:
    assert daemon.proc is not None
    name = unique()
    size = 96 << 20
    with pools(ORACLE, name):
        run(ORACLE, "pool-create-as", name, "dir", "--build", "--target", str(tmp_path / name))
        run(ORACLE, "vol-create-as", name, "big.raw", str(size), "--format", "raw")
        path = tmp_path / name / "big.raw"
        with open(path, "r+b") as f:
            for _ in range(size >> 20):
                f.write(os.urandom(1 << 20))
        want = hashlib.sha256(path.read_bytes()).hexdigest()
        conn = libvirt.open(daemon.uri)
        try:
            vol = conn.storageVolLookupByPath(str(path))
            before = rss_bytes(daemon.proc.pid)
            st = conn.newStream(0)
            vol.download(st, 0, 0, 0)
            first = st.recv(1 << 18)
            digest = hashlib.sha256(first)
            # The client reads no further: libvirtd keeps sending until the daemon stops reading it.
            wait_for(lambda: unread_bytes(daemon.pid) > 32 << 10)
            grown = rss_bytes(daemon.proc.pid) - before
            got = len(first)
            while True:
                chunk = st.recv(1 << 18)
                if not chunk:
                    break
                digest.update(chunk)
                got += len(chunk)
            st.finish()
        finally:
            conn.close()
        assert got == size and digest.hexdigest() == want
        assert grown < 16 << 20, f"the daemon grew by {grown >> 20} MiB"


def test_an_upload_to_a_frozen_libvirtd_is_not_buffered_by_the_daemon(
    session_daemon: DaemonProcess, session_libvirtd: SessionLibvirtd
) -> None:
    assert session_daemon.proc is not None
    name = unique()
    target = session_pool(session_libvirtd, name)
    size = 48 << 20
    run(session_libvirtd.uri("storage"), "vol-create-as", name, "up.raw", str(size), "--format", "raw")
    data = os.urandom(size)
    conn = libvirt.open(session_uri(session_daemon))
    try:
        vol = conn.storageVolLookupByPath(str(target / "up.raw"))
        before = rss_bytes(session_daemon.proc.pid)
        st = conn.newStream(0)
        vol.upload(st, 0, size, 0)
        session_libvirtd.signal(signal.SIGSTOP)
        sent = threading.Event()

        def send() -> None:
            view = memoryview(data)
            while view:
                n = st.send(bytes(view[: 1 << 18]))
                view = view[n:]
            sent.set()

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        # The daemon stops reading the client once libvirtd stops reading the daemon.
        wait_for(lambda: unread_bytes(session_daemon.pid) > 32 << 10)
        grown = rss_bytes(session_daemon.proc.pid) - before
        assert not sent.is_set()
        session_libvirtd.signal(signal.SIGCONT)
        sender.join(60)
        assert sent.is_set()
        st.finish()
    finally:
        conn.close()
    assert (target / "up.raw").read_bytes() == data
    assert grown < 16 << 20, f"the daemon grew by {grown >> 20} MiB"


def libvirtd_fds_under(directory: Path) -> int:
    """Open files of the system libvirtd under ``directory``, read from /proc (its pid from the socket's
    peer credentials): the oracle for streams left open upstream."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(SYSTEM_SOCKET))
        pid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]
    finally:
        s.close()
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            count += os.readlink(fd).startswith(f"{directory}/")
    return count


def test_stream_calls_sharing_a_serial_open_one_stream_upstream(daemon: DaemonProcess, tmp_path: Path) -> None:
    """Several uploads sent at once with one serial (no real client does this): one is opened, the others get an
    error, and finishing that serial leaves libvirtd with no file open (streams are never hidden or leaked)."""
    name = unique()
    target = tmp_path / name
    with pools(ORACLE, name):
        for args in (
            ("pool-define-as", name, "dir", "--target", str(target)),
            ("pool-build", name),
            ("pool-start", name),
        ):
            run(ORACLE, *args)
        for i in range(5):
            run(ORACLE, "vol-create-as", name, f"v{i}", "1M", "--format", "raw")
        with rawrpc.raw(daemon.socket) as c:
            batch = b""
            for i in range(5):
                p = Packer()
                for field in (name, f"v{i}", str(target / f"v{i}")):  # remote_nonnull_storage_vol: pool, name, key
                    p.string(field)
                p.uhyper(0)
                p.uhyper(0)
                p.uint(0)
                batch += c.packet(PROC_STORAGE_VOL_UPLOAD, p.getvalue(), serial=500)[0]
            c.send(batch)
            replies: list[tuple[int, bytes]] = []
            while len(replies) < 5:
                fields, payload = c.recv()
                if fields[4] == rawrpc.REPLY and fields[5] == 500:
                    replies.append((fields[6], payload))
            errors = [rawrpc.error_message(p)[1] for status, p in replies if status == rawrpc.ERROR]
            assert len(errors) == 4, replies
            assert set(errors) == {"stream serial 500 is already open"}, errors
            assert libvirtd_fds_under(target) <= 1
            # Finish the one stream: libvirtd closes the volume and says so.
            c.send(c.packet(PROC_STORAGE_VOL_UPLOAD, b"", mtype=rawrpc.STREAM, serial=500)[0])
            wait_for(lambda: libvirtd_fds_under(target) == 0, timeout=30, what="libvirtd closed every volume")
            assert rawrpc.hostname_ok(c)


Header = tuple[int, int, int, int, int, int, int]  # length, prog, vers, proc, type, serial, status


def rpc_packet(prog: int, vers: int, proc: int, mtype: int, serial: int, status: int, payload: bytes = b"") -> bytes:
    return struct.pack(">7I", 28 + len(payload), prog, vers, proc, mtype, serial, status) + payload


@contextlib.contextmanager
def fake_libvirtd(runtime: Path, answer: Callable[[Header], bytes]) -> Iterator[None]:
    """A 'libvirtd' on ``runtime``'s session socket: each packet it reads (the body skipped) is answered with
    what ``answer`` makes of its header, on a thread stopped and joined on exit."""
    (runtime / "libvirt").mkdir(parents=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(runtime / "libvirt" / "libvirt-sock"))
    server.listen(4)
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(10)
                with contextlib.suppress(OSError):
                    while head := conn.recv(28, socket.MSG_WAITALL):
                        header: Header = struct.unpack(">7I", head)
                        conn.recv(header[0] - 28, socket.MSG_WAITALL) if header[0] > 28 else b""
                        conn.sendall(answer(header))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)
        server.close()


def test_a_libvirtd_answering_garbage_gives_not_supported_never_a_hang(tmp_path: Path) -> None:
    """A 'libvirtd' that answers every call with an empty OK reply (its handshake replies cannot be decoded):
    the relayed call fails at once with libvirt's not-supported error, and the daemon keeps serving."""
    runtime = tmp_path / "run"

    def answer(header: Header) -> bytes:
        _, prog, vers, proc, _, serial, _ = header
        return rpc_packet(prog, vers, proc, rawrpc.REPLY, serial, rawrpc.OK)

    with fake_libvirtd(runtime, answer):
        d = DaemonProcess(tmp_path / "d", env={"XDG_RUNTIME_DIR": str(runtime)}).start()
        try:
            conn = libvirt.open(session_uri(d))
            try:
                results: list[tuple[int, int, str, float]] = []
                caller = threading.Thread(target=lambda: results.append(not_supported(conn.listAllStoragePools)))
                caller.start()
                caller.join(30)
                assert not caller.is_alive(), "the relayed call never answered"
                [(code, domain, message, took)] = results
                assert (code, domain) == (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_FROM_STORAGE), message
                assert took < 10
                assert conn.getHostname()  # the daemon still serves this client
            finally:
                conn.close()
            assert "Traceback" not in d.log.read_text(errors="replace")
        finally:
            d.stop()


def test_download_data_sent_before_the_calls_reply_reaches_the_client(tmp_path: Path) -> None:
    """libvirtd arms a download's stream (daemonAddClientStream) before its worker sends the call's reply, so
    its event loop can send the first data packet ahead of the reply (the isolation run of 2026-12-04 lost
    one such 262120-byte packet of a 96 MiB download). A 'libvirtd' that always does so: every byte arrives,
    in order, the reply first."""
    runtime = tmp_path / "run"
    first, second = os.urandom(1000), os.urandom(3000)
    CONTINUE = 2  # a stream packet's status: more follows

    def reply_payload(proc: int) -> bytes:
        p = Packer()
        if proc == 66:  # virAuthList: AUTH_NONE
            p.uint(1)
            p.int(0)
        elif proc == 60:  # virConnectSupportsFeature (keepalive): yes
            p.int(1)
        elif proc == 97:  # virStorageVolLookupByPath: remote_nonnull_storage_vol
            for field_ in ("fakepool", "early.raw", "/fake/early.raw"):
                p.string(field_)
        return p.getvalue()

    def answer(header: Header) -> bytes:
        _, prog, vers, proc, mtype, serial, _ = header
        if mtype == rawrpc.STREAM:  # the client's finish: confirm it
            return rpc_packet(prog, vers, proc, rawrpc.STREAM, serial, rawrpc.OK)
        if proc == 209:  # virStorageVolDownload: data, then the reply, then the rest and EOF
            return (
                rpc_packet(prog, vers, proc, rawrpc.STREAM, serial, CONTINUE, first)
                + rpc_packet(prog, vers, proc, rawrpc.REPLY, serial, rawrpc.OK)
                + rpc_packet(prog, vers, proc, rawrpc.STREAM, serial, CONTINUE, second)
                + rpc_packet(prog, vers, proc, rawrpc.STREAM, serial, CONTINUE)
            )
        return rpc_packet(prog, vers, proc, rawrpc.REPLY, serial, rawrpc.OK, reply_payload(proc))

    with fake_libvirtd(runtime, answer):
        d = DaemonProcess(tmp_path / "d", env={"XDG_RUNTIME_DIR": str(runtime)}).start()
        try:
            conn = libvirt.open(session_uri(d))
            try:
                vol = conn.storageVolLookupByPath("/fake/early.raw")
                st = conn.newStream(0)
                vol.download(st, 0, 0, 0)
                got = b""
                while chunk := st.recv(1 << 18):
                    got += chunk
                st.finish()
                assert got == first + second
            finally:
                conn.close()
            assert "Traceback" not in d.log.read_text(errors="replace")
        finally:
            d.stop()
