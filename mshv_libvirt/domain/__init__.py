"""Domain definitions: XML parsing, validation and canonical formatting."""

from mshv_libvirt.domain.xml import (
    LIBVIRT_DOMAIN_SCHEMA,
    MAX_ATTRIBUTES,
    MAX_DEPTH,
    MAX_ELEMENTS,
    MAX_STORED_XML_BYTES,
    MAX_TEXT_CHARS,
    MAX_VCPUS,
    MAX_XML_BYTES,
    CharDevice,
    CpuTopology,
    Cputune,
    DomainConfig,
    GuestCpu,
    format_domain_xml,
    parse_domain_xml,
)

__all__ = [
    "LIBVIRT_DOMAIN_SCHEMA",
    "MAX_ATTRIBUTES",
    "MAX_DEPTH",
    "MAX_ELEMENTS",
    "MAX_STORED_XML_BYTES",
    "MAX_TEXT_CHARS",
    "MAX_VCPUS",
    "MAX_XML_BYTES",
    "CharDevice",
    "CpuTopology",
    "Cputune",
    "DomainConfig",
    "GuestCpu",
    "format_domain_xml",
    "parse_domain_xml",
]
