"""The tests' own reading of /proc (not the driver's): memory, threads, and which processes a test's
daemon has left (``run_processes``, the oracle of every "no process left" check)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
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


_PRIVATE = re.compile(r"^Private_(?:Clean|Dirty):\s+(\d+) kB", re.M)
_MAPPING_START = re.compile(r"\n(?=[0-9a-f]+-[0-9a-f]+ )")


def private_kib(pid: int) -> int:
    """Private_Clean + Private_Dirty of the whole process (/proc/<pid>/smaps_rollup)."""
    return sum(int(n) for n in _PRIVATE.findall(Path(f"/proc/{pid}/smaps_rollup").read_text()))


def mappings_private_kib(pid: int, match: Callable[[str, int], bool]) -> int:
    """Private_Clean + Private_Dirty of the mappings ``match(header line, Size in kB)`` picks (/proc/<pid>/smaps)."""
    total = 0
    for entry in _MAPPING_START.split(Path(f"/proc/{pid}/smaps").read_text()):
        size = re.search(r"^Size:\s+(\d+) kB", entry, re.M)
        if size is not None and match(entry.split("\n", 1)[0], int(size.group(1))):
            total += sum(int(n) for n in _PRIVATE.findall(entry))
    return total


def open_sockets(pid: int) -> int:
    """How many sockets the process holds open (its listeners and every connection)."""
    n = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            n += os.readlink(fd).startswith("socket:")
    return n


def unread_socket_bytes(pid: int) -> int:
    """Bytes sent to the process and not yet read by it: the receive queues of the UNIX stream sockets it
    holds, as the kernel's socket diagnostics report them (``ss``). For a stopped VMM, its requests waiting."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            link = os.readlink(fd)
            if link.startswith("socket:["):
                inodes.add(link[len("socket:[") : -1])
    out = subprocess.run(["ss", "-xnH"], capture_output=True, text=True, timeout=30, check=True).stdout
    total = 0
    for line in out.splitlines():
        cols = line.split()  # netid state recv-q send-q [path] inode peer-path peer-inode
        if len(cols) >= 6 and cols[0] == "u_str" and cols[-3] in inodes:
            total += int(cols[2])
    return total


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


def process_alive(pid: int) -> bool:
    return not process_gone(pid)


RUN_MARK = "MSHV_TEST_RUN_DIR"  # set by tests/support/daemon.py in the daemon's environment; nothing reads it


@dataclass(frozen=True)
class Proc:
    """One live process as /proc shows it (proc(5): stat fields 4, 5, 6)."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    argv: tuple[str, ...]

    def __repr__(self) -> str:
        return f"<{self.pid} ppid {self.ppid} sid {self.sid}: {' '.join(self.argv)[:160]}>"


def live_processes() -> dict[int, Proc]:
    """Every process that is neither a zombie nor dead, by pid."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if stat[0] in ("Z", "X"):
            continue
        pid = int(entry)
        out[pid] = Proc(pid, int(stat[1]), int(stat[2]), int(stat[3]), tuple(os.fsdecode(a) for a in argv if a))
    return out


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root + "/")


def _names(p: Proc, spelt: re.Pattern[str], root: str) -> bool:
    """The process's command line, working directory or environment names the run directory."""
    for arg in p.argv:
        if spelt.search(arg):  # also inside "--opt=PATH" or "filename=PATH,..."
            return True
        if "/" in arg and not arg.startswith("/"):  # a relative path: from the process's cwd
            with contextlib.suppress(OSError):
                if _under(os.path.realpath(os.path.join(os.readlink(f"/proc/{p.pid}/cwd"), arg)), root):
                    return True
        elif arg.startswith("/") and _under(os.path.realpath(arg), root):  # through a symlink
            return True
    with contextlib.suppress(OSError):
        if _under(os.path.realpath(os.readlink(f"/proc/{p.pid}/cwd")), root):
            return True
    with contextlib.suppress(OSError):
        for var in Path(f"/proc/{p.pid}/environ").read_bytes().split(b"\0"):
            if var.startswith(RUN_MARK.encode() + b"=") and _under(
                os.path.realpath(os.fsdecode(var[len(RUN_MARK) + 1 :])), root
            ):
                return True
    return False


def run_processes(run_dir: Path, *, besides: tuple[int, ...] = ()) -> dict[int, Proc]:
    """Every live process that belongs to a test daemon's run directory, by the tests' own rules (not the
    driver's pidfiles or its VMM scan): a process whose command line, working directory or environment
    (``RUN_MARK``, inherited by whatever the daemon spawns) names ``run_dir``; every descendant of one; and
    every member of a session one of them is in (a VMM leads its own; a disk's backend reaper and the
    qemu-storage-daemon it forks stay in it after the VMM is gone), except the test's own session.
    ``besides`` are left out, with their descendants only when these are found by another rule (the
    daemon itself: its ``--run-dir`` names the directory)."""
    procs = live_processes()
    root = os.path.realpath(run_dir)
    # Either spelling, ending there or at a separator (so ".../run" does not name ".../run2").
    spelt = re.compile("(?:" + "|".join(re.escape(s) for s in {str(run_dir), root}) + r")(?=$|[/,:;\s])")
    found = {pid for pid, p in procs.items() if _names(p, spelt, root)}
    ours = os.getsid(0)
    while True:
        sessions = {procs[pid].sid for pid in found} - {ours}
        more = {pid for pid, p in procs.items() if pid not in found and (p.ppid in found or p.sid in sessions)}
        if not more:
            break
        found |= more
    return {pid: procs[pid] for pid in sorted(found) if pid not in besides}


def descendants(pid: int) -> dict[int, str]:
    """pid -> executable name (argv[0]'s base name) of every live descendant of ``pid``, by parent links."""
    procs = live_processes()
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child in (p for p in procs.values() if p.ppid == parent):
            found[child.pid] = os.path.basename(child.argv[0]) if child.argv else ""
            frontier.append(child.pid)
    return found
