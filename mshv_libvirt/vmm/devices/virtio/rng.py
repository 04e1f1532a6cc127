"""virtio-rng (virtio 1.2 section 5.4): one request queue whose writable buffers the device fills with
host entropy.

The work happens on the device's own thread, never on a vCPU: it sleeps in poll(2) on the queue's kick
eventfd (signalled by the kernel through MSHV_IOEVENTFD when the guest writes the doorbell), reads the
backend (an fd of /dev/urandom or /dev/random opened before the sandbox closed the file system) into
the guest's buffers, publishes them in the used ring and fires the queue's MSI-X vector through its
irqfd. ``<rate bytes period>`` limits it to ``bytes`` per ``period`` milliseconds: a request beyond the
budget waits for the next period (libvirt's and QEMU's meaning).

Under the VMM's sandbox the thread narrows itself to the device allow-list (abi/vmm/sandbox.c): read,
write, poll/ppoll, futex, clock_gettime and Python's allocator (mmap without PROT_EXEC, munmap, madvise,
mremap, brk), signal masking/return, restart_syscall, exit.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from dataclasses import dataclass
from typing import Any

from ... import sandbox
from .pci import VirtioPciFunction
from .queue import Virtqueue

DEVICE_ID = 4
QUEUE_SIZE = 256
CLASS_OTHER = 0xFF0000  # what QEMU's virtio-rng-pci reports
MAX_READ = 64 * 1024  # one buffer's share of a wake-up (a guest may post huge buffers)
STATE_VERSION = 1


@dataclass(frozen=True)
class RateLimit:
    bytes: int
    period_ms: int = 1000


class VirtioRng:
    device_id = DEVICE_ID
    class_code = CLASS_OTHER
    features = 0
    queue_sizes: tuple[int, ...] = (QUEUE_SIZE,)
    config_size = 0

    def __init__(self, source_fd: int, rate: RateLimit | None = None) -> None:
        self._source = source_fd
        self.rate = rate
        self.served = 0  # bytes written into guest buffers
        self.requests = 0
        self._budget = rate.bytes if rate else 0
        self._period_end = 0.0
        self._transport: VirtioPciFunction | None = None
        self._stop = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    # -- VirtioDevice ------------------------------------------------------------------------------

    def config_read(self, offset: int, size: int) -> int:
        return 0

    def config_write(self, offset: int, size: int, value: int) -> None:
        pass

    def reset(self) -> None:
        pass  # nothing beyond the queue, which the transport resets

    def to_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "served": self.served, "requests": self.requests}

    def load_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"virtio-rng state version {state.get('version')!r} is not {STATE_VERSION}")
        self.served, self.requests = int(state["served"]), int(state["requests"])

    # -- the device thread -------------------------------------------------------------------------

    def start(self, transport: VirtioPciFunction) -> None:
        self._transport = transport
        self._thread = threading.Thread(target=self._main, name="virtio-rng", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            os.eventfd_write(self._stop, 1)
            thread.join(5)
        with contextlib.suppress(OSError):
            os.close(self._stop)

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def _main(self) -> None:
        transport = self._transport
        assert transport is not None
        try:
            sandbox.enter_thread(sandbox.DEVICE, "virtio-rng")
            kick = transport.kicks[0]
            poller = select.poll()
            poller.register(kick, select.POLLIN)
            poller.register(self._stop, select.POLLIN)
            waiting = False  # rate-limited with requests left
            while True:
                timeout = None
                if waiting:
                    timeout = max(0, int((self._period_end - time.monotonic()) * 1000) + 1)
                ready = {fd for fd, _ in poller.poll(timeout)}
                if self._stop in ready:
                    return
                if kick in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(kick)
                transport.process(0, self._serve)
                waiting = self.rate is not None and self._budget == 0 and self._has_requests(transport)
        except BaseException as err:  # the VM keeps running; the device is dead and says so
            self.error = err
            transport.needs_reset(f"device thread failed: {err}")

    def _has_requests(self, transport: VirtioPciFunction) -> bool:
        with transport.lock:
            return transport.driver_ok and transport.queues[0].pending(transport.memory)

    def _refill(self) -> None:
        if self.rate is None:
            return
        now = time.monotonic()
        if now >= self._period_end:
            self._budget = self.rate.bytes
            self._period_end = now + self.rate.period_ms / 1000

    def _serve(self, queue: Virtqueue) -> bool:
        transport = self._transport
        assert transport is not None
        mem = transport.memory
        used = False
        while True:
            self._refill()
            if self.rate is not None and self._budget == 0:
                return used
            chain = queue.pop(mem)
            if chain is None:
                return used
            written = 0
            for buf in chain.writable:
                want = min(buf.length, MAX_READ)
                if self.rate is not None:
                    want = min(want, self._budget)
                if want == 0:
                    break
                data = os.read(self._source, want)
                mem.write(buf.gpa, data)
                written += len(data)
                if self.rate is not None:
                    self._budget -= len(data)
                if len(data) < buf.length:
                    break  # a short read or the budget: hand over what there is
            queue.push(mem, chain.head, written)
            self.served += written
            self.requests += 1
            used = True
