"""Custom ``<metadata>`` elements (VIR_DOMAIN_METADATA_ELEMENT) edited without a daemon, step by step
against libvirt's test:///default driver in this process: what a get returns, what a set refuses, and
the ``<metadata>`` block dumpxml prints after each change.

Written for the mutation run (docs/TESTING.md): every function of ``mshv_libvirt/domain/metadata.py``
was reached only through a daemon (tests/e2e/test_domain_ops.py), so 229 of its mutants had no test and
31 survived. The edit is applied as the driver applies it (manager._edited): ``set_element`` on the tree
of the canonical XML, then the whole document parsed again as a define would.
"""

from __future__ import annotations

import itertools
import re

import libvirt
import pytest
from lxml import etree

from mshv_libvirt.domain import metadata, parse_domain_xml
from mshv_libvirt.errors import VirtError

ELEMENT = libvirt.VIR_DOMAIN_METADATA_ELEMENT
A, B = "http://app1.example.org/ns/", "http://app2.example.org/ns/"
_names = itertools.count()

Op = tuple[str, str | None, str | None, str]  # ("set", xml, key, uri) or ("get", None, None, uri)

STEPS: list[Op] = [
    ("get", None, None, A),  # nothing yet
    ("set", "<info><owner>alice</owner><n a='1'>x<b/>y</n></info>", "app1", A),
    ("get", None, None, A),
    ("set", "<other xmlns:z='http://z/'><z:q/><plain/></other>", "app2", B),
    ("get", None, None, B),
    ("get", None, None, A),
    ("set", "<info><owner>bob</owner></info>", "a1", A),  # replaces app1's, under a new prefix
    ("get", None, None, A),
    ("get", None, None, "http://nobody/"),
    ("set", "not xml", "app1", A),
    ("set", "<a><b></a>", "app1", A),
    ("set", "<a/>", "1bad", A),
    ("set", "<a/>", "x:y", A),
    ("set", "<a xmlns:app1='http://elsewhere/'/>", "app1", A),  # the prefix is declared already
    ("set", "<a/><!-- after the element -->", "c", A),
    ("get", None, None, A),
    ("set", "<deep><l1><l2><l3 k='v'/></l2></l1></deep>", "d", B),
    ("get", None, None, B),
    ("set", "<mixed>a<b>c</b>d</mixed>", "m", B),
    ("get", None, None, B),
    ("set", "<e xmlns='http://default/'><f/></e>", "dflt", A),
    ("get", None, None, A),
    ("set", "<é attr='u'>ñ€</é>", "u", B),
    ("get", None, None, B),
    ("set", None, None, A),  # removes A's
    ("get", None, None, A),
    ("get", None, None, B),
    ("set", None, None, B),
    ("get", None, None, B),
    ("set", None, None, B),  # removing what is not there
]


def base(kind: str, name: str) -> str:
    kernel = "<kernel>/k</kernel>" if kind == "hyperv" else ""
    return f"<domain type='{kind}'><name>{name}</name><memory>65536</memory><os><type>hvm</type>{kernel}</os></domain>"


def block(xml: str) -> str:
    m = re.search(r"^( *)<metadata>\n.*?^\1</metadata>\n", xml, re.S | re.M)
    return m.group(0) if m else ""


class Ours:
    def __init__(self) -> None:
        self.cfg = parse_domain_xml(base("hyperv", "vm"))

    def do(self, op: Op) -> tuple[object, ...]:
        kind, xml, key, uri = op
        try:
            if kind == "get":
                value = metadata.get_element(etree.fromstring(self.cfg.xml.encode()), uri)
                if value is None:  # the API's answer for an absent element (virDomainGetMetadata)
                    return ("error", libvirt.VIR_ERR_NO_DOMAIN_METADATA)
                return ("ok", value)
            root = etree.fromstring(self.cfg.xml.encode())
            metadata.set_element(root, xml, key, uri)
            self.cfg = parse_domain_xml(etree.tostring(root, encoding="unicode"))
            return ("ok", block(self.cfg.xml))
        except VirtError as e:
            return ("error", int(e.code), int(e.domain), e.message)


class Theirs:
    def __init__(self, ref: libvirt.virConnect) -> None:
        self.dom = ref.defineXML(base("test", f"meta-oracle-{next(_names)}"))

    def do(self, op: Op) -> tuple[object, ...]:
        kind, xml, key, uri = op
        try:
            if kind == "get":
                return ("ok", self.dom.metadata(ELEMENT, uri, 0))
            self.dom.setMetadata(ELEMENT, xml, key, uri, 0)
            return ("ok", block(self.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)))
        except libvirt.libvirtError as e:
            if kind == "get":
                return ("error", e.get_error_code())
            return ("error", e.get_error_code(), e.get_error_domain(), e.get_error_message())


def test_every_step_as_libvirt_does_it(ref: libvirt.virConnect) -> None:
    ours, theirs = Ours(), Theirs(ref)
    try:
        for i, op in enumerate(STEPS):
            assert ours.do(op) == theirs.do(op), (i, op)
    finally:
        theirs.dom.undefine()


# Measured 2026-12-03: libvirt takes the parsed document's first node, so a comment or PI before the
# element fails ("failed to create a new XML namespace"), and keeps comments and PIs inside it; the
# driver's parser drops both (metadata._parse: remove_comments, remove_pis), accepting the first and
# returning the second without them. A fix in metadata.py turns each into a plain pass.
DIVERGES = {
    "<!-- c --><a>t</a>": ("ok", "<a>t</a>"),
    "<?pi x?><a/>": ("ok", "<a/>"),
    "<a>text <!-- d -->kept<?pi x?></a>": ("ok", "<a>text kept</a>"),
}


@pytest.mark.parametrize("xml", DIVERGES)
def test_comments_and_pis_in_what_is_set(ref: libvirt.virConnect, xml: str) -> None:
    ours, theirs = Ours(), Theirs(ref)
    try:
        set_ours, set_theirs = ours.do(("set", xml, "c", A)), theirs.do(("set", xml, "c", A))
        got_ours, got_theirs = ours.do(("get", None, None, A)), theirs.do(("get", None, None, A))
    finally:
        theirs.dom.undefine()
    assert set_ours[0] == "ok" and got_ours == DIVERGES[xml]
    if xml.startswith("<a>"):
        assert set_theirs[0] == "ok" and got_theirs == ("ok", xml)
    else:
        assert set_theirs == ("error", 1, 5, "internal error: failed to create a new XML namespace")
    pytest.xfail("comments and PIs are dropped where libvirt keeps them (or refuses them before the element)")


def test_non_ascii_attribute_values_in_dumpxml(ref: libvirt.virConnect) -> None:
    """Measured 2026-12-03: libvirt (libxml2's serialiser, no encoding declared) writes a non-ASCII
    character of an attribute value as a character reference, the driver writes it as it is; both read
    back the same. A fix in the canonical formatter turns this into a plain pass."""
    ours, theirs = Ours(), Theirs(ref)
    try:
        mine, oracle = ours.do(("set", "<é attr='ü'>ñ</é>", "u", B)), theirs.do(("set", "<é attr='ü'>ñ</é>", "u", B))
    finally:
        theirs.dom.undefine()
    line = '    <u:é xmlns:u="http://app2.example.org/ns/" attr="{}">ñ</u:é>\n'
    assert mine == ("ok", f"  <metadata>\n{line.format('ü')}  </metadata>\n")
    assert oracle == ("ok", f"  <metadata>\n{line.format('&#xFC;')}  </metadata>\n")
    pytest.xfail("a non-ASCII attribute character is printed as it is where libvirt prints &#xFC;")


@pytest.mark.parametrize("key", ["a", "_x", "é", "a-b.c1", "A\u00b7"])
def test_keys_that_are_namespace_prefixes(key: str) -> None:
    cfg = parse_domain_xml(base("hyperv", "vm"))
    root = etree.fromstring(cfg.xml.encode())
    metadata.set_element(root, "<v/>", key, A)
    again = parse_domain_xml(etree.tostring(root, encoding="unicode"))
    assert f"<{key}:v xmlns:{key}='{A}'/>" in again.xml.replace('"', "'")
    assert metadata.get_element(etree.fromstring(again.xml.encode()), A) == "<v/>"
