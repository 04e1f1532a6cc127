"""Many tiny guests on one daemon (issue 15 §2; the timings are benchmarks/density.py's, these are counts):
20 starts at once from 20 libvirt-python clients all succeed, each guest reaches its banner in a VMM of its
own, and 20 destroys at once leave no process, runtime file or daemon descriptor behind (the tests' /proc
oracle); ``getAllDomainStats`` asks running domains' VMMs in parallel, never more than
``limits.STATS_QUERIES`` at once, and a domain without disks or interfaces not at all. The queries are
counted where they wait: in the socket receive queues of VMMs the test has stopped (SIGSTOP)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import limits
from tests.support.daemon import DaemonProcess, domain_xml, serial_log, virsh, vmm_processes, wait_for
from tests.support.disks import disk_xml, document
from tests.support.guests import TINY_BANNER, TINY_IRQ_FLAG
from tests.support.procfs import open_sockets, unread_socket_bytes
from tests.support.waits import assert_quiet

libvirt = pytest.importorskip("libvirt")

pytestmark = pytest.mark.virsh

GUESTS = 20
MEMORY_MIB = 16
CMDLINE = f"console=ttyS0 {TINY_IRQ_FLAG}"  # idle in hlt: 20 polling guests would fill this host's CPUs


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def all_at_once(calls: list[Callable[[], object]]) -> list[BaseException]:
    """Run ``calls`` on a thread each, released together; the exceptions they raised."""
    barrier = threading.Barrier(len(calls))
    errors: list[BaseException] = []

    def run(call: Callable[[], object]) -> None:
        barrier.wait()
        try:
            call()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=run, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


@pytest.fixture
def clients(daemon: DaemonProcess) -> Iterator[list[Any]]:
    """One libvirt-python connection per guest, as many clients as ``virsh start`` processes would be."""
    conns = [libvirt.open(daemon.uri) for _ in range(GUESTS)]
    yield conns
    for c in conns:
        c.close()


def test_twenty_starts_at_once_all_run_and_twenty_destroys_leave_nothing(
    kvm: None, daemon: DaemonProcess, clients: list[Any], tiny_kernel: Path
) -> None:
    names = [f"dense{i:02d}" for i in range(GUESTS)]
    for name in names:
        clients[0].defineXML(domain_xml(name, tiny_kernel, memory_mib=MEMORY_MIB, cmdline=CMDLINE))
    fds, sockets = open_fds(daemon.pid), open_sockets(daemon.pid)
    doms = [c.lookupByName(n) for c, n in zip(clients, names, strict=True)]

    assert all_at_once([d.create for d in doms]) == []
    wait_for(
        lambda: all(TINY_BANNER in serial_log(daemon, n) for n in names),
        60,
        what=lambda: [n for n in names if TINY_BANNER not in serial_log(daemon, n)],
    )
    vmms = vmm_processes(daemon.run_dir)
    assert sorted(vmms) == names and len(set(vmms.values())) == GUESTS
    assert len({d.ID() for d in doms}) == GUESTS
    listed = virsh(daemon.uri, "list", "--name").stdout.split()
    assert sorted(listed) == names

    assert all_at_once([d.destroy for d in doms]) == []
    assert virsh(daemon.uri, "list", "--name").stdout.split() == []
    wait_for(lambda: not daemon.processes(), 30, what=lambda: daemon.processes())
    assert daemon.runtime_leftovers() == []
    # Each start's descriptors (console pty, control connection, pidfd, the VMM's own files) were closed.
    wait_for(lambda: open_fds(daemon.pid) == fds, 10, what=lambda: f"{open_fds(daemon.pid)} fds, {fds} before")
    assert open_sockets(daemon.pid) == sockets


def waiting_queries(pids: dict[str, int]) -> int:
    """How many of the (stopped) VMMs have a request waiting unread."""
    return sum(1 for pid in pids.values() if unread_socket_bytes(pid) > 0)


class StatsCall:
    """``getAllDomainStats`` on a thread of its own: it waits for VMMs the test has stopped."""

    def __init__(self, conn: Any, stats: int) -> None:
        self.result: list[tuple[Any, dict[str, Any]]] | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(conn, stats))
        self._thread.start()

    def _run(self, conn: Any, stats: int) -> None:
        try:
            self.result = conn.getAllDomainStats(stats)
        except BaseException as err:
            self.error = err

    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self) -> list[tuple[Any, dict[str, Any]]]:
        self._thread.join(60)
        assert not self._thread.is_alive(), "getAllDomainStats did not return"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def process_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def stopped(pids: dict[str, int]) -> None:
    for pid in pids.values():
        os.kill(pid, signal.SIGSTOP)
    wait_for(lambda: all(process_state(p) == "T" for p in pids.values()), what="the VMMs stopped")


def resumed(pids: dict[str, int]) -> None:
    for pid in pids.values():
        os.kill(pid, signal.SIGCONT)


def test_domstats_asks_the_vmms_of_running_disks_in_parallel_at_most_the_bound_at_once(
    kvm: None, daemon: DaemonProcess, conn: Any, tiny_kernel: Path, tmp_path: Path
) -> None:
    count = limits.STATS_QUERIES + 2
    image = tmp_path / "shared.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(image), "1M"], check=True, timeout=30)
    names = [f"stats{i:02d}" for i in range(count)]
    for name in names:  # one read-only image for all: each start opens it without a lock conflict
        conn.defineXML(document(name, tiny_kernel, disk_xml(image, readonly=True))).create()
    wait_for(lambda: all(TINY_BANNER in serial_log(daemon, n) for n in names), 60)
    pids = vmm_processes(daemon.run_dir)
    assert sorted(pids) == names
    assert waiting_queries(pids) == 0

    stopped(pids)
    try:
        call = StatsCall(conn, libvirt.VIR_DOMAIN_STATS_BLOCK)
        # One VMM after another would be 1 waiting; one task per domain would be all of them.
        wait_for(lambda: waiting_queries(pids) >= limits.STATS_QUERIES, 30, what=lambda: waiting_queries(pids))
        assert_quiet(
            lambda: waiting_queries(pids) == limits.STATS_QUERIES and not call.done(),
            1.0,
            "no query beyond the bound is sent while the first ones wait (1 s: dozens of event loop turns)",
        )
    finally:
        resumed(pids)
    records = {dom.name(): stats for dom, stats in call.join()}
    assert sorted(records) == names
    for stats in records.values():
        assert stats["block.count"] == 1 and stats["block.0.path"] == str(image)
        assert "block.0.capacity" in stats  # answered by the VMM's disk backend, not left out
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        dom.destroy()


def test_domstats_of_domains_without_disks_or_interfaces_asks_no_vmm(
    kvm: None, daemon: DaemonProcess, conn: Any, tiny_kernel: Path
) -> None:
    names = [f"bare{i}" for i in range(3)]
    for name in names:
        conn.defineXML(domain_xml(name, tiny_kernel, memory_mib=MEMORY_MIB, cmdline=CMDLINE)).create()
    wait_for(lambda: all(TINY_BANNER in serial_log(daemon, n) for n in names), 60)
    pids = vmm_processes(daemon.run_dir)
    stopped(pids)
    try:
        call = StatsCall(conn, 0)  # every group
        # A query would wait in a stopped VMM (until the daemon's 30 s request timeout): none is sent.
        wait_for(call.done, 20, what=lambda: f"{waiting_queries(pids)} stopped VMMs have a query waiting")
        assert waiting_queries(pids) == 0
    finally:
        resumed(pids)
    records = {dom.name(): stats for dom, stats in call.join()}
    assert sorted(records) == names
    for stats in records.values():
        assert stats["state.state"] == libvirt.VIR_DOMAIN_RUNNING
        assert stats["net.count"] == 0 and stats["block.count"] == 0
        assert stats["cpu.time"] > 0
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        dom.destroy()
