#!/usr/bin/env python3
"""The attribute bomb of issue 19 item 5: what RelaxNG validation costs unbounded, and what a define costs now.

1. The validator alone (what every define, config edit and daemon start ran before the bounds): libxml2's
   RelaxNG validation of one <metadata> element with N attributes against libvirt's schema and ours, each
   N in a fresh process so its peak memory (VmHWM) is its own. Time and memory grow with N^2; the
   quadratic fit is extrapolated to the 30 000 attributes of the issue (``--full`` measures it: about a
   minute and several GiB).
2. The daemon now: a real virtmshvd receives the 30 000-attribute define from libvirt-python (refused by
   the attribute bound before any validator runs) and the worst document the bounds let through; the time
   of each, the daemon's peak memory growth, and the longest getVersion another client waited meanwhile.

    python3 benchmarks/xml_bomb.py [--full]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import libvirt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mshv_libvirt.domain import MAX_ATTRIBUTES, MAX_ELEMENTS  # noqa: E402
from mshv_libvirt.domain import xml as domain_xml  # noqa: E402

BASE = (
    "<domain type='hyperv'><name>{name}</name>{body}<memory>65536</memory>"
    "<os><type>hvm</type><kernel>/k</kernel></os></domain>"
)


def bomb(attributes: int) -> str:
    attrs = " ".join(f"attr{i:05d}='v'" for i in range(attributes))
    return BASE.format(name="bomb", body=f"<metadata><b:x xmlns:b='urn:bomb' {attrs}/></metadata>")


def worst_within_bounds() -> str:
    inner = "<m:c a='1'/>t" * (MAX_ELEMENTS - 8)
    return BASE.format(name="worst", body=f"<metadata><m:app xmlns:m='urn:m'>{inner}</m:app></metadata>")


_CHILD = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[3])
from mshv_libvirt.domain import xml as X
root = X._parse_safely(open(sys.argv[1]).read())
path = X.LIBVIRT_DOMAIN_SCHEMA if sys.argv[2] == "libvirt" else X._own_schema_path()
X._compile_schema(path)
hwm0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
try:
    X._validate(root, path)
except Exception:
    pass
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - hwm0
print(json.dumps({"s": time.perf_counter() - t, "peak_growth_kib": grown}))
"""


def validator_alone(attributes: int, schema: str, tmp: Path) -> dict[str, float]:
    doc = tmp / f"bomb-{attributes}.xml"
    doc.write_text(bomb(attributes))
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(doc), schema, str(ROOT)], check=True, capture_output=True, text=True
    )
    return dict(json.loads(out.stdout))


def fit_quadratic(points: list[tuple[int, float]], x: int) -> float:
    """Least squares y = a*n^2 (the dominant term), evaluated at x."""
    a = sum(y * n * n for n, y in points) / sum(n**4 for n, _ in points)
    return a * x * x


@contextmanager
def virtmshvd(tmp: Path) -> Iterator[tuple[str, int]]:
    sock = tmp / "sock"
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "mshv_libvirt.daemon", "--session", "--socket", str(sock)),
            *("--config-dir", str(tmp / "etc"), "--run-dir", str(tmp / "run")),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("virtmshvd did not start")
            time.sleep(0.05)
        yield f"mshv+unix:///system?socket={sock}", proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def define_while_polling(uri: str, xml: str) -> tuple[float, str, float]:
    """(seconds for the define, its outcome, longest getVersion of another client meanwhile)."""
    result: dict[str, object] = {}

    def run() -> None:
        conn = libvirt.open(uri)
        started = time.perf_counter()
        try:
            conn.defineXML(xml)
            result["outcome"] = "accepted"
        except libvirt.libvirtError as e:
            result["outcome"] = e.get_error_message()
        result["s"] = time.perf_counter() - started
        conn.close()

    other = libvirt.open(uri)
    worker = threading.Thread(target=run)
    worker.start()
    worst = 0.0
    while worker.is_alive():
        t = time.perf_counter()
        other.getVersion()
        worst = max(worst, time.perf_counter() - t)
    worker.join()
    other.close()
    return float(result["s"]), str(result["outcome"]), worst  # type: ignore[arg-type]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="also validate 30 000 attributes (about a minute, GiBs)")
    args = ap.parse_args()
    libvirt.registerErrorHandler(lambda *_: None, None)
    sizes = [1000, 2000, 4000, 8000] + ([30_000] if args.full else [])
    with tempfile.TemporaryDirectory(prefix="mshv-xml-bomb-") as t:
        tmp = Path(t)
        print("1. the RelaxNG validator alone, one element with N attributes (each in a fresh process)")
        print(f"{'N':>7} {'schema':>8} {'seconds':>9} {'peak growth MiB':>16}")
        for schema in ("libvirt", "ours"):
            if schema == "libvirt" and not domain_xml.LIBVIRT_DOMAIN_SCHEMA.is_file():
                continue
            points_s, points_m = [], []
            for n in sizes:
                r = validator_alone(n, schema, tmp)
                points_s.append((n, r["s"]))
                points_m.append((n, r["peak_growth_kib"] / 1024))
                print(f"{n:>7} {schema:>8} {r['s']:>9.2f} {r['peak_growth_kib'] / 1024:>16.0f}")
            if not args.full:
                est_s, est_m = fit_quadratic(points_s, 30_000), fit_quadratic(points_m, 30_000)
                print(f"{30_000:>7} {schema:>8} {est_s:>9.1f} {est_m:>16.0f}   (a*N^2 fit, extrapolated)")
        print()
        print(f"2. virtmshvd now (bounds: {MAX_ELEMENTS} elements, {MAX_ATTRIBUTES} attributes per element)")
        with virtmshvd(tmp / "d") as (uri, pid):
            hwm = status_kib(pid, "VmHWM")
            for label, xml in (("30 000 attributes", bomb(30_000)), ("worst within bounds", worst_within_bounds())):
                seconds, outcome, waited = define_while_polling(uri, xml)
                grown = status_kib(pid, "VmHWM") - hwm
                print(f"{label}: {len(xml)} bytes, define {seconds:.3f} s ({outcome[:60]}),")
                print(f"    daemon peak memory +{grown / 1024:.1f} MiB,", end=" ")
                print(f"another client's getVersion waited <= {waited * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
