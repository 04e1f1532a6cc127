#!/usr/bin/env python3
"""virtio-blk data path vs. the host's own I/O on the same file, same block size, depth and O_DIRECT.

Guests cannot measure the disk on this host (every guest kernel instruction is emulated), so the data
path itself is driven: a VirtioBlk device in its test-only hand-over mode (docs/DESIGN.md) serves one ring
of guest RAM (a memfd) to qemu-storage-daemon's vhost-user-blk export exactly as on DRIVER_OK, and the
compiled module's C driver (abi/vmm/blkq.c) fills descriptors, kicks the kick eventfd and reaps the used
ring, sleeping on the call eventfd where the guest's MSI-X irqfd would be. Python only sets up and reads
one result per case. Each case then runs the reference on the same file right after:

* raw, ``cache='none'`` (``cache.direct=on,aio=native``): ``fio --ioengine=libaio --direct=1``, uniformly
  random offsets on both sides (fio ``--norandommap --randrepeat=0``, ours xorshift), each run ``--seconds`` long;
* qcow2, ``cache='none'``: ``qemu-img bench -t none -i native`` for as many requests as ours completed in
  ``--seconds``; it has no random mode, so both sides walk the same offsets, each ``(previous + step) %
  size`` as qemu-img 7.2 does: step = block (sequential) or 7919 blocks (a permutation of all 4 KiB blocks:
  "random").

Cases: 4 KiB random read/write at depth 1 and 32, 1 MiB sequential read/write at depth 8. Ratios are
ours / reference (IOPS; MiB/s); at depth 1 also the mean latency (fio's ``lat_ns`` mean; qemu-img bench's
elapsed / count). Targets (reported, not gated): sequential >= 0.9, 4 KiB QD32 >= 0.7, QD1 latency <=
reference + 20 us. The image files are filled with random bytes (a reading side must touch the disk).

Each side runs ``--rounds`` times per case, the two alternating which goes first (a drifting load then hits
both alike), and is reported pooled: all its requests over all its time. Beside the rates, each side's CPU
time per request, which a loaded machine disturbs less: ours is qemu-storage-daemon's threads (the kernel's
schedstat) plus the C driver's thread, the reference fio's own usr + sys account or qemu-img bench's whole
process (getrusage of children: its start included).

Requests pass through the VMM's counting relay (abi/vmm/svq.c) as a VM's do; ``--relay-poll-us`` sets its
busy-poll window (the VMM's default is 0: it sleeps in epoll), and each case checks the relay counted every
request the driver completed.

Then, for information, the emulated guest's figures: the tiny guest's own virtio-blk driver on a
``cache='none'`` raw and qcow2 disk times ``TINY_BLK_TIMED_READS`` 4 KiB reads at depth 1 per press on its
ACPI PM timer (``--guest-presses``; none when guests cannot run here). Its instructions are emulated by
this host, so it measures the emulator as much as the disk path.

Run: ``.tox/py/bin/python benchmarks/blk.py [--seconds S] [--rounds R] [--size-mib N] [--dir D] [--formats raw]
[--relay-poll-us U] [--guest-presses P] [--json]``.
Not run by tox.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mshv_libvirt.hv import GuestMemory
from mshv_libvirt.vmm.devices.virtio import blk
from mshv_libvirt.vmm.vhost_user import Backend, BlockImage, MemRegion
from tests.support import prereqs
from tests.support.blk_driver import T_IN, T_OUT, HandedQueue, Job, ram_for
from tests.support.guests import TINY_BANNER, TINY_BLK_BYTES, TINY_IRQ_FLAG, build_tiny_guest, tiny_blk, tiny_blk_rate
from tests.support.waits import wait_for
from tests.vmm.harness import VmmProcess

KiB, MiB = 1 << 10, 1 << 20
QCOW2_RANDOM_STEP_BLOCKS = 7919  # odd: over a power-of-two number of blocks the walk visits every block once


@dataclass(frozen=True)
class Case:
    name: str
    write: bool
    block: int
    depth: int
    sequential: bool

    @property
    def fio_rw(self) -> str:
        return ("write" if self.write else "read") if self.sequential else ("randwrite" if self.write else "randread")

    @property
    def target(self) -> str:
        if self.sequential:
            return ">= 0.9x"
        return ">= 0.7x" if self.depth >= 32 else "lat <= ref + 20 us"


CASES = [
    Case("4K randread QD1", False, 4 * KiB, 1, False),
    Case("4K randwrite QD1", True, 4 * KiB, 1, False),
    Case("4K randread QD32", False, 4 * KiB, 32, False),
    Case("4K randwrite QD32", True, 4 * KiB, 32, False),
    Case("1M read QD8", False, MiB, 8, True),
    Case("1M write QD8", True, MiB, 8, True),
]


@dataclass(frozen=True)
class Side:
    iops: float
    mib_s: float
    lat_us: float
    requests: int
    seconds: float
    cpu_s: float  # CPU time the side spent on its requests (all its processes and threads, user + kernel)
    backend_cpu_s: float = 0.0  # ours: qemu-storage-daemon's part of cpu_s (the rest is the C driver's)


def task_cpu_ns(pid: int) -> int:
    """Every thread's time on a CPU (/proc/PID/task/*/schedstat, the kernel's ns account, user + kernel)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    return total


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def make_images(where: Path, size: int) -> tuple[Path, Path]:
    raw, qcow2 = where / "bench.raw", where / "bench.qcow2"
    with raw.open("wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
        f.flush()
        os.fsync(f.fileno())
    # Every cluster allocated (random data): reads hit the disk through qcow2's mapping, not its zero path.
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], check=True, timeout=600)
    return raw, qcow2


def ours(image: Path, fmt: str, case: Case, size: int, seconds: float, poll_ns: int = 0) -> Side:
    backend = Backend(BlockImage(str(image), format=fmt, direct=True))
    try:
        with GuestMemory(ram_for(8, MiB)) as mem:
            regions = [MemRegion(0, mem.size, mem.address, mem.fd)]
            relay = blk.Relay(poll_ns=poll_ns)  # the VMM's counting relay, as a disk of a VM has it
            device = blk.VirtioBlk(backend, blk.prepare(backend), regions, relay=relay)
            q = HandedQueue(device, mem)
            try:
                stride = fmt == "qcow2" or case.sequential
                step = case.block if case.sequential else case.block * QCOW2_RANDOM_STEP_BLOCKS
                # Only the run is counted: qemu-storage-daemon's start and the hand-over are not requests.
                qsd_before, driver_before = task_cpu_ns(backend.pid), time.thread_time_ns()
                r = q.run(
                    Job(
                        T_OUT if case.write else T_IN,
                        case.block,
                        case.depth,
                        span=size,
                        stride=stride,
                        step=step if stride else 0,
                        seconds=seconds,
                        seed=int.from_bytes(os.urandom(8), "little") | 1,
                    )
                )
                # The C driver runs on this thread (it is the guest's side); the backend is all its threads.
                backend_ns = task_cpu_ns(backend.pid) - qsd_before
                cpu_ns = backend_ns + time.thread_time_ns() - driver_before
            finally:
                q.close()
                relay.stop()
                counted = relay.stats()
                relay.close()
    finally:
        backend.stop()
    if counted["rd_req"] + counted["wr_req"] != r.requests:  # the relay saw every request the driver completed
        raise RuntimeError(f"{case.name}: the relay counted {counted}, the driver completed {r.requests}")
    if r.errors:
        raise RuntimeError(f"{case.name}: {r.errors} requests failed")
    return Side(r.iops, r.mib_s, r.lat_mean_us, r.requests, r.seconds, cpu_ns / 1e9, backend_ns / 1e9)


def fio(image: Path, case: Case, seconds: float) -> Side:
    argv = [
        "fio",
        "--name=ref",
        f"--filename={image}",
        "--direct=1",
        "--ioengine=libaio",
        f"--rw={case.fio_rw}",
        f"--bs={case.block}",
        f"--iodepth={case.depth}",
        f"--runtime={int(seconds * 1000)}ms",  # fio reads a bare "0.3" as 0: no limit
        "--time_based",
        "--norandommap",
        "--randrepeat=0",
        "--output-format=json",
    ]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=seconds + 60)
    job = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]["write" if case.write else "read"]
    seconds_run = job["runtime"] / 1000
    jobs = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]
    cpu = (jobs["usr_cpu"] + jobs["sys_cpu"]) / 100 * seconds_run  # fio's own account: % of the job's runtime
    return Side(job["iops"], job["bw_bytes"] / MiB, job["lat_ns"]["mean"] / 1e3, job["total_ios"], seconds_run, cpu)


def qemu_img_bench(image: Path, case: Case, count: int) -> Side:
    step = case.block if case.sequential else case.block * QCOW2_RANDOM_STEP_BLOCKS
    argv = ["qemu-img", "bench", "-f", "qcow2", "-t", "none", "-i", "native", "-c", str(count)]
    argv += ["-d", str(case.depth), "-s", str(case.block), "-S", str(step)] + (["-w"] if case.write else [])
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([*argv, str(image)], capture_output=True, text=True, check=True, timeout=600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # Its whole process (start and image open included: it reports no CPU of its own), so a little high.
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    m = re.search(r"Run completed in ([0-9.]+) seconds", out.stdout)
    if not m:
        raise RuntimeError(f"qemu-img bench said: {out.stdout}{out.stderr}")
    secs = float(m.group(1))
    # Its only figure is the elapsed time: at depth 1 a request's latency is elapsed / count.
    return Side(count / secs, count * case.block / secs / MiB, secs / count * 1e6, count, secs, cpu)


@dataclass(frozen=True)
class GuestFigure:
    format: str
    presses: int
    reads: int
    seconds: float  # the guest's own clock (ACPI PM timer), summed over its presses

    @property
    def mib_s(self) -> float:
        return self.reads * TINY_BLK_BYTES / self.seconds / MiB

    @property
    def lat_us(self) -> float:
        return self.seconds / self.reads * 1e6


def guest_figures(where: Path, presses: int) -> list[GuestFigure] | str:
    """The tiny guest's own driver (tests/support/guests.py, key ``j``) on a ``cache='none'`` disk: each press
    times TINY_BLK_TIMED_READS reads of 4 KiB at depth 1 on the guest's ACPI PM timer. Every instruction of
    that driver runs under this host's emulation, so this is the emulated guest's figure, for information;
    a string says why there is none."""
    why = prereqs.missing("kvm") or prereqs.missing("binutils")
    if why:
        return why
    kernel = build_tiny_guest(where / "guest")
    out = []
    for fmt in ("raw", "qcow2"):
        img = where / f"guest.{fmt}"
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(img), "8M"], check=True, timeout=30)
        disks = [{"slot": 4, "path": str(img), "format": fmt, "cache": "none"}]
        cmdline = f"console=ttyS0 tiny {TINY_IRQ_FLAG}"
        with VmmProcess.start(where / f"vm-{fmt}", kernel, cmdline=cmdline, sandbox=True, disks=disks) as vm:
            vm.wait_serial(TINY_BANNER, timeout=60)
            vm.connect()
            for n in range(1, presses + 1):
                vm.console_send(b"j")
                wait_for(lambda n=n: len(tiny_blk(vm.serial)) >= n or "TINY-BLK-FAIL" in vm.serial, 120)
                if "TINY-BLK-FAIL" in vm.serial:
                    raise RuntimeError(f"the tiny guest's request failed: {vm.diagnostics()}")
            lines = tiny_blk(vm.serial)
            vm.request("destroy")
            vm.wait_exit(timeout=30)
        seconds = sum(tiny_blk_rate(line)[1] * line["reads"] for line in lines)
        out.append(GuestFigure(fmt, len(lines), sum(line["reads"] for line in lines), seconds))
    return out


def pooled(runs: list[Side]) -> Side:
    """Rounds of one side as one run: their requests over their time; latency weighted by requests."""
    requests, seconds = sum(r.requests for r in runs), sum(r.seconds for r in runs)
    lat = sum(r.lat_us * r.requests for r in runs) / requests
    mib = sum(r.mib_s * r.seconds for r in runs) / seconds
    cpu, backend_cpu = sum(r.cpu_s for r in runs), sum(r.backend_cpu_s for r in runs)
    return Side(requests / seconds, mib, lat, requests, seconds, cpu, backend_cpu)


def verdict(case: Case, a: Side, b: Side) -> str:
    if case.depth == 1:
        return "met" if a.lat_us <= b.lat_us + 20 else "missed"
    ratio = a.iops / b.iops
    return "met" if ratio >= (0.9 if case.sequential else 0.7) else "missed"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=1.5, help="per case, side and round")
    ap.add_argument("--rounds", type=int, default=2, help="per case and side, alternating which goes first")
    ap.add_argument("--size-mib", type=int, default=256, help="image size")
    ap.add_argument("--dir", type=Path, default=None, help="where the images go (not tmpfs: O_DIRECT)")
    ap.add_argument("--relay-poll-us", type=float, default=0.0, help="the relay's busy-poll window (0: it sleeps)")
    ap.add_argument("--formats", default="raw,qcow2", help="which images: raw, qcow2 or both (comma-separated)")
    ap.add_argument("--guest-presses", type=int, default=4, help="tiny guest presses per format; 0: none")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    for tool in ("fio", "qemu-img", "qemu-storage-daemon"):
        if shutil.which(tool) is None and not Path(f"/usr/bin/{tool}").exists():
            print(f"{tool} is not installed (scripts/install-deps.sh)", file=sys.stderr)
            return 2
    size = args.size_mib * MiB
    rows: list[tuple[str, Case, Side, Side]] = []
    tmp = Path(tempfile.mkdtemp(prefix="mshv-blkbench-", dir=args.dir))
    try:
        raw, qcow2 = make_images(tmp, size)
        print(f"load average at start: {load()}", file=sys.stderr)
        poll_ns = int(args.relay_poll_us * 1000)
        formats = set(args.formats.split(","))
        for fmt, image in (f for f in (("raw", raw), ("qcow2", qcow2)) if f[0] in formats):
            for case in CASES:
                ours_runs: list[Side] = []
                ref_runs: list[Side] = []
                for n in range(args.rounds):
                    # Rounds alternate which side goes first, so a drifting load hits both alike. qemu-img
                    # bench is count-based: it does as many requests as ours did in the first round.
                    first_ours = n % 2 == 0
                    if first_ours:
                        ours_runs.append(ours(image, fmt, case, size, args.seconds, poll_ns))
                    count = ours_runs[0].requests
                    ref_runs.append(
                        fio(image, case, args.seconds) if fmt == "raw" else qemu_img_bench(image, case, count)
                    )
                    if not first_ours:
                        ours_runs.append(ours(image, fmt, case, size, args.seconds, poll_ns))
                a, b = pooled(ours_runs), pooled(ref_runs)
                rows.append((fmt, case, a, b))
                print(f"{fmt} {case.name}: {a.iops:.0f} / {b.iops:.0f} IOPS = {a.iops / b.iops:.3f}", file=sys.stderr)
        print(f"load average at end: {load()}", file=sys.stderr)
        guest = guest_figures(tmp, args.guest_presses) if args.guest_presses else "not asked for"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        out = [
            {"format": f, "case": c.name, "ours": a.__dict__, "reference": b.__dict__, "verdict": verdict(c, a, b)}
            for f, c, a, b in rows
        ]
        figures = guest if isinstance(guest, str) else [dict(g.__dict__, mib_s=g.mib_s, lat_us=g.lat_us) for g in guest]
        print(json.dumps({"ring": out, "emulated_guest": figures}, indent=1))
        return 0
    print("| image | case | ours | reference | ratio | latency ours / ref | CPU us/request ours (qsd) / ref | target |")
    print("|---|---|---|---|---|---|---|---|")
    for fmt, case, a, b in rows:
        ref = "fio" if fmt == "raw" else "qemu-img bench"
        ours_fig, ref_fig = (
            (f"{a.mib_s:.0f} MiB/s", f"{b.mib_s:.0f} MiB/s") if case.sequential else (f"{a.iops:.0f}", f"{b.iops:.0f}")
        )
        lat = f"{a.lat_us:.0f} / {b.lat_us:.0f} us" if case.depth == 1 else ""
        per = 1e6 / a.requests
        cpu = f"{a.cpu_s * per:.1f} ({a.backend_cpu_s * per:.1f}) / {b.cpu_s / b.requests * 1e6:.1f}"
        print(
            f"| {fmt} | {case.name} | {ours_fig} | {ref_fig} ({ref}) | **{a.iops / b.iops:.2f}** | {lat} | {cpu} "
            f"| {case.target}: {verdict(case, a, b)} |"
        )
    print()
    print("Emulated-guest figures (the tiny guest's own driver, 4 KiB reads at depth 1, its ACPI PM timer):")
    if isinstance(guest, str):
        print(f"none: {guest}")
        return 0
    print("| image | presses | reads | guest seconds | MiB/s | latency us/read |")
    print("|---|---|---|---|---|---|")
    for g in guest:
        print(f"| {g.format} | {g.presses} | {g.reads} | {g.seconds:.4f} | {g.mib_s:.1f} | {g.lat_us:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
