#!/usr/bin/env python3
"""qemu-storage-daemon option sets compared on blk.py's cases: which command line serves the ring best.

Each variant is the command line ``vhost_user.Backend`` builds (the shipped one: the export in a polling
iothread, ``aio=native`` for O_DIRECT) edited here, for this script only: ``main-loop`` drops the iothread
(the export in qsd's main loop, as before), ``pollN`` keeps the iothread with ``poll-max-ns=N`` (``poll0``:
a thread, no polling), ``uring`` swaps ``aio=native`` for ``aio=io_uring``. Rounds rotate which variant (and the
reference) goes first; every side is reported pooled (blk.py ``pooled``), with its CPU time per request
(blk.py ``task_cpu_ns``: qsd's threads plus the C driver's thread), which a loaded machine disturbs less
than IOPS or latency.

Run: ``.tox/py/bin/python benchmarks/blk_qsd_options.py [--variants shipped,main-loop,...] [--cases
"4K randread QD1,..."] [--formats raw,qcow2] [--seconds S] [--rounds R] [--size-mib N] [--dir D]``.
Not run by tox.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import blk  # benchmarks/blk.py

from mshv_libvirt.vmm.vhost_user import IOTHREAD_POLL_MAX_NS, Backend, BlockImage

Argv = Callable[[str, BlockImage, int, int], list[str]]
SHIPPED: Argv = Backend._argv


def _edit(argv: list[str], variant: str) -> list[str]:
    out = list(argv)
    if "main-loop" in variant:
        i = out.index("--object")
        del out[i : i + 2]
        out = [a.replace(",iothread=iothread0", "") for a in out]
    poll = re.search(r"poll(\d+)", variant)
    if poll:
        out = [a.replace(f"poll-max-ns={IOTHREAD_POLL_MAX_NS}", f"poll-max-ns={poll.group(1)}") for a in out]
    if "uring" in variant:
        out = [a.replace("aio=native", "aio=io_uring") for a in out]
    return out


def use(variant: str) -> None:
    def argv(exe: str, image: BlockImage, listen_fd: int, qmp_fd: int) -> list[str]:
        return _edit(SHIPPED(exe, image, listen_fd, qmp_fd), variant)

    Backend._argv = staticmethod(argv)  # type: ignore[method-assign]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="shipped,main-loop,poll0,uring")
    ap.add_argument("--cases", default="4K randread QD1,4K randwrite QD1,4K randread QD32,4K randwrite QD32")
    ap.add_argument("--formats", default="raw,qcow2")
    ap.add_argument("--seconds", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--dir", type=Path, default=None, help="where the images go (not tmpfs: O_DIRECT)")
    args = ap.parse_args()
    variants = args.variants.split(",")
    cases = [c for c in blk.CASES if c.name in args.cases.split(",")]
    size = args.size_mib * blk.MiB
    tmp = Path(tempfile.mkdtemp(prefix="mshv-blkopts-", dir=args.dir))
    try:
        raw, qcow2 = blk.make_images(tmp, size)
        print(f"load average at start: {blk.load()}")
        print("| image | case | side | IOPS | mean latency us | CPU us/request (qsd) |")
        print("|---|---|---|---|---|---|")
        for fmt in args.formats.split(","):
            image = raw if fmt == "raw" else qcow2
            for case in cases:
                runs: dict[str, list[blk.Side]] = {v: [] for v in [*variants, "reference"]}
                for n in range(args.rounds):
                    order = [*variants, "reference"]
                    order = order[n % len(order) :] + order[: n % len(order)]
                    for side in order:
                        if side != "reference":
                            use(side)
                            runs[side].append(blk.ours(image, fmt, case, size, args.seconds))
                        elif fmt == "raw":
                            runs[side].append(blk.fio(image, case, args.seconds))
                        else:  # count-based: as many requests as the first variant's first round, or a guess
                            done = runs[variants[0]]
                            count = done[0].requests if done else int(20000 * args.seconds)
                            runs[side].append(blk.qemu_img_bench(image, case, count))
                for side, sides in runs.items():
                    p = blk.pooled(sides)
                    per = 1e6 / p.requests
                    qsd = f" ({p.backend_cpu_s * per:.1f})" if side != "reference" else ""
                    lat = f"{p.lat_us:.1f}" if case.depth == 1 else ""  # qemu-img bench's is elapsed / count
                    print(
                        f"| {fmt} | {case.name} | {side} | {p.iops:.0f} | {lat} | {p.cpu_s * per:.1f}{qsd} |",
                        flush=True,
                    )
        print(f"load average at end: {blk.load()}")
    finally:
        use("shipped")
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
