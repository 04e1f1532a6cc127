"""The tests' own reading of /proc (not the driver's): memory, threads."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

IOCTL = 16  # x86_64 syscall number of ioctl(2), as /proc/<tid>/syscall prints it


def status_kib(pid: int, field: str = "VmRSS") -> int:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM, ...)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def rss_kib(pid: int) -> int:
    return status_kib(pid, "VmRSS")


def open_sockets(pid: int) -> int:
    """How many sockets the process holds open (its listeners and every connection)."""
    n = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            n += os.readlink(fd).startswith("socket:")
    return n


def in_guest(t: threading.Thread) -> bool:
    """The thread (of this process) is running a VP: blocked in the run ioctl (a halted guest), or a
    spinning guest's time is accounted to it: guest time under VMX/SVM, system time under kvm-pvm (which
    runs the guest from the kernel; measured there: stime grows 10 ticks in 100 ms, utime and guest_time
    stay 0). Python code alone accrues user time, not 20 ms of system time. False once the thread ended."""
    if t.native_id is None or not t.is_alive():
        return False
    task = Path(f"/proc/self/task/{t.native_id}")
    try:
        syscall = (task / "syscall").read_text().split()
        stat = (task / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    stime, guest_time = int(stat[12]), int(stat[40])  # fields 15 and 43 of proc(5), in clock ticks
    return (bool(syscall) and syscall[0] == str(IOCTL)) or guest_time > 0 or stime >= 2


def process_gone(pid: int) -> bool:
    """Ended: no such process, or a zombie its (new) parent has yet to reap."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def image_locked(path: Path) -> bool:
    """The kernel's record (/proc/locks): any lock on the file's inode (the daemon's, a VMM's, a backend's)."""
    st = path.stat()
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    return any(inode in line.split() for line in Path("/proc/locks").read_text().splitlines())
