"""The procedure-coverage check of a whole-suite run (tests/conftest.py ``pytest_sessionfinish``): every row
of the procedure table, and every path through the relay, must have been driven by a real client (virsh or
libvirt-python) at least once, as the daemons' call traces (mshv_libvirt/rpc/calltrace.py) record."""

from __future__ import annotations

from pathlib import Path

from mshv_libvirt.rpc import calltrace

# Relayed procedures (rpc/relay.py) are not table rows and have no code of their own: every number goes
# the same way, so each *path* through the relay must be driven rather than each number: per driver a
# plain call, event (de)registration (the events coming back are asserted by the tests), both volume
# streams, and NETWORK_UPDATE (its arguments' order depends on a feature we answer).
RELAY_PATHS = (
    "virConnectListAllStoragePools",
    "virConnectStoragePoolEventRegisterAny",
    "virConnectStoragePoolEventDeregisterAny",
    "virStorageVolUpload",
    "virStorageVolDownload",
    "virConnectListAllNetworks",
    "virConnectNetworkEventRegisterAny",
    "virConnectNetworkEventDeregisterAny",
    "virNetworkUpdate",
    "virNetworkGetDHCPLeases",
)


def required() -> dict[int, str]:
    """Procedure number -> API name of what a whole-suite run must drive."""
    from mshv_libvirt.rpc.dispatch import PROCEDURES
    from mshv_libvirt.rpc.procnames import PROCEDURE_NAMES
    from mshv_libvirt.rpc.relay import RELAYED

    table = {n: PROCEDURES[n].name for n in PROCEDURES}
    relayed = {n: name for n, (name, *_) in PROCEDURE_NAMES.items() if n in RELAYED and name in RELAY_PATHS}
    assert len(relayed) == len(RELAY_PATHS), sorted(set(RELAY_PATHS) - set(relayed.values()))
    return table | relayed


def undriven(trace_dir: Path) -> list[str]:
    """``"N name"`` of every required procedure no trace under ``trace_dir`` recorded, by number."""
    need = required()
    driven = calltrace.read_traces(trace_dir)
    return [f"{n} {need[n]}" for n in sorted(set(need) - driven)]
