"""vCPUs and memory as libvirt defines them (issue 21 item 3, issue 12 item 4), through the real daemon.

* ``<vcpu current='N'>M</vcpu>``: the guest starts N vCPUs (the tiny guest counts the APs it brought up
  with a broadcast INIT-SIPI), dominfo/vcpucount/GetVcpusFlags report N and M apart, and
  ``setvcpus --config`` follows libvirt's rules, compared with ``test:///default`` in the same test;
* ``<cpu mode='host-model'/>`` is accepted at define and refused at start, as libvirt's QEMU driver does
  for a mode its domain capabilities mark unsupported;
* currentMemory below memory without a balloon device: the guest gets all of <memory> and, as libvirt's
  QEMU driver reports it then, a running domain's current memory is its maximum (dominfo, dumpxml).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from tests.support.daemon import (
    DaemonProcess,
    console_roundtrip,
    domain_xml,
    serial_log,
    virsh,
    vmm_request,
    wait_for,
)
from tests.support.guests import TINY_AP_BANNER, TINY_BANNER

libvirt = pytest.importorskip("libvirt")

pytestmark = pytest.mark.virsh

CONFIG = 2  # VIR_DOMAIN_AFFECT_CONFIG
MAXIMUM = 4  # VIR_DOMAIN_VCPU_MAXIMUM


def _vcpu_xml(name: str, kernel: Path, vcpu: str, virt_type: str = "hyperv") -> str:
    xml = domain_xml(name, kernel).replace("<vcpu>1</vcpu>", vcpu)
    return xml.replace("type='hyperv'", f"type='{virt_type}'")


def _started_aps(d: DaemonProcess, name: str) -> list[str]:
    return re.findall(rf"{TINY_AP_BANNER} (\d+)", serial_log(d, name))


@pytest.mark.parametrize(("vcpu", "online"), [("<vcpu current='1'>3</vcpu>", 1), ("<vcpu current='2'>3</vcpu>", 2)])
def test_guest_starts_the_current_vcpus(
    kvm: None, daemon: DaemonProcess, tiny_kernel: Path, vcpu: str, online: int
) -> None:
    conn = libvirt.open(daemon.uri)
    dom = conn.defineXML(_vcpu_xml("cur", tiny_kernel, vcpu))
    dom.create()
    wait_for(lambda: TINY_BANNER in serial_log(daemon, "cur"))
    if online > 1:
        wait_for(lambda: len(_started_aps(daemon, "cur")) == online - 1)
    console_roundtrip(daemon, "cur", b"AP-COUNT-DONE")  # the guest went on after sending INIT-SIPI to every other CPU
    assert _started_aps(daemon, "cur") == [str(i) for i in range(1, online)]
    status = vmm_request(daemon, "cur", "status")
    assert status["vcpus"] == online and len(status["vcpu_threads"]) == online
    # dominfo shows the online count, vcpucount both, as libvirt's drivers do
    info = virsh(daemon.uri, "dominfo", "cur").stdout
    assert re.search(rf"^CPU\(s\):\s+{online}$", info, re.M), info
    counts = virsh(daemon.uri, "vcpucount", "cur").stdout
    for row in ("maximum      config         3", "maximum      live           3"):
        assert row in counts, counts
    for row in (f"current      config         {online}", f"current      live           {online}"):
        assert row in counts, counts
    assert dom.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_LIVE | MAXIMUM) == 3
    assert dom.vcpusFlags(libvirt.VIR_DOMAIN_AFFECT_LIVE) == online
    assert f"<vcpu placement='static' current='{online}'>3</vcpu>" in dom.XMLDesc(0)
    # no hotplug: a live change is refused (a deliberate deviation: libvirt's drivers hot-plug)
    with pytest.raises(libvirt.libvirtError) as err:
        dom.setVcpusFlags(3, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    assert err.value.get_error_code() == libvirt.VIR_ERR_OPERATION_UNSUPPORTED
    dom.destroy()
    conn.close()


def _vcpu_state(dom: Any) -> tuple[int, int, str]:
    vcpu = etree.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)).find("vcpu")
    assert vcpu is not None
    attrs = " ".join(f"{k}={v}" for k, v in sorted((str(k), str(v)) for k, v in vcpu.items()))
    text = vcpu.text
    assert isinstance(text, str)
    return dom.vcpusFlags(CONFIG | MAXIMUM), dom.vcpusFlags(CONFIG), f"{attrs} {text}"


def _error(call: Any) -> tuple[int, str]:
    with pytest.raises(libvirt.libvirtError) as err:
        call()
    return err.value.get_error_code(), err.value.get_error_message()


def test_setvcpus_config_as_libvirt(daemon: DaemonProcess, tmp_path: Path) -> None:
    """The same sequence on test:///default and here: the states and the errors must be libvirt's."""
    libvirt.registerErrorHandler(lambda *_: None, None)
    oracle = libvirt.open("test:///default")
    ours = libvirt.open(daemon.uri)
    kernel = tmp_path / "vmlinuz"
    doms = {
        "oracle": oracle.defineXML(_vcpu_xml("sv", kernel, "<vcpu>2</vcpu>", "test")),
        "ours": ours.defineXML(_vcpu_xml("sv", kernel, "<vcpu>2</vcpu>")),
    }
    try:
        seen: dict[str, list[object]] = {}
        for who, dom in doms.items():
            steps: list[object] = [_vcpu_state(dom)]
            steps.append(_error(lambda dom=dom: dom.setVcpusFlags(3, CONFIG)))  # above the maximum
            dom.setVcpusFlags(4, CONFIG | MAXIMUM)  # issue 12: raising the maximum ...
            steps.append(_vcpu_state(dom))
            dom.setVcpusFlags(3, CONFIG)  # ... and then the current count must not lower it
            steps.append(_vcpu_state(dom))
            dom.setVcpusFlags(1, CONFIG | MAXIMUM)  # lowering the maximum below current lowers current
            steps.append(_vcpu_state(dom))
            dom.setVcpusFlags(2, CONFIG | MAXIMUM)
            steps.append(_vcpu_state(dom))
            seen[who] = steps
        assert seen["ours"] == seen["oracle"]
        assert seen["ours"][1] == (
            libvirt.VIR_ERR_INVALID_ARG,
            "invalid argument: requested cpu amount exceeds maximum (3 > 2)",
        )
        assert seen["ours"][3] == (4, 3, "current=3 placement=static 4")
    finally:
        for dom in doms.values():
            dom.undefine()
        oracle.close()
        ours.close()


def test_setvcpus_config_boots_that_many(kvm: None, daemon: DaemonProcess, tiny_kernel: Path) -> None:
    conn = libvirt.open(daemon.uri)
    dom = conn.defineXML(_vcpu_xml("grow", tiny_kernel, "<vcpu>1</vcpu>"))
    dom.setVcpusFlags(3, CONFIG | MAXIMUM)
    dom.setVcpusFlags(2, CONFIG)
    dom.create()
    wait_for(lambda: len(_started_aps(daemon, "grow")) == 1)
    console_roundtrip(daemon, "grow", b"GROWN")
    assert _started_aps(daemon, "grow") == ["1"]
    assert vmm_request(daemon, "grow", "status")["vcpus"] == 2
    dom.destroy()
    conn.close()


def test_host_model_is_accepted_at_define_and_refused_at_start(
    daemon: DaemonProcess, tmp_path: Path, tiny_kernel: Path
) -> None:
    caps = etree.fromstring(virsh(daemon.uri, "domcapabilities").stdout.encode())
    modes = {m.get("name"): m.get("supported") for m in caps.iterfind("cpu/mode")}
    assert modes["host-model"] == "no" and modes["maximum"] == "no" and modes["host-passthrough"] == "yes"
    conn = libvirt.open(daemon.uri)
    for mode in ("host-model", "maximum"):
        xml = domain_xml(f"cpu-{mode}", tiny_kernel, extra=f"<cpu mode='{mode}'/>")
        dom = conn.defineXML(xml)  # libvirt's QEMU driver defines it too ...
        assert f"<cpu mode='{mode}'/>" in dom.XMLDesc(0)
        expected = (
            libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
            f"unsupported configuration: CPU mode '{mode}' for x86_64 hyperv domain on x86_64 host "
            "is not supported by hypervisor",
        )
        assert _error(dom.create) == expected  # ... and refuses to start it, with this message
        assert _error(lambda xml=xml, mode=mode: conn.createXML(xml.replace(f"cpu-{mode}", f"t-{mode}"), 0)) == expected
        assert not dom.isActive() and daemon.processes() == {}
        dom.undefine()
    conn.close()


def test_current_memory_below_memory_without_balloon(kvm: None, daemon: DaemonProcess, tiny_kernel: Path) -> None:
    conn = libvirt.open(daemon.uri)
    xml = domain_xml("mem", tiny_kernel, memory_mib=128).replace(
        "</memory>", "</memory><currentMemory unit='MiB'>64</currentMemory>"
    )
    dom = conn.defineXML(xml)
    assert dom.info()[1:3] == [131072, 65536]  # shut off: the configured values
    dom.create()
    wait_for(lambda: TINY_BANNER in serial_log(daemon, "mem"))
    # the guest got all of <memory>: the VMM maps one 128 MiB RAM range
    assert vmm_request(daemon, "mem", "status")["memory_kib"] == 131072
    maps = Path(f"/proc/{daemon.vmm_pid('mem')}/maps").read_text().splitlines()
    sizes = [int(end, 16) - int(start, 16) for start, end in (m.split()[0].split("-") for m in maps)]
    assert 128 << 20 in sizes and 64 << 20 not in sizes
    # ... and reports it as libvirt's QEMU driver does without a balloon: current = maximum while running
    assert dom.info()[1:3] == [131072, 131072]
    info = virsh(daemon.uri, "dominfo", "mem").stdout
    assert re.search(r"^Max memory:\s+131072 KiB$", info, re.M) and re.search(
        r"^Used memory:\s+131072 KiB$", info, re.M
    )
    assert "<currentMemory unit='KiB'>131072</currentMemory>" in dom.XMLDesc(0)
    assert "<currentMemory unit='KiB'>65536</currentMemory>" in dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    stats = conn.domainListGetStats([dom], libvirt.VIR_DOMAIN_STATS_BALLOON)[0][1]
    assert (stats["balloon.current"], stats["balloon.maximum"]) == (131072, 131072)
    dom.destroy()
    assert dom.info()[1:3] == [131072, 65536]
    conn.close()
