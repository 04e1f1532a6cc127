"""Whatever define accepts, its stored form and its dumpxml are accepted again (issue 19 item 3).

A property over generated documents (tests/support/domain_docs.py): for every document the parser
accepts as define does, the canonical (stored) form parses to the same config through define's path
and through the trusted path the next daemon uses, and so does a running domain's dumpxml. The e2e
counterpart (tests/e2e/test_xml_bounds.py) drives the same documents through a real daemon and its
restart.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings

from mshv_libvirt.domain import format_domain_xml, parse_domain_xml
from mshv_libvirt.errors import VirtError
from tests.support.domain_docs import domain_document
from tests.support.limits import MAX_XML_BYTES

# what a running domain's dumpxml adds: a large id and the longest pty path Linux hands out
RUNNING = {"domain_id": 2**31 - 1, "pty": "/dev/pts/" + "9" * 7}
_seen = {"accepted": 0, "refused": 0}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(text=domain_document())
def test_what_define_accepts_is_accepted_again(text: str) -> None:
    try:
        cfg = parse_domain_xml(text, check_libvirt_schema=True)
    except VirtError:
        _seen["refused"] += 1
        return
    _seen["accepted"] += 1
    assert len(cfg.xml.encode()) <= MAX_XML_BYTES
    assert parse_domain_xml(cfg.xml, check_libvirt_schema=True) == cfg  # the stored form, defined again
    assert parse_domain_xml(cfg.xml, check_libvirt_schema=True, validate=True) == cfg
    assert parse_domain_xml(cfg.xml, trusted=True) == cfg  # the next daemon's read of it
    running = format_domain_xml(cfg, **RUNNING)  # type: ignore[arg-type]
    assert len(running.encode()) <= MAX_XML_BYTES
    assert parse_domain_xml(running, check_libvirt_schema=True) == cfg


def test_generator_reaches_both_sides() -> None:
    # (runs after the property in file order) the property saw accepted and refused documents alike
    if _seen["accepted"] + _seen["refused"] == 0:
        test_what_define_accepts_is_accepted_again()
    assert _seen["accepted"] >= 20 and _seen["refused"] >= 20, _seen
