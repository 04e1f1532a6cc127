"""<vcpu current='N'>M</vcpu>: M CPUs described to the guest, the first N enabled (MADT and MP table), read
back here the way Linux reads them (arch/x86/kernel/acpi/boot.c, mpparse.c)."""

from __future__ import annotations

import struct

import pytest

from mshv_libvirt.vmm import acpi, mptable
from mshv_libvirt.vmm.config import ConfigError, VmmConfig


def madt_lapics(tables: acpi.AcpiTables) -> tuple[int, list[tuple[int, int]]]:
    """(MADT revision, [(APIC id, flags)]) found through RSDP -> XSDT -> APIC."""

    def at(addr: int, length: int) -> bytes:
        off = addr - tables.rsdp_addr
        return tables.blob[off : off + length]

    xsdt_addr = struct.unpack_from("<Q", at(tables.rsdp_addr, 36), 24)[0]
    xsdt = at(xsdt_addr, struct.unpack_from("<I", at(xsdt_addr, 8), 4)[0])
    for (addr,) in struct.iter_unpack("<Q", xsdt[36:]):
        header = at(addr, 36)
        if header[:4] == b"APIC":
            madt = at(addr, struct.unpack_from("<I", header, 4)[0])
            assert sum(madt) % 256 == 0
            out, pos = [], 44
            while pos < len(madt):
                kind, length = madt[pos], madt[pos + 1]
                if kind == 0:
                    _uid, apic_id, flags = struct.unpack_from("<BBI", madt, pos + 2)
                    out.append((apic_id, flags))
                pos += length
            return madt[8], out
    raise AssertionError("no MADT")


def linux_counts(revision: int, lapics: list[tuple[int, int]]) -> tuple[int, int]:
    """(processors, disabled) as Linux's acpi_parse_lapic/acpi_register_lapic count them: an entry that is
    neither enabled nor online-capable is skipped when the MADT is revision 5 or later."""
    processors = disabled = 0
    for _apic_id, flags in lapics:
        enabled, online_capable = flags & 1, flags & 2
        if not enabled and revision >= 5 and not online_capable:
            continue
        if enabled:
            processors += 1
        else:
            disabled += 1
    return processors, disabled


@pytest.mark.parametrize(("maximum", "online"), [(1, 1), (2, 1), (4, 2), (4, 4), (254, 3)])
def test_madt_describes_maximum_and_enables_the_online_ones(maximum: int, online: int) -> None:
    revision, lapics = madt_lapics(acpi.build_tables(maximum, ioapic_id=maximum, online=online))
    assert [apic_id for apic_id, _ in lapics] == list(range(maximum))
    assert all(
        flags == (acpi.LAPIC_ENABLED if i < online else acpi.LAPIC_ONLINE_CAPABLE)
        for i, (_, flags) in enumerate(lapics)
    )
    # what Linux then prints: "smpboot: Allowing <maximum> CPUs, <maximum - online> hotplug CPUs"
    assert linux_counts(revision, lapics) == (online, maximum - online)


def test_madt_online_count_is_checked() -> None:
    for online in (0, 3):
        with pytest.raises(ValueError, match="online vcpus"):
            acpi.build_tables(2, online=online)


def test_mp_table_marks_the_others_disabled() -> None:
    blob = mptable.build_mptable(4, ioapic_id=4, online=2)
    table = blob[16:]
    assert sum(table) % 256 == 0
    cpus = [(table[44 + 20 * i + 1], table[44 + 20 * i + 3]) for i in range(4)]
    assert all(table[44 + 20 * i] == 0 for i in range(4))  # processor entries
    assert cpus == [(0, mptable.CPU_ENABLED | mptable.CPU_BOOTSTRAP), (1, mptable.CPU_ENABLED), (2, 0), (3, 0)]


def test_vmm_config_max_vcpus() -> None:
    base = {"name": "t", "memory_bytes": 64 << 20, "kernel": "/k", "vcpus": 2}
    assert VmmConfig.from_dict(base).max_vcpus == 2  # absent: the same as vcpus
    assert VmmConfig.from_dict({**base, "max_vcpus": 5}).max_vcpus == 5
    for bad in (1, 255, True, "3"):
        with pytest.raises(ConfigError, match="max_vcpus"):
            VmmConfig.from_dict({**base, "max_vcpus": bad})
