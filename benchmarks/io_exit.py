#!/usr/bin/env python3
"""IO-exit round trips per second: our VMM path vs. a minimal C loop on /dev/kvm.

Three numbers, same host, same run:

* ``c-kvm``: a C program compiled here from the source below (our own code) puts a guest that
  executes ``out %al, $0x80`` in a loop directly on /dev/kvm and counts KVM_RUN round trips.
  This is the floor: one ioctl and nothing else per exit.
* ``hv-loop``: the same guest through ``mshv_libvirt.hv`` (emulated /dev/mshv on KVM here), with a
  Python loop that only completes the OUT (``set_registers(RIP)``) -- the cost of our ABI layer.
* ``vmm``: the tiny test guest under the real VMM process (``python -m mshv_libvirt.vmm``), which
  on ``b`` executes 20000 OUTs to port 0x80; timed from sending ``b`` on the console pty to
  ``BENCH-DONE`` on it, minus the measured console round trip. This includes the device bus.

Run: ``.venv/bin/python benchmarks/io_exit.py [--exits N]``. Sides that cannot run say why.
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
from pathlib import Path

C_SOURCE = r"""
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 100000;
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) { perror("/dev/kvm"); return 2; }
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    uint8_t *ram = mmap(NULL, 0x200000, PROT_READ | PROT_WRITE,
                        MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    struct kvm_userspace_memory_region r = {0, 0, 0, 0x200000, (uint64_t)ram};
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r)) { perror("memory"); return 2; }
    uint64_t *pml4 = (uint64_t *)(ram + 0x9000), *pdpt = (uint64_t *)(ram + 0xa000);
    uint64_t *pd = (uint64_t *)(ram + 0xb000);
    pml4[0] = 0xa003; pdpt[0] = 0xb003; pd[0] = 0x83;
    /* 1: out %al, $0x80 ; jmp 1b */
    static const uint8_t code[] = {0xe6, 0x80, 0xeb, 0xfc};
    memcpy(ram + 0x1000, code, sizeof code);
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    struct kvm_run *run = mmap(NULL, ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0),
                               PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    struct kvm_sregs s;
    ioctl(vcpu, KVM_GET_SREGS, &s);
    struct kvm_segment cs = {.base = 0, .limit = 0xffffffff, .selector = 8, .type = 11,
                             .present = 1, .s = 1, .l = 1, .g = 1};
    struct kvm_segment ds = cs;
    ds.selector = 16; ds.type = 3; ds.l = 0; ds.db = 1;
    s.cs = cs; s.ds = s.es = s.fs = s.gs = s.ss = ds;
    s.cr0 = 0x80000011; s.cr3 = 0x9000; s.cr4 = 0x20; s.efer = 0x500;
    ioctl(vcpu, KVM_SET_SREGS, &s);
    struct kvm_regs g = {0};
    g.rip = 0x1000; g.rflags = 2;
    ioctl(vcpu, KVM_SET_REGS, &g);
    struct timespec a, b;
    long done = 0;
    clock_gettime(CLOCK_MONOTONIC, &a);
    while (done < n) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) continue;
        if (run->exit_reason != KVM_EXIT_IO) {
            fprintf(stderr, "unexpected exit %d\n", run->exit_reason);
            return 1;
        }
        done++;
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    double secs = (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9;
    printf("{\"exits\": %ld, \"seconds\": %.6f}\n", done, secs);
    return 0;
}
"""

REPO = Path(__file__).resolve().parent.parent


def c_kvm(exits: int) -> dict[str, object]:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return {"error": "no usable /dev/kvm"}
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return {"error": "no C compiler"}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "io_exit.c"
        src.write_text(C_SOURCE)
        subprocess.run([cc, "-O2", "-o", str(Path(tmp) / "io_exit"), str(src)], check=True)
        out = subprocess.run([str(Path(tmp) / "io_exit"), str(exits)], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        return {"error": out.stderr.strip()}
    result: dict[str, object] = json.loads(out.stdout)
    return result


def hv_loop(exits: int) -> dict[str, object]:
    try:
        from mshv_libvirt.hv import GuestMemory, MshvSystem, Reg
        from mshv_libvirt.vmm import builder, layout
    except ImportError as err:
        return {"error": f"mshv_libvirt.hv unavailable: {err}"}
    try:
        system = MshvSystem.open(mode="auto")
        pt = system.create_partition()
        pt.initialize()
        mem = GuestMemory(0x200000)
        pt.map_memory(0, mem, writable=True, executable=True)
        _, tables = layout.identity_page_tables()
        mem.write(layout.PML4_ADDR, tables)
        mem.write(layout.GDT_ADDR, layout.gdt_bytes())
        mem.write(0x1000, bytes([0xE6, 0x80, 0xEB, 0xFC]))  # 1: out %al,$0x80; jmp 1b
        vp = pt.create_vp(0)
        vp.set_registers(builder.boot_registers(0x1000))
        start = time.perf_counter()
        for _ in range(exits):
            msg = vp.run()
            io = msg.as_io_port()
            vp.set_registers({Reg.RIP: io.rip + io.instruction_length})
        seconds = time.perf_counter() - start
        vp.close()
        pt.close()
        mem.close()
        system.close()
    except Exception as err:  # report, do not crash the other sides
        return {"error": f"{type(err).__name__}: {err}"}
    return {"exits": exits, "seconds": seconds, "backend": system.backend}


def vmm_side() -> dict[str, object]:
    sys.path.insert(0, str(REPO))
    try:
        from tests.support.guests import TINY_BANNER, TINY_BENCH_DONE, TINY_BENCH_EXITS, build_tiny_guest
        from tests.vmm.harness import VmmProcess
    except ImportError as err:
        return {"error": f"test support unavailable: {err}"}
    with tempfile.TemporaryDirectory() as tmp:
        kernel = build_tiny_guest(Path(tmp))
        with VmmProcess.start(Path(tmp), kernel, vcpus=1) as vm:
            vm.wait_serial(TINY_BANNER, timeout=120)
            # Console round trip without exits in a loop: echo of one byte.
            t0 = time.perf_counter()
            vm.console_send(b"e")
            vm.wait_console(b"e", timeout=60)
            echo = time.perf_counter() - t0
            t0 = time.perf_counter()
            vm.console_send(b"b")
            vm.wait_console(TINY_BENCH_DONE.encode(), timeout=600)
            seconds = time.perf_counter() - t0 - echo
            vm.console_send(b"q")
            vm.wait_exit(timeout=120)
    return {"exits": TINY_BENCH_EXITS, "seconds": seconds, "console_round_trip_s": echo}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exits", type=int, default=20000)
    args = parser.parse_args()
    results = {"c-kvm": c_kvm(args.exits), "hv-loop": hv_loop(args.exits), "vmm": vmm_side()}
    base = results["c-kvm"]
    for name, r in results.items():
        if "error" in r:
            print(f"{name:8s}  cannot run: {r['error']}")
            continue
        rate = float(r["exits"]) / float(r["seconds"])  # type: ignore[arg-type]
        line = f"{name:8s}  {rate:12.0f} exits/s  ({r['exits']} exits in {float(r['seconds']):.3f} s)"  # type: ignore[arg-type]
        if "error" not in base and name != "c-kvm":
            base_rate = float(base["exits"]) / float(base["seconds"])  # type: ignore[arg-type]
            line += f"  = {rate / base_rate:.3f} x c-kvm"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
