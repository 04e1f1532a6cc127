"""Facts about other processes and the host, read from /proc and /sys."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (dead, not yet reaped by its parent) is gone for our purposes.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def host_memory_kib() -> int:
    """MemTotal in KiB (0 if /proc/meminfo cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PF_NO_SETAFFINITY = 0x04000000  # a kernel worker whose affinity userspace may not change
_PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


@dataclass(frozen=True)
class TaskStat:
    """What libvirt's virProcessGetStatInfo reads from a process's or thread's ``stat`` file."""

    user_ns: int
    system_ns: int
    processor: int  # the host CPU it last ran on
    rss_kib: int
    flags: int = 0  # the kernel's PF_* flags

    @property
    def pinnable(self) -> bool:
        return not self.flags & PF_NO_SETAFFINITY

    @property
    def cpu_ns(self) -> int:
        return self.user_ns + self.system_ns


def task_stat(pid: int, tid: int | None = None) -> TaskStat | None:
    """/proc/<pid>/stat, or /proc/<pid>/task/<tid>/stat for one thread; None once it is gone."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        # One open and one read, unbuffered: domstats reads this for every running domain at every call
        # (a file object costs twice the system calls' time). The line is a few hundred bytes.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
        fields = data.rsplit(b")", 1)[1].split()  # the command name may hold anything
        utime, stime = int(fields[11]), int(fields[12])
        return TaskStat(
            utime * 1_000_000_000 // _CLOCK_TICKS,
            stime * 1_000_000_000 // _CLOCK_TICKS,
            int(fields[36]),
            int(fields[21]) * _PAGE_KIB,
            int(fields[6]),
        )
    except (OSError, IndexError, ValueError):
        return None


def thread_ids(pid: int) -> list[int]:
    """The threads of a process (empty once it is gone)."""
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if t.isdigit())
    except OSError:
        return []


SYS_CPU = Path("/sys/devices/system/cpu")
_CPU_LIMIT = 1 << 18  # no host has more CPUs; a corrupt list must not make a set without bound


def parse_cpu_list(text: str) -> frozenset[int]:
    """A kernel CPU list ("0-3,8,10-11") as a set of CPU numbers; ValueError if it is not one."""
    out: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        first, last = int(lo), int(hi or lo)
        if not 0 <= first <= last < _CPU_LIMIT:
            raise ValueError(f"bad CPU range {part!r}")
        out.update(range(first, last + 1))
    return frozenset(out)


def read_cpu_list(name: str) -> frozenset[int]:
    """/sys/devices/system/cpu/<name> ("online", "present", ...); OSError or ValueError if unreadable."""
    return parse_cpu_list((SYS_CPU / name).read_text())
