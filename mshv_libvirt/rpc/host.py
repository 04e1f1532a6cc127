"""Host facts for the connection-level procedures: node info and statistics, capabilities, CPU models, SMBIOS."""

from __future__ import annotations

import errno
import logging
import os
import platform
import re
import subprocess
import threading
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from xml.sax.saxutils import escape

from mshv_libvirt.domain import MAX_VCPUS
from mshv_libvirt.domain.xml import DISK_BUSES_SUPPORTED, DISK_DEVICES_SUPPORTED, DISK_MODELS_SUPPORTED
from mshv_libvirt.errors import ErrorCode, ErrorDomain, VirtError, invalid_argument
from mshv_libvirt.proc import SYS_CPU, host_memory_kib, read_cpu_list

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


def _enum(name: str, values: Collection[str], indent: str) -> str:
    """A domcapabilities <enum> as libvirt's virDomainCapsEnumFormat prints it."""
    if not values:
        return f"{indent}<enum name='{name}'/>"
    inner = "".join(f"{indent}  <value>{v}</value>\n" for v in values)
    return f"{indent}<enum name='{name}'>\n{inner}{indent}</enum>"


def _disk_xml() -> str:
    """<disk>: what domain/xml.py runs, in the QEMU driver's shape (virDomainCapsDeviceDiskFormat): a disk on
    virtio-blk, no cdrom, floppy or lun and no other bus."""
    enums = (("diskDevice", DISK_DEVICES_SUPPORTED), ("bus", DISK_BUSES_SUPPORTED), ("model", DISK_MODELS_SUPPORTED))
    body = "\n".join(_enum(name, values, "      ") for name, values in enums)
    return f"    <disk supported='yes'>\n{body}\n    </disk>"


def check_hypervisor(arch: str | None, virttype: str | None) -> None:
    """The (arch, virttype) a domcapabilities-style call names must be this driver's (None: the default)."""
    if arch not in (None, "x86_64"):
        raise VirtError(ErrorCode.INVALID_ARG, f"architecture '{arch}' is not supported by the mshv driver")
    if virttype not in (None, "hyperv"):
        raise VirtError(ErrorCode.INVALID_ARG, f"virttype '{virttype}' is not supported by the mshv driver")


def domain_capabilities_xml(emulator: str | None, arch: str | None, machine: str | None, virttype: str | None) -> str:
    check_hypervisor(arch, virttype)
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
{_disk_xml()}
    <graphics supported='no'/>
    <video supported='no'/>
    <hostdev supported='no'/>
    <rng supported='yes'>
      <enum name='model'>
        <value>virtio</value>
        <value>virtio-non-transitional</value>
      </enum>
      <enum name='backendModel'>
        <value>random</value>
      </enum>
    </rng>
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


# ---- node statistics: what libvirt's util/virhostcpu.c and virhostmem.c read on Linux ---------------------

PROC_STAT = Path("/proc/stat")
PROC_MEMINFO = Path("/proc/meminfo")
SYS_NODE = Path("/sys/devices/system/node")

NODE_CPU_STATS_ALL_CPUS = -1
NODE_MEMORY_STATS_ALL_CELLS = -1
_NODE_CPU_STATS = 4  # kernel, user, idle, iowait
_NODE_MEMORY_STATS_ALL = 4  # total, free, buffers, cached
_NODE_MEMORY_STATS_CELL = 2  # total, free
_TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def _invalid_arg(detail: str) -> VirtError:
    return invalid_argument(detail, ErrorDomain.NONE)  # libvirt's util/ code reports in no domain


def _api_arg(detail: str) -> VirtError:
    return invalid_argument(detail, ErrorDomain.DOMAIN)  # its public API's checks


def _cpu_list(name: str) -> frozenset[int]:
    try:
        return read_cpu_list(name)
    except (OSError, ValueError) as err:
        raise VirtError(ErrorCode.SYSTEM_ERROR, f"cannot read {SYS_CPU / name}: {err}", ErrorDomain.NONE) from err


def online_cpus() -> frozenset[int]:
    """The host CPUs that are online, as libvirt's virHostCPUGetOnlineBitmap reads them."""
    return _cpu_list("online")


def host_cpu_count() -> int:
    """Highest present CPU number + 1 (virHostCPUGetCount): the length of every cpumap libvirt hands out."""
    present = _cpu_list("present")
    return max(present) + 1 if present else 0


def cpumap_bytes(cpus: Collection[int], maplen: int) -> bytes:
    """A libvirt cpumap (bit N of byte N // 8 = CPU N) of exactly ``maplen`` bytes (virBitmapToDataBuf)."""
    out = bytearray(maplen)
    for cpu in cpus:
        if 0 <= cpu < maplen * 8:
            out[cpu // 8] |= 1 << (cpu % 8)
    return bytes(out)


def cpumap_cpus(data: bytes) -> frozenset[int]:
    """The CPUs a libvirt cpumap names (virBitmapNewData)."""
    return frozenset(i * 8 + bit for i, byte in enumerate(data) for bit in range(8) if byte >> bit & 1)


def node_cpu_map() -> tuple[int, bytes, int]:
    """(CPU count, online map of VIR_CPU_MAPLEN(count) bytes, online CPUs) as virNodeGetCPUMap returns them."""
    count = host_cpu_count()
    online = online_cpus()
    return count, cpumap_bytes(online, (count + 7) // 8), len(online)


def node_cpu_stats(cpu_num: int, nparams: int) -> tuple[int, list[tuple[str, int]]]:
    """virNodeGetCPUStats: (how many, the values in ns from /proc/stat); nparams 0 only asks how many."""
    if cpu_num < 0 and cpu_num != NODE_CPU_STATS_ALL_CPUS:
        raise _api_arg(f"cpuNum in virNodeGetCPUStats only accepts {NODE_CPU_STATS_ALL_CPUS} as a negative value")
    if nparams < 0:
        raise _api_arg("*nparams in virNodeGetCPUStats must be zero or greater")
    if nparams == 0:
        return _NODE_CPU_STATS, []
    if nparams != _NODE_CPU_STATS:
        raise _invalid_arg(f"nparams in virHostCPUGetStatsLinux must be equal to {_NODE_CPU_STATS}")
    header = "cpu" if cpu_num == NODE_CPU_STATS_ALL_CPUS else f"cpu{cpu_num}"
    try:
        lines = PROC_STAT.read_text().splitlines()
    except OSError as err:
        raise VirtError(ErrorCode.SYSTEM_ERROR, f"cannot open {PROC_STAT}: {err}", ErrorDomain.NONE) from err
    for line in lines:
        fields = line.split()
        if len(fields) < 5 or fields[0] != header:
            continue
        ticks = [int(v) for v in fields[1:11]] + [0] * (11 - len(fields))
        user, nice, system, idle, iowait, irq, softirq = ticks[:7]
        return _NODE_CPU_STATS, [
            ("kernel", (system + irq + softirq) * _TICK_NS),
            ("user", (user + nice) * _TICK_NS),
            ("idle", idle * _TICK_NS),
            ("iowait", iowait * _TICK_NS),
        ]
    raise _invalid_arg("Invalid cpuNum in virHostCPUGetStatsLinux")


def numa_nodes() -> list[int]:
    """Host NUMA node numbers (empty where the kernel has no NUMA support, libvirt's fake one-cell case)."""
    try:
        names = os.listdir(SYS_NODE)
    except OSError:
        return []
    return sorted(int(n[4:]) for n in names if n.startswith("node") and n[4:].isdigit())


def _meminfo(path: Path, prefix: str = "") -> dict[str, int]:
    """``Key: N kB`` lines (a node's file prefixes them with "Node N ")."""
    out: dict[str, int] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise VirtError(ErrorCode.SYSTEM_ERROR, f"cannot open {path}: {err}", ErrorDomain.NONE) from err
    for line in lines:
        fields = line[len(prefix) :].split() if line.startswith(prefix) else []
        if len(fields) >= 2 and fields[0].endswith(":") and fields[1].isdigit():
            out.setdefault(fields[0][:-1], int(fields[1]))
    return out


def _node_meminfo(node: int) -> dict[str, int]:
    return _meminfo(SYS_NODE / f"node{node}" / "meminfo", f"Node {node} ")


def node_memory_stats(cell: int, nparams: int) -> tuple[int, list[tuple[str, int]]]:
    """virNodeGetMemoryStats: (how many, the values in KiB from /proc/meminfo for all cells or from the node's
    meminfo for one); nparams 0 only asks how many."""
    if cell < 0 and cell != NODE_MEMORY_STATS_ALL_CELLS:
        raise _api_arg(
            f"cellNum in virNodeGetMemoryStats only accepts {NODE_MEMORY_STATS_ALL_CELLS} as a negative value"
        )
    if nparams < 0:
        raise _api_arg("*nparams in virNodeGetMemoryStats must be zero or greater")
    nodes = numa_nodes()
    if not nodes and cell == 0:
        cell = NODE_MEMORY_STATS_ALL_CELLS  # libvirt claims one cell without NUMA: the whole host
    if cell != NODE_MEMORY_STATS_ALL_CELLS:
        if not nodes:
            raise VirtError(ErrorCode.INTERNAL_ERROR, "NUMA isn't available on this host", ErrorDomain.NONE)
        if cell > max(nodes):
            raise _invalid_arg(f"cellNum in virHostMemGetStats must be less than or equal to {max(nodes)}")
    want = _NODE_MEMORY_STATS_ALL if cell == NODE_MEMORY_STATS_ALL_CELLS else _NODE_MEMORY_STATS_CELL
    if nparams == 0:
        return want, []
    if nparams != want:
        raise _invalid_arg(f"nparams in virHostMemGetStatsLinux must be {want}")
    info = _meminfo(PROC_MEMINFO) if cell == NODE_MEMORY_STATS_ALL_CELLS else _node_meminfo(cell)
    # In libvirt's order, as far as the file has them (a node's meminfo has no Buffers/Cached lines).
    fields = (("MemTotal", "total"), ("MemFree", "free"), ("Buffers", "buffers"), ("Cached", "cached"))
    out = [(name, info[key]) for key, name in fields if key in info][:want]
    if not out:
        raise VirtError(ErrorCode.INTERNAL_ERROR, "no available memory line found", ErrorDomain.NONE)
    return want, out


def _available_bytes() -> int:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_memory_bytes() -> int:
    """virNodeGetFreeMemory: the NUMA nodes' free memory summed (libvirt's virHostMemGetInfo), in bytes."""
    nodes = numa_nodes()
    if not nodes:
        return _available_bytes()
    return sum(_node_meminfo(n).get("MemFree", 0) * 1024 for n in nodes)


def cells_free_memory(start: int, count: int) -> list[int]:
    """virNodeGetCellsFreeMemory: free bytes of cells start .. start + count - 1 that exist."""
    if count <= 0:
        raise _api_arg("maxCells in virNodeGetCellsFreeMemory must be greater than zero")
    if start < 0:
        raise _api_arg("startCell in virNodeGetCellsFreeMemory must be zero or greater")
    nodes = numa_nodes()
    last = max(nodes) if nodes else 0
    if start > last:
        raise VirtError(ErrorCode.INTERNAL_ERROR, f"start cell {start} out of range (0-{last})", ErrorDomain.NONE)
    if not nodes:
        return [_available_bytes()]
    return [
        _node_meminfo(n).get("MemFree", 0) * 1024 if n in nodes else 0
        for n in range(start, min(start + count, last + 1))
    ]


# ---- CPU models: libvirt's own list for an architecture (its cpu_map), and the hypervisor CPU -------------

CPU_MAP = Path("/usr/share/libvirt/cpu_map")
# libvirt's architecture names (virArchFromString) and which CPU driver lists models for them.
_ARCHES = (
    "alpha", "armv6l", "armv7l", "armv7b", "aarch64", "cris", "i686", "ia64", "lm32", "m68k", "microblaze",
    "microblazeel", "mips", "mipsel", "mips64", "mips64el", "openrisc", "parisc", "parisc64", "ppc", "ppcle",
    "ppc64", "ppc64le", "ppcemb", "riscv32", "riscv64", "s390", "s390x", "sh4", "sh4eb", "sparc", "sparc64",
    "unicore32", "x86_64", "xtensa", "xtensaeb",
)  # fmt: skip
_CPU_MAP_ARCH = {"i686": "x86", "x86_64": "x86", "ppc64": "ppc64", "ppc64le": "ppc64"}
_CPU_DRIVER_WITHOUT_MODELS = ("s390", "s390x", "armv6l", "armv7b", "armv7l", "aarch64")


@cache
def _cpu_map_models(group: str) -> tuple[str, ...]:
    """Model names of one arch group of libvirt's cpu_map, in the order libvirt loads them."""
    from lxml import etree

    try:
        index = etree.parse(str(CPU_MAP / "index.xml")).getroot()
    except (OSError, etree.LxmlError) as err:
        raise VirtError(ErrorCode.INTERNAL_ERROR, f"cannot read libvirt's CPU map: {err}", ErrorDomain.NONE) from err
    arch = index.find(f"arch[@name='{group}']")
    if arch is None:
        raise VirtError(ErrorCode.INTERNAL_ERROR, f"cannot find CPU map for {group} architecture", ErrorDomain.NONE)
    names = [m.get("name", "") for m in arch.findall("model")]
    for include in arch.findall("include"):
        try:
            part = etree.parse(str(CPU_MAP / include.get("filename", ""))).getroot()
        except (OSError, etree.LxmlError) as err:
            raise VirtError(
                ErrorCode.INTERNAL_ERROR, f"cannot read libvirt's CPU map: {err}", ErrorDomain.NONE
            ) from err
        names += [m.get("name", "") for m in part.findall("model")]
    return tuple(names)


def cpu_model_names(arch: str) -> list[str]:
    """virConnectGetCPUModelNames: the CPU models libvirt knows for ``arch`` (which the API documents as
    not promising that a hypervisor runs them: this driver runs host-passthrough CPUs only)."""
    if arch not in _ARCHES:
        raise VirtError(ErrorCode.INVALID_ARG, f"cannot find architecture {arch}")
    if arch in _CPU_DRIVER_WITHOUT_MODELS:
        return []
    group = _CPU_MAP_ARCH.get(arch)
    if group is None:
        raise VirtError(ErrorCode.NO_SUPPORT, f"'{arch}' architecture is not supported by CPU driver", ErrorDomain.CPU)
    return list(_cpu_map_models(group))


def _no_host_model() -> VirtError:
    # As libvirt's QEMU driver refuses when its hypervisor reports no host CPU model (domcapabilities lists
    # host-model and custom as unsupported here: only host-passthrough, the host's own CPU, exists).
    return VirtError(
        ErrorCode.OPERATION_UNSUPPORTED, "the mshv driver does not support reporting CPU model for virttype 'hyperv'"
    )


def compare_hypervisor_cpu(arch: str | None, virttype: str | None) -> int:
    """virConnectCompareHypervisorCPU: refused, as libvirt's drivers do without a reported host CPU model."""
    check_hypervisor(arch, virttype)
    raise _no_host_model()


def baseline_hypervisor_cpu(arch: str | None, virttype: str | None, cpus: list[str]) -> str:
    """virConnectBaselineHypervisorCPU: refused, as libvirt's QEMU driver does for a hypervisor with no CPU
    models (after parsing the CPUs given, which it does first)."""
    _parse_cpu_definitions(cpus)
    check_hypervisor(arch, virttype)
    raise VirtError(
        ErrorCode.OPERATION_UNSUPPORTED, "the mshv driver does not support any CPU models for virttype 'hyperv'"
    )


def _parse_cpu_definitions(cpus: list[str]) -> None:
    """virCPUDefListParse's checks: at least one CPU, each well-formed XML whose root is <cpu>."""
    from lxml import etree

    if not cpus:
        raise VirtError(ErrorCode.INVALID_ARG, "no CPUs given", ErrorDomain.CPU)
    for text in cpus:
        try:
            root = etree.fromstring(text.encode(), etree.XMLParser(resolve_entities=False, no_network=True))
        except etree.XMLSyntaxError as err:
            raise VirtError(
                ErrorCode.XML_ERROR, f"(CPU_definition):{err.lineno or 0}: {err.msg}", ErrorDomain.CPU
            ) from None
        if root.tag != "cpu":
            raise VirtError(ErrorCode.XML_ERROR, "XML does not contain expected 'cpu' element", ErrorDomain.CPU)


# ---- host SMBIOS (virsh sysinfo): dmidecode's output read and formatted as libvirt's virsysinfo.c does -------

DMIDECODE_TYPES = "0,1,2,3,4,11,17"  # BIOS, system, base board, chassis, processor, OEM strings, memory
_SPACE = " \t\n\v\f\r"  # g_ascii_isspace

# (section header, repeats, [(entry name, dmidecode key)]) in libvirt's output order
_SMBIOS_SECTIONS: tuple[tuple[str, str, bool, tuple[tuple[str, str], ...]], ...] = (
    ("bios", "BIOS Information", False, (("vendor", "Vendor"), ("version", "Version"), ("date", "Release Date"),
                                         ("release", "BIOS Revision"))),
    ("system", "System Information", False, (("manufacturer", "Manufacturer"), ("product", "Product Name"),
                                             ("version", "Version"), ("serial", "Serial Number"), ("uuid", "UUID"),
                                             ("sku", "SKU Number"), ("family", "Family"))),
    ("baseBoard", "Base Board Information", True, (("manufacturer", "Manufacturer"), ("product", "Product Name"),
                                                   ("version", "Version"), ("serial", "Serial Number"),
                                                   ("asset", "Asset Tag"), ("location", "Location In Chassis"))),
    ("chassis", "Chassis Information", False, (("manufacturer", "Manufacturer"), ("version", "Version"),
                                               ("serial", "Serial Number"), ("asset", "Asset Tag"),
                                               ("sku", "SKU Number"))),
    ("processor", "Processor Information", True, (("socket_destination", "Socket Designation"), ("type", "Type"),
                                                  ("family", "Family"), ("manufacturer", "Manufacturer"),
                                                  ("signature", "Signature"), ("version", "Version"),
                                                  ("external_clock", "External Clock"), ("max_speed", "Max Speed"),
                                                  ("status", "Status"), ("serial_number", "Serial Number"),
                                                  ("part_number", "Part Number"))),
    ("memory_device", "Memory Device", True, (("size", "Size"), ("form_factor", "Form Factor"), ("locator", "Locator"),
                                              ("bank_locator", "Bank Locator"), ("type", "Type"),
                                              ("type_detail", "Type Detail"), ("speed", "Speed"),
                                              ("manufacturer", "Manufacturer"), ("serial_number", "Serial Number"),
                                              ("part_number", "Part Number"))),
)  # fmt: skip


def _smbios_value(text: str, start: int, key: str) -> str | None:
    """libvirt's lookup: the first "Key: " at or after ``start`` (anywhere after it, as its strstr does), the rest
    of that line without trailing blanks; None when absent or blank."""
    i = text.find(f"{key}: ", start)
    if i < 0:
        return None
    cur = i + len(key) + 2
    eol = text.find("\n", cur)
    value = text[cur : eol if eol >= 0 else len(text)].rstrip(_SPACE)
    return value or None


def _smbios_escape(value: str) -> str:
    """virBufferEscapeString: XML specials escaped, other control characters dropped."""
    out = []
    for ch in value:
        if ch in "<>&\"'":
            out.append({"<": "&lt;", ">": "&gt;", "&": "&amp;", '"': "&quot;", "'": "&apos;"}[ch])
        elif ord(ch) >= 0x20 or ch in "\t\n\r":
            out.append(ch)
    return "".join(out)


def _smbios_oem_strings(text: str, oem_string: Callable[[int], str | None]) -> list[str] | None:
    start = text.find("OEM Strings")
    if start < 0:
        return None
    values: list[str] = []
    index, cur = 1, start
    while (cur := text.find("String ", cur)) >= 0:
        cur += 7
        eol = text.find("\n", cur)
        if eol < 0:
            raise VirtError(ErrorCode.INTERNAL_ERROR, "Malformed output of dmidecode", ErrorDomain.SYSINFO)
        while text[cur].isdigit():
            cur += 1
        if text[cur] != ":":
            raise VirtError(ErrorCode.INTERNAL_ERROR, "Malformed output of dmidecode", ErrorDomain.SYSINFO)
        cur += 2
        value = text[cur:eol].rstrip(_SPACE)
        if not value:
            continue  # (libvirt does not count it either)
        # dmidecode prints a newline inside a string as '.': libvirt asks for the raw string then.
        raw = oem_string(index) if "." in value else value
        if raw is None:
            raise VirtError(ErrorCode.INTERNAL_ERROR, f"cannot read OEM string {index}", ErrorDomain.SYSINFO)
        values.append(raw)
        index += 1
        cur = eol
    return values


def _empty_slot(text: str, base: int) -> bool:
    """A memory device whose (first following) "Size: " line is "No Module Installed" (or a prefix of it)."""
    at = text.find("Size: ", base)
    if at < 0:
        return False
    eol = text.find("\n", at + 6)
    return "No Module Installed".startswith(text[at + 6 : eol if eol >= 0 else len(text)])


def format_smbios(text: str, oem_string: Callable[[int], str | None] = lambda _i: None) -> str:
    """``dmidecode -q -t 0,1,2,3,4,11,17`` output as libvirt's <sysinfo type='smbios'> (virSysinfoFormat)."""
    body: list[str] = []
    oem = _smbios_oem_strings(text, oem_string)
    for element, header, repeats, fields in _SMBIOS_SECTIONS:
        base = 0
        while (base := text.find(header, base)) >= 0:
            start = base + len(header) if element == "baseBoard" else base
            entries = [(name, _smbios_value(text, start, key)) for name, key in fields]
            if element == "memory_device" and _empty_slot(text, base):
                entries = []  # libvirt skips the whole device
            present = [(name, value) for name, value in entries if value is not None]
            if present:
                body.append(f"  <{element}>")
                body += [f"    <entry name='{name}'>{_smbios_escape(value)}</entry>" for name, value in present]
                body.append(f"  </{element}>")
            if not repeats:
                break
            base += len(header)
        if element == "memory_device" and oem is not None:
            body.append("  <oemStrings>")
            body += [f"    <entry>{_smbios_escape(v)}</entry>" for v in oem]
            body.append("  </oemStrings>")
    if not body:
        return "<sysinfo type='smbios'/>\n"
    return "<sysinfo type='smbios'>\n" + "\n".join(body) + "\n</sysinfo>\n"


def _dmidecode() -> str | None:
    for directory in (*os.get_exec_path(), "/usr/sbin", "/sbin"):
        path = os.path.join(directory, "dmidecode")
        if os.access(path, os.X_OK):
            return path
    return None


def _run(argv: list[str]) -> str | None:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout if res.returncode == 0 else None


def read_host_sysinfo() -> str | None:
    """The host's SMBIOS as libvirt formats it, or None where there is none (no dmidecode, or no DMI tables:
    dmidecode fails, as on hosts that boot without firmware tables). Runs dmidecode: call it off the event loop."""
    dmidecode = _dmidecode()
    if dmidecode is None:
        return None
    text = _run([dmidecode, "-q", "-t", DMIDECODE_TYPES])
    if text is None:
        return None

    def oem_string(index: int) -> str | None:
        assert dmidecode is not None
        try:
            res = subprocess.run(
                [dmidecode, "--dump", "--oem-string", str(index)], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return res.stdout if res.returncode == 0 and not res.stderr else None

    try:
        return format_smbios(text, oem_string)
    except VirtError:
        return None
