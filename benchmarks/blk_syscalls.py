#!/usr/bin/env python3
"""System calls per request of qemu-storage-daemon serving blk.py's handed-over ring (``strace -c -f``).

The C driver (abi/vmm/blkq.c) runs ``--count`` 4 KiB reads at ``--depth`` on a fresh raw or qcow2 image
of random bytes (``cache='none'``) while strace counts every call of every backend thread; the table is
calls / requests, with the driver's own kicks and sleeps on the call eventfd beside it. Counts, not times:
strace slows each call, so the iothread's polling catches fewer completions than it would untraced (its
ppoll count is an upper bound). fio's libaio at the same depth needs one io_submit and one io_getevents
per request (or per batch).

Run: ``.tox/py/bin/python benchmarks/blk_syscalls.py [--format raw|qcow2] [--depth N] [--count N] [--dir D]
[--variant V]`` (V as in blk_qsd_options.py: the shipped command line by default).
Not run by tox.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import blk  # benchmarks/blk.py
import blk_qsd_options  # its command-line variants

from mshv_libvirt.hv import GuestMemory
from mshv_libvirt.vmm.devices.virtio import blk as virtio_blk
from mshv_libvirt.vmm.vhost_user import Backend, BlockImage, MemRegion
from tests.support.blk_driver import T_IN, HandedQueue, Job, ram_for
from tests.support.waits import wait_for


def traced(pid: int) -> bool:
    """Every thread of ``pid`` has a tracer (the kernel's TracerPid)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        if "\nTracerPid:\t0\n" in Path(f"/proc/{pid}/task/{tid}/status").read_text():
            return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--format", choices=("raw", "qcow2"), default="raw")
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--count", type=int, default=5000)
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--dir", type=Path, default=None, help="where the image goes (not tmpfs: O_DIRECT)")
    ap.add_argument("--variant", default="shipped", help="a blk_qsd_options.py variant: main-loop, poll0, uring...")
    args = ap.parse_args()
    blk_qsd_options.use(args.variant)
    if shutil.which("strace") is None:
        print("strace is not installed", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="mshv-blksys-", dir=args.dir))
    try:
        raw, qcow2 = blk.make_images(tmp, args.size_mib * blk.MiB)
        image = raw if args.format == "raw" else qcow2
        out = tmp / "strace.txt"
        backend = Backend(BlockImage(str(image), format=args.format, direct=True))
        try:
            with GuestMemory(ram_for(args.depth, 4096)) as mem:
                device = virtio_blk.VirtioBlk(
                    backend, virtio_blk.prepare(backend), [MemRegion(0, mem.size, mem.address, mem.fd)]
                )
                q = HandedQueue(device, mem)
                try:
                    tracer = subprocess.Popen(["strace", "-c", "-f", "-o", str(out), "-p", str(backend.pid)])
                    try:
                        wait_for(lambda: traced(backend.pid), 10, what="strace attached")
                        job = Job(T_IN, 4096, args.depth, span=args.size_mib * blk.MiB, count=args.count, seed=7)
                        r = q.run(job)
                    finally:
                        tracer.send_signal(signal.SIGINT)  # detaches and writes its summary
                        tracer.wait(30)
                finally:
                    q.close()
        finally:
            backend.stop()
        print(f"{args.format}, 4 KiB reads at depth {args.depth}, {args.variant}: {r.requests} requests")
        print(f"driver: {r.kicks / r.requests:.2f} kicks, {r.waits / r.requests:.2f} sleeps on the call eventfd")
        print("| qemu-storage-daemon call | per request |")
        print("|---|---|")
        for line in out.read_text().splitlines():
            parts = line.split()
            # "% time  seconds  usecs/call  calls  [errors]  syscall"
            if len(parts) >= 5 and parts[3].isdigit() and parts[-1] != "total":
                print(f"| {parts[-1]} | {int(parts[3]) / r.requests:.2f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
