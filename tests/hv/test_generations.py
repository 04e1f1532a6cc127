"""mshv_libvirt.hv (MshvSystem -> PartitionFd) against each kernel generation of the emulated device.

Expected values: docs/ABI.md §4.1 (which pt_flags bits and which layout each generation accepts),
§3.2 (bit values), §9.2 (generation names and the open refusing an unknown one) and §9.5 (a KVM that
cannot nest refuses NESTED_VIRTUALIZATION with EIO).
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator

import pytest

from mshv_libvirt import hv
from tests.support.hostcpu import kvm_can_nest, missing

# spec -> (MshvSystem.emulated_kernel, (v2 layout, nested, SMT) errnos with KVM out of the picture)
EXPECTED = {
    "6.15": ("6.15-6.18", (errno.EINVAL, errno.EINVAL, errno.EINVAL)),
    "6.18": ("6.15-6.18", (errno.EINVAL, errno.EINVAL, errno.EINVAL)),
    "6.19": ("6.19", (0, errno.EINVAL, errno.EINVAL)),
    "7.0": ("7.0", (0, 0, 0)),
}


Opener = Callable[[str | None], hv.MshvSystem]


@pytest.fixture
def open_as(monkeypatch: pytest.MonkeyPatch) -> Iterator[Opener]:
    systems: list[hv.MshvSystem] = []

    def opener(spec: str | None) -> hv.MshvSystem:
        if spec is None:
            monkeypatch.delenv(hv.EMU_KERNEL_ENV, raising=False)
        else:
            monkeypatch.setenv(hv.EMU_KERNEL_ENV, spec)
        systems.append(hv.MshvSystem.open(mode="emulated"))
        return systems[-1]

    yield opener
    for s in systems:
        s.close()


@pytest.mark.parametrize("spec", sorted(EXPECTED))
def test_probe_features_per_generation(open_as: Opener, monkeypatch: pytest.MonkeyPatch, spec: str) -> None:
    monkeypatch.setenv("MSHV_LIBVIRT_EMU_KVM", "0")  # the kernel's rules alone
    system = open_as(spec)
    name, (v2, nested, smt) = EXPECTED[spec]
    assert system.emulated_kernel == name
    f = system.probe_features()
    assert (f.cpu_features_v2, f.nested_virtualization, f.smt_enabled_guest) == (v2, nested, smt)
    assert f.nested == (nested == 0) and f.smt == (smt == 0)


def test_default_is_7_0(open_as: Opener) -> None:
    assert open_as(None).emulated_kernel == "7.0"


@pytest.mark.parametrize("spec", sorted(EXPECTED))
def test_create_partition_with_the_new_bits(open_as: Opener, spec: str) -> None:
    system = open_as(spec)
    flags = hv.DEFAULT_PT_FLAGS | hv.PT_SMT_ENABLED_GUEST
    if EXPECTED[spec][1][2]:
        with pytest.raises(hv.MshvError) as exc:
            system.create_partition(flags)
        assert exc.value.errno == errno.EINVAL and exc.value.ioctl == "MSHV_CREATE_PARTITION"
    else:
        with system.create_partition(flags) as p:
            p.initialize()
            p.create_vp(0)


def test_nested_is_refused_by_a_kvm_that_cannot_nest(open_as: Opener) -> None:
    system = open_as("7.0")
    if not system.kvm_backed:
        missing("no usable /dev/kvm behind the emulated device")
    f = system.probe_features()
    assert f.nested_virtualization == (0 if kvm_can_nest() else errno.EIO)


def test_bad_generation_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(hv.EMU_KERNEL_ENV, "6.20")
    with pytest.raises(hv.MshvError) as exc:
        hv.MshvSystem.open(mode="emulated")
    assert exc.value.errno == errno.EINVAL
    assert "MSHV_LIBVIRT_EMU_KERNEL='6.20' names no emulated kernel" in str(exc.value)


def test_pt_bits_are_the_abi_ones() -> None:
    # docs/ABI.md §3.2: NESTED_VIRTUALIZATION is bit 4, SMT_ENABLED_GUEST bit 5; the default asks
    # for LAPIC, X2APIC and GPA_SUPER_PAGES (bits 0-2).
    assert hv.PT_NESTED_VIRTUALIZATION == 0x10
    assert hv.PT_SMT_ENABLED_GUEST == 0x20
    assert hv.DEFAULT_PT_FLAGS == 0x7
