"""System calls read back from ``strace -f -o FILE`` output, per thread (the tests' own oracle).

A line is ``TID name(args...``; ``<... name resumed>`` continuations, signals and exits are not new
calls and are skipped. An ioctl is named by its request as strace decodes it ("ioctl KVM_RUN").
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict

_CALL = re.compile(r"^(\d+)\s+(\w+)\((.*)$")


def _name(m: re.Match[str]) -> str:
    name = m.group(2)
    if name == "ioctl":  # "9, KVM_RUN, 0) = 0" or "9, KVM_RUN <unfinished ...>"
        name += " " + re.split(r"[ ,)]+", m.group(3))[1]
    return name


def by_thread(lines: list[str]) -> dict[int, Counter[str]]:
    """Every call of every thread."""
    calls: dict[int, Counter[str]] = defaultdict(Counter)
    for line in lines:
        m = _CALL.match(line)
        if m is not None:
            calls[int(m.group(1))][_name(m)] += 1
    return dict(calls)


def between(lines: list[str], begin: str, end: str, tid: int) -> Counter[str]:
    """The calls of thread ``tid`` after the first line containing ``begin`` and before the first
    one containing ``end`` (markers: calls whose arguments the tracer shows, e.g. a stat of a path)."""
    first = next(i for i, line in enumerate(lines) if begin in line)
    last = next(i for i, line in enumerate(lines) if end in line)
    return by_thread(lines[first + 1 : last]).get(tid, Counter())
