"""The vhost-user frontend against the real qemu-storage-daemon: negotiation, a queue in memfd guest RAM
driven from the test (tests/support/vhost_queue.py), bytes checked in the image file (raw) or through
qemu-io (qcow2); and supervision: the backend ends with its frontend, and dies with a SIGKILLed parent."""

from __future__ import annotations

import dataclasses
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mshv_libvirt.hv import GuestMemory
from mshv_libvirt.vmm import vhost_user
from mshv_libvirt.vmm.vhost_user import Backend, BackendError, BlockImage, MemRegion
from tests.support.procfs import process_gone
from tests.support.vhost_queue import AVAIL, DESC, S_OK, SECTOR, T_FLUSH, T_GET_ID, T_IN, T_OUT, USED, BlkQueue
from tests.support.waits import wait_for

MiB = 1 << 20
F_VERSION_1, F_FLUSH, F_RO = 1 << 32, 1 << 9, 1 << 5


def image_locked(path: Path) -> bool:
    """The kernel's record (/proc/locks), not ours: does any process hold a lock on the image's inode?
    (qemu-storage-daemon 7.2's export takes QEMU's OFD lock on byte 100, "consistent read", and shares
    writing: the driver's own image lock is what keeps a second domain out.)"""
    st = path.stat()
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    return any(inode in line.split() for line in Path("/proc/locks").read_text().splitlines())


def start_queue(backend: Backend, mem: GuestMemory) -> BlkQueue:
    fe = backend.frontend
    features = fe.get_features()
    fe.negotiate_protocol(features)
    fe.set_owner()
    fe.set_features(features & (F_VERSION_1 | F_FLUSH | F_RO | vhost_user.F_PROTOCOL_FEATURES))
    fe.set_mem_table([MemRegion(0, mem.size, mem.address, mem.fd)])
    q = BlkQueue(mem)
    backend_queues.append(q)
    fe.set_vring_num(0, q.size)
    fe.set_vring_addr(0, fe.address_of(DESC, 16 * q.size), fe.address_of(USED, 4 + 8 * q.size), fe.address_of(AVAIL, 4))
    fe.set_vring_base(0, 0)
    fe.set_vring_kick(0, q.kick)
    fe.set_vring_call(0, q.call)
    fe.set_vring_enable(0, True)
    return q


backend_queues: list[BlkQueue] = []


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with GuestMemory(MiB) as m:
        yield m
    while backend_queues:
        backend_queues.pop().close()


def test_read_write_flush_through_qemu_storage_daemon_land_in_the_raw_file(tmp_path: Path, mem: GuestMemory) -> None:
    img = tmp_path / "disk.raw"
    img.write_bytes(bytes(4 * MiB))
    backend = Backend(BlockImage(str(img)))
    try:
        assert image_locked(img)
        fe = backend.frontend
        q = start_queue(backend, mem)
        assert fe.has_protocol and fe.protocol_features & vhost_user.PROTOCOL_F_CONFIG
        capacity, _size_max, seg_max = struct.unpack_from("<QII", fe.get_config(24))
        assert capacity == 4 * MiB // SECTOR and seg_max > 0
        pattern = bytes((i * 7 + 3) & 0xFF for i in range(2 * SECTOR))
        assert q.request(T_OUT, 5, pattern) == bytes([S_OK])
        assert q.request(T_FLUSH, 0) == bytes([S_OK])
        with img.open("rb") as f:  # the host sees the guest's write where it asked for it
            f.seek(5 * SECTOR)
            assert f.read(2 * SECTOR) == pattern
        with img.open("r+b") as f:  # and the guest sees the host's
            f.seek(9 * SECTOR)
            f.write(b"host" * 128)
        assert q.request(T_IN, 9, read_len=SECTOR) == bytes([S_OK]) + b"host" * 128
        # GET_ID is answered by the backend itself: qemu-storage-daemon 7.2's export has no serial option.
        answer = q.request(T_GET_ID, 0, read_len=20)
        assert answer[0] == S_OK and answer[1:].rstrip(b"\0") == b"vhost_user_blk"
        assert fe.get_vring_base(0) == 4  # stops the ring: four requests read from the available ring
        pid = backend.pid
    finally:
        backend.stop()
    assert backend.poll() == 0 and process_gone(pid)  # QMP quit: a clean exit, reaped by us
    assert not image_locked(img)


def test_qcow2_image_written_through_the_backend_reads_back_with_qemu_io(tmp_path: Path, mem: GuestMemory) -> None:
    img = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "8M"], check=True, timeout=30)
    backend = Backend(BlockImage(str(img), format="qcow2"))
    try:
        q = start_queue(backend, mem)
        assert q.request(T_OUT, 100, b"\xa5" * SECTOR) == bytes([S_OK])
        assert q.request(T_FLUSH, 0) == bytes([S_OK])
    finally:
        backend.stop()
    r = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-r", "-c", f"read -P 0xa5 {100 * SECTOR} {SECTOR}", str(img)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr
    check = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr


def test_readonly_export_refuses_writes_and_offers_ro(tmp_path: Path, mem: GuestMemory) -> None:
    img = tmp_path / "ro.raw"
    img.write_bytes(b"\x11" * MiB)
    backend = Backend(BlockImage(str(img), readonly=True))
    try:
        assert backend.frontend.get_features() & F_RO
        q = start_queue(backend, mem)
        assert q.request(T_OUT, 0, b"\0" * SECTOR) != bytes([S_OK])
        assert q.request(T_IN, 0, read_len=SECTOR) == bytes([S_OK]) + b"\x11" * SECTOR
    finally:
        backend.stop()
    assert img.read_bytes() == b"\x11" * MiB


def test_a_missing_image_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match=r"qemu-storage-daemon for .*nope.raw exited with status 1"):
        Backend(BlockImage(str(tmp_path / "nope.raw")))


def test_backend_dies_with_its_sigkilled_parent_and_unlocks_the_image(tmp_path: Path) -> None:
    img = tmp_path / "disk.raw"
    img.write_bytes(bytes(MiB))
    script = (
        "import sys\n"
        "from mshv_libvirt.vmm.vhost_user import Backend, BlockImage\n"
        "b = Backend(BlockImage(sys.argv[1]))\n"
        "print(b.pid, flush=True)\n"
        "sys.stdin.read()\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-I", "-c", script, str(img)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert not process_gone(child) and image_locked(img)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
    wait_for(lambda: process_gone(child), 10, what=f"qemu-storage-daemon {child} ended with its parent")
    wait_for(lambda: not image_locked(img), 10, what="image unlocked")


@pytest.mark.parametrize(
    ("image", "want"),
    [
        (
            BlockImage("", "qcow2", direct=True),
            {"drv": "qcow2", "ro": False, "direct": True, "no-flush": False},
        ),
        (
            BlockImage("", readonly=True, no_flush=True),
            {"drv": "raw", "ro": True, "direct": False, "no-flush": True},
        ),
        (  # cache='directsync'
            BlockImage("", direct=True, writethrough=True),
            {"drv": "raw", "ro": False, "direct": True, "no-flush": False},
        ),
        (  # cache='writethrough'
            BlockImage("", "qcow2", writethrough=True),
            {"drv": "qcow2", "ro": False, "direct": False, "no-flush": False},
        ),
    ],
)
def test_the_backend_opens_the_image_as_configured(tmp_path: Path, image: BlockImage, want: dict[str, object]) -> None:
    """qemu-storage-daemon's own account (QMP query-named-block-nodes) of the node the export serves."""
    img = tmp_path / "disk.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", image.format, str(img), "1M"], check=True, timeout=30)
    backend = Backend(dataclasses.replace(image, path=str(img)))
    try:
        nodes = backend.qmp("query-named-block-nodes")
        assert isinstance(nodes, list)
        (disk,) = [n for n in nodes if n["node-name"] == "disk0"]
        got = {"drv": disk["drv"], "ro": disk["ro"], "direct": disk["cache"]["direct"]}
        got["no-flush"] = disk["cache"]["no-flush"]
        assert got == want and disk["file"] == str(img)
    finally:
        backend.stop()


def _sched_runs(pid: int, tid: int) -> int:
    """How many times the kernel put thread ``tid`` on a CPU (/proc/.../schedstat: ns on CPU, ns waiting, runs)."""
    return int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[2])


def test_the_export_is_served_by_a_polling_iothread_and_quit_still_ends_the_backend(
    tmp_path: Path, mem: GuestMemory
) -> None:
    """The requests run on a thread of the backend other than its main loop (the kernel's count of each thread's
    runs), the iothread polling up to IOTHREAD_POLL_MAX_NS (QMP qom-get; qsd 7.2 has no query-iothreads); and
    stop() still ends the backend by QMP quit, a clean exit (7.2 hangs in quit while a frontend is connected)."""
    img = tmp_path / "disk.raw"
    img.write_bytes(bytes(MiB))
    backend = Backend(BlockImage(str(img), direct=True))
    pid = backend.pid
    try:
        poll = backend.qmp("qom-get", path="/objects/iothread0", property="poll-max-ns")
        assert poll == vhost_user.IOTHREAD_POLL_MAX_NS
        q = start_queue(backend, mem)
        requests = 200
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        before = {t: _sched_runs(pid, t) for t in tids}
        for n in range(requests):
            assert q.request(T_IN, n * 8, read_len=4096)[0] == S_OK
        runs = {t: _sched_runs(pid, t) - before[t] for t in tids}
        assert runs[pid] < requests // 4, runs  # the main loop slept through them
        assert max(runs[t] for t in tids if t != pid) >= requests // 2, runs
    finally:
        backend.stop()
    assert backend.poll() == 0 and process_gone(pid)  # quit, not the lifeline's SIGKILL


def _traced(pid: int) -> bool:
    """Every thread of ``pid`` has a tracer (the kernel's TracerPid)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        if "\nTracerPid:\t0\n" in status:
            return False
    return True


@pytest.mark.needs("strace")
@pytest.mark.parametrize("writethrough", [False, True])
def test_a_writethrough_export_syncs_every_write_and_a_writeback_one_none(
    tmp_path: Path, mem: GuestMemory, writethrough: bool
) -> None:
    """cache='writethrough'|'directsync' (BlockImage.writethrough): each write reaches stable storage before it
    completes, so the backend syncs the file once per write; with a write cache (the other modes) it does not
    (a guest flush does). Counted by strace on the backend, not by anything of ours (qsd 7.2's device
    configuration says writeback=0 either way, so it is no witness)."""
    img = tmp_path / "disk.raw"
    img.write_bytes(bytes(MiB))
    backend = Backend(BlockImage(str(img), direct=True, writethrough=writethrough))
    out = tmp_path / "strace.out"
    tracer = subprocess.Popen(
        ["strace", "-f", "-qq", "-e", "trace=fsync,fdatasync,sync_file_range", "-o", str(out), "-p", str(backend.pid)]
    )
    try:
        q = start_queue(backend, mem)
        wait_for(lambda: _traced(backend.pid), 10, what="strace attached")
        writes = 4
        for n in range(writes):
            assert q.request(T_OUT, n * 8, bytes([n + 1]) * 4096) == bytes([S_OK])
    finally:
        tracer.send_signal(signal.SIGINT)  # detaches; its output is complete once it has exited
        tracer.wait(10)
        backend.stop()
    syncs = [line for line in out.read_text().splitlines() if "sync" in line and "resumed" not in line]
    assert len(syncs) >= writes if writethrough else syncs == [], syncs


@pytest.mark.needs("strace")
@pytest.mark.parametrize(
    ("image", "calls"),
    [
        (BlockImage("", direct=True), {"io_submit"}),  # cache='none' without io=: Linux AIO
        (BlockImage("", direct=True, aio="io_uring"), {"io_uring_enter"}),
        (BlockImage("", direct=True, aio="threads"), {"pread64", "preadv", "preadv2"}),
        (BlockImage(""), {"pread64", "preadv", "preadv2"}),  # no O_DIRECT, no io=: QEMU's thread pool
    ],
)
def test_the_backend_reads_the_image_with_the_aio_asked_for(
    tmp_path: Path, mem: GuestMemory, image: BlockImage, calls: set[str]
) -> None:
    """<driver io> as qemu-storage-daemon's aio=, seen in the system calls that read the image (strace)."""
    img = tmp_path / "disk.raw"
    img.write_bytes(bytes(MiB))
    backend = Backend(dataclasses.replace(image, path=str(img)))
    out = tmp_path / "strace.out"
    traced_calls = "trace=io_submit,io_uring_enter,pread64,preadv,preadv2"
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-e", traced_calls, "-o", str(out), "-p", str(backend.pid)])
    try:
        q = start_queue(backend, mem)
        wait_for(lambda: _traced(backend.pid), 10, what="strace attached")
        reads = 4
        for n in range(reads):
            assert q.request(T_IN, n * 8, read_len=4096)[0] == S_OK
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(10)
        backend.stop()
    names = [line.split()[1].split("(")[0] for line in out.read_text().splitlines() if "resumed" not in line]
    assert len([n for n in names if n in calls]) >= reads and set(names) <= calls, names


def test_the_export_keeps_no_request_counters(tmp_path: Path, mem: GuestMemory) -> None:
    """Why the VMM counts requests itself (its relay, abi/vmm/svq.c): qemu-storage-daemon 7.2's vhost-user-blk
    export does no block accounting (QEMU's virtio-blk-handler.c calls no block_acct_*). Its BlockBackend is
    anonymous, so query-blockstats lists nothing, and node-level counters are never kept: only the highest
    written offset moves. Should a backend ever count, this fails and the relay may no longer be needed."""
    img = tmp_path / "disk.raw"
    img.write_bytes(bytes(MiB))
    backend = Backend(BlockImage(str(img)))
    try:
        q = start_queue(backend, mem)
        assert q.request(T_OUT, 8, b"\x5a" * 4096) == bytes([S_OK])
        assert q.request(T_FLUSH, 0) == bytes([S_OK])
        assert q.request(T_IN, 8, read_len=4096) == bytes([S_OK]) + b"\x5a" * 4096
        assert backend.qmp("query-blockstats") == []
        nodes = backend.qmp("query-blockstats", **{"query-nodes": True})
        assert isinstance(nodes, list)
        counted = ("rd_operations", "rd_bytes", "wr_operations", "wr_bytes", "flush_operations")
        for node in nodes:
            assert {k: node["stats"][k] for k in counted} == dict.fromkeys(counted, 0), node["node-name"]
            assert node["stats"]["wr_highest_offset"] == 8 * SECTOR + 4096, node["node-name"]
        assert sorted(n["node-name"] for n in nodes) == ["disk0", "file0"]
    finally:
        backend.stop()


def test_a_resized_export_serves_the_new_range_but_keeps_its_old_config(tmp_path: Path, mem: GuestMemory) -> None:
    """Why blockresize takes the capacity from the node (QMP), not from GET_CONFIG: qemu-storage-daemon 7.2's
    export serves the grown range at once while its device configuration keeps the old capacity."""
    img = tmp_path / "grow.raw"
    img.write_bytes(bytes(MiB))
    backend = Backend(BlockImage(str(img)))
    try:
        q = start_queue(backend, mem)
        past_end = MiB // SECTOR  # the first sector beyond the old size
        assert q.request(T_IN, past_end, read_len=SECTOR)[0] != S_OK
        assert backend.qmp("block_resize", **{"node-name": "disk0", "size": 2 * MiB}) == {}
        assert img.stat().st_size == 2 * MiB
        nodes = backend.qmp("query-named-block-nodes", flat=True)
        assert isinstance(nodes, list)
        (node,) = [n for n in nodes if n["node-name"] == "disk0"]
        assert node["image"]["virtual-size"] == 2 * MiB
        assert struct.unpack_from("<Q", backend.frontend.get_config(8))[0] == MiB // SECTOR  # still the old one
        assert q.request(T_IN, past_end, read_len=SECTOR) == bytes([S_OK]) + bytes(SECTOR)
        assert q.request(T_IN, 2 * MiB // SECTOR, read_len=SECTOR)[0] != S_OK  # the new end holds
    finally:
        backend.stop()


def test_a_stopped_backend_bounds_a_qmp_call_and_its_late_answer_is_not_taken_for_the_next(tmp_path: Path) -> None:
    img = tmp_path / "disk.raw"
    img.write_bytes(bytes(MiB))
    backend = Backend(BlockImage(str(img)))
    try:
        os.kill(backend.pid, signal.SIGSTOP)  # the backend this test started, by its pid
        try:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                backend.qmp("query-named-block-nodes", flat=True)
            assert time.monotonic() - started < vhost_user.QMP_TIMEOUT + 2
        finally:
            os.kill(backend.pid, signal.SIGCONT)
        # the nodes answer now arrives first; the next call still gets its own
        stats = backend.qmp("query-blockstats", **{"query-nodes": True})
        assert isinstance(stats, list) and stats and all("stats" in s for s in stats), stats
    finally:
        backend.stop()
