#!/usr/bin/env python3
"""IO-exit round trips per second: our VMM path vs. a minimal C loop on /dev/kvm.

Four numbers (five with a baseline), same host, same run:

* ``c-kvm``: a C program compiled here from the source below (our own code) puts a guest that
  executes ``out %al, $0x80`` in a loop directly on /dev/kvm and counts KVM_RUN round trips.
  This is the floor: one ioctl and nothing else per exit.
* ``c-mshv``: the same guest and loop in C over the /dev/mshv ABI (MSHV_RUN_VP, then the
  SET_VP_REGISTERS hypercall for RIP), through the compiled module's shim: the emulated device on
  KVM here. Its ratio to ``c-kvm`` is the emulated device's own cost per exit.
* ``hv-loop``: the same guest through ``mshv_libvirt.hv`` (emulated /dev/mshv on KVM here), with a
  Python loop that only completes the OUT (``set_registers(RIP)``) -- the cost of our ABI layer.
* ``vmm``: the tiny test guest under the real VMM process (``python -m mshv_libvirt.vmm``), which
  on ``b`` executes 20000 OUTs to port 0x80; timed from sending ``--presses`` ``b`` at once on the
  console pty to the last ``BENCH-DONE`` on it, minus the measured console round trip. Its vCPU runs
  the compiled run loop (vmm/runloop.py), which completes the OUTs to 0x80 in C; ``c-mshv`` is the
  loop it is held to (>= 0.8x).

The C sides run alternately for ``--rounds`` rounds (a change of load then hits each alike);
``--baseline-abi DIR`` adds ``c-mshv`` built from another checkout's ``abi/`` (before/after in one run).

Run: ``.venv/bin/python benchmarks/io_exit.py [--exits N] [--rounds R] [--presses P] [--baseline-abi DIR]``. Sides that
cannot run say why.
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

# The same guest and loop over /dev/mshv's ABI (abi/include), built with the compiled module's C
# sources (abi/shim.c, abi/emu): the emulated device here, the kernel's where /dev/mshv exists. Per
# exit: MSHV_RUN_VP and the SET_VP_REGISTERS hypercall that moves RIP past the OUT, as a VMM does.
C_MSHV_SOURCE = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include "hv_defs.h"
#include "mshv_uapi.h"
#include "shim.h"

#define dev_ioctl mshv_dev_ioctl

static int set_regs(int vp, const struct hv_register_assoc *r, int n) {
    static uint8_t in[4096];
    struct hv_input_set_vp_registers h = {0};
    memcpy(in, &h, sizeof h);
    memcpy(in + sizeof h, r, sizeof(*r) * n);
    struct mshv_root_hvcall c = {0};
    c.code = HVCALL_SET_VP_REGISTERS;
    c.reps = (uint16_t)n;
    c.in_sz = (uint16_t)(sizeof h + sizeof(*r) * n);
    c.in_ptr = (uint64_t)(uintptr_t)in;
    return dev_ioctl(vp, MSHV_ROOT_HVCALL, &c) < 0 || c.status || c.reps != n ? -1 : 0;
}

static struct hv_register_assoc reg(uint32_t name, uint64_t v) {
    struct hv_register_assoc a = {0};
    a.name = name;
    a.value.reg64 = v;
    return a;
}

static struct hv_register_assoc seg(uint32_t name, uint16_t sel, uint16_t attr) {
    struct hv_register_assoc a = {0};
    a.name = name;
    a.value.segment.limit = 0xffffffff;
    a.value.segment.selector = sel;
    a.value.segment.attributes = attr;
    return a;
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 100000;
    int dev = mshv_dev_open(0);
    if (dev < 0) { perror("open /dev/mshv"); return 2; }
    struct mshv_create_partition cp = {0x7, 0}; /* LAPIC, X2APIC, GPA super pages */
    int pt = (int)dev_ioctl(dev, MSHV_CREATE_PARTITION, &cp);
    if (pt < 0 || dev_ioctl(pt, MSHV_INITIALIZE_PARTITION, NULL) < 0) { perror("partition"); return 2; }
    uint8_t *ram = mmap(NULL, 0x200000, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    struct mshv_user_mem_region m = {0};
    m.size = 0x200000;
    m.userspace_addr = (uint64_t)(uintptr_t)ram;
    m.flags = (1 << MSHV_SET_MEM_BIT_WRITABLE) | (1 << MSHV_SET_MEM_BIT_EXECUTABLE);
    if (dev_ioctl(pt, MSHV_SET_GUEST_MEMORY, &m) < 0) { perror("memory"); return 2; }
    uint64_t *pml4 = (uint64_t *)(ram + 0x9000), *pdpt = (uint64_t *)(ram + 0xa000);
    uint64_t *pd = (uint64_t *)(ram + 0xb000);
    pml4[0] = 0xa003; pdpt[0] = 0xb003; pd[0] = 0x83;
    static const uint8_t code[] = {0xe6, 0x80, 0xeb, 0xfc}; /* 1: out %al, $0x80 ; jmp 1b */
    memcpy(ram + 0x1000, code, sizeof code);
    struct mshv_create_vp cv = {0};
    int vp = (int)dev_ioctl(pt, MSHV_CREATE_VP, &cv);
    struct hv_register_assoc boot[] = {
        reg(HV_X64_REGISTER_CR0, 0x80000011), reg(HV_X64_REGISTER_CR3, 0x9000),
        reg(HV_X64_REGISTER_CR4, 0x20), reg(HV_X64_REGISTER_EFER, 0x500),
        seg(HV_X64_REGISTER_CS, 8, 0xa09b), seg(HV_X64_REGISTER_DS, 16, 0xc093),
        seg(HV_X64_REGISTER_ES, 16, 0xc093), seg(HV_X64_REGISTER_SS, 16, 0xc093),
        seg(HV_X64_REGISTER_FS, 16, 0xc093), seg(HV_X64_REGISTER_GS, 16, 0xc093),
        reg(HV_X64_REGISTER_RFLAGS, 2), reg(HV_X64_REGISTER_RIP, 0x1000),
    };
    if (vp < 0 || set_regs(vp, boot, sizeof boot / sizeof boot[0])) { perror("vp"); return 2; }
    struct mshv_run_vp run;
    struct timespec a, b;
    long done = 0;
    clock_gettime(CLOCK_MONOTONIC, &a);
    while (done < n) {
        if (dev_ioctl(vp, MSHV_RUN_VP, &run) < 0) continue;
        const struct hv_message *msg = (const void *)run.msg_buf;
        const struct hv_x64_io_port_intercept_message *io = (const void *)msg->payload;
        if (msg->header.message_type != HVMSG_X64_IO_PORT_INTERCEPT) {
            fprintf(stderr, "unexpected message %#x\n", msg->header.message_type);
            return 1;
        }
        struct hv_register_assoc rip = reg(HV_X64_REGISTER_RIP,
                                           io->header.rip + (io->header.instruction_length_cr8 & 0xf));
        if (set_regs(vp, &rip, 1)) { perror("complete"); return 1; }
        done++;
    }
    clock_gettime(CLOCK_MONOTONIC, &b);
    double secs = (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9;
    printf("{\"exits\": %ld, \"seconds\": %.6f, \"backend\": \"%s\"}\n", done, secs,
           mshv_dev_is_emulated(dev) ? "emulated" : "mshv");
    return 0;
}
"""

REPO = Path(__file__).resolve().parent.parent


def build_c(tmp: Path, name: str, source: str, abi: Path | None = None) -> Path | str:
    """Compiles one C side; with ``abi`` also that checkout's shim and emulated device."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return "no C compiler"
    src = tmp / f"{name}.c"
    src.write_text(source)
    exe = tmp / name
    cmd = [cc, "-O2", "-o", str(exe), str(src)]
    if abi is not None:
        cmd += ["-D_GNU_SOURCE", f"-I{abi}", f"-I{abi / 'include'}", f"-I{abi / 'emu'}"]
        cmd += [str(abi / "shim.c"), *map(str, sorted((abi / "emu").glob("*.c"))), "-lpthread"]
    build = subprocess.run(cmd, capture_output=True, text=True)
    return exe if build.returncode == 0 else build.stderr.strip()[-500:]


def run_c(exe: Path, exits: int) -> dict[str, object]:
    out = subprocess.run([str(exe), str(exits)], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        return {"error": out.stderr.strip()}
    result: dict[str, object] = json.loads(out.stdout)
    return result


def c_sides(exits: int, rounds: int, baseline_abi: Path | None) -> dict[str, dict[str, object]]:
    """The C loops, alternated for ``rounds`` rounds so that a change of load hits every side alike;
    each side's figure is its exits and seconds summed over the rounds."""
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        exes: dict[str, Path] = {}
        wanted: list[tuple[str, str, Path | None]] = [
            ("c-kvm", C_SOURCE, None),
            ("c-mshv", C_MSHV_SOURCE, REPO / "abi"),
        ]
        if baseline_abi is not None:
            wanted.append(("c-mshv-baseline", C_MSHV_SOURCE, baseline_abi))
        for name, source, abi in wanted:
            if name == "c-kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
                results[name] = {"error": "no usable /dev/kvm"}
                continue
            built = build_c(Path(tmp), name, source, abi)
            if isinstance(built, str):
                results[name] = {"error": built}
            else:
                exes[name] = built
                results[name] = {"exits": 0, "seconds": 0.0}
        for _ in range(rounds):
            for name, exe in exes.items():
                r = run_c(exe, exits)
                if "error" in r or "error" in results[name]:
                    results[name] = r if "error" in r else results[name]
                    continue
                total = results[name]
                total["exits"] = int(total["exits"]) + int(r["exits"])  # type: ignore[call-overload]
                total["seconds"] = float(total["seconds"]) + float(r["seconds"])  # type: ignore[arg-type]
                if "backend" in r:
                    total["backend"] = r["backend"]
    return results


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


def vmm_side(presses: int) -> dict[str, object]:
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
            # All presses at once: the guest runs them back to back, and the one round trip subtracted is
            # small beside their total (one press is ~0.1 s at the compiled loop's rate).
            t0 = time.perf_counter()
            vm.console_send(b"b" * presses)
            for _ in range(presses):
                vm.wait_console(TINY_BENCH_DONE.encode(), timeout=600)
            seconds = time.perf_counter() - t0 - echo
            vm.console_send(b"q")
            vm.wait_exit(timeout=120)
    return {"exits": TINY_BENCH_EXITS * presses, "seconds": seconds, "console_round_trip_s": echo}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exits", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5, help="alternated runs of the C sides")
    parser.add_argument("--presses", type=int, default=10, help="'b' presses of the vmm side, 20000 OUTs each")
    parser.add_argument(
        "--baseline-abi", type=Path, help="also build c-mshv from this abi/ directory (e.g. an older checkout)"
    )
    args = parser.parse_args()
    results = c_sides(args.exits, args.rounds, args.baseline_abi)
    results["hv-loop"] = hv_loop(args.exits)
    results["vmm"] = vmm_side(args.presses)
    rates = {
        name: float(r["exits"]) / float(r["seconds"])  # type: ignore[arg-type]
        for name, r in results.items()
        if "error" not in r
    }
    for name, r in results.items():
        if name not in rates:
            print(f"{name:16s}  cannot run: {r['error']}")
            continue
        line = f"{name:16s}  {rates[name]:12.0f} exits/s  ({r['exits']} exits in {float(r['seconds']):.3f} s)"  # type: ignore[arg-type]
        for base in ("c-kvm", "c-mshv"):
            if base in rates and name not in ("c-kvm", base):
                line += f"  = {rates[name] / rates[base]:.3f} x {base}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
