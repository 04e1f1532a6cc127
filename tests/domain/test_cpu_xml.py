"""``<cpu>``'s topology and features, parsed and formatted without a daemon; libvirt's test:///default
driver (libvirt-python, in this process) is the oracle for what is printed and for each refusal.

Written for the mutation run (docs/TESTING.md): ``_cpu_features`` and ``_guest_cpu`` had 134 surviving
mutants, only the end-to-end tests having driven them. Where libvirt accepts what the driver cannot honour
(a feature other than vmx/svm, a second topology) the driver's own refusal is stated here.
"""

from __future__ import annotations

import re

import libvirt
import pytest

from mshv_libvirt.domain import parse_domain_xml
from mshv_libvirt.errors import ErrorCode, ErrorDomain, VirtError
from tests.support.oracle import inactive_xml

TOPOLOGY = "<topology sockets='1' dies='1' cores='2' threads='2'/>"


def ours_xml(cpu: str) -> str:
    return (
        "<domain type='hyperv'><name>vm</name><memory>262144</memory><vcpu>4</vcpu>"
        f"<os><type>hvm</type><kernel>/k</kernel></os>{cpu}</domain>"
    )


def theirs(ref: libvirt.virConnect, cpu: str) -> str:
    """libvirt's inactive dumpxml of the same <cpu>."""
    return inactive_xml(ref, "cpu-oracle", cpu, before_os="<vcpu>4</vcpu>")


def cpu_block(xml: str) -> str:
    m = re.search(r"^  <cpu.*?(/>|</cpu>)\n", xml, re.S | re.M)
    assert m, xml
    return m.group(0)


@pytest.mark.parametrize(
    "cpu",
    [
        "<cpu mode='host-passthrough'/>",
        "<cpu mode='host-passthrough' check='none' migratable='on'/>",
        "<cpu mode='host-passthrough' migratable='off'><feature name='vmx'/></cpu>",
        f"<cpu mode='host-passthrough'><feature policy='optional' name='svm'/>{TOPOLOGY}"
        "<feature policy='force' name='vmx'/></cpu>",
        "<cpu mode='host-passthrough'><feature policy='disable' name='vmx'/>"
        "<feature policy='forbid' name='svm'/></cpu>",
        f"<cpu mode='maximum'>{TOPOLOGY}</cpu>",
        f"<cpu>{TOPOLOGY}</cpu>",
    ],
)
def test_cpu_is_printed_as_libvirt_prints_it(ref: libvirt.virConnect, cpu: str) -> None:
    """The topology first, then the features in the given order, the default policy spelled out."""
    ours = parse_domain_xml(ours_xml(cpu)).xml
    assert cpu_block(ours) == cpu_block(theirs(ref, cpu))
    assert parse_domain_xml(ours).xml == ours


@pytest.mark.parametrize(
    ("features", "nested", "feature"),
    [
        ("", "off", None),
        ("<feature name='vmx'/>", "require", "vmx"),  # no policy: libvirt's VIR_CPU_FEATURE_REQUIRE
        ("<feature policy='force' name='svm'/>", "require", "svm"),
        ("<feature policy='require' name='vmx'/>", "require", "vmx"),
        ("<feature policy='optional' name='vmx'/>", "optional", "vmx"),
        ("<feature policy='disable' name='vmx'/>", "off", None),
        ("<feature policy='forbid' name='svm'/>", "off", None),
        # the strongest demand wins, named by the feature that first made it
        ("<feature policy='optional' name='svm'/><feature policy='require' name='vmx'/>", "require", "vmx"),
        ("<feature policy='require' name='vmx'/><feature policy='force' name='svm'/>", "require", "vmx"),
        ("<feature policy='forbid' name='vmx'/><feature policy='optional' name='svm'/>", "optional", "svm"),
    ],
)
def test_features_ask_for_nested_virtualization(features: str, nested: str, feature: str | None) -> None:
    cpu = parse_domain_xml(ours_xml(f"<cpu mode='host-passthrough'>{features}</cpu>")).cpu
    assert (cpu.nested, cpu.nested_feature) == (nested, feature)
    assert cpu.topology is None and cpu.threads_per_core == 1


def test_topology_is_read() -> None:
    cpu = parse_domain_xml(ours_xml(f"<cpu mode='host-passthrough'>{TOPOLOGY}</cpu>")).cpu
    assert cpu.topology is not None
    assert (cpu.topology.sockets, cpu.topology.dies, cpu.topology.cores, cpu.topology.threads) == (1, 1, 2, 2)
    assert cpu.threads_per_core == 2


def error(call: object) -> tuple[int, int, str]:
    assert callable(call)
    try:
        call()
    except VirtError as e:
        return int(e.code), int(e.domain), e.message
    except libvirt.libvirtError as e:
        return e.get_error_code(), e.get_error_domain(), e.get_error_message()
    raise AssertionError("accepted")


# Measured 2026-12-03: the driver's error domain differs from libvirt's (VIR_FROM_CPU, 31) for these;
# code and message agree. A fix in mshv_libvirt/domain/xml.py turns each into a plain pass.
DIVERGES = {
    "bad-policy": (ErrorCode.CONFIG_UNSUPPORTED, ErrorDomain.DOMAIN),
    "no-name": (ErrorCode.XML_ERROR, ErrorDomain.XML),
    "empty-name": (ErrorCode.XML_ERROR, ErrorDomain.XML),
    "twice": (ErrorCode.XML_ERROR, ErrorDomain.XML),
    "features-without-model": (ErrorCode.XML_ERROR, ErrorDomain.XML),
}


@pytest.mark.parametrize(
    ("case", "cpu"),
    [
        ("bad-policy", "<cpu mode='host-passthrough'><feature policy='bogus' name='vmx'/></cpu>"),
        ("no-name", "<cpu mode='host-passthrough'><feature policy='require'/></cpu>"),
        ("empty-name", "<cpu mode='host-passthrough'><feature name=''/></cpu>"),
        ("twice", "<cpu mode='host-passthrough'><feature name='vmx'/><feature policy='optional' name='vmx'/></cpu>"),
        ("features-without-model", "<cpu><feature name='vmx'/></cpu>"),
        ("check-without-model", f"<cpu check='full'>{TOPOLOGY}</cpu>"),
        ("bad-mode", "<cpu mode='bogus'/>"),
        ("migratable-custom", "<cpu migratable='on'/>"),
    ],
)
def test_refusals_match_libvirts(ref: libvirt.virConnect, case: str, cpu: str) -> None:
    ours = error(lambda: parse_domain_xml(ours_xml(cpu)))
    oracle = error(lambda: theirs(ref, cpu))
    if case in DIVERGES:
        code, domain = DIVERGES[case]
        assert ours == (code, domain, oracle[2]) and oracle[:2] == (code, ErrorDomain.CPU)
        pytest.xfail(f"error domain {domain.name} ({int(domain)}) where libvirt says CPU ({int(ErrorDomain.CPU)})")
    assert ours == oracle


@pytest.mark.parametrize(
    ("cpu", "code", "message"),
    [
        (
            "<cpu mode='host-passthrough'><feature name='pdpe1gb'/></cpu>",
            ErrorCode.CONFIG_UNSUPPORTED,
            "unsupported configuration: CPU feature 'pdpe1gb' is not supported by the mshv driver; "
            "only vmx or svm (nested virtualization) can be set",
        ),
        (
            f"<cpu mode='host-passthrough'>{TOPOLOGY}{TOPOLOGY}</cpu>",
            ErrorCode.XML_ERROR,
            "XML error: element <topology> may appear only once in <cpu>",
        ),
        (
            "<cpu mode='host-passthrough'><cache mode='passthrough'/></cpu>",
            ErrorCode.CONFIG_UNSUPPORTED,
            "unsupported configuration: element <cache> in <cpu> is not supported by the mshv driver",
        ),
        (
            "<cpu mode='host-passthrough'><feature name='vmx' x='1'/></cpu>",
            ErrorCode.CONFIG_UNSUPPORTED,
            "unsupported configuration: attribute 'x' of <cpu><feature> is not supported by the mshv driver",
        ),
        (
            "<cpu mode='host-passthrough'><feature name='vmx'><y/></feature></cpu>",
            ErrorCode.CONFIG_UNSUPPORTED,
            "unsupported configuration: element <y> in <cpu><feature> is not supported by the mshv driver",
        ),
    ],
    ids=["other-feature", "two-topologies", "cache", "feature-attribute", "feature-child"],
)
def test_what_libvirt_accepts_and_the_driver_cannot_honour(cpu: str, code: ErrorCode, message: str) -> None:
    with pytest.raises(VirtError) as info:
        parse_domain_xml(ours_xml(cpu))
    assert (info.value.code, info.value.message) == (code, message)
