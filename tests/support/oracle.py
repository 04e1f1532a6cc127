"""libvirt's own test:///default driver as the oracle of how libvirt parses and prints an element."""

from __future__ import annotations

import itertools

import libvirt

_names = itertools.count()


def inactive_xml(ref: libvirt.virConnect, prefix: str, after_os: str, before_os: str = "") -> str:
    """libvirt's inactive dumpxml of a test-driver domain carrying ``before_os`` and ``after_os`` around its
    <os>, defined under a fresh name (``prefix``-N) and undefined again."""
    d = ref.defineXML(
        f"<domain type='test'><name>{prefix}-{next(_names)}</name><memory>262144</memory>{before_os}"
        f"<os><type>hvm</type></os>{after_os}</domain>"
    )
    try:
        return str(d.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    finally:
        d.undefine()
