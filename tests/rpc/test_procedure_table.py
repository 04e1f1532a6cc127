"""The procedure table against independent sources of libvirt's facts.

Expected values come from outside the table: libvirt's installed API description
(/usr/share/libvirt/api/libvirt-api.xml, from Debian's libvirt-dev) for the names, and read-only
policies stated here from libvirt 9.0's public API (src/libvirt-domain.c: virDomainGetXMLDesc has no
virCheckReadOnlyGoto, virDomainCreate and virDomainDefineXML have it).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mshv_libvirt.rpc.dispatch import PROCEDURES
from mshv_libvirt.rpc.procnames import LAST_PROCEDURE, PROCEDURE_NAMES
from mshv_libvirt.rpc.table import Flags, proc

API_XML = Path("/usr/share/libvirt/api/libvirt-api.xml")


@pytest.fixture(scope="module")
def public_functions() -> set[str]:
    if not API_XML.is_file():
        pytest.fail(f"{API_XML} is missing (Debian's libvirt-dev installs it)")
    return set(re.findall(r"<function name='(vir\w+)'", API_XML.read_text()))


def test_every_number_of_libvirt_9_is_named() -> None:
    # libvirt 9.0.0's remote_protocol.x numbers its procedures 1..443 without gaps.
    assert LAST_PROCEDURE == 443
    assert sorted(PROCEDURE_NAMES) == list(range(1, 444))


def test_public_procedures_carry_public_api_names(public_functions: set[str]) -> None:
    # Procedures that are neither events, authentication, nor migration/feature internals must name
    # a public function: that is what "not supported by the connection driver: <name>" shows users.
    internal = re.compile(r"^vir(Auth|DomainMigrate(Prepare|Perform|Finish|Begin|Confirm)|ConnectSupportsFeature)")
    missing = [
        (n, name)
        for n, (name, _ro, _dom, event) in PROCEDURE_NAMES.items()
        if not event and not internal.match(name) and name not in public_functions
    ]
    # Legacy event (de)registration (105/106, 167/168, ...) is named by the public API it serves.
    assert missing == [], missing


@pytest.mark.parametrize(
    ("number", "name", "refused_read_only"),
    [
        (9, "virDomainCreate", True),
        (11, "virDomainDefineXML", True),
        (14, "virDomainGetXMLDesc", False),
        (20, "virDomainGetVcpus", False),
        (23, "virDomainLookupByName", False),
        (26, "virDomainPinVcpu", True),
        (29, "virDomainSetAutostart", True),
        (200, "virDomainGetVcpusFlags", False),  # checked only with VIR_DOMAIN_VCPU_GUEST: the handler's job
        (202, "virDomainIsUpdated", False),
        (316, "virConnectDomainEventRegisterAny", False),
        (342, "virConnectGetDomainCapabilities", True),
    ],
)
def test_known_rows(number: int, name: str, refused_read_only: bool) -> None:
    info = PROCEDURE_NAMES[number]
    assert (info[0], info[1]) == (name, refused_read_only)


def test_implemented_rows_take_name_and_policy_from_libvirt() -> None:
    for number, row in PROCEDURES.items():
        name, ro, domain, event = PROCEDURE_NAMES[number]
        assert not event, number
        assert (row.name, row.readonly_denied, int(row.error_domain)) == (name, ro, domain)


def test_event_messages_cannot_be_rows() -> None:
    with pytest.raises(ValueError, match="event message"):
        proc(318, lambda s: None)


def test_flags_are_finished_before_domains() -> None:
    # Like libvirt's drivers (virCheckFlags first): bad flags are refused before the domain lookup.
    row = PROCEDURES[234]  # virDomainDestroyFlags(dom, flags)
    assert isinstance(row.args[row.finish_order[0]], Flags)
