"""The compiled module's test-only virtio-blk driver (abi/vmm/blkq.c) on a queue a VirtioBlk device handed
over (VirtioBlk.hand_over): guest RAM is a memfd-backed GuestMemory, the kick and call are eventfds. Python
only sets it up and reads the result; every request is filled, kicked and reaped in C."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from mshv_libvirt._mshv import ffi, lib

from mshv_libvirt.hv import GuestMemory
from mshv_libvirt.vmm.devices.virtio.blk import QUEUE_SIZE, VirtioBlk
from mshv_libvirt.vmm.devices.virtio.pci import F_EVENT_IDX

T_IN, T_OUT = 0, 1
SECTOR = 512
# Guest-physical layout of the handed-over RAM: the rings, 32 bytes of header + status per request slot,
# then the data buffers (page-aligned, as a guest's would be for O_DIRECT).
DESC, AVAIL, USED, HEADERS, DATA = 0x0, 0x1000, 0x2000, 0x3000, 0x10000


@dataclass(frozen=True)
class Job:
    type: int
    block: int
    depth: int
    span: int
    stride: bool = False  # False: uniformly random offsets; True: offset += step, modulo span
    step: int = 0
    count: int = 0  # requests; 0: as many as fit in seconds
    seconds: float = 0.0
    stamp: bool = False  # writes stamp each sector with its number; reads count the sectors that lack it
    seed: int = 1
    timeout_ms: int = 10_000


@dataclass(frozen=True)
class Result:
    requests: int
    bytes: int
    seconds: float
    lat_mean_us: float
    lat_max_us: float
    errors: int
    mismatches: int
    kicks: int
    waits: int

    @property
    def iops(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def mib_s(self) -> float:
        return self.bytes / self.seconds / (1 << 20) if self.seconds else 0.0


class DriverError(RuntimeError):
    pass


def ram_for(depth: int, block: int) -> int:
    """Guest RAM enough for ``depth`` buffers of ``block`` bytes, in whole MiB."""
    return (DATA + depth * block + (1 << 20) - 1) & ~((1 << 20) - 1)


class HandedQueue:
    """Ring 0 of ``device`` handed over to the C driver; close() stops the ring, then frees the driver."""

    def __init__(self, device: VirtioBlk, mem: GuestMemory) -> None:
        self.mem = mem
        mem.write(0, bytes(DATA))
        self.kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.device = device
        self._handle: Any = ffi.NULL
        try:
            self.features = device.hand_over(QUEUE_SIZE, DESC, AVAIL, USED, self.kick, self.call)
            layout = ffi.new(
                "struct mshv_blkq_layout *",
                {"desc": DESC, "avail": AVAIL, "used": USED, "headers": HEADERS, "data": DATA, "size": QUEUE_SIZE},
            )
            self.event_idx = bool(self.features & F_EVENT_IDX)
            ram = ffi.cast("void *", mem.address)
            self._handle = lib.mshv_blkq_new(ram, mem.size, layout, self.kick, self.call, int(self.event_idx))
            if self._handle == ffi.NULL:
                raise DriverError("mshv_blkq_new refused the layout")
        except BaseException:
            self.close()
            raise

    def run(self, job: Job) -> Result:
        c_job = ffi.new(
            "struct mshv_blkq_job *",
            {
                "type": job.type,
                "block": job.block,
                "depth": job.depth,
                "stride": int(job.stride),
                "seed": job.seed,
                "step": job.step,
                "span": job.span,
                "count": job.count,
                "duration_ns": int(job.seconds * 1e9),
                "stamp": int(job.stamp),
                "timeout_ms": job.timeout_ms,
            },
        )
        out = ffi.new("struct mshv_blkq_result *")
        if lib.mshv_blkq_run(self._handle, c_job, out) != 0:
            buf = ffi.new("char[256]")
            lib.mshv_blkq_error(self._handle, buf, 256)
            raise DriverError(ffi.string(buf).decode())
        n = int(out.requests)
        return Result(
            requests=n,
            bytes=int(out.bytes),
            seconds=int(out.elapsed_ns) / 1e9,
            lat_mean_us=int(out.lat_sum_ns) / n / 1e3 if n else 0.0,
            lat_max_us=int(out.lat_max_ns) / 1e3,
            errors=int(out.errors),
            mismatches=int(out.mismatches),
            kicks=int(out.kicks),
            waits=int(out.waits),
        )

    def close(self) -> None:
        self.device.release()
        self.device.close()  # its relay (the device's own here) ends with the queue
        if self._handle != ffi.NULL:
            lib.mshv_blkq_free(self._handle)
            self._handle = ffi.NULL
        for fd in (self.kick, self.call):
            if fd >= 0:
                os.close(fd)
        self.kick = self.call = -1
