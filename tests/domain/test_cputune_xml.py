"""``<cputune>`` (vcpupin, emulatorpin) parsed and formatted without a daemon.

Written for the mutation run (docs/TESTING.md): ``_cputune`` had 114 surviving mutants and
``_format_cputune`` 12, because only the end-to-end tests (through a daemon, where mutmut cannot see)
exercised them. Expected values come from libvirt 9.0's source, not from the module under test:
src/conf/domain_conf.c (virDomainVcpuPinDefParseXML, virDomainEmulatorPinDefParseXML,
virDomainDefTunablesParse: its messages, error codes and the silent skip of a pin of a missing vCPU),
src/util/virxml.c (virXMLPropUInt's messages, VIR_FROM_XML), src/util/virbitmap.c (virBitmapParse's
syntax and message, virBitmapFormat's ranges) and src/util/virerror.c (the message prefix of each code).
"""

from __future__ import annotations

import pytest

from mshv_libvirt.domain import parse_domain_xml
from mshv_libvirt.errors import ErrorCode, ErrorDomain, VirtError


def dom(cputune: str, vcpus: int = 4) -> str:
    return (
        f"<domain type='hyperv'><name>vm</name><memory>262144</memory><vcpu>{vcpus}</vcpu>"
        f"<os><type>hvm</type><kernel>/k</kernel></os>{cputune}</domain>"
    )


def err(text: str) -> VirtError:
    with pytest.raises(VirtError) as info:
        parse_domain_xml(text)
    return info.value


def test_pins_are_parsed_per_vcpu_and_sorted() -> None:
    cfg = parse_domain_xml(
        dom(
            "<cputune><vcpupin vcpu='3' cpuset='5'/><emulatorpin cpuset='0,7'/>"
            "<vcpupin vcpu='1' cpuset='0-3,^1'/></cputune>"
        )
    )
    tune = cfg.cputune
    assert tune.vcpupin == ((1, frozenset({0, 2, 3})), (3, frozenset({5})))
    assert tune.emulatorpin == frozenset({0, 7})
    assert tune.vcpu(1) == frozenset({0, 2, 3}) and tune.vcpu(3) == frozenset({5})
    assert tune.vcpu(0) is None and tune.vcpu(2) is None  # unpinned: every online host CPU


def test_pins_are_formatted_as_libvirt_formats_them() -> None:
    """virBitmapFormat: ascending ranges ("0,2-3"); vcpupin by vCPU, then emulatorpin (virDomainCputuneDefFormat)."""
    xml = parse_domain_xml(
        dom(
            "<cputune><emulatorpin cpuset='7,0'/><vcpupin vcpu='2' cpuset='3,0,2'/>"
            "<vcpupin vcpu='0' cpuset='1'/></cputune>"
        )
    ).xml
    block = xml[xml.index("  <cputune>") : xml.index("</cputune>\n") + len("</cputune>\n")]
    assert block == (
        "  <cputune>\n"
        "    <vcpupin vcpu='0' cpuset='1'/>\n"
        "    <vcpupin vcpu='2' cpuset='0,2-3'/>\n"
        "    <emulatorpin cpuset='0,7'/>\n"
        "  </cputune>\n"
    )
    assert xml.index("<vcpu ") < xml.index("<cputune>") < xml.index("<os>")
    assert parse_domain_xml(xml).xml == xml  # what dumpxml prints is read back the same


@pytest.mark.parametrize(
    "cputune",
    ["", "<cputune/>", "<cputune></cputune>", "<cputune><vcpupin vcpu='9' cpuset='1'/></cputune>"],
    ids=["absent", "empty", "empty-pair", "only-a-missing-vcpu"],
)
def test_nothing_pinned_prints_no_cputune(cputune: str) -> None:
    cfg = parse_domain_xml(dom(cputune))
    assert cfg.cputune.vcpupin == () and cfg.cputune.emulatorpin is None
    assert "cputune" not in cfg.xml


def test_only_an_emulatorpin() -> None:
    cfg = parse_domain_xml(dom("<cputune><emulatorpin cpuset='1-2'/></cputune>"))
    assert cfg.cputune.vcpupin == () and cfg.cputune.emulatorpin == frozenset({1, 2})
    assert "  <cputune>\n    <emulatorpin cpuset='1-2'/>\n  </cputune>\n" in cfg.xml


def test_a_pin_of_a_vcpu_the_domain_lacks_is_ignored() -> None:
    """ "Ignoring vcpupin for missing vcpus" (a warning): even a second, or one without a cpuset."""
    cfg = parse_domain_xml(
        dom(
            "<cputune><vcpupin vcpu='2' cpuset='1'/><vcpupin vcpu='2' cpuset='2'/><vcpupin vcpu='5' cpuset='4'/>"
            "<vcpupin vcpu='1' cpuset='3'/></cputune>",
            vcpus=2,
        )
    )
    assert cfg.cputune.vcpupin == ((1, frozenset({3})),)


@pytest.mark.parametrize(
    ("vcpu", "index"),
    [("0", 0), ("+1", 1), (" 2", 2), ("\t3", 3), ("03", 3)],
)
def test_vcpu_numbers_as_virStrToLong_uip_reads_them(vcpu: str, index: int) -> None:
    cfg = parse_domain_xml(dom(f"<cputune><vcpupin vcpu='{vcpu}' cpuset='1'/></cputune>"))
    assert cfg.cputune.vcpupin == ((index, frozenset({1})),)


def test_a_vcpu_number_beyond_uint_max_is_refused_below_it_ignored() -> None:
    ignored = parse_domain_xml(dom("<cputune><vcpupin vcpu='4294967295' cpuset='1'/></cputune>"))
    assert ignored.cputune.vcpupin == ()
    e = err(dom("<cputune><vcpupin vcpu='4294967296' cpuset='1'/></cputune>"))
    assert (e.code, e.domain) == (ErrorCode.XML_ERROR, ErrorDomain.XML)
    assert e.message == (
        "XML error: Invalid value for attribute 'vcpu' in element 'vcpupin': '4294967296'. "
        "Expected non-negative integer value"
    )


@pytest.mark.parametrize("vcpu", ["-1", "x", "", "1x", "1 ", "0x1", "99999999999"])
def test_bad_vcpu_numbers(vcpu: str) -> None:
    e = err(dom(f"<cputune><vcpupin vcpu='{vcpu}' cpuset='1'/></cputune>"))
    assert (e.code, e.domain) == (ErrorCode.XML_ERROR, ErrorDomain.XML)
    assert e.message == (
        f"XML error: Invalid value for attribute 'vcpu' in element 'vcpupin': '{vcpu}'. "
        "Expected non-negative integer value"
    )


@pytest.mark.parametrize(
    ("cputune", "code", "domain", "message"),
    [
        (
            "<vcpupin cpuset='1'/>",
            ErrorCode.XML_ERROR,
            ErrorDomain.XML,
            "XML error: Missing required attribute 'vcpu' in element 'vcpupin'",
        ),
        (
            "<vcpupin vcpu='1'/>",
            ErrorCode.INTERNAL_ERROR,
            ErrorDomain.DOMAIN,
            "internal error: missing cpuset for vcpupin",
        ),
        (
            "<vcpupin vcpu='1' cpuset='1'/><vcpupin vcpu='1' cpuset='2'/>",
            ErrorCode.INTERNAL_ERROR,
            ErrorDomain.DOMAIN,
            "internal error: duplicate vcpupin for vcpu '1'",
        ),
        (
            # the cpuset check comes first (virDomainVcpuPinDefParseXML)
            "<vcpupin vcpu='1' cpuset='1'/><vcpupin vcpu='1'/>",
            ErrorCode.INTERNAL_ERROR,
            ErrorDomain.DOMAIN,
            "internal error: missing cpuset for vcpupin",
        ),
        (
            "<vcpupin vcpu='1' cpuset='0,^0'/>",
            ErrorCode.CONFIG_UNSUPPORTED,
            ErrorDomain.DOMAIN,
            "unsupported configuration: Invalid value of 'cpuset': 0,^0",
        ),
        (
            "<emulatorpin/>",
            ErrorCode.INTERNAL_ERROR,
            ErrorDomain.DOMAIN,
            "internal error: missing cpuset for emulatorpin",
        ),
        (
            "<emulatorpin cpuset='3,^3'/>",  # virBitmapParse applies items in order: ^3 after 3 clears it
            ErrorCode.CONFIG_UNSUPPORTED,
            ErrorDomain.DOMAIN,
            "unsupported configuration: Invalid value of 'cpuset': 3,^3",
        ),
        (
            "<emulatorpin cpuset='1'/><emulatorpin cpuset='2'/>",
            ErrorCode.XML_ERROR,
            ErrorDomain.DOMAIN,
            "XML error: only one emulatorpin is supported",
        ),
        (
            "<vcpupin vcpu='1' cpuset='a'/>",
            ErrorCode.INVALID_ARG,
            ErrorDomain.NONE,
            "invalid argument: Failed to parse bitmap 'a'",
        ),
        (
            "<emulatorpin cpuset=''/>",
            ErrorCode.INVALID_ARG,
            ErrorDomain.NONE,
            "invalid argument: Failed to parse bitmap ''",
        ),
    ],
    ids=[
        "no-vcpu",
        "no-cpuset",
        "duplicate",
        "duplicate-without-cpuset",
        "all-clear",
        "emulatorpin-no-cpuset",
        "emulatorpin-all-clear",
        "two-emulatorpins",
        "bad-bitmap",
        "empty-bitmap",
    ],
)
def test_libvirts_refusals(cputune: str, code: ErrorCode, domain: ErrorDomain, message: str) -> None:
    e = err(dom(f"<cputune>{cputune}</cputune>"))
    assert (e.code, e.domain, e.message) == (code, domain, message)


@pytest.mark.parametrize(
    ("cputune", "what"),
    [
        ("<cputune><shares>2048</shares></cputune>", "element <shares> in <cputune>"),
        ("<cputune><iothreadpin iothread='1' cpuset='1'/></cputune>", "element <iothreadpin> in <cputune>"),
        ("<cputune mode='x'/>", "attribute 'mode' of <cputune>"),
        ("<cputune><vcpupin vcpu='1' cpuset='1' x='1'/></cputune>", "attribute 'x' of <cputune><vcpupin>"),
        ("<cputune><emulatorpin cpuset='1' y='2'/></cputune>", "attribute 'y' of <cputune><emulatorpin>"),
        ("<cputune><vcpupin vcpu='1' cpuset='1'><z/></vcpupin></cputune>", "element <z> in <vcpupin>"),
        ("<cputune><emulatorpin cpuset='1'><z/></emulatorpin></cputune>", "element <z> in <emulatorpin>"),
    ],
)
def test_what_the_driver_cannot_honour_is_named(cputune: str, what: str) -> None:
    """Scheduler, cache and iothread tuning need cgroups or resctrl the driver does not manage."""
    e = err(dom(cputune))
    assert (e.code, e.domain) == (ErrorCode.CONFIG_UNSUPPORTED, ErrorDomain.DOMAIN)
    assert e.message == f"unsupported configuration: {what} is not supported by the mshv driver"
