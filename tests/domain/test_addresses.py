"""PCI address assignment shared by all PCI devices (mshv_libvirt/domain/addresses.py)."""

from __future__ import annotations

import re

import pytest

from mshv_libvirt.domain import parse_domain_xml
from mshv_libvirt.domain.addresses import PCI_AUTO_FIRST_SLOT, PCI_SLOTS, PciAddress, assign_pci
from mshv_libvirt.errors import ErrorCode, ErrorDomain, VirtError

RNG = "<rng model='virtio'><backend model='random'>/dev/urandom</backend>{address}</rng>"


def _address(slot: str) -> str:
    return f"<address type='pci' domain='0x0000' bus='0x00' slot='{slot}' function='0x0'/>"


def _document(devices: str) -> str:
    return f"""<domain type='hyperv'>
  <name>addr</name>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64'>hvm</type><kernel>/k</kernel></os>
  <devices>{devices}</devices>
</domain>"""


def test_auto_slots_start_at_two_in_document_order() -> None:
    assert assign_pci([None, None, None]) == (PciAddress(2), PciAddress(3), PciAddress(4))


def test_explicit_addresses_are_reserved_before_auto_ones() -> None:
    # The auto device before the explicit one still skips the explicit one's slot (reserved first).
    assert assign_pci([None, PciAddress(2), None]) == (PciAddress(3), PciAddress(2), PciAddress(4))


def test_explicit_slots_below_the_auto_range_are_kept() -> None:
    assert assign_pci([PciAddress(1), None]) == (PciAddress(1), PciAddress(PCI_AUTO_FIRST_SLOT))


def test_a_slot_used_twice_is_libvirts_xml_error() -> None:
    with pytest.raises(VirtError) as info:
        assign_pci([PciAddress(5), None, PciAddress(5)])
    e = info.value
    assert (e.code, e.domain) == (ErrorCode.XML_ERROR, ErrorDomain.DOMAIN)
    assert e.message == "XML error: Attempted double use of PCI Address 0000:00:05.0"


def test_a_full_bus_has_no_slot_left() -> None:
    full = [PciAddress(s) for s in range(PCI_AUTO_FIRST_SLOT, PCI_SLOTS)]
    assert len(assign_pci(full)) == len(full)
    with pytest.raises(VirtError) as info:
        assign_pci([*full, None])
    assert (info.value.code, info.value.domain) == (ErrorCode.INTERNAL_ERROR, ErrorDomain.DOMAIN)
    assert info.value.message == "internal error: No more available PCI slots"


def test_str_is_virpcideviceaddressasstring() -> None:
    assert str(PciAddress(0x1F)) == "0000:00:1f.0"


def test_define_writes_the_assigned_addresses_and_they_read_back_the_same() -> None:
    cfg = parse_domain_xml(_document(RNG.format(address="") + RNG.format(address=_address("0x02"))))
    assert re.findall(r"slot='(0x[0-9a-f]{2})'", cfg.xml) == ["0x03", "0x02"]
    again = parse_domain_xml(cfg.xml)
    assert again.xml == cfg.xml
    assert [r.address for r in again.rngs] == [PciAddress(3), PciAddress(2)]


def test_define_refuses_a_slot_given_twice() -> None:
    twice = RNG.format(address=_address("3")) + RNG.format(address=_address("0x03"))
    with pytest.raises(VirtError) as info:
        parse_domain_xml(_document(twice))
    assert (info.value.code, info.value.domain) == (ErrorCode.XML_ERROR, ErrorDomain.DOMAIN)
    assert info.value.message == "XML error: Attempted double use of PCI Address 0000:00:03.0"
