"""Reliability of the real daemon: SIGKILLed daemons and VMMs, many concurrent clients, crash-safe configs.

Every test drives the real ``virtmshvd`` through real clients (``virsh``, libvirt-python) and checks
the outcome against the processes and files that actually exist, not only against what the daemon says.
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mshv_libvirt.domain import parse_domain_xml
from tests.support.daemon import (
    DaemonProcess,
    console_roundtrip,
    define,
    domain_xml,
    domstate,
    kill_pids,
    serial_log,
    virsh,
    vmm_processes,
    vmm_request,
    wait_for,
)
from tests.support.events import DomainEvents, ensure_event_loop
from tests.support.guests import TINY_BANNER
from tests.support.procfs import process_alive, process_gone
from tests.support.waits import assert_quiet, jitter

libvirt = pytest.importorskip("libvirt")

pytestmark = pytest.mark.virsh


# -- 1. daemon SIGKILL ----------------------------------------------------------------------------


def test_daemon_sigkill_reattaches_running_and_paused_domains(
    kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    for name in ("ka", "kb"):
        define(daemon, tmp_path, name, tiny_kernel)
        virsh(daemon.uri, "start", name)
    wait_for(lambda: TINY_BANNER in serial_log(daemon, "ka") and TINY_BANNER in serial_log(daemon, "kb"))
    virsh(daemon.uri, "suspend", "kb")
    pids = {name: daemon.vmm_pid(name) for name in ("ka", "kb")}
    ids = {name: virsh(daemon.uri, "domid", name).stdout.strip() for name in ("ka", "kb")}

    daemon.kill()
    try:
        assert_quiet(lambda: all(process_alive(p) for p in pids.values()), 0.3, "VMMs must survive the daemon")
        assert vmm_request(daemon, "ka", "status")["state"] == "running"
        assert vmm_request(daemon, "kb", "status")["state"] == "paused"

        daemon.start()
        assert domstate(daemon, "ka") == "running (booted)"
        assert domstate(daemon, "kb") == "paused (user)"
        assert {name: virsh(daemon.uri, "domid", name).stdout.strip() for name in ("ka", "kb")} == ids
        assert {name: daemon.vmm_pid(name) for name in ("ka", "kb")} == pids
        # a domain started now gets an id no re-attached domain has
        define(daemon, tmp_path, "kc", tiny_kernel)
        virsh(daemon.uri, "start", "kc")
        assert virsh(daemon.uri, "domid", "kc").stdout.strip() not in ids.values()
        virsh(daemon.uri, "destroy", "kc")

        console_roundtrip(daemon, "ka", b"AFTER-RESTART-A")
        virsh(daemon.uri, "resume", "kb")
        assert domstate(daemon, "kb") == "running (unpaused)"
        console_roundtrip(daemon, "kb", b"AFTER-RESTART-B")

        for name in ("ka", "kb"):
            virsh(daemon.uri, "destroy", name)
            assert domstate(daemon, name) == "shut off (destroyed)"
        wait_for(lambda: not any(process_alive(p) for p in pids.values()), timeout=10)
        assert daemon.runtime_leftovers() == []
        assert daemon.processes() == {}
    finally:
        kill_pids(list(pids.values()))


def test_domains_that_ended_while_the_daemon_was_dead(
    kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    names = ("gone-term", "gone-off", "gone-kill", "still")
    for name in names:
        define(daemon, tmp_path, name, tiny_kernel)
        virsh(daemon.uri, "start", name)
    wait_for(lambda: all(TINY_BANNER in serial_log(daemon, n) for n in names))
    pids = {name: daemon.vmm_pid(name) for name in names}
    pty = vmm_request(daemon, "gone-off", "status")["pty"]

    daemon.kill()
    try:
        os.kill(pids["gone-term"], signal.SIGTERM)  # the VMM writes exit reason "destroyed"
        fd = os.open(pty, os.O_RDWR | os.O_NOCTTY)
        try:
            os.write(fd, b"q")  # the guest powers off: exit reason "shutdown"
        finally:
            os.close(fd)
        os.kill(pids["gone-kill"], signal.SIGKILL)  # no exit report at all
        wait_for(lambda: not any(process_alive(pids[n]) for n in ("gone-term", "gone-off", "gone-kill")), timeout=15)

        daemon.start()
        assert domstate(daemon, "gone-term") == "shut off (destroyed)"
        assert domstate(daemon, "gone-off") == "shut off (shutdown)"
        assert domstate(daemon, "gone-kill") == "shut off (crashed)"
        assert domstate(daemon, "still") == "running (booted)"
        for name in ("gone-term", "gone-off", "gone-kill"):
            assert daemon.stale_runtime(name) == []
        # and they can be started again
        virsh(daemon.uri, "start", "gone-off")
        wait_for(lambda: serial_log(daemon, "gone-off").count(TINY_BANNER) == 2)
        for name in ("gone-off", "still"):
            virsh(daemon.uri, "destroy", name)
        assert daemon.runtime_leftovers() == []
    finally:
        kill_pids(list(pids.values()))


# -- 2. VMM SIGKILL --------------------------------------------------------------------------------


def test_vmm_sigkill_is_a_crash(kvm: None, daemon: DaemonProcess, tiny_kernel: Path) -> None:
    ensure_event_loop()  # before the connection opens, as libvirt requires
    conn = libvirt.open(daemon.uri)
    events = DomainEvents(conn)
    try:
        dom = conn.defineXML(domain_xml("vk", tiny_kernel))
        dom.create()
        wait_for(lambda: TINY_BANNER in serial_log(daemon, "vk"))
        pid = daemon.vmm_pid("vk")
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF, timeout=10)
        assert dom.state() == [libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_CRASHED]
        assert domstate(daemon, "vk") == "shut off (crashed)"
        stopped = ("vk", libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED)
        wait_for(lambda: stopped in events.seen, timeout=5)
        assert events.seen[-1] == stopped
        assert daemon.stale_runtime("vk") == []
        assert process_gone(pid)

        dom.create()
        wait_for(lambda: serial_log(daemon, "vk").count(TINY_BANNER) == 2)
        assert dom.state() == [libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_BOOTED]
        dom.destroy()
        assert daemon.stale_runtime("vk") == []
    finally:
        events.close()
        conn.close()


# -- 3. many concurrent clients ---------------------------------------------------------------------

CONCURRENT_CLIENTS = 32
CONCURRENT_SECONDS = float(os.environ.get("MSHV_LIBVIRT_CONCURRENCY_SECONDS", "20"))
SHARED_DOMAINS = {f"cc{i}": f"3b9d6c1e-0000-4000-8000-00000000000{i}" for i in range(4)}
EXPECTED_CODES = {"VIR_ERR_OPERATION_INVALID", "VIR_ERR_NO_DOMAIN"}


def _code_name(code: int) -> str:
    for name in dir(libvirt):
        if name.startswith("VIR_ERR_") and getattr(libvirt, name) == code:
            return str(name)
    return f"code {code}"


def test_concurrent_clients(kvm: None, daemon: DaemonProcess, tiny_kernel: Path) -> None:
    xmls = {name: domain_xml(name, tiny_kernel, uuid=uuid, memory_mib=32) for name, uuid in SHARED_DOMAINS.items()}
    setup = libvirt.open(daemon.uri)
    for xml in xmls.values():
        setup.defineXML(xml)
    setup.close()

    ops = ("start", "suspend", "resume", "destroy", "define", "undefine", "state")
    weights = (4, 2, 2, 3, 2, 1, 2)
    counts: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    unexpected: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + CONCURRENT_SECONDS
    finished: list[int] = []

    def client(idx: int) -> None:
        rng = random.Random(idx)
        conn = libvirt.open(daemon.uri)
        try:
            while time.monotonic() < deadline:
                name = rng.choice(list(xmls))
                op = rng.choices(ops, weights)[0]
                try:
                    if op == "define":
                        conn.defineXML(xmls[name])
                    else:
                        dom = conn.lookupByName(name)
                        if op == "start":
                            dom.create()
                        elif op == "state":
                            dom.state()
                        else:
                            getattr(dom, op)()
                    outcome = "ok"
                except libvirt.libvirtError as err:
                    outcome = _code_name(err.get_error_code())
                    if outcome not in EXPECTED_CODES:
                        with lock:
                            unexpected.append(f"{op} {name}: {outcome}: {err}")
                with lock:
                    counts[op] += 1
                    errors[outcome] += 1
        except Exception as err:
            with lock:
                unexpected.append(f"client {idx} died: {type(err).__name__}: {err}")
        finally:
            conn.close()
            with lock:
                finished.append(idx)

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CONCURRENT_CLIENTS)]
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # expected errors: do not print each one
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=max(1.0, deadline - time.monotonic()) + 60)
    finally:
        libvirt.registerErrorHandler(None, None)
    elapsed = time.monotonic() - started
    hung = CONCURRENT_CLIENTS - len(finished)

    t0 = time.monotonic()
    listing = virsh(daemon.uri, "list", "--all", "--name", timeout=10).stdout.split()
    list_latency = time.monotonic() - t0

    # What the daemon says against what exists: processes, runtime files and config files.
    conn = libvirt.open(daemon.uri)
    inconsistent: list[str] = []
    live = vmm_processes(daemon.run_dir)
    persistent_names = {d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_PERSISTENT)}
    final_states: dict[str, str] = {}
    for name in xmls:
        try:
            state = conn.lookupByName(name).state()[0]
        except libvirt.libvirtError as err:
            assert err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN
            state = None
        final_states[name] = "undefined" if state is None else {1: "running", 3: "paused", 5: "shut off"}[state]
        active = state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED)
        recorded = daemon.try_vmm_pid(name)
        if active != (name in live):
            inconsistent.append(f"{name}: reported {final_states[name]} but VMM process {live.get(name)}")
        if active and recorded != live.get(name):
            inconsistent.append(f"{name}: pidfile {recorded} but VMM process {live.get(name)}")
        if active and name not in daemon.records():
            inconsistent.append(f"{name}: running without a runtime record")
        if not active and daemon.stale_runtime(name):
            inconsistent.append(f"{name}: stale runtime files {daemon.stale_runtime(name)}")
        if state is not None and name not in listing:
            inconsistent.append(f"{name}: not in virsh list")
        has_file = daemon.config_file(name).exists()
        if has_file != (name in persistent_names):
            inconsistent.append(f"{name}: config file {has_file} but persistent {name in persistent_names}")
    for leaked in set(live) - set(xmls):
        inconsistent.append(f"unexpected VMM {leaked}")
    for path in daemon.config_dir.glob("*.xml"):
        cfg = parse_domain_xml(path.read_text())
        assert cfg.name == path.stem and str(cfg.uuid) == SHARED_DOMAINS[cfg.name]
    for dom in conn.listAllDomains():
        if dom.isActive():
            dom.destroy()
    conn.close()

    report = {
        "clients": CONCURRENT_CLIENTS,
        "seconds": round(elapsed, 2),
        "ops": sum(counts.values()),
        "ops_per_second": round(sum(counts.values()) / elapsed, 1),
        "ops_by_kind": dict(counts),
        "outcomes": dict(errors),
        "unexpected_errors": unexpected[:50],
        "hung_clients": hung,
        "final_list_latency_s": round(list_latency, 3),
        "final_states": final_states,
        "domains_lost": len(inconsistent),
        "inconsistencies": inconsistent,
    }
    text = json.dumps(report, indent=2, sort_keys=True)
    print(text)
    report_dir = os.environ.get("MSHV_LIBVIRT_REPORT_DIR")
    if report_dir:
        Path(report_dir).mkdir(parents=True, exist_ok=True)
        (Path(report_dir) / "concurrency.json").write_text(text + "\n")

    assert hung == 0, "clients did not finish (deadlock?)"
    assert unexpected == []
    assert inconsistent == []
    assert counts["start"] > 0 and errors["ok"] > 0


# -- 4. crash-safe define against the real daemon -------------------------------------------------

DEFINE_UUID = "8c3f1a9e-5b2d-4e7f-a1c0-9d8e7f6a5b4c"

DEFINER = r"""
import sys, libvirt
uri, a, b = sys.argv[1], open(sys.argv[2]).read(), open(sys.argv[3]).read()
libvirt.registerErrorHandler(lambda *_: None, None)
conn = libvirt.open(uri)
print("ready", flush=True)
i = 0
try:
    while True:
        conn.defineXML(a if i % 2 == 0 else b)
        i += 1
except libvirt.libvirtError:
    pass
print(i, flush=True)
"""


def test_daemon_sigkill_during_define_keeps_old_or_new_config(daemon: DaemonProcess, tmp_path: Path) -> None:
    a_file, b_file = tmp_path / "a.xml", tmp_path / "b.xml"
    a_file.write_text(domain_xml("def1", Path("/boot/a"), uuid=DEFINE_UUID, memory_mib=64, vcpus=1))
    b_file.write_text(domain_xml("def1", Path("/boot/b"), uuid=DEFINE_UUID, memory_mib=128, vcpus=2))
    want = {parse_domain_xml(a_file.read_text()).xml, parse_domain_xml(b_file.read_text()).xml}
    virsh(daemon.uri, "define", str(a_file))
    rng = random.Random(99)
    defines = 0
    seen = set()
    for _ in range(10):
        client = subprocess.Popen(
            [sys.executable, "-c", DEFINER, daemon.uri, str(a_file), str(b_file)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert client.stdout is not None
            assert client.stdout.readline().strip() == "ready"
            jitter(rng, 0.02, 0.25)
            daemon.kill()
            out = client.communicate(timeout=20)[0].strip()
            defines += int(out or 0)
        finally:
            client.kill()
            client.wait()
        on_disk = daemon.config_file("def1").read_text()
        assert parse_domain_xml(on_disk).xml in want
        daemon.start()
        xml = virsh(daemon.uri, "dumpxml", "--inactive", "def1").stdout
        cfg = parse_domain_xml(xml)
        assert cfg.xml in want
        seen.add(cfg.current_memory_kib)
        assert virsh(daemon.uri, "list", "--all", "--name").stdout.split() == ["def1"]
        assert not list(daemon.config_dir.glob(".tmp-*"))
    print(f"defines issued across 10 daemon kills: {defines}; configs seen after restart (KiB): {sorted(seen)}")
    assert defines > 10


def test_daemon_sigkill_during_start_leaves_no_unmanaged_vmm(
    kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    """Killed at any point of ``virsh start``: afterwards the domain is running with its VMM, or off without one."""
    define(daemon, tmp_path, "ks", tiny_kernel)
    rng = random.Random(7)
    outcomes: collections.Counter[str] = collections.Counter()
    for _ in range(8):
        client = subprocess.Popen(
            ["virsh", "-c", daemon.uri, "start", "ks"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        jitter(rng, 0.0, 0.3)
        daemon.kill()
        client.wait(timeout=20)
        daemon.start()
        state = domstate(daemon, "ks")
        live = vmm_processes(daemon.run_dir)
        outcomes[state] += 1
        if state == "running (booted)":
            assert live == {"ks": daemon.vmm_pid("ks")}
            virsh(daemon.uri, "destroy", "ks")
        else:
            assert state.startswith("shut off"), state
            assert live == {}
        assert daemon.stale_runtime("ks") == []
        assert daemon.runtime_leftovers() == []
    print("state after a daemon kill during start:", dict(outcomes))

    # The narrowest window, made deterministic: the VMM exists but neither its runtime record nor
    # its pidfile was written yet when the daemon died. It is found by its command line and stopped.
    virsh(daemon.uri, "start", "ks")
    pid = daemon.vmm_pid("ks")
    daemon.kill()
    runtime = daemon.runtime_dir("ks")
    for f in ("record.json", "vmm.pid"):
        (runtime / f).unlink()
    daemon.start()
    assert domstate(daemon, "ks").startswith("shut off")
    assert process_gone(pid) and vmm_processes(daemon.run_dir) == {}
    assert daemon.runtime_leftovers() == []
    virsh(daemon.uri, "start", "ks")  # and it starts normally afterwards
    virsh(daemon.uri, "destroy", "ks")
