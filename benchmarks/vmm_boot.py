#!/usr/bin/env python3
"""Boot time of a Linux guest: our VMM vs. QEMU/KVM, same kernel, initramfs and host, same run.

For each side: time from process start to the first byte on the serial port, to the initramfs
marker, and to the process exiting after the guest's ``poweroff -f``. The guest is Debian's kernel
(``tests.support.guests.debian_kernel``, or ``--kernel``) with a busybox initramfs built here whose
/init prints the marker and powers off.

Both sides get the same command line (console on ttyS0, plus ``clearcpuid=`` for kvm-pvm hosts).
A side that does not finish within ``--timeout`` is reported with its last serial line: on hosts
whose KVM emulates supervisor-mode guest code (kvm-pvm) QEMU does not get past the real-mode setup
code, and that is printed as measured, not hidden.

Run: ``.venv/bin/python benchmarks/vmm_boot.py [--timeout 3600] [--memory-mib 256]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.guests import (  # noqa: E402
    KVM_PVM_CLEARCPUID,
    LINUX_MARKER,
    GuestUnavailable,
    build_initramfs,
    debian_kernel,
)


@dataclass
class Result:
    name: str
    first_byte: float | None = None
    marker: float | None = None
    exited: float | None = None
    detail: str = ""
    notes: list[str] = field(default_factory=list)


def watch(name: str, proc: subprocess.Popen[bytes], log: Path, start: float, timeout: float) -> Result:
    result = Result(name)
    deadline = start + timeout
    while time.monotonic() < deadline:
        data = log.read_bytes() if log.exists() else b""
        now = time.monotonic() - start
        if data and result.first_byte is None:
            result.first_byte = now
        if LINUX_MARKER.encode() in data and result.marker is None:
            result.marker = now
        if proc.poll() is not None:
            result.exited = now
            break
        time.sleep(0.01)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    text = (log.read_bytes() if log.exists() else b"").decode(errors="replace")
    lines = [ln for ln in text.splitlines() if ln]
    result.detail = lines[-1][-160:] if lines else "(no serial output)"
    return result


def run_ours(kernel: Path, initrd: Path, cmdline: str, memory_mib: int, timeout: float, work: Path) -> Result:
    config = {
        "name": "bench",
        "uuid": "00000000-0000-0000-0000-0000000000be",
        "memory_bytes": memory_mib << 20,
        "vcpus": 1,
        "kernel": str(kernel),
        "initrd": str(initrd),
        "cmdline": cmdline,
        "exit_file": str(work / "ours.exit"),
        "serial_log": str(work / "ours.log"),
    }
    (work / "ours.json").write_text(json.dumps(config))
    start = time.monotonic()
    with open(work / "ours.stderr", "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mshv_libvirt.vmm", "--config", str(work / "ours.json")],
            stdout=err,
            stderr=err,
            cwd=work,
        )
        result = watch("ours", proc, work / "ours.log", start, timeout)
    if (work / "ours.exit").exists():
        result.notes.append(f"exit file: {(work / 'ours.exit').read_text()}")
    return result


def run_qemu(kernel: Path, initrd: Path, cmdline: str, memory_mib: int, timeout: float, work: Path) -> Result:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return Result("qemu", detail="qemu-system-x86_64 is not installed")
    log = work / "qemu.log"
    start = time.monotonic()
    proc = subprocess.Popen(
        [qemu, "-accel", "kvm", "-m", str(memory_mib), "-smp", "1", "-kernel", str(kernel),
         "-initrd", str(initrd), "-append", cmdline, "-display", "none", "-monitor", "none",
         "-serial", f"file:{log}", "-no-reboot"],
        stdout=subprocess.DEVNULL,
        stderr=open(work / "qemu.stderr", "wb"),  # noqa: SIM115
    )  # fmt: skip
    return watch("qemu", proc, log, start, timeout)


def fmt(value: float | None) -> str:
    return f"{value:9.2f} s" if value is not None else "        - "


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", type=Path)
    parser.add_argument("--timeout", type=float, default=3600.0, help="per side, seconds")
    parser.add_argument("--memory-mib", type=int, default=256)
    parser.add_argument("--skip-qemu", action="store_true")
    args = parser.parse_args()
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("cannot run: no usable /dev/kvm")
        return 1
    try:
        debian = None if args.kernel else debian_kernel()
    except GuestUnavailable as err:
        print(f"cannot run: {err}")
        return 1
    kernel = args.kernel or debian.vmlinuz  # type: ignore[union-attr]
    modules = debian.modules if debian else ()
    cmdline = (
        "console=ttyS0 earlyprintk=ttyS0 panic=-1 nowatchdog mitigations=off cryptomgr.notests " + KVM_PVM_CLEARCPUID
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        initrd = build_initramfs(work / "initrd.gz", poweroff=True, modules=modules)
        results = [run_ours(kernel, initrd, cmdline, args.memory_mib, args.timeout, work)]
        if not args.skip_qemu:
            results.append(run_qemu(kernel, initrd, cmdline, args.memory_mib, args.timeout, work))
    print(f"kernel {kernel}, {args.memory_mib} MiB, 1 vCPU, timeout {args.timeout:.0f} s per side")
    print(f"{'side':6s} {'first byte':>11s} {'marker':>11s} {'exited':>11s}  last serial line")
    for r in results:
        print(f"{r.name:6s} {fmt(r.first_byte)} {fmt(r.marker)} {fmt(r.exited)}  {r.detail}")
        for note in r.notes:
            print(f"       {note}")
    ours, *rest = results
    if rest and ours.marker is not None and rest[0].marker is not None:
        print(f"ratio ours/qemu to marker: {ours.marker / rest[0].marker:.2f}")
    elif rest:
        print("ratio: not computable, one side did not reach the marker (see last serial line)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
