"""The VMM and the daemon against each kernel generation of the emulated mshv device.

Each daemon here runs with MSHV_LIBVIRT_EMU_KERNEL set (its VMMs inherit it), and with
MSHV_LIBVIRT_EMU_DEBUG=1, so the VM's log holds the device's own record of every
MSHV_CREATE_PARTITION (flags and answer): the oracle for what the VMM really asked, next to what it
says. Linux 7.0 added MSHV_PT_BIT_NESTED_VIRTUALIZATION (bit 4) and MSHV_PT_BIT_SMT_ENABLED_GUEST
(bit 5); older kernels answer EINVAL.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree

from tests.support.daemon import DaemonProcess, define, virsh, wait_for
from tests.support.guests import TINY_BANNER
from tests.support.hostcpu import kvm_can_nest

libvirt = pytest.importorskip("libvirt")

pytestmark = pytest.mark.virsh

GENERATIONS = ("6.18", "6.19", "7.0")
SMT_TOPOLOGY = "<cpu><topology sockets='1' cores='1' threads='2'/></cpu>"
DOMAINCAPS_RNG = Path("/usr/share/libvirt/schemas/domaincaps.rng")


def host_nested_feature() -> str:
    vendor = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("vendor_id")), "")
    return "svm" if "AuthenticAMD" in vendor or "HygonGenuine" in vendor else "vmx"


def nested_offered(generation: str) -> bool:
    """Independent of the code under test: the kernel bit exists (7.0) and, when the emulated device
    runs guests on /dev/kvm, that KVM can nest (with MSHV_LIBVIRT_EMU_KVM=0 it asks no KVM)."""
    on_kvm = os.environ.get("MSHV_LIBVIRT_EMU_KVM", "1") != "0" and os.access("/dev/kvm", os.R_OK | os.W_OK)
    return generation == "7.0" and (not on_kvm or kvm_can_nest())


@pytest.fixture(params=GENERATIONS)
def gen_daemon(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DaemonProcess]:
    env = {"MSHV_LIBVIRT_EMU_KERNEL": request.param, "MSHV_LIBVIRT_EMU_DEBUG": "1"}
    d = DaemonProcess(tmp_path / "d", env=env).start()
    d.generation = request.param  # type: ignore[attr-defined]
    try:
        yield d
    finally:
        d.stop()
        d.destroy_all_vmms()


def vm_log(d: DaemonProcess, name: str) -> str:
    path = d.vmm_log(name)
    return path.read_text(errors="replace") if path.exists() else ""


def creates(log: str) -> list[tuple[str, str]]:
    """(pt_flags, answer) of each MSHV_CREATE_PARTITION the emulated device saw."""
    return re.findall(
        r"mshv-emu: Linux [0-9.]+: MSHV_CREATE_PARTITION pt_flags=(0x[0-9a-f]+|0): (fd \d+|errno \d+)", log
    )


# ---- domcapabilities -------------------------------------------------------------------------


def test_domcapabilities_reports_what_the_kernel_offers(gen_daemon: DaemonProcess) -> None:
    gen = gen_daemon.generation  # type: ignore[attr-defined]
    xml = virsh(gen_daemon.uri, "domcapabilities").stdout
    doc = etree.fromstring(xml.encode())
    mode = doc.find("cpu/mode[@name='host-passthrough']")
    assert mode is not None and mode.get("supported") == "yes"
    smt = mode.findall("enum[@name='smtScheduling']/value")
    assert [v.text for v in smt] == (["yes"] if gen == "7.0" else ["no"])
    features = [v.text for v in mode.findall("enum[@name='features']/value")]
    assert features == ([host_nested_feature()] if nested_offered(gen) else [])
    if DOMAINCAPS_RNG.is_file():  # what libvirt's own clients validate against
        rng = etree.RelaxNG(etree.parse(str(DOMAINCAPS_RNG)))
        assert rng.validate(doc), rng.error_log


# ---- SMT: asked for where offered, dropped (and said) where not ------------------------------


def test_smt_topology_starts_on_every_generation(
    kvm: None, gen_daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    d, gen = gen_daemon, gen_daemon.generation  # type: ignore[attr-defined]
    define(d, tmp_path, "smt", tiny_kernel, vcpus=2, extra=SMT_TOPOLOGY)
    virsh(d.uri, "start", "smt")
    wait_for(lambda: TINY_BANNER in d.serial_log("smt").read_text(errors="replace"), timeout=60)
    log = vm_log(d, "smt")
    seen = creates(log)
    if gen == "7.0":
        assert seen == [("0x27", seen[0][1])] and seen[0][1].startswith("fd ")
        assert "SMT scheduling of 2 threads per core: partition created with MSHV_PT_BIT_SMT_ENABLED_GUEST" in log
        assert "is not available" not in log
    else:
        # The full request, the probe of the SMT bit alone, then the partition without it.
        assert [s for s in seen if s[1].startswith("errno")] == [("0x27", "errno 22"), ("0x27", "errno 22")]
        assert seen[-1][0] == "0x7" and seen[-1][1].startswith("fd ")
        assert (
            "SMT scheduling of 2 threads per core is not available: MSHV_CREATE_PARTITION refused "
            f"MSHV_PT_BIT_SMT_ENABLED_GUEST with EINVAL, the kernel's mshv driver predates Linux 7.0 "
            f"(the emulated device behaves as Linux {'6.15-6.18' if gen == '6.18' else gen}). Starting without it: "
            "the hypervisor schedules the guest's 2 threads per core as separate cores"
        ) in log
    assert virsh(d.uri, "domstate", "smt").stdout.strip() == "running"
    assert "<topology sockets='1' dies='1' cores='1' threads='2'/>" in virsh(d.uri, "dumpxml", "smt").stdout
    virsh(d.uri, "destroy", "smt")


# ---- nested virtualization: refused like libvirt where the kernel cannot give it --------------


def test_required_nested_virtualization(
    kvm: None, gen_daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    d, gen = gen_daemon, gen_daemon.generation  # type: ignore[attr-defined]
    feature = host_nested_feature()
    cpu = f"<cpu mode='host-passthrough'><feature policy='require' name='{feature}'/></cpu>"
    define(d, tmp_path, "nested", tiny_kernel, vcpus=1, extra=cpu)
    conn = libvirt.open(d.uri)
    try:
        dom = conn.lookupByName("nested")
        if nested_offered(gen):
            dom.create()
            assert "nested virtualization: partition created with MSHV_PT_BIT_NESTED_VIRTUALIZATION" in vm_log(
                d, "nested"
            )
            dom.destroy()
            return
        with pytest.raises(libvirt.libvirtError) as exc:
            dom.create()
        err = exc.value
        assert err.get_error_code() == libvirt.VIR_ERR_CONFIG_UNSUPPORTED
        assert err.get_error_domain() == libvirt.VIR_FROM_DOMAIN
        why = (
            "the hypervisor refused it (EIO)"
            if gen == "7.0"
            else f"the mshv driver does not know the flag (EINVAL; the emulated device behaves as Linux "
            f"{'6.15-6.18' if gen == '6.18' else gen})"
        )
        assert err.get_error_message() == (
            f"unsupported configuration: host doesn't support nested virtualization ('{feature}'): "
            f"MSHV_PT_BIT_NESTED_VIRTUALIZATION: {why}"
        )
        assert dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
        assert not d.vmm_log("nested").exists()  # refused before any VMM ran
    finally:
        conn.close()
    res = virsh(d.uri, "start", "nested", check=False)
    assert res.returncode == 1 and "error: unsupported configuration: host doesn't support nested" in res.stderr


def test_optional_nested_virtualization_starts_without_it(
    kvm: None, gen_daemon: DaemonProcess, tiny_kernel: Path, tmp_path: Path
) -> None:
    d, gen = gen_daemon, gen_daemon.generation  # type: ignore[attr-defined]
    cpu = f"<cpu mode='host-passthrough'><feature policy='optional' name='{host_nested_feature()}'/></cpu>"
    define(d, tmp_path, "maybe", tiny_kernel, vcpus=1, extra=cpu)
    virsh(d.uri, "start", "maybe")
    wait_for(lambda: TINY_BANNER in d.serial_log("maybe").read_text(errors="replace"), timeout=60)
    log = vm_log(d, "maybe")
    if nested_offered(gen):
        assert "partition created with MSHV_PT_BIT_NESTED_VIRTUALIZATION" in log
    else:
        assert "nested virtualization is not available: MSHV_CREATE_PARTITION refused " in log
        assert "Starting without it: the guest sees no VMX/SVM" in log
        assert creates(log)[-1][0] == "0x7"
    virsh(d.uri, "destroy", "maybe")


# ---- <cpu> topology and features: libvirt's own parser is the oracle --------------------------

# (vcpus, <cpu> element) -> errors compared with test:///default's; None where both accept.
CPU_CORPUS = [
    (4, "<cpu><topology sockets='1' cores='2' threads='2'/></cpu>"),
    (4, "<cpu mode='host-passthrough'><topology sockets='1' dies='1' cores='2' threads='2'/></cpu>"),
    (
        4,
        "<cpu mode='host-passthrough'><feature policy='force' name='svm'/>"
        "<topology sockets='2' cores='1' threads='2'/></cpu>",
    ),
    (
        1,
        "<cpu mode='host-passthrough'><feature policy='disable' name='vmx'/>"
        "<feature policy='forbid' name='svm'/></cpu>",
    ),
    (1, "<cpu/>"),
    (4, "<cpu><topology sockets='1' cores='0' threads='2'/></cpu>"),
    (4, "<cpu><topology cores='2' threads='2'/></cpu>"),
    (4, "<cpu><topology sockets='1' cores='2'/></cpu>"),
    (4, "<cpu><topology sockets='x' cores='2' threads='2'/></cpu>"),
    (4, "<cpu><topology sockets='-1' cores='2' threads='2'/></cpu>"),
    (4, "<cpu><topology sockets='1' dies='0' cores='2' threads='2'/></cpu>"),
    (4, "<cpu><topology sockets='4294967296' cores='2' threads='2'/></cpu>"),
    (4, "<cpu><topology sockets='65536' cores='65536' threads='2'/></cpu>"),
    (4, "<cpu><feature name='vmx'/></cpu>"),
    (4, "<cpu check='partial'><topology sockets='1' cores='2' threads='2'/></cpu>"),
    (4, "<cpu migratable='on'><topology sockets='1' cores='2' threads='2'/></cpu>"),
    (1, "<cpu mode='host-passthrough'><feature name='vmx' policy='sometimes'/></cpu>"),
    (1, "<cpu mode='host-passthrough'><feature name=''/></cpu>"),
    (1, "<cpu mode='host-passthrough'><feature policy='require'/></cpu>"),
    (1, "<cpu mode='host-passthrough'><feature name='vmx'/><feature name='vmx' policy='disable'/></cpu>"),
]
# Where we deliberately differ from the test driver, with our answer (code, message):
DEVIATIONS = {
    # libvirt's QEMU driver validates the topology against <vcpu> (qemuValidateDomainDefCpu...); the test
    # driver does not. We refuse as QEMU does.
    (3, "<cpu><topology sockets='1' cores='2' threads='2'/></cpu>"): (
        libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
        "unsupported configuration: CPU topology doesn't match maximum vcpu count",
    ),
    # The daemon validates every define against libvirt's domain.rng, which requires the policy (libvirt's
    # parser defaults it to 'require'; `virsh define --validate` refuses it as we do, with this error).
    (1, "<cpu mode='host-passthrough'><feature name='vmx'/></cpu>"): "libvirt's answer with VALIDATE",
    # Only the nested-virtualization extensions can be asked for; libvirt knows every x86 feature.
    (1, "<cpu mode='host-passthrough'><feature policy='require' name='avx2'/></cpu>"): (
        libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
        "unsupported configuration: CPU feature 'avx2' is not supported by the mshv driver; "
        "only vmx or svm (nested virtualization) can be set",
    ),
}


def _answer(conn: object, xml: str, flags: int = 0) -> tuple[int, str] | str:
    """The error (code, message), or the <cpu> of the inactive XML libvirt prints back."""
    try:
        dom = conn.defineXMLFlags(xml, flags)  # type: ignore[attr-defined]
    except libvirt.libvirtError as err:
        return err.get_error_code(), err.get_error_message()
    out = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    dom.undefine()
    m = re.search(r"\n  (<cpu[^>]*/>|<cpu[^>]*>.*?</cpu>)\n", out, re.DOTALL)
    return m.group(1) if m else ""


def test_cpu_elements_parse_like_libvirt(daemon: DaemonProcess) -> None:
    ours, oracle = libvirt.open(daemon.uri), libvirt.open("test:///default")
    try:
        for i, (vcpus, cpu) in enumerate([*CPU_CORPUS, *DEVIATIONS]):
            body = (
                f"<name>cpu{i}</name><memory unit='MiB'>64</memory><vcpu>{vcpus}</vcpu>"
                "<os><type arch='x86_64'>hvm</type><kernel>/vmlinuz</kernel></os>" + cpu
            )
            mine = _answer(ours, f"<domain type='hyperv'>{body}</domain>")
            theirs = _answer(oracle, f"<domain type='test'>{body.replace('<kernel>/vmlinuz</kernel>', '')}</domain>")
            if (vcpus, cpu) in DEVIATIONS:
                assert not isinstance(theirs, tuple), (cpu, theirs)  # the test driver accepts it
                expected = DEVIATIONS[(vcpus, cpu)]
                if expected == "libvirt's answer with VALIDATE":
                    oracle_xml = f"<domain type='test'>{body.replace('<kernel>/vmlinuz</kernel>', '')}</domain>"
                    expected = _answer(oracle, oracle_xml, 1)  # VIR_DOMAIN_DEFINE_VALIDATE
                    assert isinstance(expected, tuple) and expected[0] == libvirt.VIR_ERR_XML_INVALID_SCHEMA
                assert mine == expected, cpu
            else:
                assert mine == theirs, cpu
    finally:
        ours.close()
        oracle.close()


def test_topology_and_features_survive_a_daemon_restart(daemon: DaemonProcess, tmp_path: Path) -> None:
    cpu = (
        "<cpu mode='host-passthrough'><topology sockets='2' cores='1' threads='2'/>"
        "<feature policy='optional' name='vmx'/></cpu>"
    )
    define(daemon, tmp_path, "keep", Path("/vmlinuz"), vcpus=4, extra=cpu)
    before = virsh(daemon.uri, "dumpxml", "keep").stdout
    assert "<topology sockets='2' dies='1' cores='1' threads='2'/>" in before
    assert "<feature policy='optional' name='vmx'/>" in before
    daemon.stop()
    daemon.start()
    assert virsh(daemon.uri, "dumpxml", "keep").stdout == before
