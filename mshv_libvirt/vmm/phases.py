"""Startup phase stamps: where a VMM's start goes, logged once, at its first ``MSHV_RUN_VP``.

Each stamp is one ``clock_gettime(CLOCK_BOOTTIME)``: the clock ``/proc/PID/stat``'s start time counts
in, so the first figure (the fork by the daemon -> first Python line: exec and the interpreter's own
start) is measurable too, and any other process (benchmarks/startup.py) can line the stamps up with
its own. Only the first build of a process is recorded; a reboot's rebuild is not a start.

The line reads ``startup phases: spawn=<boottime s> main=+<s> imports=+<s> ...``, each ``+`` being
seconds after the spawn (which has the 10 ms resolution of clock ticks).
"""

from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger(__name__)

_stamps: list[tuple[str, float]] = []
_done = False
_lock = threading.Lock()


def now() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def mark(name: str) -> None:
    """Record that phase ``name`` ended now (no-op once the summary was logged)."""
    if not _done:
        _stamps.append((name, now()))


def process_start() -> float | None:
    """When this process was forked, in CLOCK_BOOTTIME seconds (``/proc/self/stat`` field 22)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()  # after "pid (comm) ": field 3 is fields[0]
    return int(fields[22 - 3]) / os.sysconf("SC_CLK_TCK")


# Read at import, in the main thread: the vCPU thread that logs the summary may open no file (sandbox).
_spawn = process_start()


def summary() -> str:
    base = _spawn if _spawn is not None else (_stamps[0][1] if _stamps else now())
    parts = [f"spawn={base:.3f}"] + [f"{name}=+{at - base:.4f}" for name, at in _stamps]
    return "startup phases: " + " ".join(parts)


def first_run_vp() -> None:
    """The first vCPU is about to enter the guest: stamp it and log the whole start once."""
    global _done
    with _lock:  # several vCPUs start at once: one line
        if _done:
            return
        mark("first_run_vp")
        _done = True
    log.info("%s", summary())
