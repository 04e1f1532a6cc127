"""The judge of the Linux boot tests (tests/support/linuxboot.py) on serial logs with a known verdict.

The real boot tests (tests/vmm/test_linux_guest.py, ``tox -e slow``) stay the judges of a real boot;
this module shows, in seconds, that the judge cannot be talked into an expected failure: only the
measured kvm-pvm signature, after every milestone, before any reboot, is one. ``kvm-pvm-6.1.log`` is
a real boot's log as the VMM wrote it (Debian's 6.1 kernel on this project's kvm-pvm host with
test_linux_guest.py's command line, 2026-12-03), up to the first line of the boot that panic=-1's
reset starts.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.guests import LINUX_CMDLINE, LINUX_MARKER
from tests.support.linuxboot import INIT, INIT_DIED, PLATFORM, SYSCALL_IN_USER_MODE, Deadlines, judge, watch
from tests.vmm.harness import VmmProcess

RECORDED = (Path(__file__).parent / "linux_serial" / "kvm-pvm-6.1.log").read_text()
UP_TO_INIT = RECORDED[: RECORDED.index(INIT)] + INIT + "\n"
FIRST_BOOT = RECORDED[: RECORDED.rindex("Linux version ")]
NO_SETUP_HEADER = {"reason": "error", "detail": "Cannot load the kernel: kernel image has no Linux setup header"}


def verdict_on(serial: str, *, kvm_pvm: bool = True, timed_out: str | None = None) -> tuple[str, str]:
    v = judge(serial, exit_record=None, vmm_exited=False, timed_out=timed_out, kvm_pvm=kvm_pvm)
    return v.outcome, v.reason


def test_the_recorded_kvm_pvm_boot_is_the_expected_failure_only_on_kvm_pvm() -> None:
    outcome, reason = verdict_on(RECORDED)
    assert outcome == "xfail"
    # The reason quotes the lines seen, not a fixed story.
    assert "init[1]: segfault at ffffffff81c00080" in reason
    assert "Kernel panic - not syncing: Attempted to kill init!" in reason
    assert "RIP: 0033:entry_SYSCALL_64+0x0/0x29" in reason
    assert verdict_on(FIRST_BOOT)[0] == "xfail"  # watched until the panic report ended, before the reset
    assert verdict_on(RECORDED, kvm_pvm=False)[0] == "failed"


def test_the_32_bit_variant_of_the_limit_is_one_too() -> None:
    # int $0x80 from a 32-bit init arrives as #UD: the kernel reports the trap, then the panic.
    trap = "[ 1304.7] traps: init[1] trap invalid opcode ip:8049000 sp:ffd0 error:0 in busybox[8048000+1000]\n"
    panic = "[ 1304.8] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000004\n"
    assert verdict_on(UP_TO_INIT + trap + panic)[0] == "xfail"
    assert verdict_on(UP_TO_INIT + panic + trap)[0] == "failed"  # a trap after the panic is not the cause


def test_a_vmm_that_exits_at_once_fails() -> None:
    v = judge("", exit_record=NO_SETUP_HEADER, vmm_exited=True, timed_out=None, kvm_pvm=True)
    assert v.outcome == "failed"
    assert "no kernel banner" in v.reason and "kernel image has no Linux setup header" in v.reason


@pytest.mark.parametrize(
    ("case", "serial", "timed_out"),
    [
        ("deadline before init", RECORDED[: RECORDED.index(INIT)], "no 'Run /init as init process' within 2817 s"),
        ("deadline after init", RECORDED[: RECORDED.index("init[1]")], "neither ... within 2819 s of VMM CPU time"),
        ("init died, not of the host limit", RECORDED.replace(SYSCALL_IN_USER_MODE, "RIP: 0033:0x401000"), None),
        ("a kernel-mode crash", RECORDED.replace(SYSCALL_IN_USER_MODE, "RIP: 0010:do_syscall_64"), None),
        (
            "the limit only in the next boot",
            FIRST_BOOT.replace(SYSCALL_IN_USER_MODE, "RIP: 0033:0x401000")
            + "Linux version 6.1\n"
            + INIT
            + "\n"
            + SYSCALL_IN_USER_MODE
            + "\n",
            None,
        ),
        ("init never ran", RECORDED.replace(INIT, "Run /sbin/init as init process"), None),
        ("no banner", RECORDED.replace("Linux version ", "Linux-version "), None),
        ("nothing died", RECORDED.replace(INIT_DIED, "Attempted to kill something"), None),
    ],
)
def test_anything_but_the_measured_signature_fails(case: str, serial: str, timed_out: str | None) -> None:
    outcome, reason = verdict_on(serial, timed_out=timed_out)
    assert outcome == "failed", (case, reason)
    if timed_out:
        assert timed_out in reason


def test_the_marker_after_init_passes_and_only_after_init() -> None:
    assert verdict_on(UP_TO_INIT + LINUX_MARKER + "\n")[0] == "passed"
    assert verdict_on(UP_TO_INIT + LINUX_MARKER + "\n", kvm_pvm=False)[0] == "passed"
    early = LINUX_MARKER + "\n" + RECORDED[: RECORDED.index(INIT)]  # printed before the kernel's init ran
    assert verdict_on(early, kvm_pvm=False)[0] == "failed"


def test_the_milestone_patterns_match_the_recorded_wording() -> None:
    assert f"Command line: {LINUX_CMDLINE}\n" in RECORDED
    for device, pattern in PLATFORM.items():
        assert re.search(pattern, RECORDED), device


@pytest.mark.kvm
def test_watching_a_real_vmm_with_8_kib_of_zeros_fails_at_once(kvm: None, tmp_path: Path) -> None:
    zeros = tmp_path / "zeros"
    zeros.write_bytes(bytes(8192))
    with VmmProcess.start(tmp_path / "vm", zeros, cmdline="console=ttyS0") as vm:
        result = watch(vm, Deadlines(banner=60, init=60, end=60, wall=120), kvm_pvm=True)
    assert result.verdict.outcome == "failed"
    assert "kernel image has no Linux setup header" in result.verdict.reason
