#!/usr/bin/env python3
"""RPC speed: libvirt-python against virtmshvd vs. against Debian's libvirtd serving test:///default.

Both peers are measured in the same run with the same client library, the same number of
defined domains (1000 by default) and the same call mix:

* ``dom.info()`` calls per second on one domain (one RPC round trip each);
* ``conn.listAllDomains()`` latency (median and p95) with every domain defined.

Ratios are printed as virtmshvd / libvirtd (for calls/s higher is better, for latency lower is
better). libvirtd runs as a session daemon of user ``nobody`` (as root it insists on its QEMU
driver), so this script needs root and Debian's ``libvirt-daemon`` package:

    apt-get install --no-install-recommends libvirt-daemon
    python3 benchmarks/rpc_bench.py [--domains 1000] [--seconds 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import libvirt

ROOT = Path(__file__).resolve().parent.parent


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with status {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"{path} did not appear within {timeout}s")


@contextmanager
def libvirtd_test_driver(tmp: Path) -> Iterator[str]:
    """A session libvirtd owned by 'nobody'; yields the test+unix URI."""
    if not shutil.which("libvirtd"):
        sys.exit("libvirtd not found: apt-get install --no-install-recommends libvirt-daemon")
    base = tmp / "libvirtd"
    for sub in ("run", "cfg", "cache", "home"):
        (base / sub).mkdir(parents=True)
    shutil.chown(base, "nobody")
    for entry in base.iterdir():
        shutil.chown(entry, "nobody")
    (base / "run").chmod(0o700)
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(base / "home"),
        "XDG_RUNTIME_DIR": str(base / "run"),
        "XDG_CONFIG_HOME": str(base / "cfg"),
        "XDG_CACHE_HOME": str(base / "cache"),
    }
    proc = subprocess.Popen(
        ["runuser", "-u", "nobody", "--", "libvirtd"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sock = base / "run" / "libvirt" / "libvirt-sock"
    try:
        _wait_for_socket(sock, proc)
        yield f"test+unix:///default?socket={sock}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextmanager
def virtmshvd(tmp: Path) -> Iterator[str]:
    base = tmp / "virtmshvd"
    sock = base / "sock"
    (base / "etc").mkdir(parents=True)
    (base / "run").mkdir()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mshv_libvirt.daemon",
            "--socket",
            str(sock),
            "--config-dir",
            str(base / "etc"),
            "--run-dir",
            str(base / "run"),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_socket(sock, proc)
        yield f"mshv+unix:///system?socket={sock}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def domain_xml(kind: str, i: int, kernel: str) -> str:
    name = f"bench{i:05d}"
    if kind == "test":
        return (
            f"<domain type='test'><name>{name}</name><uuid>{uuid.uuid4()}</uuid>"
            "<memory unit='MiB'>64</memory><vcpu>1</vcpu><os><type>hvm</type></os></domain>"
        )
    return (
        f"<domain type='hyperv'><name>{name}</name><uuid>{uuid.uuid4()}</uuid>"
        "<memory unit='MiB'>64</memory><vcpu>1</vcpu>"
        f"<os><type arch='x86_64'>hvm</type><kernel>{kernel}</kernel></os></domain>"
    )


def measure(uri: str, kind: str, domains: int, seconds: float, kernel: str) -> dict[str, float]:
    conn = libvirt.open(uri)
    try:
        for i in range(domains):
            conn.defineXML(domain_xml(kind, i, kernel))
        dom = conn.lookupByName("bench00000")

        calls = 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            dom.info()
            calls += 1
        info_rate = calls / (time.perf_counter() - start)

        latencies: list[float] = []
        listed = 0
        for _ in range(30):
            t0 = time.perf_counter()
            listed = len(conn.listAllDomains(0))
            latencies.append(time.perf_counter() - t0)
        if listed < domains:
            raise RuntimeError(f"{uri}: listAllDomains returned {listed} < {domains}")
        latencies.sort()
        return {
            "info_per_s": info_rate,
            "list_median_ms": statistics.median(latencies) * 1e3,
            "list_p95_ms": latencies[int(len(latencies) * 0.95) - 1] * 1e3,
            "listed": float(listed),
        }
    finally:
        conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domains", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the libvirtd peer is started as user 'nobody'")

    with tempfile.TemporaryDirectory(prefix="mshv-rpc-bench-") as t:
        tmp = Path(t)
        tmp.chmod(0o755)
        kernel = tmp / "vmlinuz"
        kernel.write_bytes(b"\0" * 4096)  # defining needs a path; nothing is started
        results: dict[str, dict[str, float]] = {}
        runs: list[tuple[str, str, Callable[[Path], object]]] = [
            ("virtmshvd", "hyperv", virtmshvd),
            ("libvirtd test:///default", "test", libvirtd_test_driver),
        ]
        for label, kind, server in runs:
            with server(tmp) as uri:  # type: ignore[attr-defined]
                results[label] = measure(uri, kind, args.domains, args.seconds, str(kernel))

    ours, peer = results["virtmshvd"], results["libvirtd test:///default"]
    print(f"domains defined: {args.domains}")
    print(f"{'metric':<28}{'virtmshvd':>14}{'libvirtd test':>16}{'ratio':>10}")
    for key, label in (
        ("info_per_s", "dom.info() calls/s"),
        ("list_median_ms", "listAllDomains median ms"),
        ("list_p95_ms", "listAllDomains p95 ms"),
    ):
        print(f"{label:<28}{ours[key]:>14.2f}{peer[key]:>16.2f}{ours[key] / peer[key]:>10.2f}")


if __name__ == "__main__":
    main()
