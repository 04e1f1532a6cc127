"""The XML the README tells users to start from must be accepted as is."""

from __future__ import annotations

from pathlib import Path

from mshv_libvirt.domain import parse_domain_xml
from tests.support.libvirtd import missing

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_readme_example_guest_parses() -> None:
    cfg = parse_domain_xml((EXAMPLES / "guest.xml").read_text(), check_libvirt_schema=True)
    assert (cfg.name, cfg.vcpus, cfg.memory_kib) == ("guest", 2, 512 * 1024)
    assert cfg.kernel and cfg.initrd and cfg.serials


def test_readme_nat_network_is_valid_for_libvirt() -> None:
    """The README's one-line NAT network: libvirt's own network schema accepts it, and it is NAT."""
    from lxml import etree

    schema = Path("/usr/share/libvirt/schemas/network.rng")
    if not schema.exists():
        missing("libvirt's schemas (libvirt-clients) are not installed")
    doc = etree.parse(str(EXAMPLES / "nat-network.xml"))
    rng = etree.RelaxNG(etree.parse(str(schema)))
    assert rng.validate(doc), rng.error_log
    forward = doc.find("forward")
    assert doc.getroot().findtext("name") == "default" and forward is not None and forward.get("mode") == "nat"
