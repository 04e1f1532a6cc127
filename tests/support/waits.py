"""Every way the suite lets time pass, in one place (tests/test_suite_rules.py keeps bare sleeps out of tests).

- ``wait_for``: poll an observable condition until it holds, bounded; the condition's value is returned.
- ``assert_quiet``: a test that must show nothing happens for a while ("quiet window") names what stays
  true and why that long; this is the only place where a fixed span of time is a test's point.
- ``settle``: a reading that must stop growing (memory after a burst of clients).
- ``jitter``: a random delay that moves a race (a kill, a crash) to another point each round.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(
    predicate: Callable[..., T | None],
    timeout: float = 20.0,
    interval: float = 0.05,
    what: str | Callable[[], object] | None = None,
) -> T:
    """Poll ``predicate`` until it returns a true value, and return that value.

    On timeout: AssertionError naming the condition (``what``, or the predicate's own name) and its last
    value; ``what`` may be a callable whose value (e.g. the serial log's tail) the message then shows.
    An exception raised by the predicate propagates at once (a VMM that exited stops the wait).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            if callable(what):
                detail = f": {what()}"
                name = getattr(predicate, "__qualname__", repr(predicate))
            else:
                detail, name = "", what or getattr(predicate, "__qualname__", repr(predicate))
            raise AssertionError(f"condition {name} not met within {timeout} s (last value {value!r}){detail}")
        time.sleep(interval)


def assert_quiet(check: Callable[[], object], seconds: float, why: str, interval: float = 0.02) -> None:
    """``check`` stays true for ``seconds`` (polled every ``interval``): nothing happened meanwhile.

    ``why`` says what the window shows and why it is that long; it is part of the failure message.
    """
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if not value:
            raise AssertionError(f"quiet window broken ({why}): {getattr(check, '__qualname__', check)} -> {value!r}")
        if time.monotonic() >= deadline:
            return
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


def settle(
    read: Callable[[], int], *, start: int, tolerance: int, quiet: float, timeout: float, interval: float = 0.2
) -> int:
    """Sample ``read`` until it has not grown past the peak by more than ``tolerance`` for ``quiet`` seconds;
    the peak seen (at least ``start``, the reading before the burst).

    Bounded by ``timeout``: a reading still growing then is returned as it is (the caller asserts on it).
    """
    peak = start
    stable_since = time.monotonic()
    deadline = stable_since + timeout
    while time.monotonic() < deadline and time.monotonic() - stable_since < quiet:
        now = read()
        if now > peak + tolerance:
            stable_since = time.monotonic()
        peak = max(peak, now)
        time.sleep(interval)
    return peak


def jitter(rng: random.Random, low: float, high: float) -> None:
    """Sleep a random span in [low, high): where a race test's kill or crash lands, not synchronisation."""
    time.sleep(rng.uniform(low, high))
