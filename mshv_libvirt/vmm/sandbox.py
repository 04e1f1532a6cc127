"""The VMM's least privilege (docs/SECURITY.md); the native parts are abi/vmm/sandbox.c.

Order, once every descriptor the VMM will ever use is open and logging is set up:
``PR_SET_NO_NEW_PRIVS`` (and not dumpable), Landlock (read-only beneath the interpreter's library and
the installed package, write access nowhere), the SIGSYS reporter, then the process-wide seccomp
allow-list on every thread. Each vCPU thread calls :func:`enter_thread` before it runs guest code and
narrows itself to the vCPU list; the emulated device's helper thread does the same natively.
"""

from __future__ import annotations

import errno
import logging
import os
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import mshv_libvirt
from mshv_libvirt._mshv import ffi, lib
from mshv_libvirt.hv import _ffi  # noqa: F401  (checks the compiled module's version)

log = logging.getLogger(__name__)

PROCESS = 0
VCPU = 1
HELPER = 2
DEVICE = 3  # a device thread (virtio backends): poll, read, write, Python

HYPERVISOR_KINDS = {"/dev/mshv": 1, "/dev/kvm": 2}


class SandboxError(OSError):
    """A sandbox step failed (the VMM must not run guest code then)."""


@dataclass(frozen=True)
class SandboxState:
    landlock_abi: int  # 0: the kernel offers no Landlock
    read_paths: tuple[str, ...]
    uid: int
    gid: int

    def as_json(self) -> dict[str, object]:
        return {"landlock_abi": self.landlock_abi, "seccomp": True, "uid": self.uid, "gid": self.gid}


_state: SandboxState | None = None
_test_call: int | None = None


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise SandboxError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc


def read_paths() -> tuple[str, ...]:
    """What the VMM may still read: the interpreter's library, the environment's packages, this package."""
    paths = sysconfig.get_paths()
    found = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    found.add(str(Path(mshv_libvirt.__file__).resolve().parent))
    return tuple(sorted(p for p in found if os.path.isdir(p)))


def hand_over_device(device: str, fd: int) -> None:
    """Use ``fd`` (opened by the daemon) for ``device`` instead of opening it."""
    kind = HYPERVISOR_KINDS.get(device)
    if kind is None:
        raise SandboxError(22, f"unknown hypervisor device {device!r}")
    _check(int(lib.mshv_dev_use_fd(kind, fd)), f"hand-over of {device}")


def probe_hypervisor() -> tuple[str, int]:
    """(device, fd) the way the shim's auto mode probes: /dev/mshv, else /dev/kvm for the emulated device.

    The daemon does this for the VMMs it spawns (a sandboxed VMM may open no device; /dev/kvm is root's
    only); a VMM started by hand with "sandbox" and no handed descriptor does it itself before entering.
    """
    try:
        return "/dev/mshv", os.open("/dev/mshv", os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        if err.errno not in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
            raise SandboxError(err.errno, f"cannot open /dev/mshv: {err.strerror}") from err
    try:
        return "/dev/kvm", os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        # No KVM: the emulated device still validates everything (guest code cannot run).
        raise SandboxError(err.errno, f"cannot open /dev/kvm: {err.strerror}") from err


def landlock_abi() -> int:
    """The Landlock ABI version the running kernel offers (0 when it has none or it is disabled)."""
    return max(int(lib.mshv_landlock_abi()), 0)


def enter(report_fd: int | None = None, write_paths: tuple[str, ...] = ()) -> SandboxState:
    """Restrict this process for good (see the module docstring); idempotent per process."""
    global _state
    if _state is not None:
        return _state
    time.localtime()  # log timestamps: the C library reads the time zone file now, while it still may
    _check(int(lib.mshv_sandbox_register_thread(b"main")), "naming the main thread")
    _check(int(lib.mshv_sandbox_no_new_privs()), "PR_SET_NO_NEW_PRIVS")
    reads = read_paths()
    abi = 0
    if landlock_abi() > 0:
        c_reads = [ffi.new("char[]", os.fsencode(p)) for p in reads]
        c_writes = [ffi.new("char[]", os.fsencode(p)) for p in write_paths]
        abi = _check(
            int(lib.mshv_landlock_restrict(c_reads, len(c_reads), c_writes, len(c_writes))), "Landlock restriction"
        )
    else:
        log.warning("sandbox: the kernel offers no Landlock; file access is limited by seccomp and DAC only")
    _check(int(lib.mshv_sandbox_install_sigsys(-1 if report_fd is None else report_fd)), "SIGSYS handler")
    _check(int(lib.mshv_seccomp_install(PROCESS)), "seccomp (process allow-list)")
    lib.mshv_emu_prestart()  # the emulated device's helper thread starts now, filtered, from here
    _state = SandboxState(abi, reads, os.getuid(), os.getgid())
    log.info("sandbox: no_new_privs, Landlock ABI %d (read-only: %s), seccomp allow-lists", abi, ", ".join(reads))
    return _state


def state() -> SandboxState | None:
    return _state


def enter_thread(kind: int, name: str) -> None:
    """First act of a thread that runs guest code: narrow it to its own list (no-op without a sandbox)."""
    _check(int(lib.mshv_sandbox_thread_enter(kind, name.encode()[:15])), f"seccomp ({name} allow-list)")


def syscall_number(name: str) -> int:
    nr = int(lib.mshv_syscall_number(name.encode()))
    if nr < 0:
        raise ValueError(f"unknown system call {name!r}")
    return nr


# -- test hooks (honoured only when the VMM config has "test_hooks": true; see docs/SECURITY.md) ----------
def request_test_call(nr: int) -> None:
    """Make the next vCPU thread that looks issue system call ``nr`` (see :func:`take_test_call`)."""
    global _test_call
    _test_call = nr


def test_call_pending() -> bool:
    return _test_call is not None


def take_test_call() -> None:
    global _test_call
    nr, _test_call = _test_call, None
    if nr is not None:
        issue_syscall(nr)


def issue_syscall(nr: int) -> int:
    """Issue ``nr`` with zero arguments from this thread; a forbidden one ends the VMM (SIGSYS)."""
    return int(lib.mshv_sandbox_test_syscall(nr))
