"""libvirt-python (the real binding, with its default event loop) against virtmshvd."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.daemon import DOMAIN_EVENT_IDS, DaemonProcess, domain_xml, virsh, virsh_event, wait_for
from tests.support.events import DomainEvents

libvirt = pytest.importorskip("libvirt")


def test_list_info_state(kvm: None, conn: object, daemon: DaemonProcess, tiny_kernel: Path) -> None:
    c = conn
    assert c.getType() == "MSHV"  # type: ignore[attr-defined]
    dom = c.defineXML(domain_xml("py1", tiny_kernel, vcpus=2, memory_mib=32))  # type: ignore[attr-defined]
    assert [d.name() for d in c.listAllDomains()] == ["py1"]  # type: ignore[attr-defined]
    assert dom.state() == [libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_UNKNOWN]
    assert dom.info()[:4] == [libvirt.VIR_DOMAIN_SHUTOFF, 32768, 32768, 2]
    assert dom.ID() == -1 and dom.isPersistent() == 1 and dom.isActive() == 0
    dom.create()
    assert dom.ID() >= 1
    assert dom.state() == [libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_BOOTED]
    state, max_mem, mem, vcpus, cpu_ns = dom.info()
    assert (state, max_mem, mem, vcpus) == (libvirt.VIR_DOMAIN_RUNNING, 32768, 32768, 2) and cpu_ns > 0
    active = c.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)  # type: ignore[attr-defined]
    assert [d.name() for d in active] == ["py1"]
    assert c.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_SHUTOFF) == []  # type: ignore[attr-defined]
    assert c.lookupByID(dom.ID()).name() == "py1"  # type: ignore[attr-defined]
    assert c.lookupByUUIDString(dom.UUIDString()).name() == "py1"  # type: ignore[attr-defined]
    dom.destroy()
    assert dom.state() == [libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED]
    dom.undefine()


def test_errors_are_libvirt_errors(conn: object) -> None:
    c = conn
    with pytest.raises(libvirt.libvirtError) as exc:
        c.lookupByName("nope")  # type: ignore[attr-defined]
    assert exc.value.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN
    assert "Domain not found: no domain with matching name 'nope'" in str(exc.value)
    with pytest.raises(libvirt.libvirtError) as exc:
        c.defineXML("<domain type='kvm'><name>k</name><memory>65536</memory><os><type>hvm</type></os></domain>")  # type: ignore[attr-defined]
    assert exc.value.get_error_code() == libvirt.VIR_ERR_CONFIG_UNSUPPORTED
    # An API we do not implement reaches the client as "not supported", so callers fall back.
    with pytest.raises(libvirt.libvirtError) as exc:
        c.listAllInterfaces()  # type: ignore[attr-defined]  # networks, storage: relayed
    assert exc.value.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT


def test_lifecycle_event_callbacks(kvm: None, conn: object, daemon: DaemonProcess, tiny_kernel: Path) -> None:
    c = conn
    events = DomainEvents(c)
    try:
        dom = c.defineXML(domain_xml("ev1", tiny_kernel))  # type: ignore[attr-defined]
        dom.create()
        dom.suspend()
        dom.resume()
        dom.shutdown()  # ACPI power button: the tiny guest powers off
        wait_for(lambda: dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF)
        dom.undefine()
        E = libvirt
        expected = [
            ("ev1", E.VIR_DOMAIN_EVENT_DEFINED, E.VIR_DOMAIN_EVENT_DEFINED_ADDED),
            ("ev1", E.VIR_DOMAIN_EVENT_STARTED, E.VIR_DOMAIN_EVENT_STARTED_BOOTED),
            ("ev1", E.VIR_DOMAIN_EVENT_SUSPENDED, E.VIR_DOMAIN_EVENT_SUSPENDED_PAUSED),
            ("ev1", E.VIR_DOMAIN_EVENT_RESUMED, E.VIR_DOMAIN_EVENT_RESUMED_UNPAUSED),
            ("ev1", E.VIR_DOMAIN_EVENT_SHUTDOWN, E.VIR_DOMAIN_EVENT_SHUTDOWN_GUEST),
            ("ev1", E.VIR_DOMAIN_EVENT_STOPPED, E.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN),
            ("ev1", E.VIR_DOMAIN_EVENT_UNDEFINED, E.VIR_DOMAIN_EVENT_UNDEFINED_REMOVED),
        ]
        events.wait(expected, timeout=20)
    finally:
        events.close()


def test_virsh_event_loop_sees_other_clients_changes(
    kvm: None, daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    watcher = virsh_event(daemon, "--all", "--loop", registrations=DOMAIN_EVENT_IDS)
    try:
        xml = tmp_path / "w.xml"
        xml.write_text(domain_xml("w1", tiny_kernel))
        virsh(daemon.uri, "define", str(xml))
        virsh(daemon.uri, "start", "w1")
        virsh(daemon.uri, "reboot", "w1")
        watcher.read_until(b"event 'reboot' for domain 'w1'")
        virsh(daemon.uri, "destroy", "w1")
        out = watcher.read_until(b"Stopped Destroyed").decode()
        lines = [ln.strip() for ln in out.splitlines() if ln.startswith("event")]
        assert lines == [
            "event 'lifecycle' for domain 'w1': Defined Added",
            "event 'lifecycle' for domain 'w1': Started Booted",
            "event 'reboot' for domain 'w1'",
            "event 'lifecycle' for domain 'w1': Stopped Destroyed",
        ]
    finally:
        watcher.kill()


def test_define_also_checks_libvirts_own_schema(conn: object) -> None:
    """Our parser takes any dash placement in a uuid (as libvirt's C parser does); libvirt's RelaxNG schema,
    when installed, does not, and define then refuses it as libvirt's tools would."""
    from mshv_libvirt.domain import LIBVIRT_DOMAIN_SCHEMA

    if not Path(LIBVIRT_DOMAIN_SCHEMA).exists():
        pytest.skip("libvirt's domain.rng is not installed")
    xml = (
        "<domain type='hyperv'><name>odd</name><uuid>0f8b7f62-3f544d0e-a0f8-3c1f-0f6f2a01</uuid>"
        "<memory>65536</memory><os><type>hvm</type></os></domain>"
    )
    with pytest.raises(libvirt.libvirtError) as exc:
        conn.defineXML(xml)  # type: ignore[attr-defined]
    # what libvirt answers for a schema violation (with VIR_DOMAIN_DEFINE_VALIDATE)
    assert exc.value.get_error_code() == libvirt.VIR_ERR_XML_INVALID_SCHEMA
    assert conn.listAllDomains() == []  # type: ignore[attr-defined]


def test_domain_stats(kvm: None, conn: object, daemon: DaemonProcess, tiny_kernel: Path) -> None:
    c = conn
    run = c.defineXML(domain_xml("st1", tiny_kernel, vcpus=2, memory_mib=32))  # type: ignore[attr-defined]
    c.defineXML(domain_xml("st2", tiny_kernel))  # type: ignore[attr-defined]
    run.create()
    wait_for(lambda: run.info()[4] > 0)
    records = {d.name(): s for d, s in c.getAllDomainStats()}  # type: ignore[attr-defined]
    assert set(records) == {"st1", "st2"}
    st1 = records["st1"]
    assert st1["state.state"] == libvirt.VIR_DOMAIN_RUNNING and st1["vcpu.current"] == 2
    assert st1["balloon.maximum"] == 32768 and st1["cpu.time"] == st1["cpu.user"] + st1["cpu.system"] > 0
    assert "cpu.time" not in records["st2"]  # no CPU time for a domain that is not running
    assert st1["block.count"] == 0 and not any(k.startswith("block.0.") for k in st1)  # a domain without disks
    active = c.getAllDomainStats(  # type: ignore[attr-defined]
        libvirt.VIR_DOMAIN_STATS_STATE, libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE
    )
    assert [(d.name(), sorted(s)) for d, s in active] == [("st1", ["state.reason", "state.state"])]
    with pytest.raises(libvirt.libvirtError) as exc:  # a group we lack (perf events), enforced
        c.getAllDomainStats(  # type: ignore[attr-defined]
            libvirt.VIR_DOMAIN_STATS_PERF, libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ENFORCE_STATS
        )
    assert exc.value.get_error_code() == libvirt.VIR_ERR_OPERATION_UNSUPPORTED
    out = virsh(daemon.uri, "domstats", "st1").stdout
    assert "Domain: 'st1'" in out and "state.state=1" in out and "vcpu.maximum=2" in out
    run.destroy()
