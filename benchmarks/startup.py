#!/usr/bin/env python3
"""``virsh start`` to the guest's first serial line, and the VMM's memory beyond guest RAM, vs. QEMU (TCG).

Ours: a real virtmshvd on a temporary socket (tests/support/daemon.py), the domain defined through
``virsh define`` and started with ``virsh start``; the clock runs from just before ``virsh start`` is
spawned to the first complete line in the domain's serial log. QEMU: ``qemu-system-x86_64 -accel tcg``
with the same kernel, command line and memory, from just before it is spawned to the first complete line
of its ``-serial file:`` log (QEMU's KVM mode cannot run guests on this kvm-pvm host; TCG can). The two
sides alternate, round by round, so a drifting load hits both alike; medians are reported.

Guests: the small Linux test kernel (scripts/build-test-kernel.sh, cached; ``earlyprintk=ttyS0`` makes
its banner the first line) and the tiny guest (tests/support/guests.py: QEMU runs its real-mode setup code
and 32-bit entry, through SeaBIOS; our loader enters it at the 64-bit entry), each on both sides.

Memory, taken once the first line is seen (and the daemon has recorded the VMM's pid): ``Private_Clean +
Private_Dirty`` of ``/proc/PID/smaps_rollup`` minus the same fields of the guest-RAM mapping(s) in
``/proc/PID/smaps`` (ours: the memfd ``mshv-guest-ram``; QEMU: its anonymous mapping exactly the size of
guest RAM). Our guest RAM is fully populated at map time (the emulated device pins it as Linux 6.15-6.18's
driver does), QEMU's on touch, which is why guest RAM is left out of both.

Our side's breakdown comes from the VMM's own ``startup phases`` log line (mshv_libvirt/vmm/phases.py):
daemon (``virsh start`` spawned -> VMM forked: the client, RPC, domain XML, config, fork), interpreter
(fork -> first line of ``mshv_libvirt.vmm.__main__``), imports, config, setup (console, control socket,
sandbox), partition, memory map, devices, kernel load, tables (ACPI + MP), then ``first_run_vp`` -> the
first serial line (the guest's own time to print it).

Our daemon keeps a kernel's decompressed payload after its first start (mshv_libvirt/driver/kernel_cache.py),
so the first round of the Linux kernel decompresses it and the later ones do not; the medians are of later
starts, as a user's second and later starts of a kernel are.

Run: ``.tox/py/bin/python benchmarks/startup.py [--rounds N] [--memory-mib M] [--no-results]``; appends
dated rows to benchmarks/RESULTS.md unless ``--no-results``. Not run by tox.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.daemon import DaemonProcess, define, virsh  # noqa: E402
from tests.support.guests import cached_tiny_guest  # noqa: E402
from tests.support.kernel import small_kernel  # noqa: E402
from tests.support.phases import STARTUP_PHASES  # noqa: E402
from tests.support.procfs import mappings_private_kib, private_kib  # noqa: E402
from tests.support.waits import wait_for  # noqa: E402

RESULTS = REPO / "benchmarks" / "RESULTS.md"
CMDLINE = "console=ttyS0 earlyprintk=ttyS0 panic=-1"
TINY_CMDLINE = "console=ttyS0"
PHASES = re.compile(r"startup phases: spawn=(\S+) (.*)")
GUEST_RAM_MEMFD = "memfd:mshv-guest-ram"


def boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


@dataclass
class Sample:
    first_line: float  # seconds from spawning virsh start / qemu to the first complete serial line
    private_kib: int  # Private_* of the process
    guest_kib: int  # Private_* of its guest-RAM mapping(s)
    cpu: float  # the VMM's / QEMU's CPU seconds (user + system, guest time included) by then
    phases: dict[str, float] = field(default_factory=dict)  # ours: seconds after virsh start was spawned

    @property
    def beyond_guest_kib(self) -> int:
        return self.private_kib - self.guest_kib


def cpu_seconds(pid: int) -> float:
    """utime + stime of /proc/PID/stat (fields 14 and 15; clock ticks): less at the load's mercy than time."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


def ours_memory(pid: int) -> tuple[int, int]:
    """(Private_* of the process, of its guest RAM: the memfd mapping(s))."""
    return private_kib(pid), mappings_private_kib(pid, lambda head, _size: GUEST_RAM_MEMFD in head)


def qemu_memory(pid: int, guest_kib: int) -> tuple[int, int]:
    """(Private_* of the process, of its guest RAM: the anonymous mapping exactly guest RAM's size)."""
    return private_kib(pid), mappings_private_kib(pid, lambda head, size: size == guest_kib and len(head.split()) == 5)


def first_line_seen(log: Path, offset: int) -> bool:
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            return b"\n" in f.read()
    except FileNotFoundError:
        return False


def wait_first_line(log: Path, offset: int, proc: subprocess.Popen[bytes] | None, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while not first_line_seen(log, offset):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no serial line in {log} within {timeout} s")
        if proc is not None and proc.poll() is not None and proc.returncode != 0 and not first_line_seen(log, offset):
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before the first serial line")
        time.sleep(0.002)  # a poll, not a wait on a condition: this is the measurement's resolution
    return boottime()


def run_ours(d: DaemonProcess, name: str, timeout: float) -> Sample:
    log = d.serial_log(name)
    offset = log.stat().st_size if log.exists() else 0
    vmm_log = d.vmm_log(name)
    log_offset = vmm_log.stat().st_size if vmm_log.exists() else 0
    t0 = boottime()
    start = subprocess.Popen(["virsh", "-c", d.uri, "start", name], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        seen = wait_first_line(log, offset, start, timeout)
        # The tiny guest can print before the daemon has recorded its VMM (virsh start still waiting).
        pid = wait_for(lambda: d.try_vmm_pid(name), timeout, what=f"{name}'s VMM recorded by the daemon")
        total, guest = ours_memory(pid)
        cpu = cpu_seconds(pid)
    finally:
        _, err = start.communicate(timeout=timeout)
    if start.returncode != 0:
        raise RuntimeError(f"virsh start {name}: {err.decode()}")
    text = vmm_log.read_bytes()[log_offset:].decode(errors="replace")
    match = PHASES.search(text)
    if match is None:
        raise RuntimeError(f"no startup phases line in {vmm_log}: {text[-2000:]}")
    spawn = float(match.group(1))
    phases = {"spawn": spawn - t0}
    for part in match.group(2).split():
        key, value = part.split("=+")
        phases[key] = spawn - t0 + float(value)
    virsh(d.uri, "destroy", name)
    return Sample(seen - t0, total, guest, cpu, phases)


def run_qemu(qemu: str, kernel: Path, cmdline: str, memory_mib: int, work: Path, timeout: float) -> Sample:
    log = work / "qemu-serial.log"
    log.unlink(missing_ok=True)
    argv = [qemu, "-accel", "tcg", "-m", str(memory_mib), "-smp", "1", "-nodefaults", "-no-user-config"]
    argv += ["-display", "none", "-no-reboot", "-kernel", str(kernel), "-append", cmdline]
    argv += ["-serial", f"file:{log}"]
    t0 = boottime()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        seen = wait_first_line(log, 0, proc, timeout)
        total, guest = qemu_memory(proc.pid, memory_mib * 1024)
        cpu = cpu_seconds(proc.pid)
    finally:
        proc.kill()  # the pid this benchmark started
        proc.wait()
    return Sample(seen - t0, total, guest, cpu)


def median(values: list[float]) -> float:
    return statistics.median(values)


def breakdown(samples: list[Sample]) -> str:
    """Median duration of each phase of our start (each phase: its end minus the previous phase's end)."""
    names = ["spawn", *STARTUP_PHASES]
    parts = []
    prev = [0.0] * len(samples)
    labels = {"spawn": "daemon", "main": "interpreter", "first_run_vp": "vcpu start"}
    for name in names:
        ends = [s.phases[name] for s in samples]
        took = median([e - p for e, p in zip(ends, prev, strict=True)])
        parts.append(f"{labels.get(name, name)} {took * 1000:.0f}")
        prev = ends
    guest = median([s.first_line - p for s, p in zip(samples, prev, strict=True)])
    parts.append(f"guest to first line {guest * 1000:.0f}")
    return ", ".join(parts) + " ms"


def code_label() -> str:
    """The commit the package was measured at, ``+dirty`` when its files differ from it."""
    git = ["git", "-C", str(REPO)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "mshv_libvirt"], capture_output=True, text=True).stdout
    return (head or "?") + ("+dirty" if dirty.strip() else "")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


GUESTS = ("linux", "tiny")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--memory-mib", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--no-results", action="store_true", help="print only; do not append to RESULTS.md")
    parser.add_argument("--label", help="what the rows call the code measured (default: the commit, +dirty)")
    args = parser.parse_args()
    label = args.label or code_label()
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        print("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)", file=sys.stderr)
        return 2
    kernels = {"linux": (small_kernel(), CMDLINE), "tiny": (cached_tiny_guest(), TINY_CMDLINE)}
    load_before = loadavg()
    root = Path(tempfile.mkdtemp(prefix="startup-bench-"))
    d = DaemonProcess(root / "daemon").start()
    ours: dict[str, list[Sample]] = {g: [] for g in GUESTS}
    theirs: dict[str, list[Sample]] = {g: [] for g in GUESTS}
    try:
        for guest, (kernel, cmdline) in kernels.items():
            define(d, root, guest, kernel, memory_mib=args.memory_mib, cmdline=cmdline)
        for round_ in range(args.rounds):
            for guest, (kernel, cmdline) in kernels.items():
                # Alternate which side goes first.
                steps = ["ours", "qemu"] if round_ % 2 == 0 else ["qemu", "ours"]
                for step in steps:
                    if step == "ours":
                        ours[guest].append(run_ours(d, guest, args.timeout))
                    else:
                        theirs[guest].append(run_qemu(qemu, kernel, cmdline, args.memory_mib, root, args.timeout))
    finally:
        d.stop()
        d.destroy_all_vmms()
        shutil.rmtree(root, ignore_errors=True)
    load_after = loadavg()

    print(f"load average {load_before} before, {load_after} after; {args.rounds} rounds, {args.memory_mib} MiB guests")
    rows = []
    for guest in GUESTS:
        mine, qemus = ours[guest], theirs[guest]
        t_ours, t_qemu = median([s.first_line for s in mine]), median([s.first_line for s in qemus])
        m_ours = median([s.beyond_guest_kib for s in mine]) / 1024
        m_qemu = median([s.beyond_guest_kib for s in qemus]) / 1024
        g_ours = median([s.guest_kib for s in mine]) / 1024
        g_qemu = median([s.guest_kib for s in qemus]) / 1024
        print(f"{guest}: first serial line ours {t_ours:.3f} s, qemu tcg {t_qemu:.3f} s: {t_ours / t_qemu:.2f}x")
        rounds = [round(s.first_line, 3) for s in mine], [round(s.first_line, 3) for s in qemus]
        print(f"  per round, ours {rounds[0]}, qemu {rounds[1]}")
        c_ours, c_qemu = median([s.cpu for s in mine]), median([s.cpu for s in qemus])
        print(f"  CPU by then: the VMM {c_ours:.2f} s, qemu {c_qemu:.2f} s: {c_ours / c_qemu:.2f}x")
        print(f"  memory beyond guest RAM: ours {m_ours:.1f} MiB, qemu {m_qemu:.1f} MiB: {m_ours / m_qemu:.2f}x")
        print(f"  (guest RAM mapping's private memory: ours {g_ours:.1f} MiB, qemu {g_qemu:.1f} MiB)")
        print(f"  ours: {breakdown(mine)}")
        rows.append(
            f"| {time.strftime('%Y-%m-%d %H:%M')} | {label} | {load_before} / {load_after} | {args.rounds} | {guest} "
            f"| {t_ours:.3f} | {t_qemu:.3f} | **{t_ours / t_qemu:.2f}** | {c_ours:.2f} / {c_qemu:.2f} "
            f"| {m_ours:.1f} | {m_qemu:.1f} | **{m_ours / m_qemu:.2f}** | {breakdown(mine)} |"
        )
    if not args.no_results:
        append_rows(rows)
    return 0


MARKER = "## `startup.py`"
TABLE_HEAD = (
    "| run | code | load avg before / after | rounds | guest | ours s | qemu s | ratio | CPU s ours / qemu "
    "| ours MiB | qemu MiB | ratio | our start, median per phase |"
)
HEADER = f"""
{MARKER} — `virsh start` to the first serial line, and VMM memory beyond guest RAM, vs. `qemu-system-x86_64 -accel tcg`
Each guest (the small test kernel, the tiny guest) with the same image, command line and guest RAM on both
sides, alternating, medians; memory once the first line is seen (Private_* minus the guest-RAM mapping's).
Targets: time ≤ 0.7x, memory ≤ 1.0x. Our breakdown: the VMM's `startup phases` line.

{TABLE_HEAD}
|---|---|---|---|---|---|---|---|---|---|---|---|---|
"""


def append_rows(rows: list[str]) -> None:
    """Add ``rows`` at the end of this benchmark's table (the section is created on first use)."""
    text = RESULTS.read_text()
    if MARKER not in text:
        text = text.rstrip("\n") + "\n" + HEADER
    head, marker, rest = text.partition(MARKER)
    lines = rest.split("\n")
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(first, len(lines)) if not lines[i].startswith("|")), len(lines))
    lines[end:end] = rows
    RESULTS.write_text(head + marker + "\n".join(lines))


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
