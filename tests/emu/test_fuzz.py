"""Bounded fuzzing of the emulated device: random and mutated arguments for every ioctl number on
every fd type. The process must survive, and every result must be a success or one of the errnos
docs/ABI.md §4 gives for that call (plus §9.4's ENODEV for calls that need a guest); ioctl numbers
and the descriptor each belongs to are §2.3, the hypercall codes §4.9.

Pointers inside the arguments only ever point at our scratch pages, at unmapped or read-only
pages, or outside user space: the kernel would write through valid pointers too, and random ones
could land on the interpreter's own heap.
"""

from __future__ import annotations

import errno as E
import os
import random
import signal
import struct
import threading

import pytest
from mshv_libvirt._mshv import lib

from tests.abi import facts as F
from tests.support.report import write_report

from .emutil import (
    KERNEL_ADDR,
    PAGE,
    Mem,
    close,
    create_partition,
    create_vp,
    eventfd,
    initialize,
    ioctl,
    open_dev,
    protect,
    unmapped_addr,
)

ITERATIONS = int(os.environ.get("MSHV_EMU_FUZZ_ITERATIONS", "4000"))

ALLOWED = {
    # EIO: the create hypercall's refusal (§4.1 step 3, §5), e.g. NESTED_VIRTUALIZATION where KVM cannot nest (§9.5)
    "MSHV_CREATE_PARTITION": {E.EFAULT, E.EINVAL, E.EIO},
    "MSHV_INITIALIZE_PARTITION": {E.EIO, E.ENOMEM},
    "MSHV_CREATE_VP": {E.EFAULT, E.EINVAL, E.EEXIST, E.EIO, E.ENOMEM},
    "MSHV_SET_GUEST_MEMORY": {E.EFAULT, E.EINVAL, E.EEXIST, E.EIO, E.ENOMEM},
    "MSHV_IRQFD": {E.EFAULT, E.EINVAL, E.EBADF, E.EBUSY},
    "MSHV_IOEVENTFD": {E.EFAULT, E.EINVAL, E.EBADF, E.EOPNOTSUPP, E.EEXIST, E.ENOENT},
    "MSHV_SET_MSI_ROUTING": {E.EFAULT, E.EINVAL, E.ENOMEM},
    "MSHV_GET_GPAP_ACCESS_BITMAP": {E.EFAULT, E.EINVAL, E.EIO, E.ENOMEM, E.E2BIG, E.EBADFD},
    "MSHV_ROOT_HVCALL": {E.EFAULT, E.EINVAL, E.EIO, E.ENOMEM, E.EAGAIN, E.EPERM, E.EBADFD, E.ENODEV},
    "MSHV_RUN_VP": {E.EFAULT, E.EINTR, E.EIO, E.ENODEV},
    "MSHV_GET_VP_STATE": {E.EFAULT, E.EINVAL, E.EIO, E.ENOMEM},
    "MSHV_SET_VP_STATE": {E.EFAULT, E.EINVAL, E.EIO, E.ENOMEM},
}
VALID_ON = {
    "dev": {"MSHV_CREATE_PARTITION"},
    "partition": {
        "MSHV_INITIALIZE_PARTITION",
        "MSHV_CREATE_VP",
        "MSHV_SET_GUEST_MEMORY",
        "MSHV_IRQFD",
        "MSHV_IOEVENTFD",
        "MSHV_SET_MSI_ROUTING",
        "MSHV_GET_GPAP_ACCESS_BITMAP",
        "MSHV_ROOT_HVCALL",
    },
    "vp": {"MSHV_RUN_VP", "MSHV_GET_VP_STATE", "MSHV_SET_VP_STATE", "MSHV_ROOT_HVCALL"},
}
HVCALLS = list(F.ALLOW_LIST_6_15)


class Arena:
    """Scratch memory every generated pointer points into (or deliberately outside of)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        # Guest RAM and buffers: 64 pages, then a PROT_NONE guard page. Pointers stay in the
        # first 44 pages so that no generated size (at most 16 pages) reaches beyond the guard:
        # a guest given this memory may write anywhere in it.
        self.rw = Mem(65 * PAGE)
        protect(self.rw.addr + 64 * PAGE, PAGE, 0)
        self.ro = Mem(PAGE, prot=1)
        self.hole = unmapped_addr()
        # The ioctl argument itself lives here; the third page is a PROT_NONE guard, so an
        # argument placed across the end faults instead of reaching whatever is mapped next.
        self.arg = Mem(3 * PAGE)
        protect(self.arg.addr + 2 * PAGE, PAGE, 0)
        self.efd = eventfd()
        self.rfd, self.wfd = os.pipe()
        self.closed_fd = os.dup(self.rfd)
        os.close(self.closed_fd)

    def ptr(self, aligned: bool = False) -> int:
        r = self.rng.random()
        if r < 0.45:
            p = self.rw.addr + self.rng.randrange(0, 44) * PAGE
            return p if aligned or self.rng.random() < 0.5 else p + self.rng.randrange(1, PAGE)
        return self.rng.choice(
            [
                0,
                self.ro.addr,
                self.hole,
                KERNEL_ADDR,
                0x1000,
                8,
                KERNEL_ADDR + self.rng.randrange(1 << 30) * PAGE,
                2**64 - PAGE,
            ]
        )

    def fd(self, handles: list[int]) -> int:
        return self.rng.choice(
            [-1, self.efd, self.efd, self.rfd, self.closed_fd, self.rng.randrange(-5, 2**31), *handles]
        )

    def close(self) -> None:
        for fd in (self.efd, self.rfd, self.wfd):
            os.close(fd)
        self.rw.close()
        self.ro.close()
        self.arg.close()


def _mutate(rng: random.Random, data: bytearray) -> bytearray:
    for _ in range(rng.randrange(0, 4)):
        i = rng.randrange(len(data))
        data[i] = rng.choice([0, 0xFF, 1 << rng.randrange(8), rng.randrange(256)])
    return data


# Offsets of the user-pointer fields the emulator writes through (or maps into a guest).
POINTERS = {
    "MSHV_SET_GUEST_MEMORY": [16],
    "MSHV_GET_GPAP_ACCESS_BITMAP": [24],
    "MSHV_ROOT_HVCALL": [16, 24],
    "MSHV_GET_VP_STATE": [8],
    "MSHV_SET_VP_STATE": [8],
}


def sanitize(name: str, data: bytes, a: Arena) -> bytes:
    """Mutation may turn a pointer into any address of this process; the kernel would write
    through it, so would the emulator. Keep every pointer inside the arena or harmless."""
    out = bytearray(data)
    for off in POINTERS.get(name, []):
        if off + 8 > len(out):
            continue
        (p,) = struct.unpack_from("<Q", out, off)
        safe = (
            p < 0x10000
            or p >= 0x8000_0000_0000
            or a.rw.addr <= p < a.rw.addr + 45 * PAGE
            or a.ro.addr <= p < a.ro.addr + PAGE
        )
        if not safe:
            struct.pack_into("<Q", out, off, KERNEL_ADDR | (p & 0xFFFFFFFF))
    return bytes(out)


def make_arg(name: str, rng: random.Random, a: Arena, handles: list[int]) -> bytes:
    return sanitize(name, _make_arg(name, rng, a, handles), a)


def _make_arg(name: str, rng: random.Random, a: Arena, handles: list[int]) -> bytes:
    """A template filled with plausible values, then mutated (or pure noise now and then)."""
    if rng.random() < 0.1:
        return rng.randbytes(rng.choice([4, 16, 32, 64, 300]))

    def pg() -> int:
        return rng.choice([1, 2, 4, 16, 0, 3]) * PAGE + rng.choice([0, 0, 0, 1, 2048])

    if name == "MSHV_CREATE_PARTITION":
        d = struct.pack(
            "<QQH6s2Q16sQ",
            rng.choice([7, 0, 15, 8, 1 << rng.randrange(64)]),
            rng.choice([0, 0, 1]),
            rng.choice([2, 2, 0, 3]),
            bytes(6),
            rng.getrandbits(64),
            rng.getrandbits(64),
            bytes(16),
            rng.getrandbits(64),
        )
    elif name == "MSHV_CREATE_VP":
        d = struct.pack("<I", rng.choice([0, 1, 2, 255, 256, rng.getrandbits(32)]))
    elif name == "MSHV_SET_GUEST_MEMORY":
        d = struct.pack(
            "<QQQB7s",
            pg(),
            rng.choice([0, 0x100, 0x10000, rng.getrandbits(52), rng.getrandbits(64)]),
            a.ptr(aligned=rng.random() < 0.8),
            rng.randrange(8),
            bytes(7),
        )
    elif name == "MSHV_IRQFD":
        d = struct.pack(
            "<iiII",
            a.fd(handles),
            a.fd(handles),
            rng.choice([0, 5, 23, 4095, rng.getrandbits(32)]),
            rng.choice([0, 1, 2, 3, 4]),
        )
    elif name == "MSHV_IOEVENTFD":
        d = struct.pack(
            "<QQIiI4s",
            rng.getrandbits(64),
            rng.choice([0xFEB00000, 2**64 - 2, rng.getrandbits(64)]),
            rng.choice([0, 1, 2, 4, 8, 3]),
            a.fd(handles),
            rng.randrange(8),
            bytes(4),
        )
    elif name == "MSHV_SET_MSI_ROUTING":
        n = rng.choice([0, 1, 3, 8, 5000])
        d = struct.pack("<II", n, 0) + b"".join(
            struct.pack(
                "<IIII",
                rng.choice([0, 1, 5, 4096]),
                0xFEE00000 | rng.randrange(256) << 12,
                rng.choice([0, 0, 1]),
                rng.getrandbits(16),
            )
            for _ in range(min(n, 16))
        )
    elif name == "MSHV_GET_GPAP_ACCESS_BITMAP":
        d = struct.pack(
            "<BB6sQQQ",
            rng.randrange(3),
            rng.randrange(4),
            bytes(6),
            rng.choice([0, 1, 64, 4096, 2**40]),
            rng.getrandbits(20),
            a.ptr(),
        )
    elif name == "MSHV_ROOT_HVCALL":
        in_ptr, out_ptr = a.ptr(), a.ptr()
        if a.rw.addr <= in_ptr < a.rw.addr + 44 * PAGE:  # give the hypercall real input
            a.rw.write(in_ptr - a.rw.addr, bytes(_mutate(rng, bytearray(_hv_input(rng)))))
        d = struct.pack(
            "<HHHHH6sQQ",
            rng.choice([*HVCALLS, 0, 78, rng.getrandbits(16)]),
            rng.choice([0, 0, 1, 2, 300]),
            rng.choice([8, 16, 24, 32, 48, 4096, 4097, 0, 7]),
            rng.choice([0, 8, 16, 64, 4096, 5000]),
            0,
            bytes(6),
            in_ptr,
            out_ptr,
        )
    elif name in ("MSHV_GET_VP_STATE", "MSHV_SET_VP_STATE"):
        d = struct.pack(
            "<B3sIQ",
            rng.randrange(6),
            bytes(3),
            rng.choice([PAGE, 2 * PAGE, 0, 200, 3 * PAGE]),
            a.ptr(aligned=rng.random() < 0.8),
        )
    else:
        d = rng.randbytes(256)
    return bytes(_mutate(rng, bytearray(d)))


def _hv_input(rng: random.Random) -> bytes:
    hdr = struct.pack("<QIBBH", 0, rng.choice([0, 1, 300]), 0, 0, 0)
    body = b"".join(
        struct.pack("<IIQ", 0x00020000 + rng.randrange(0x90000), 0, 0) + rng.randbytes(16) for _ in range(4)
    )
    return hdr + body


class Kicker:
    """Interrupts a RUN_VP that does not come back by itself (guest in a loop)."""

    def __init__(self) -> None:
        self.old = signal.signal(signal.SIGUSR1, lambda *_: None)
        self.main = threading.get_ident()

    def arm(self) -> threading.Timer:
        t = threading.Timer(0.2, lambda: signal.pthread_kill(self.main, signal.SIGUSR1))
        t.daemon = True
        t.start()
        return t

    def close(self) -> None:
        signal.signal(signal.SIGUSR1, self.old)


def test_fuzz_every_ioctl_on_every_fd() -> None:
    rng = random.Random(int(os.environ.get("MSHV_EMU_FUZZ_SEED", "0x6D736876"), 0))
    arena = Arena(rng)
    kicker = Kicker()
    dev = open_dev()
    numbers = {n: F.IOCTLS[n] for n in ALLOWED}
    created: list[int] = []
    counts = {"ok": 0, "err": 0}

    def fresh() -> dict[str, int]:
        pt_uninit = create_partition(dev)
        pt = create_partition(dev)
        assert initialize(pt) == 0
        vp = create_vp(pt, 0)
        h = {"dev": dev, "partition_uninit": pt_uninit, "partition": pt, "vp": vp}
        created.extend([pt_uninit, pt, vp])
        return h

    try:
        handles = fresh()
        for i in range(ITERATIONS):
            if i and i % 500 == 0:  # bound the state a partition can accumulate
                for fd in created:
                    close(fd)
                created.clear()
                handles = fresh()
            kind = rng.choice(list(handles))
            fd = handles[kind]
            if rng.random() < 0.05:
                name, number = "unknown", rng.choice([rng.getrandbits(32), 0xC020B800 | rng.randrange(8, 256)])
            else:
                name = rng.choice(list(numbers))
                number = numbers[name]
            valid_kind = kind.split("_")[0]
            data = make_arg(name, rng, arena, list(handles.values()))
            arena.arg.write(0, data)
            argp = rng.choice([arena.arg.addr] * 8 + [0, arena.hole, arena.arg.addr + 2 * PAGE - len(data) // 2])
            timer = kicker.arm() if name == "MSHV_RUN_VP" and kind == "vp" else None
            r = ioctl(fd, number, argp)
            if timer:
                timer.cancel()
            if name == "unknown" or name not in VALID_ON[valid_kind]:
                assert r == -E.ENOTTY, (i, kind, name, hex(number), r)
                continue
            if r >= 0:
                counts["ok"] += 1
                if name in ("MSHV_CREATE_PARTITION", "MSHV_CREATE_VP"):
                    assert lib.mshv_dev_is_emulated(r)
                    close(r)
            else:
                counts["err"] += 1
                assert -r in ALLOWED[name], (i, kind, name, E.errorcode.get(-r, -r), data.hex())
    finally:
        for fd in created:
            close(fd)
        close(dev)
        kicker.close()
        arena.close()
    # the generator reaches both outcomes
    assert counts["ok"] > ITERATIONS // 20 and counts["err"] > ITERATIONS // 5, counts
    write_report(
        "emu_ioctl_fuzz",
        {
            "ioctls_tried": ITERATIONS,
            "accepted": counts["ok"],
            "refused_with_kernel_errno": counts["err"],
            "enotty_wrong_fd_or_unknown": ITERATIONS - counts["ok"] - counts["err"],
        },
    )


@pytest.mark.parametrize("kind", ["dev", "partition", "vp"])
def test_fuzz_pure_noise_never_crashes(kind: str) -> None:
    rng = random.Random({"dev": 1, "partition": 2, "vp": 3}[kind])
    dev = open_dev()
    pt = create_partition(dev)
    initialize(pt)
    vp = create_vp(pt, 1)
    fd = {"dev": dev, "partition": pt, "vp": vp}[kind]
    mem = Mem(PAGE)
    try:
        for _ in range(500):
            number = rng.choice([rng.getrandbits(32), *(F.IOCTLS[n] for n in ALLOWED if n != "MSHV_RUN_VP")])
            # noise, with any would-be pointer made harmless (kernel half) so writes cannot land
            words = [rng.getrandbits(64) | (0xFFFF8 << 44) for _ in range(16)]
            mem.write(0, struct.pack("<16Q", *words))
            r = ioctl(fd, number, mem.addr)
            if r >= 0 and number in (F.MSHV_CREATE_PARTITION, F.MSHV_CREATE_VP):
                close(r)
            assert r >= 0 or -r in {
                E.ENOTTY,
                E.EFAULT,
                E.EINVAL,
                E.EBADF,
                E.EIO,
                E.EOPNOTSUPP,
                E.ENOMEM,
                E.EEXIST,
                E.ENOENT,
                E.EBUSY,
                E.ENODEV,
            }, (hex(number), r)
    finally:
        mem.close()
        close(vp)
        close(pt)
        close(dev)
