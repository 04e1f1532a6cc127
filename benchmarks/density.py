#!/usr/bin/env python3
"""Density: many tiny guests on one virtmshvd (issue 15 §2), both sides of each ratio in one run.

One real daemon on a temporary socket (``tests/support/daemon.py``), ``--guests`` (20) tiny guests of
``--memory-mib`` (16) defined on it:

* **starts**: the guests started one after another (each ``virDomainCreate`` issued once the one before
  it returned) vs. all at once (one libvirt-python thread and connection each, released together); each
  side's total is from its first call to the last guest's ``TINY-GUEST-UP`` in its serial log. Target
  all at once ≤ 0.6x one after another.
* **list / domstats latency** with every guest running vs. none: ``virsh list --all`` and ``virsh
  domstats`` (median of ``--repeat`` processes: what a user waits for, virsh's own start included) and
  the same two calls from libvirt-python on an open connection (``listAllDomains``,
  ``getAllDomainStats``: the daemon's share alone). None running is measured before the starts and again
  after the destroys, pooled, so a load that drifts meanwhile moves both sides. Target ≤ 2x.
* **daemon RSS**: ``VmRSS`` of the daemon's pid (``/proc/<pid>/status``) with every guest running vs.
  idle (the guests defined, the idle calls above made). Target ≤ +20 MiB.

``--guest irq`` (the default) boots the tiny guest interrupt-driven: idle in ``hlt``, as an idle guest
kernel is; ``--guest polled`` has it poll its ports every 2 ms, which costs its VMM ~9% of a CPU (so 20 of
them fill a 2-core host: what is measured then is the host's CPU, not the daemon). ``--disk`` gives each
guest a read-only virtio-blk disk, so its domstats block figures need its VMM and disk backend to answer.

The all-at-once side runs first on a fresh daemon (a daemon whose peak was 20 guests keeps its
allocator's arenas), then the daemon is stopped and a second one runs the one-after-another side.
Every VMM is ended by the pid the tests' own /proc scan finds (``DaemonProcess.destroy_all_vmms``).
Prints the raw figures and ratios and appends a dated row with the load average to RESULTS.md.

Run as root (the emulated device uses /dev/kvm): ``.tox/py/bin/python benchmarks/density.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import libvirt  # noqa: E402

from tests.support.daemon import DaemonProcess, domain_xml, serial_log, virsh, vmm_processes  # noqa: E402
from tests.support.disks import disk_xml  # noqa: E402
from tests.support.guests import TINY_BANNER, TINY_IRQ_FLAG, build_tiny_guest  # noqa: E402
from tests.support.waits import wait_for  # noqa: E402

MiB = 1 << 20
RESULTS = REPO / "benchmarks" / "RESULTS.md"
HEADING = "## `density.py`"
# The tiny guest's two idle modes: interrupt-driven sleeps in hlt until a device interrupts (~0.2% of a CPU
# per VMM, measured), polled reads its ports every LAPIC timer tick (~9% of a CPU per VMM: 20 of them fill
# this 2-core host, which then slows every process on it, the daemon's clients included).
CMDLINES = {"irq": f"console=ttyS0 {TINY_IRQ_FLAG}", "polled": "console=ttyS0"}


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def names(count: int) -> list[str]:
    return [f"dense{i:02d}" for i in range(count)]


@dataclass
class Latency:
    """Each call's samples, in seconds."""

    virsh_list: list[float] = field(default_factory=list)
    virsh_domstats: list[float] = field(default_factory=list)
    py_list: list[float] = field(default_factory=list)
    py_domstats: list[float] = field(default_factory=list)
    # the daemon's own CPU time per call (its utime + stime over CPU_CALLS calls): what the load moves least
    cpu_list: list[float] = field(default_factory=list)
    cpu_domstats: list[float] = field(default_factory=list)

    def extend(self, other: Latency) -> None:
        for key in KEYS:
            getattr(self, key).extend(getattr(other, key))

    def median(self, key: str) -> float:
        values: list[float] = getattr(self, key)
        return statistics.median(values)


KEYS = ("virsh_list", "virsh_domstats", "py_list", "py_domstats", "cpu_list", "cpu_domstats")
CPU_CALLS = 500
CLOCK_TICK = 1 / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * CLOCK_TICK


def cpu_per_call(pid: int, call: Callable[[], object]) -> list[float]:
    before = cpu_seconds(pid)
    for _ in range(CPU_CALLS):
        call()
    return [(cpu_seconds(pid) - before) / CPU_CALLS]


@dataclass
class Side:
    start_total: float = 0.0
    per_call: list[float] = field(default_factory=list)


def samples(repeat: int, call: Callable[[], object]) -> list[float]:
    call()  # not counted: the first call warms the daemon's and the client's caches
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return times


def latencies(d: DaemonProcess, conn: libvirt.virConnect, repeat: int, running: int) -> Latency:
    def listed() -> None:
        out = virsh(d.uri, "list", "--all").stdout
        assert out.count(" running") == running, out

    def stats() -> None:
        out = virsh(d.uri, "domstats").stdout
        assert out.count("state.state=1") == running, out

    def py_stats() -> None:
        got = conn.getAllDomainStats()
        assert sum(1 for _, s in got if s["state.state"] == libvirt.VIR_DOMAIN_RUNNING) == running

    return Latency(
        virsh_list=samples(repeat, listed),
        virsh_domstats=samples(repeat, stats),
        py_list=samples(repeat * 10, lambda: conn.listAllDomains(0)),
        py_domstats=samples(repeat * 10, py_stats),
        cpu_list=cpu_per_call(d.pid, lambda: conn.listAllDomains(0)),
        cpu_domstats=cpu_per_call(d.pid, conn.getAllDomainStats),
    )


def banners_up(d: DaemonProcess, guests: list[str]) -> bool:
    return all(TINY_BANNER in serial_log(d, name) for name in guests)


def start_all_at_once(d: DaemonProcess, guests: list[str]) -> Side:
    conns = [libvirt.open(d.uri) for _ in guests]  # one client each, as 20 virsh processes would be
    doms = [c.lookupByName(n) for c, n in zip(conns, guests, strict=True)]
    barrier = threading.Barrier(len(guests) + 1)
    per_call = [0.0] * len(guests)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        barrier.wait()
        t0 = time.perf_counter()
        try:
            doms[i].create()
        except BaseException as err:
            errors.append(err)
        per_call[i] = time.perf_counter() - t0

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(guests))]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(guests)} concurrent starts failed: {errors[0]}")
    wait_for(lambda: banners_up(d, guests), 300, interval=0.01, what=f"{TINY_BANNER} in every serial log")
    total = time.perf_counter() - t0
    for c in conns:
        c.close()
    return Side(total, per_call)


def start_one_after_another(d: DaemonProcess, conn: libvirt.virConnect, guests: list[str]) -> Side:
    per_call = []
    t0 = time.perf_counter()
    for name in guests:
        t1 = time.perf_counter()
        conn.lookupByName(name).create()
        per_call.append(time.perf_counter() - t1)
    wait_for(lambda: banners_up(d, guests), 300, interval=0.01, what=f"{TINY_BANNER} in every serial log")
    return Side(time.perf_counter() - t0, per_call)


@dataclass
class Run:
    side: Side
    idle: Latency | None = None
    busy: Latency | None = None
    rss_idle: int = 0
    rss_busy: int = 0
    rss_after: int = 0


def one_daemon(root: Path, kernel: Path, disk: Path | None, args: argparse.Namespace, concurrent: bool) -> Run:
    guests = names(args.guests)
    d = DaemonProcess(root).start()
    try:
        conn = libvirt.open(d.uri)
        for name in guests:
            xml = domain_xml(name, kernel, memory_mib=args.memory_mib, cmdline=CMDLINES[args.guest])
            if disk is not None:  # one read-only image for all of them: no lock conflict between their starts
                xml = xml.replace("<serial type='pty'/>", f"<serial type='pty'/>{disk_xml(disk, readonly=True)}")
            conn.defineXML(xml)
        run = Run(Side())
        if concurrent:
            run.idle = latencies(d, conn, args.repeat, 0)
        run.rss_idle = rss_bytes(d.pid)
        run.side = start_all_at_once(d, guests) if concurrent else start_one_after_another(d, conn, guests)
        assert len(vmm_processes(d.run_dir)) == len(guests), vmm_processes(d.run_dir)
        if concurrent:
            run.busy = latencies(d, conn, args.repeat, len(guests))
        run.rss_busy = rss_bytes(d.pid)
        for name in guests:
            conn.lookupByName(name).destroy()
        wait_for(lambda: not vmm_processes(d.run_dir), 60, what=lambda: f"VMMs left: {vmm_processes(d.run_dir)}")
        run.rss_after = rss_bytes(d.pid)
        if run.idle is not None:  # none running again: the idle figures pool both ends (load drifts meanwhile)
            run.idle.extend(latencies(d, conn, args.repeat, 0))
        conn.close()
        return run
    finally:
        d.stop()
        d.destroy_all_vmms()


def verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guests", type=int, default=20)
    ap.add_argument("--memory-mib", type=int, default=16)
    ap.add_argument(
        "--guest",
        choices=sorted(CMDLINES),
        default="irq",
        help="the tiny guest's mode: irq (idle in hlt until an interrupt) or polled (polls its ports every 2 ms)",
    )
    ap.add_argument(
        "--disk",
        action="store_true",
        help="give every guest a virtio-blk disk (one read-only raw image, a qemu-storage-daemon each): "
        "its domstats block figures then come from its VMM and backend",
    )
    ap.add_argument("--repeat", type=int, default=9, help="virsh processes per latency figure (x10 python calls)")
    ap.add_argument("--no-record", action="store_true", help=f"do not append to {RESULTS.name}")
    args = ap.parse_args()
    load_before = loadavg()
    with tempfile.TemporaryDirectory(prefix="mshv-density-") as t:
        tmp = Path(t)
        kernel = build_tiny_guest(tmp / "kernel")
        disk = None
        if args.disk:
            disk = tmp / "shared.raw"
            subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(disk), "1M"], check=True, timeout=60)
        at_once = one_daemon(tmp / "d1", kernel, disk, args, concurrent=True)
        serial = one_daemon(tmp / "d2", kernel, disk, args, concurrent=False)
    load_after = loadavg()
    assert at_once.idle is not None and at_once.busy is not None
    n = args.guests
    start_ratio = at_once.side.start_total / serial.side.start_total
    rss_growth = at_once.rss_busy - at_once.rss_idle
    disks = " with a disk each" if args.disk else ""
    print(f"{n} {args.guest} guests of {args.memory_mib} MiB{disks}; load average {load_before} -> {load_after}")
    print(
        f"start to every banner: all at once {at_once.side.start_total:.2f} s, one after another "
        f"{serial.side.start_total:.2f} s: {start_ratio:.2f}x (target <= 0.6x: {verdict(start_ratio <= 0.6)})"
    )
    print(
        f"  virDomainCreate: at once median {statistics.median(at_once.side.per_call):.3f} s max "
        f"{max(at_once.side.per_call):.3f} s; one after another median {statistics.median(serial.side.per_call):.3f} s"
    )
    rows = []
    labels = (
        "virsh list --all",
        "virsh domstats",
        "listAllDomains",
        "getAllDomainStats",
        "listAllDomains, daemon CPU",
        "getAllDomainStats, daemon CPU",
    )
    for label, key in zip(labels, KEYS, strict=True):
        idle, busy = at_once.idle.median(key), at_once.busy.median(key)
        ratio = busy / idle
        rows.append((label, idle, busy, ratio))
        print(
            f"{label:30s} none running {idle * 1e3:8.2f} ms, {n} running {busy * 1e3:8.2f} ms: {ratio:.2f}x "
            f"(target <= 2x: {verdict(ratio <= 2)})"
        )
    print(
        f"daemon VmRSS idle {at_once.rss_idle / MiB:.1f} MiB, {n} running {at_once.rss_busy / MiB:.1f} MiB: "
        f"{rss_growth / MiB:+.1f} MiB (target <= +20 MiB: {verdict(rss_growth <= 20 * MiB)}); after destroying "
        f"them {at_once.rss_after / MiB:.1f} MiB (one-after-another daemon: {serial.rss_idle / MiB:.1f} -> "
        f"{serial.rss_busy / MiB:.1f} MiB)"
    )
    if not args.no_record:
        guests = f"{n} x {args.memory_mib} MiB, {args.guest}{', a disk each' if args.disk else ''}"
        record(guests, load_before, load_after, at_once, serial, start_ratio, rows)
    return 0


def record(
    guests: str,
    load_before: str,
    load_after: str,
    at_once: Run,
    serial: Run,
    start_ratio: float,
    rows: list[tuple[str, float, float, float]],
) -> None:
    text = RESULTS.read_text()
    if HEADING not in text:
        text += (
            f"{'' if text.endswith(chr(10) * 2) else chr(10)}{HEADING} — tiny guests on one virtmshvd: started at once "
            "vs. one after another; list and domstats latency and the daemon's RSS with them all running vs. none\n"
            "Latencies are medians in ms, none running / all running (target <= 2x); the start is from the first call\n"
            "to the last banner (target <= 0.6x); the daemon's VmRSS idle -> all running (target <= +20 MiB).\n\n"
            "| date (UTC) | load (1 min) before / after | guests | start: at once / one after another | "
            "virsh list --all | virsh domstats | listAllDomains | getAllDomainStats | daemon CPU per listAllDomains "
            "| daemon CPU per getAllDomainStats | daemon VmRSS |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n"
        )
    cells = [f"{idle * 1e3:.2f} / {busy * 1e3:.2f} = **{ratio:.2f}x**" for _, idle, busy, ratio in rows]
    growth = (at_once.rss_busy - at_once.rss_idle) / MiB
    row = (
        f"| {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} | {load_before.split()[0]} / {load_after.split()[0]} | "
        f"{guests} | {at_once.side.start_total:.2f} / {serial.side.start_total:.2f} s = **{start_ratio:.2f}x** | "
        + " | ".join(cells)
        + f" | {at_once.rss_idle / MiB:.1f} -> {at_once.rss_busy / MiB:.1f} MiB = **{growth:+.1f} MiB** |\n"
    )
    # The row goes right after this table's last row, wherever the section sits in the file.
    lines = text.splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith(HEADING))
    while at + 1 < len(lines) and not lines[at + 1].startswith("|"):
        at += 1
    while at + 1 < len(lines) and lines[at + 1].startswith("|"):
        at += 1
    lines.insert(at + 1, row)
    RESULTS.write_text("".join(lines))
    print(f"appended to {RESULTS}")


if __name__ == "__main__":
    sys.exit(main())
