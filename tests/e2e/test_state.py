"""The daemon's on-disk state through the real clients (issue 19 items 1, 2, 10, 11).

Names that look like temporaries or like another domain's files, names at the length limit, and
queries racing a transient ``createXML``. (Migration of the old layout: test_migration.py; the daemon's
process life, pid file lock included: test_daemon_life.py.)
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt
import pytest

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
    wait_for,
)
from tests.support.guests import TINY_BANNER
from tests.support.limits import MAX_ESCAPED_NAME_BYTES
from tests.support.report import write_report

pytestmark = pytest.mark.virsh


# -- items 1 and 2: names like temporaries, names like another domain's files ------------------------


def test_names_like_temporaries_and_other_files_survive_restarts(
    kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    """The issue's reproductions: `.tmp-victim` (defined and running), `.tmp-a.b.1.2.3`, `x.vmm` running
    while `x` is started and destroyed, `x` and `x.serial` running side by side; two restarts each."""
    running = [".tmp-victim", "x.vmm", "x.serial", "x"]
    defined = [".tmp-a.b.1.2.3", "a%41", "%2Etmp-victim"]
    for name in running + defined:
        define(daemon, tmp_path, name, tiny_kernel, cmdline=f"console=ttyS0 who={name}")
    for name in running:
        virsh(daemon.uri, "start", "--domain", name)
    wait_for(lambda: all(f"who={n}" in serial_log(daemon, n) for n in running))
    # Each guest's serial log is its own (x's is not x.serial's VMM log, nor the other way round).
    for name in running:
        assert re.findall(r"who=(\S+)", serial_log(daemon, name)) == [name]
    virsh(daemon.uri, "destroy", "--domain", "x")
    virsh(daemon.uri, "start", "--domain", "x")
    virsh(daemon.uri, "destroy", "--domain", "x")
    running.remove("x")
    pids = {name: daemon.vmm_pid(name) for name in running}
    assert vmm_processes(daemon.run_dir) == pids
    try:
        for restart in (daemon.stop, daemon.kill):
            restart()
            daemon.start()
            assert sorted(virsh(daemon.uri, "list", "--all", "--name").stdout.split()) == sorted(
                running + defined + ["x"]
            )
            for name in running:
                assert domstate(daemon, name) == "running (booted)", name
            for name in [*defined, "x"]:
                assert domstate(daemon, name).startswith("shut off"), name
            assert vmm_processes(daemon.run_dir) == pids  # no guest was killed, none added
        for i, name in enumerate(running):
            console_roundtrip(daemon, name, f"ECHO-{i}".encode())  # (lower case letters are guest commands)
            virsh(daemon.uri, "destroy", "--domain", name)
        assert vmm_processes(daemon.run_dir) == {}
        assert daemon.runtime_leftovers() == []
        # Nothing on disk looks like a temporary: the next start sweeps nothing of ours.
        assert not [p for p in daemon.config_dir.iterdir() if p.name.startswith(".")]
        daemon.stop()
        daemon.start()
        assert len(virsh(daemon.uri, "list", "--all", "--name").stdout.split()) == len(running + defined) + 1
        write_report(
            "names_like_files",
            {"names": len(running + defined) + 1, "running": len(running), "restarts_intact": 3, "domains_lost": 0},
        )
    finally:
        kill_pids(pids.values())


def test_run_dir_spelled_differently_keeps_running_vms(
    kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    """Records keep the run dir's spelling of the daemon that wrote them; a daemon given another one
    (a symlink, a relative path) must still re-attach, and remove nothing of a running VM."""
    define(daemon, tmp_path, "sp", tiny_kernel)
    virsh(daemon.uri, "start", "sp")
    wait_for(lambda: TINY_BANNER in serial_log(daemon, "sp"))
    pid = daemon.vmm_pid("sp")
    (tmp_path / "link").symlink_to(daemon.run_dir)
    try:
        for spelling in (str(tmp_path / "link"), os.path.relpath(daemon.run_dir)):
            daemon.stop()
            daemon.run_dir_arg = spelling
            daemon.start()
            assert domstate(daemon, "sp") == "running (booted)"
            assert daemon.vmm_pid("sp") == pid and vmm_processes(daemon.run_dir) == {"sp": pid}
            console_roundtrip(daemon, "sp", b"SPELLING-OK")
        virsh(daemon.uri, "destroy", "sp")
        assert daemon.runtime_leftovers() == []
    finally:
        kill_pids([pid])


# -- item 10: every name define accepts starts -------------------------------------------------------

LIMIT = MAX_ESCAPED_NAME_BYTES  # docs/DAEMON.md "On-disk layout", stated in tests/support/limits.py


def limit_names() -> list[str]:
    return [
        "n" * LIMIT,  # 240 plain bytes
        "é" * (LIMIT // 2),  # multi-byte
        "%" * (LIMIT // 3),  # every character escaped
        "." + "d" * (LIMIT - 3),  # a leading dot is escaped
        "\t" + "x" * (LIMIT - 3),  # control character
    ]


def test_names_at_the_length_limit_define_and_start(
    kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    names = limit_names()
    conn = libvirt.open(daemon.uri)
    try:
        for name in names:
            dom = conn.defineXML(domain_xml(name.replace("\t", "&#9;"), tiny_kernel, memory_mib=32))
            assert dom.name() == name
        for name in names:
            conn.lookupByName(name).create()
        wait_for(lambda: all(TINY_BANNER in serial_log(daemon, n) for n in names))
        for name in names:
            assert conn.lookupByName(name).state() == [libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_BOOTED]
        # virsh too (the longest plain name, by name on the command line)
        assert domstate(daemon, names[0]) == "running (booted)"
        console_roundtrip(daemon, names[0], b"LONG-NAME-ECHO")
        daemon.stop()
        daemon.start()
        conn.close()
        conn = libvirt.open(daemon.uri)
        assert sorted(d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)) == sorted(names)
        for name in names:
            conn.lookupByName(name).destroy()
        assert vmm_processes(daemon.run_dir) == {}

        # One byte past the limit: refused by define and by createXML, with the limit in the message.
        for name in ("n" * (LIMIT + 1), "é" * (LIMIT // 2) + "e", "%" * (LIMIT // 3 + 1)):
            for call in (conn.defineXML, lambda x: conn.createXML(x, 0)):
                with pytest.raises(libvirt.libvirtError) as err:
                    call(domain_xml(name, tiny_kernel, memory_mib=32))
                assert err.value.get_error_code() == libvirt.VIR_ERR_CONFIG_UNSUPPORTED
                assert f"at most {LIMIT}" in err.value.get_error_message()
        assert sorted(d.name() for d in conn.listAllDomains()) == sorted(names)
        write_report("names_at_length_limit", {"started_and_kept_across_restart": len(names), "refused_past_limit": 6})
    finally:
        conn.close()


# -- item 11: queries during a transient createXML --------------------------------------------------

RACE_SECONDS = 10.0


def test_queries_during_transient_create_answer(kvm: None, daemon: DaemonProcess, tiny_kernel: Path) -> None:
    """8 clients: one creates and destroys a transient domain in a loop, seven query it meanwhile.

    A query either finds no domain (VIR_ERR_NO_DOMAIN) or gets its answer; no call ever fails with an
    internal error, and no error message is empty.
    """
    xml = domain_xml("trq", tiny_kernel, memory_mib=32)
    deadline = time.monotonic() + RACE_SECONDS
    errors: collections.Counter[str] = collections.Counter()
    bad: list[str] = []
    answered = collections.Counter[str]()
    lock = threading.Lock()
    creates = [0]

    def note(what: str, err: libvirt.libvirtError) -> None:
        code, msg = err.get_error_code(), err.get_error_message() or ""
        with lock:
            errors[f"{what}: {code}"] += 1
            detail = msg.split(": ", 1)[-1].strip()
            if code not in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID) or not detail:
                bad.append(f"{what}: code {code}: {msg!r}")

    def creator() -> None:
        conn = libvirt.open(daemon.uri)
        try:
            while time.monotonic() < deadline:
                try:
                    dom = conn.createXML(xml, 0)
                    creates[0] += 1
                    dom.destroy()
                except libvirt.libvirtError as err:
                    note("create/destroy", err)
        finally:
            conn.close()

    queries: dict[str, Callable[[Any], object]] = {
        "info": lambda d: d.info(),
        "state": lambda d: d.state(),
        "xml": lambda d: d.XMLDesc(0),
        "active": lambda d: d.isActive(),
        "persistent": lambda d: d.isPersistent(),
        "id": lambda d: d.ID(),
        "maxmem": lambda d: d.maxMemory(),
        "vcpus": lambda d: d.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_CURRENT),
        "autostart": lambda d: d.autostart(),
    }

    def querier() -> None:
        conn = libvirt.open(daemon.uri)
        try:
            while time.monotonic() < deadline:
                try:
                    dom = conn.lookupByName("trq")
                except libvirt.libvirtError as err:
                    note("lookup", err)
                    continue
                for what, query in queries.items():
                    try:
                        query(dom)
                        with lock:
                            answered[what] += 1
                    except libvirt.libvirtError as err:
                        note(what, err)
                with contextlib.suppress(libvirt.libvirtError):
                    conn.listAllDomains()
        finally:
            conn.close()

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        threads = [threading.Thread(target=creator)] + [threading.Thread(target=querier) for _ in range(7)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(RACE_SECONDS + 60)
    finally:
        libvirt.registerErrorHandler(None, None)
    print(f"creates: {creates[0]}, answered: {dict(answered)}, errors: {dict(errors)}")
    assert bad == []
    assert creates[0] > 3 and all(answered[q] > 0 for q in queries)
