"""Host facts for the connection-level procedures: node info, capabilities, domain capabilities."""

from __future__ import annotations

import os
import platform
import re
import uuid
from dataclasses import dataclass
from functools import cache
from xml.sax.saxutils import escape

from mshv_libvirt.domain import MAX_VCPUS
from mshv_libvirt.proc import host_memory_kib


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
    <mode name='host-passthrough' supported='yes'/>
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
