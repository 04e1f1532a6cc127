"""The XML the README tells users to start from must be accepted as is."""

from __future__ import annotations

from pathlib import Path

from mshv_libvirt.domain import parse_domain_xml

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_readme_example_guest_parses() -> None:
    cfg = parse_domain_xml((EXAMPLES / "guest.xml").read_text(), check_libvirt_schema=True)
    assert (cfg.name, cfg.vcpus, cfg.memory_kib) == ("guest", 2, 512 * 1024)
    assert cfg.kernel and cfg.initrd and cfg.serials
