"""Judging a Linux guest's boot from its serial log: milestones, the known host limit, everything else.

A boot passes only when the log shows, in order, the kernel banner, ``Run /init as init process`` and
the marker our /init prints (which takes system calls from user mode). On a kvm-pvm host it is an
expected failure only when the log shows, after ``Run /init`` and before any reboot, the kernel's
``Attempted to kill init`` together with one of the measured signatures of that host's limit; the
reason quotes those lines. Anything else fails: the VMM exiting at once (e.g. "kernel image has no
Linux setup header"), a missing milestone, a deadline running out, a different crash.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from tests.support.guests import LINUX_MARKER

BANNER = "Linux version "
INIT = "Run /init as init process"
INIT_DIED = "Attempted to kill init"
# x86's panic report ends with this line; with panic=-1 the kernel then resets (and boots again).
PANIC_END = "Kernel Offset:"
# The host limit, as measured on kvm-pvm (tests/vmm/linux_serial/kvm-pvm-6.1.log): a 64-bit SYSCALL
# arrives at LSTAR still in CPL3, so init faults on the kernel's entry_SYSCALL_64 and the panic's dump
# of its registers reads "RIP: 0033:entry_SYSCALL_64" (user CS 0x33); a 32-bit ``int $0x80`` arrives as
# #UD instead, which the kernel reports as "init[1] trap invalid opcode" before the panic.
SYSCALL_IN_USER_MODE = "RIP: 0033:entry_SYSCALL_64"
INT80_IS_UD = "trap invalid opcode"

# What the kernel reports for each device the VMM offers (Debian 6.1's wording, as recorded in
# tests/vmm/linux_serial/kvm-pvm-6.1.log): the milestones test_linux_guest.py checks.
PLATFORM = {
    "ACPI tables": r"ACPI: RSDP 0x[0-9A-F]+ \d+ \(v02 MSHVLV\)",
    "MADT": r"ACPI: APIC 0x[0-9A-F]+ [0-9A-F]+ \(v0\d MSHVLV",
    "IOAPIC": r"IOAPIC\[0\]: apic_id \d+, version 32, address 0xfec00000, GSI 0-23",
    "ACPI S5": r"ACPI: PM: \(supports S0 S5\)",
    "interrupt routing": r"ACPI: Using IOAPIC for interrupt routing",
    "PM timer": r"clocksource: acpi_pm: mask: 0xffffff ",
    "16550": r"serial8250: ttyS0 at I/O 0x3f8 \(irq = 4, base_baud = 115200\) is a 16550A",
    "i8042": r"serio: i8042 KBD port at 0x60,0x64 irq 1",
}


Outcome = Literal["passed", "xfail", "failed"]


def is_kvm_pvm() -> bool:
    return Path("/sys/module/kvm_pvm").exists()


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    reason: str


def _line_at(text: str, index: int) -> str:
    start = text.rfind("\n", 0, index) + 1
    end = text.find("\n", index)
    return text[start : end if end >= 0 else len(text)].strip()[-200:]


def _last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1].strip()[-200:] if lines else "(no serial output)"


def judge(
    serial: str,
    *,
    exit_record: dict[str, Any] | None,
    vmm_exited: bool,
    timed_out: str | None,
    kvm_pvm: bool,
) -> Verdict:
    """The verdict on one boot. ``timed_out`` names the deadline that ran out, if one did."""
    context = f"VMM exit: {exit_record if vmm_exited else 'still running'}; last serial line: {_last_line(serial)!r}"
    if timed_out:
        context = f"{timed_out}; {context}"
    banner = serial.find(BANNER)
    if banner < 0:
        return Verdict("failed", f"no kernel banner ({BANNER.strip()!r}); {context}")
    init = serial.find(INIT, banner)
    if init < 0:
        return Verdict("failed", f"the kernel never printed {INIT!r}; {context}")
    if serial.find(LINUX_MARKER + "\n", init) >= 0:
        return Verdict("passed", f"reached {LINUX_MARKER}")
    rebooted = serial.find(BANNER, init)  # panic=-1: a reset, then the next boot's log
    first = serial[init : rebooted if rebooted >= 0 else len(serial)]
    died = first.find(INIT_DIED)
    if kvm_pvm and died >= 0:
        signature = first.find(SYSCALL_IN_USER_MODE, died)
        if signature < 0:
            trap = first.rfind(INT80_IS_UD, 0, died)
            signature = trap if trap >= 0 and "init[1]" in _line_at(first, trap) else -1
        if signature >= 0:
            fault = first.find("init[1]")
            return Verdict(
                "xfail",
                f"kvm-pvm host limit: after {INIT!r} the first system call from user mode failed on the host: "
                f"{_line_at(first, fault)!r}, then {_line_at(first, died)!r}, {_line_at(first, signature)!r}",
            )
    return Verdict("failed", f"the kernel reached {INIT!r} but not {LINUX_MARKER!r}; {context}")


class BootingVm(Protocol):
    """What :func:`watch` needs of a running VMM (tests/vmm/harness.py's VmmProcess)."""

    proc: subprocess.Popen[bytes]

    @property
    def serial(self) -> str: ...

    def exit_record(self) -> dict[str, Any] | None: ...


@dataclass(frozen=True)
class Deadlines:
    """By when each milestone must have appeared, in CPU seconds used by the VMM process: the boot's
    work, which a machine busy with other runs stretches in wall time but not in CPU time. ``wall``
    bounds the whole boot in wall-clock seconds (a VMM that stops working uses no CPU)."""

    banner: float
    init: float
    end: float  # the marker, or the kernel's report of init's death
    wall: float


@dataclass
class Boot:
    verdict: Verdict
    serial: str
    seconds: dict[str, tuple[float, float]] = field(default_factory=dict)  # milestone -> (wall s, VMM CPU s)


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` (from /proc, not from the VMM)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def watch(
    vm: BootingVm, deadlines: Deadlines, *, kvm_pvm: bool, started: float | None = None, settle: float = 60.0
) -> Boot:
    """Follow a boot until it passes, dies, stops or misses a deadline; then judge it. ``started``:
    the ``time.monotonic()`` at which the VMM was started, if that was before this call."""
    start = time.monotonic() if started is None else started
    seen: dict[str, tuple[float, float]] = {}
    timed_out: str | None = None
    while True:
        text = vm.serial
        now = time.monotonic() - start
        cpu = cpu_seconds(vm.proc.pid)
        for name in (BANNER, INIT, LINUX_MARKER + "\n", INIT_DIED):
            if name not in seen and name in text:
                seen[name] = (round(now, 1), round(cpu, 1))
        if LINUX_MARKER + "\n" in seen or vm.proc.poll() is not None:
            break
        if INIT_DIED in seen:
            # The rest of the kernel's report: its last line, the reset that follows, or a bound.
            rest = text[text.find(INIT_DIED) :]
            if PANIC_END in rest or BANNER in rest or now - seen[INIT_DIED][0] > settle:
                break
        elif BANNER not in seen and cpu > deadlines.banner:
            timed_out = f"no kernel banner within {deadlines.banner:.0f} s of VMM CPU time"
        elif INIT not in seen and cpu > deadlines.init:
            timed_out = f"no {INIT!r} within {deadlines.init:.0f} s of VMM CPU time"
        elif cpu > deadlines.end:
            timed_out = f"neither {LINUX_MARKER!r} nor {INIT_DIED!r} within {deadlines.end:.0f} s of VMM CPU time"
        elif now > deadlines.wall:
            timed_out = f"the boot took more than {deadlines.wall:.0f} s (wall clock; {cpu:.0f} s of VMM CPU time)"
        if timed_out:
            break
        time.sleep(0.5)
    text = vm.serial
    exited = vm.proc.poll() is not None
    verdict = judge(
        text, exit_record=vm.exit_record() if exited else None, vmm_exited=exited, timed_out=timed_out, kvm_pvm=kvm_pvm
    )
    return Boot(verdict, text, {k.strip(): v for k, v in seen.items()})


__all__ = [
    "BANNER",
    "INIT",
    "INIT_DIED",
    "INT80_IS_UD",
    "PANIC_END",
    "PLATFORM",
    "SYSCALL_IN_USER_MODE",
    "Boot",
    "BootingVm",
    "Deadlines",
    "Verdict",
    "cpu_seconds",
    "is_kvm_pvm",
    "judge",
    "watch",
]
