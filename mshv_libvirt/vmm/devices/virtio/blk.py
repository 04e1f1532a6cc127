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

The backend is not given the guest's rings: a counting relay in the compiled module (abi/vmm/svq.c, a
shadow virtqueue as vDPA's SVQ) sits between them, because qemu-storage-daemon's export keeps no block
accounting. The backend serves VMM-owned rings in a memfd it maps with guest RAM (``SHADOW_GPA`` in the
memory table, beyond any guest address); the relay's C thread copies each guest chain there (addresses
unchanged), counts and times every request, and copies completions back to the guest's used ring and
irqfd. A ``Relay`` belongs to its disk for the VMM's life (vmm/runtime.py), so its counters outlive VM
rebuilds and daemon restarts; it also logs every guest page the device wrote (``dirty()``).

The vhost-user messages go out on the device's own thread ("vhost-blk", the sandbox's device list plus
sendmsg/recvfrom): a vCPU's seccomp list has no socket calls, so the vCPU that wrote the status register
posts the job and waits for it (bounded).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mshv_libvirt._mshv import ffi, lib

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


RELAY_QUEUES = 64  # abi/vmm/svq.h MSHV_SVQ_MAX_QUEUES
SHADOW_GPA = 1 << 50  # where the relay's rings sit in the backend's memory table: no guest address is there
STATS = (
    "rd_req", "rd_bytes", "rd_total_ns", "wr_req", "wr_bytes", "wr_total_ns", "flush_req", "flush_total_ns",
    "rd_failed", "wr_failed", "flush_failed", "other_req",
    "guest_kicks", "backend_kicks", "backend_calls", "guest_irqs", "polled",
)  # fmt: skip


class Relay:
    """One disk's counting relay between the guest's rings and the backend's (abi/vmm/svq.c), for up to
    ``queues`` rings. Made on a thread allowed to create threads and eventfds (the VMM's main thread, after
    the sandbox: then its C thread narrows its own list). ``poll_ns``: how long its thread busy-polls both
    sides after its last work before it sleeps (0: never)."""

    def __init__(self, queues: int = 1, poll_ns: int = 0) -> None:
        self.poll_ns = poll_ns
        self.error_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)  # readable when the relay stopped on a fault
        self._handle: Any = lib.mshv_svq_new(self.error_fd, queues)
        if self._handle == ffi.NULL:
            os.close(self.error_fd)
            raise OSError("cannot create the virtio-blk relay")
        fd, size, host = ffi.new("int *"), ffi.new("uint64_t *"), ffi.new("uint64_t *")
        lib.mshv_svq_shadow(self._handle, fd, size, host)
        self.shadow = MemRegion(SHADOW_GPA, int(size[0]), int(host[0]), int(fd[0]))

    def ring(self, index: int) -> tuple[int, int, int, int, int]:
        """Ring ``index``'s shadow (desc, avail, used) addresses in this process, and the backend's kick
        and call eventfds (the relay's own)."""
        out = [ffi.new("uint64_t *") for _ in range(3)]
        kick, call = ffi.new("int *"), ffi.new("int *")
        rc = lib.mshv_svq_ring(self._handle, index, *out, kick, call)
        if rc < 0:
            raise OSError(-rc, f"virtio-blk relay: ring {index}: {os.strerror(-rc)}")
        return int(out[0][0]), int(out[1][0]), int(out[2][0]), int(kick[0]), int(call[0])

    def start(self, regions: list[MemRegion], rings: list[_Ring], event_idx: bool) -> None:
        h = self._handle
        lib.mshv_svq_stop(h)
        lib.mshv_svq_clear_regions(h)
        for r in regions:
            if (rc := lib.mshv_svq_add_region(h, r.gpa, r.size, r.address)) < 0:
                raise OSError(-rc, f"virtio-blk relay: guest RAM at {r.gpa:#x}: {os.strerror(-rc)}")
        for n in range(RELAY_QUEUES):
            lib.mshv_svq_set_queue(h, n, 0, 0, 0, 0, -1, -1, 0, 0)
        for ring in rings:
            call = -1 if ring.call_fd is None else ring.call_fd
            rc = lib.mshv_svq_set_queue(
                h, ring.index, ring.size, ring.desc, ring.driver, ring.device, ring.kick_fd, call, 0, 0
            )
            if rc < 0:
                raise OSError(-rc, f"virtio-blk relay: ring {ring.index}: {os.strerror(-rc)}")
        if lib.mshv_svq_start(h, int(event_idx), self.poll_ns) != 0:
            raise OSError(0, f"virtio-blk relay: {self.error() or 'queues refused'}")

    def stop(self) -> None:
        """Returns once the relay's thread has let go of every ring."""
        lib.mshv_svq_stop(self._handle)

    def stats(self) -> dict[str, int]:
        st = ffi.new("struct mshv_svq_stats *")
        lib.mshv_svq_get_stats(self._handle, st)
        return {name: int(getattr(st, name)) for name in STATS}

    def dirty(self) -> list[int]:
        """Guest-physical page numbers (4 KiB) the device wrote since the last call; the log is cleared."""
        words = int(lib.mshv_svq_dirty(self._handle, ffi.NULL, 0))
        buf = ffi.new("uint64_t[]", max(words, 1))
        words = min(words, int(lib.mshv_svq_dirty(self._handle, buf, words)))
        return [64 * i + b for i in range(words) if (w := int(buf[i])) for b in range(64) if w >> b & 1]

    def error(self) -> str | None:
        buf = ffi.new("char[]", 160)
        if not lib.mshv_svq_error(self._handle, buf, 160):
            return None
        return str(ffi.string(buf).decode(errors="replace"))

    def close(self) -> None:
        if self._handle is not None:
            lib.mshv_svq_free(self._handle)
            self._handle = None
            os.close(self.error_fd)


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

    def __init__(
        self, backend: Backend, info: BackendInfo, regions: list[MemRegion], queues: int = 1, relay: Relay | None = None
    ) -> None:
        self.backend = backend
        self._own_relay = relay is None  # tests and the benchmark: the device's own, freed by close()
        self.relay = relay if relay is not None else Relay(queues)
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
        self._relaying = False
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
        self.close()

    def close(self) -> None:
        """Frees the relay the device made itself (a disk's relay from the VMM lives on)."""
        if self._own_relay:
            self._own_relay = False
            self.relay.stop()
            self.relay.close()

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
        fe.set_mem_table([*self._regions, self.relay.shadow])
        shadows = {r.index: self.relay.ring(r.index) for r in rings}
        # The relay takes the guest's rings first: what the guest posts meanwhile waits in the shadow ring
        # (and its kick in the backend's eventfd) until the backend is enabled below.
        self.relay.start(self._regions, rings, bool(features & F_EVENT_IDX))
        self._relaying = True
        for r in rings:
            desc, avail, used, kick, call = shadows[r.index]
            fe.set_vring_num(r.index, r.size)
            fe.set_vring_addr(r.index, desc, used, avail)
            fe.set_vring_base(r.index, 0)
            fe.set_vring_call(r.index, call)
            fe.set_vring_kick(r.index, kick)
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
        if self._relaying:  # then the relay lets go of the guest's rings
            self._relaying = False
            self.relay.stop()
