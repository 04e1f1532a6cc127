"""The test-only hand-over mode (VirtioBlk.hand_over) and the compiled module's C driver (abi/vmm/blkq.c)
that benchmarks/blk.py measures with: requests filled, kicked and reaped in C against a real
qemu-storage-daemon, the bytes checked in the image file by the host, so the benchmark cannot rot."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mshv_libvirt.hv import GuestMemory
from mshv_libvirt.vmm.devices.virtio import blk
from mshv_libvirt.vmm.devices.virtio.pci import F_EVENT_IDX
from mshv_libvirt.vmm.vhost_user import Backend, BlockImage, MemRegion
from tests.support.blk_driver import SECTOR, T_IN, T_OUT, DriverError, HandedQueue, Job, ram_for

MiB = 1 << 20
SPAN = MiB  # the part of the 4 MiB image the requests address
BLOCK = 4096


def sector_stamps(data: bytes) -> list[int]:
    """The first 8 bytes of each sector, as the driver stamps them (its sector number)."""
    return [int.from_bytes(data[i : i + 8], "little") for i in range(0, len(data), SECTOR)]


@pytest.fixture
def raw_queue(tmp_path: Path) -> Iterator[tuple[Path, HandedQueue]]:
    img = tmp_path / "disk.raw"
    img.write_bytes(bytes(4 * MiB))
    backend = Backend(BlockImage(str(img), direct=True))  # cache='none', as the benchmark's
    try:
        with GuestMemory(ram_for(8, BLOCK)) as mem:
            device = blk.VirtioBlk(backend, blk.prepare(backend), [MemRegion(0, mem.size, mem.address, mem.fd)])
            q = HandedQueue(device, mem)
            try:
                yield img, q
            finally:
                q.close()
    finally:
        backend.stop()


def test_c_driver_writes_then_reads_back_every_sector_through_the_handed_over_queue(
    raw_queue: tuple[Path, HandedQueue],
) -> None:
    img, q = raw_queue
    assert q.event_idx and q.features & F_EVENT_IDX  # the device offers it and the driver took it, as Linux would
    n = SPAN // BLOCK
    wrote = q.run(Job(T_OUT, BLOCK, depth=4, span=SPAN, stride=True, step=BLOCK, count=n, stamp=True))
    assert (wrote.requests, wrote.bytes, wrote.errors) == (n, SPAN, 0)
    assert wrote.kicks >= 1 and wrote.waits >= 1  # kicks through the eventfd, completions signalled on the call
    # The host's view of the file (the backend writes with O_DIRECT): each sector holds its own number,
    # nothing beyond the span was touched.
    data = img.read_bytes()
    assert sector_stamps(data[:SPAN]) == list(range(SPAN // SECTOR))
    assert data[SPAN:] == bytes(len(data) - SPAN)

    read = q.run(Job(T_IN, BLOCK, depth=8, span=SPAN, count=500, stamp=True, seed=7))
    assert (read.requests, read.errors, read.mismatches) == (500, 0, 0)
    # Through the device's counting relay (abi/vmm/svq.c): the driver's own figures, at depth 4 and 8.
    st = q.device.relay.stats()
    assert (st["wr_req"], st["wr_bytes"], st["rd_req"], st["rd_bytes"]) == (n, SPAN, 500, 500 * BLOCK)
    assert (st["rd_failed"], st["wr_failed"], st["flush_req"], st["other_req"]) == (0, 0, 0, 0)

    # The read check can fail: the host overwrites one block, and a full pass finds exactly its 8 sectors.
    fd = os.open(img, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\xee" * BLOCK, 3 * BLOCK)
        os.fsync(fd)
    finally:
        os.close(fd)
    full = q.run(Job(T_IN, BLOCK, depth=8, span=SPAN, stride=True, step=BLOCK, count=n, stamp=True))
    assert (full.requests, full.errors, full.mismatches) == (n, 0, BLOCK // SECTOR)


def test_a_timed_run_at_depth_32_and_a_refused_job(raw_queue: tuple[Path, HandedQueue]) -> None:
    _img, q = raw_queue
    timed = q.run(Job(T_IN, BLOCK, depth=32, span=SPAN, seconds=0.2))
    assert timed.requests > 0 and timed.errors == 0 and timed.seconds >= 0.2
    assert 0 < timed.lat_mean_us <= timed.lat_max_us
    with pytest.raises(DriverError, match=r"depth 86 is not within 1\.\.85"):
        q.run(Job(T_IN, BLOCK, depth=86, span=SPAN, count=1))


def test_c_driver_through_a_qcow2_backend_lands_where_qemu_img_reads_it(tmp_path: Path) -> None:
    img, flat = tmp_path / "disk.qcow2", tmp_path / "flat.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "4M"], check=True, timeout=30)
    backend = Backend(BlockImage(str(img), format="qcow2", direct=True))
    try:
        with GuestMemory(ram_for(8, BLOCK)) as mem:
            device = blk.VirtioBlk(backend, blk.prepare(backend), [MemRegion(0, mem.size, mem.address, mem.fd)])
            q = HandedQueue(device, mem)
            try:
                # The benchmark's qcow2 walk: (previous + step) % span, a permutation of the span's blocks.
                n = SPAN // BLOCK
                wrote = q.run(
                    Job(T_OUT, BLOCK, depth=8, span=SPAN, stride=True, step=7919 * BLOCK, count=n, stamp=True)
                )
                assert (wrote.requests, wrote.errors) == (n, 0)
            finally:
                q.close()
    finally:
        backend.stop()  # QMP quit: qcow2's metadata flushed
    subprocess.run(["qemu-img", "check", "-q", str(img)], check=True, timeout=30)
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(img), str(flat)], check=True, timeout=30)
    data = flat.read_bytes()
    assert sector_stamps(data[:SPAN]) == list(range(SPAN // SECTOR))
    assert data[SPAN:] == bytes(len(data) - SPAN)


@pytest.mark.parametrize("event_idx", [True, False])
def test_a_busy_polling_relay_serves_and_counts_every_request(tmp_path: Path, event_idx: bool) -> None:
    """The relay's polling mode (its notifications off on both sides while it spins, abi/vmm/svq.c): every
    request completes and is counted, with EVENT_IDX and with the NO_NOTIFY / NO_INTERRUPT flags."""
    img = tmp_path / "disk.raw"
    img.write_bytes(bytes(4 * MiB))
    backend = Backend(BlockImage(str(img), direct=True))
    try:
        info = blk.prepare(backend)
        if not event_idx:
            info = dataclasses.replace(info, features=info.features & ~F_EVENT_IDX)
        relay = blk.Relay(poll_ns=200_000)
        try:
            with GuestMemory(ram_for(8, BLOCK)) as mem:
                device = blk.VirtioBlk(backend, info, [MemRegion(0, mem.size, mem.address, mem.fd)], relay=relay)
                q = HandedQueue(device, mem)
                try:
                    assert q.event_idx == event_idx
                    n = SPAN // BLOCK
                    for depth in (1, 8):
                        r = q.run(Job(T_OUT, BLOCK, depth=depth, span=SPAN, stride=True, step=BLOCK, count=n))
                        assert (r.requests, r.errors) == (n, 0)
                    read = q.run(Job(T_IN, BLOCK, depth=1, span=SPAN, count=300, seed=3))
                    assert (read.requests, read.errors) == (300, 0)
                finally:
                    q.close()
            st = relay.stats()
            assert (st["wr_req"], st["wr_bytes"], st["rd_req"], st["rd_bytes"]) == (2 * n, 2 * SPAN, 300, 300 * BLOCK)
        finally:
            relay.close()
    finally:
        backend.stop()
