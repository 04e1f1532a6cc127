"""``tox -e isolation``: every test module passes on its own, and the suite passes in a random order.

Each module runs in a pytest of its own (a test that needs another module's side effects fails there);
then the whole suite runs once in the order pytest-randomly draws from a seed printed first (rerun one
order with ``--seed N``). Failures are collected, not fatal, and summed up at the end; the exit status is
non-zero when any run failed. Arguments after ``--`` go to every pytest run.

    python -m tests.support.isolation [--seed N] [--only-modules | --only-random] [-- PYTEST ARGS]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NO_TESTS = 5  # pytest's exit status when a selection holds no test (a module of only slow tests)
SELECT = ("-m", "not slow")  # what the default `tox` runs


@dataclass
class Run:
    what: str
    status: int
    seconds: float
    output: str

    @property
    def ok(self) -> bool:
        return self.status in (0, NO_TESTS)

    @property
    def summary(self) -> str:
        """pytest's closing line ("12 passed, 1 skipped in 3.2s")."""
        lines = [
            ln.strip("= ") for ln in self.output.splitlines() if re.search(r"\b(passed|failed|error|no tests ran)", ln)
        ]
        return lines[-1] if lines else "(no summary line)"

    @property
    def tail(self) -> str:
        return "\n".join(self.output.strip().splitlines()[-40:])


def modules() -> list[str]:
    return sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").rglob("test_*.py"))


def pytest(what: str, args: list[str]) -> Run:
    started = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=ROOT, capture_output=True, text=True
    )
    return Run(what, res.returncode, time.monotonic() - started, res.stdout + res.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seed", type=int, default=None, help="pytest-randomly's seed (default: a new one)")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--only-modules", action="store_true")
    only.add_argument("--only-random", action="store_true")
    parser.add_argument("pytest_args", nargs="*", help="passed to every pytest run (after --)")
    opts = parser.parse_args(argv)
    extra = [*SELECT, *opts.pytest_args]
    runs: list[Run] = []
    t0 = time.monotonic()

    if not opts.only_random:
        mods = modules()
        for i, mod in enumerate(mods, 1):
            run = pytest(mod, ["-q", "-p", "no:randomly", *extra, mod])
            runs.append(run)
            verdict = "ok" if run.ok else f"FAILED (exit {run.status})"
            print(f"[{i}/{len(mods)}] {mod} alone: {verdict}: {run.summary} ({run.seconds:.1f} s)", flush=True)
            if not run.ok:
                print(run.tail, flush=True)

    if not opts.only_modules:
        seed = opts.seed if opts.seed is not None else random.SystemRandom().randrange(1 << 32)
        print(f"the suite in random order: pytest -p randomly --randomly-seed={seed}", flush=True)
        run = pytest(f"suite, --randomly-seed={seed}", ["-q", "-p", "randomly", f"--randomly-seed={seed}", *extra])
        runs.append(run)
        verdict = "ok" if run.ok else f"FAILED (exit {run.status})"
        print(f"random order (seed {seed}): {verdict}: {run.summary} ({run.seconds:.1f} s)", flush=True)
        if not run.ok:
            print(run.tail, flush=True)

    failed = [r for r in runs if not r.ok]
    print(f"\n== isolation: {len(runs) - len(failed)} of {len(runs)} runs passed in {time.monotonic() - t0:.0f} s ==")
    for r in failed:
        print(f"FAILED: {r.what} (exit {r.status})")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
