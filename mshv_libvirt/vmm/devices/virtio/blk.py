"""virtio-blk (virtio 1.2 section 5.2) with its data path outside Python: a vhost-user-blk backend.

The VMM owns the transport (virtio-pci registers, MSI-X, the doorbells' MSHV_IOEVENTFD registrations)
and the device configuration, which it reads from the backend once (GET_CONFIG: capacity, seg_max,
blk_size, num_queues, discard and write-zeroes limits). It never sees a request: when the driver sets
DRIVER_OK, the device thread hands the backend (``qemu-storage-daemon``, vmm/vhost_user.py) the guest
RAM memfds, each enabled ring, the ring's doorbell eventfd as its kick and the irqfd eventfd of the
ring's MSI-X vector as its call. A guest kick then wakes the backend in the kernel, and its completion
interrupts the guest through the kernel too. A device reset (or the VM's teardown) stops every ring
with GET_VRING_BASE before the status reads back 0, so the backend never touches rings the driver
reuses.

The vhost-user messages go out on the device's own thread ("vhost-blk", the sandbox's device list plus
sendmsg/recvfrom): a vCPU's seccomp list has no socket calls, so the vCPU that wrote the status register
posts the job and waits for it (bounded).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ... import sandbox
from ...vhost_user import F_PROTOCOL_FEATURES, Backend, MemRegion, VhostUserError
from .pci import F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1, NO_VECTOR, VirtioPciFunction

log = logging.getLogger(__name__)

DEVICE_ID = 2
CLASS_STORAGE_SCSI = 0x010000  # what QEMU's virtio-blk-pci reports
QUEUE_SIZE = 256
CONFIG_SIZE = 60  # struct virtio_blk_config up to write_zeroes_may_unmap (+ padding)
JOB_TIMEOUT = 10.0
STATE_VERSION = 1

F_SIZE_MAX = 1 << 1
F_SEG_MAX = 1 << 2
F_RO = 1 << 5
F_BLK_SIZE = 1 << 6
F_FLUSH = 1 << 9
F_MQ = 1 << 12
F_DISCARD = 1 << 13
F_WRITE_ZEROES = 1 << 14
# What we pass through of the backend's offer (the transport adds VERSION_1 itself). SEG_MAX and
# BLK_SIZE only say that those configuration fields are valid.
SUPPORTED = F_SEG_MAX | F_RO | F_BLK_SIZE | F_FLUSH | F_MQ | F_DISCARD | F_WRITE_ZEROES | F_INDIRECT_DESC | F_EVENT_IDX


@dataclass(frozen=True)
class BackendInfo:
    """What the backend offered at setup, once per backend (kept across VM rebuilds)."""

    features: int
    config: bytes
    queues: int


def prepare(backend: Backend) -> BackendInfo:
    """Negotiate the session (protocol features, owner) and read the device's offer and configuration."""
    fe = backend.frontend
    features = fe.get_features()
    if not features & F_VERSION_1:
        raise VhostUserError(0, "vhost-user-blk backend does not offer VIRTIO_F_VERSION_1")
    fe.negotiate_protocol(features)
    fe.set_owner()
    config = fe.get_config(CONFIG_SIZE)
    return BackendInfo(features, config, fe.get_queue_num())


@dataclass(frozen=True)
class _Ring:
    index: int
    size: int
    desc: int
    driver: int
    device: int
    call_fd: int | None
    kick_fd: int


class VirtioBlk:
    device_id = DEVICE_ID
    class_code = CLASS_STORAGE_SCSI
    config_size = CONFIG_SIZE

    def __init__(self, backend: Backend, info: BackendInfo, regions: list[MemRegion], queues: int = 1) -> None:
        self.backend = backend
        self.info = info
        self.features = info.features & SUPPORTED & ~F_VERSION_1
        queues = max(1, min(queues, info.queues))
        if queues == 1:
            self.features &= ~F_MQ
        self.queue_sizes: tuple[int, ...] = (QUEUE_SIZE,) * queues
        self._config = bytearray(info.config.ljust(CONFIG_SIZE, b"\0"))
        if self.features & F_MQ:
            struct.pack_into("<H", self._config, 34, queues)  # num_queues
        self._regions = regions
        self._transport: VirtioPciFunction | None = None
        self._jobs: queue.SimpleQueue[tuple[Callable[[], None], threading.Event] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._started: list[int] = []  # rings the backend serves now
        self.activations = 0
        self.error: str | None = None

    # -- VirtioDevice ------------------------------------------------------------------------------

    def config_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self._config[offset : offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        pass  # writeback (CONFIG_WCE) is not offered: the configuration is read-only

    def reset(self) -> None:
        """The driver wrote 0 to the status: every ring is stopped before the write completes."""
        self._run(self._stop_rings)

    def driver_ok(self, transport: VirtioPciFunction) -> None:
        """DRIVER_OK: hand the backend the memory table and every enabled ring (called under the transport's lock)."""
        vectors_on = transport.msix.enabled
        rings = []
        for n, q in enumerate(transport.queues):
            if not q.ready:
                continue
            vector = q.msix_vector
            call = None
            if vectors_on and vector != NO_VECTOR:
                line = transport.lines[vector]
                line.fire_when_routed = True  # what the backend signals while the vector is masked is lost
                call = line.fd
            rings.append(_Ring(n, q.size, q.desc, q.driver, q.device, call, transport.kicks[n]))
        features = transport.driver_features
        self._run(lambda: self._start_rings(features, rings))

    def set_capacity(self, sectors: int) -> None:
        """The backend's image was resized (blockresize): the new capacity, and a config-change interrupt."""
        struct.pack_into("<Q", self._config, 0, sectors)
        if self._transport is not None:
            self._transport.config_changed()

    def to_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "activations": self.activations}

    def load_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"virtio-blk state version {state.get('version')!r} is not {STATE_VERSION}")
        self.activations = int(state["activations"])

    # -- test-only: the hand-over mode -------------------------------------------------------------

    def hand_over(self, size: int, desc: int, driver: int, device: int, kick_fd: int, call_fd: int) -> int:
        """Test-only (benchmarks/blk.py, tests/vmm/test_blk_handover.py; never reached from a VM's config):
        serve ring 0 to a driver outside any guest, as DRIVER_OK would, with ``call_fd`` (an eventfd the
        caller reads) where the ring's MSI-X irqfd would be. The driver accepts every feature the device
        offers, as Linux's does; returns them (VERSION_1 included). Called without the device thread: the
        caller is no vCPU. ``release()`` stops the ring."""
        features = F_VERSION_1 | self.features
        self._start_rings(features, [_Ring(0, size, desc, driver, device, call_fd, kick_fd)])
        return features

    def release(self) -> None:
        """Test-only: the handed-over ring stops (GET_VRING_BASE answered) before this returns."""
        self._stop_rings()

    # -- the device thread -------------------------------------------------------------------------

    def start(self, transport: VirtioPciFunction) -> None:
        self._transport = transport
        self._thread = threading.Thread(target=self._main, name="vhost-blk", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """The VM is torn down: the backend stops serving its rings (the backend itself lives on)."""
        if self._thread is None:
            return
        self._run(self._stop_rings)
        thread, self._thread = self._thread, None
        self._jobs.put(None)
        thread.join(JOB_TIMEOUT)

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def _run(self, job: Callable[[], None]) -> None:
        if self._thread is None or not self._thread.is_alive():
            return
        done = threading.Event()
        self._jobs.put((job, done))
        if not done.wait(JOB_TIMEOUT):
            self._failed(f"vhost-user backend did not answer within {JOB_TIMEOUT:.0f} s")

    def _main(self) -> None:
        sandbox.enter_thread(sandbox.DEVICE, "vhost-blk")
        while (item := self._jobs.get()) is not None:
            job, done = item
            try:
                job()
            except (OSError, ValueError) as err:
                self._failed(str(err))
            finally:
                done.set()

    def _failed(self, why: str) -> None:
        self.error = why
        log.error("virtio-blk: %s", why)
        if self._transport is not None:
            self._transport.needs_reset(why)

    def _start_rings(self, features: int, rings: list[_Ring]) -> None:
        fe = self.backend.frontend
        self._stop_rings()
        fe.set_features(features | (self.info.features & F_PROTOCOL_FEATURES))
        fe.set_mem_table(self._regions)
        for r in rings:
            fe.set_vring_num(r.index, r.size)
            fe.set_vring_addr(
                r.index,
                fe.address_of(r.desc, 16 * r.size),
                fe.address_of(r.device, 6 + 8 * r.size),
                fe.address_of(r.driver, 6 + 2 * r.size),
            )
            fe.set_vring_base(r.index, 0)
            fe.set_vring_call(r.index, r.call_fd)
            fe.set_vring_kick(r.index, r.kick_fd)
            fe.set_vring_enable(r.index, True)
            self._started.append(r.index)
        self.activations += 1

    def _stop_rings(self) -> None:
        fe = self.backend.frontend
        while self._started:
            n = self._started.pop()
            with contextlib.suppress(VhostUserError):
                fe.set_vring_enable(n, False)
            fe.get_vring_base(n)  # returns once the backend has stopped the ring
