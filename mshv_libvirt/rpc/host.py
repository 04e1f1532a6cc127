"""Host facts for the connection-level procedures: node info, capabilities, domain capabilities."""

from __future__ import annotations

import errno
import logging
import os
import platform
import re
import threading
import uuid
from dataclasses import dataclass
from functools import cache
from xml.sax.saxutils import escape

from mshv_libvirt.domain import MAX_VCPUS
from mshv_libvirt.proc import host_memory_kib

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeInfo:
    model: str
    memory_kib: int
    cpus: int
    mhz: int
    nodes: int
    sockets: int
    cores: int
    threads: int


def _cpuinfo() -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor block is enough
                key, _, value = line.partition(":")
                out[key.strip()] = value.strip()
    except OSError:
        pass
    return out


def node_info() -> NodeInfo:
    cpus = os.cpu_count() or 1
    mem_kib = host_memory_kib()
    info = _cpuinfo()
    try:
        mhz = int(float(info.get("cpu MHz", "0")))
    except ValueError:
        mhz = 0
    # libvirt reports one NUMA node, one socket and cores = cpus when it cannot see the topology.
    return NodeInfo(platform.machine() or "x86_64", mem_kib, cpus, mhz, 1, 1, cpus, 1)


def hypervisor_version(release: str | None = None) -> int:
    """The host kernel's version as major * 1_000_000 + minor * 1000 + micro (the mshv driver's version).

    Only each field's leading digits count: "6.18.44-fc-v1147" is 6.18.44.
    """
    parts = []
    for piece in (release if release is not None else platform.release()).split(".")[:3]:
        m = re.match(r"\d+", piece)
        parts.append(min(int(m.group()), 999) if m else 0)
    while len(parts) < 3:
        parts.append(0)
    return parts[0] * 1_000_000 + parts[1] * 1000 + parts[2]


@cache
def host_uuid() -> str:
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path) as f:
                return str(uuid.UUID(f.read().strip()))
        except (OSError, ValueError):
            continue
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, platform.node()))


@dataclass(frozen=True)
class HypervisorOffer:
    """What the running kernel's mshv driver (or the emulated device) lets a partition have, beyond
    the basics every generation has. Probed once per daemon (:func:`hypervisor_offer`)."""

    device: str  # "kernel", "emulated (Linux 6.19)", or why there is none
    nested_feature: str | None  # "vmx"/"svm" when nested virtualization is offered
    nested_refusal: str  # why not, when it is not
    smt: bool  # MSHV_PT_BIT_SMT_ENABLED_GUEST is accepted
    smt_refusal: str


def _nested_cpu_feature() -> str:
    """The virtualization extension a nested hypervisor uses on this host's CPU vendor."""
    return "svm" if _cpuinfo().get("vendor_id") in ("AuthenticAMD", "HygonGenuine") else "vmx"


def _refusal(err: int, emulated: str | None) -> str:
    if err == errno.EINVAL:
        kernel = f"the emulated device behaves as Linux {emulated}" if emulated else "the kernel predates Linux 7.0"
        return f"the mshv driver does not know the flag (EINVAL; {kernel})"
    return f"the hypervisor refused it ({errno.errorcode.get(err, err)})"


def _probe() -> HypervisorOffer:
    try:
        from mshv_libvirt import hv  # the compiled module; absent from an unbuilt checkout

        system = hv.MshvSystem.open()
    except (ImportError, OSError) as err:
        why = f"no mshv device: {err}"
        return HypervisorOffer(why, None, why, False, why)
    try:
        features = system.probe_features()
        kernel = system.emulated_kernel
    finally:
        system.close()
    device = f"emulated (Linux {kernel})" if system.backend == "emulated" else "kernel"
    offer = HypervisorOffer(
        device,
        _nested_cpu_feature() if features.nested else None,
        ""
        if features.nested
        else "MSHV_PT_BIT_NESTED_VIRTUALIZATION: " + _refusal(features.nested_virtualization, kernel),
        features.smt,
        "" if features.smt else "MSHV_PT_BIT_SMT_ENABLED_GUEST: " + _refusal(features.smt_enabled_guest, kernel),
    )
    log.info("mshv device %s: %s", device, offer)
    return offer


_offer_lock = threading.Lock()
_offer: HypervisorOffer | None = None


def hypervisor_offer() -> HypervisorOffer:
    """The device's offer, probed on first use (a few MSHV_CREATE_PARTITION calls), then cached: the
    kernel does not change under a running daemon. Call from a thread, or after :func:`probe_soon`."""
    global _offer
    with _offer_lock:
        if _offer is None:
            _offer = _probe()
        return _offer


def probe_soon() -> None:
    """Start probing in the background, so no client request ever waits on the device."""
    threading.Thread(target=hypervisor_offer, name="mshv-probe", daemon=True).start()


def capabilities_xml() -> str:
    info = node_info()
    vendor = escape(_cpuinfo().get("vendor_id", "unknown"))
    cpus = "\n".join(
        f"            <cpu id='{i}' socket_id='0' die_id='0' core_id='{i}' siblings='{i}'/>" for i in range(info.cpus)
    )
    return f"""<capabilities>

  <host>
    <uuid>{host_uuid()}</uuid>
    <cpu>
      <arch>x86_64</arch>
      <vendor>{vendor}</vendor>
      <topology sockets='{info.sockets}' dies='1' cores='{info.cores}' threads='{info.threads}'/>
    </cpu>
    <power_management/>
    <iommu support='no'/>
    <migration_features/>
    <topology>
      <cells num='1'>
        <cell id='0'>
          <memory unit='KiB'>{info.memory_kib}</memory>
          <cpus num='{info.cpus}'>
{cpus}
          </cpus>
        </cell>
      </cells>
    </topology>
  </host>

  <guest>
    <os_type>hvm</os_type>
    <arch name='x86_64'>
      <wordsize>64</wordsize>
      <domain type='hyperv'/>
    </arch>
    <features>
      <acpi default='on' toggle='yes'/>
      <apic default='on' toggle='no'/>
    </features>
  </guest>

</capabilities>
"""


def _host_passthrough_xml(offer: HypervisorOffer) -> str:
    """host-passthrough and what this kernel adds to it, as enums (domaincaps.rng allows any enum
    there): ``features`` lists the <feature policy='require'> names a guest may ask for (vmx or svm when
    nested virtualization is offered), ``smtScheduling`` whether threads='2' gets SMT-aware scheduling
    (a topology with threads is accepted either way)."""
    if offer.nested_feature:
        features = f"<enum name='features'>\n        <value>{offer.nested_feature}</value>\n      </enum>"
    else:
        features = "<enum name='features'/>"
    return f"""    <mode name='host-passthrough' supported='yes'>
      {features}
      <enum name='smtScheduling'>
        <value>{"yes" if offer.smt else "no"}</value>
      </enum>
    </mode>"""


def domain_capabilities_xml(emulator: str | None, arch: str | None, machine: str | None, virttype: str | None) -> str:
    from mshv_libvirt.errors import ErrorCode, VirtError

    if arch not in (None, "x86_64"):
        raise VirtError(ErrorCode.INVALID_ARG, f"architecture '{arch}' is not supported by the mshv driver")
    if virttype not in (None, "hyperv"):
        raise VirtError(ErrorCode.INVALID_ARG, f"virttype '{virttype}' is not supported by the mshv driver")
    return f"""<domainCapabilities>
  <path>/usr/sbin/virtmshvd</path>
  <domain>hyperv</domain>
  <arch>x86_64</arch>
  <vcpu max='{MAX_VCPUS}'/>
  <iothreads supported='no'/>
  <os supported='yes'>
    <loader supported='no'/>
  </os>
  <cpu>
{_host_passthrough_xml(hypervisor_offer())}
    <mode name='maximum' supported='no'/>
    <mode name='host-model' supported='no'/>
    <mode name='custom' supported='no'/>
  </cpu>
  <memoryBacking supported='no'/>
  <devices>
    <disk supported='no'/>
    <graphics supported='no'/>
    <video supported='no'/>
    <hostdev supported='no'/>
    <rng supported='no'/>
    <filesystem supported='no'/>
    <tpm supported='no'/>
    <redirdev supported='no'/>
    <channel supported='no'/>
  </devices>
  <features>
    <gic supported='no'/>
    <vmcoreinfo supported='no'/>
    <genid supported='no'/>
    <sev supported='no'/>
  </features>
</domainCapabilities>
"""
