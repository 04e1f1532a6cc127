"""Monitoring and host procedures: node statistics, CPU models, SMBIOS, per-domain CPU and memory figures,
vCPU and emulator pinning, scheduler queries, jobs, and the device statistics every driver answers.

The rows at the end join the table in ``dispatch.py``. Each handler does what libvirt's remote daemon,
public API and QEMU driver do for the call, in their order: the daemon's bounds on the wire arguments,
the public API's argument checks, then the driver (flags, domain state, the answer), with their codes
and messages. Values come from where libvirt reads them on Linux (/proc, /sys, the VMM's threads).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import stat
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mshv_libvirt.domain import DomainConfig
from mshv_libvirt.domain.xml import DiskDevice, parse_mac
from mshv_libvirt.driver.cputune import set_emulatorpin, set_vcpupin, vcpu_threads
from mshv_libvirt.driver.disks import cannot_access
from mshv_libvirt.driver.manager import Domain
from mshv_libvirt.driver.netports import dhcp_leases
from mshv_libvirt.driver.vmm_client import VmmError
from mshv_libvirt.errors import ErrorCode, ErrorDomain, VirtError, invalid_argument, invalid_operation
from mshv_libvirt.proc import task_stat

from . import host
from .protocol import STRING_MAX
from .table import (
    DOM,
    INT,
    OPT_STR,
    STR,
    UHYPER,
    UINT,
    Arg,
    Flags,
    Procedure,
    proc,
    ret_bool,
    ret_int,
    ret_raw,
    ret_str,
    ret_uhyper,
)
from .xdr import Packer, Unpacker

if TYPE_CHECKING:
    from .dispatch import Session

# remote_protocol.x bounds
CPUMAP_MAX = 2048
CPUMAPS_MAX = 8388608
VCPUINFO_MAX = 16384
NODE_STATS_MAX = 16  # REMOTE_NODE_CPU_STATS_MAX, REMOTE_NODE_MEMORY_STATS_MAX
NODE_MAX_CELLS = 1024
MEMORY_STATS_MAX = 1024
SCHEDULER_PARAMETERS_MAX = 16
CPU_STATS_NCPUS_MAX = 128
CPU_MODELS_MAX = 8192
CPU_BASELINE_MAX = 256

AFFECT_LIVE, AFFECT_CONFIG = 1, 2
TYPED_PARAM_STRING_OKAY = 4
VCPU_OFFLINE, VCPU_RUNNING = 0, 1
MEMORY_STAT_ACTUAL_BALLOON, MEMORY_STAT_RSS, MEMORY_STAT_NR = 6, 7, 13
JOB_STATS_COMPLETED, JOB_STATS_KEEP_COMPLETED = 1, 2
TP_INT, TP_UINT, TP_LLONG, TP_ULLONG, TP_DOUBLE, TP_BOOLEAN, TP_STRING = range(1, 8)
TypedParam = tuple[str, int, Any]
QCOW2_MAGIC = b"QFI\xfb"
QCOW2_HEADER = struct.Struct(">4sIQIIQ")  # magic, version, backing file offset and size, cluster bits, size


def _rpc_internal(detail: str) -> VirtError:
    """The remote daemon's own bounds on wire arguments (remote_daemon_dispatch.c)."""
    return VirtError(ErrorCode.INTERNAL_ERROR, detail, ErrorDomain.RPC)


def _api_arg(detail: str) -> VirtError:
    """An argument check of libvirt's public API (libvirt-domain.c), or of its domain_conf.c."""
    return invalid_argument(detail, ErrorDomain.DOMAIN)


def _privileged(s: Session) -> bool:
    """The system instance, libvirt's "privileged" driver (the one that may use cgroups and read SMBIOS)."""
    return bool(s.daemon.uri == "mshv:///system")


def pack_typed_params(p: Packer, params: Sequence[TypedParam]) -> None:
    """remote_typed_param<>: field, type, and the value of that type."""
    p.uint(len(params))
    for field, kind, value in params:
        p.string(field)
        p.int(kind)
        if kind in (TP_INT, TP_BOOLEAN):
            p.int(int(value))
        elif kind == TP_UINT:
            p.uint(int(value))
        elif kind == TP_LLONG:
            p.hyper(int(value))
        elif kind == TP_ULLONG:
            p.uhyper(int(value))
        elif kind == TP_DOUBLE:
            p.double(float(value))
        else:
            p.string(str(value))


class _Opaque(Arg):
    """A variable-length opaque (a cpumap) of at most ``maximum`` bytes."""

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum

    def decode(self, u: Unpacker) -> Any:
        return u.opaque(self.maximum)


class _Strings(Arg):
    """remote_nonnull_string<maximum>."""

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum

    def decode(self, u: Unpacker) -> Any:
        return [u.string(STRING_MAX) for _ in range(u.array_len(self.maximum))]


CPUMAP = _Opaque(CPUMAP_MAX)


# ---- which config a call reads or changes (libvirt's virDomainObjGetOneDefState / virDomainObjGetDefs) -----

_EXCLUSIVE_AFFECT = "Flags 'VIR_DOMAIN_AFFECT_LIVE' and 'VIR_DOMAIN_AFFECT_CONFIG' are mutually exclusive"


def _impact(dom: Domain, flags: int) -> int:
    """virDomainObjUpdateModificationImpact: CURRENT resolved, and what the domain cannot have refused."""
    if not flags & (AFFECT_LIVE | AFFECT_CONFIG):
        flags |= AFFECT_LIVE if dom.active else AFFECT_CONFIG
    if not dom.active and flags & AFFECT_LIVE:
        raise invalid_operation("domain is not running")
    if dom.persistent is None and flags & AFFECT_CONFIG:
        raise invalid_operation("transient domains do not have any persistent config")
    return flags


def one_def(dom: Domain, flags: int) -> tuple[DomainConfig, bool]:
    """(the config a getter reads, whether it is the live one)."""
    if flags & AFFECT_LIVE and flags & AFFECT_CONFIG:
        raise _api_arg(_EXCLUSIVE_AFFECT)
    flags = _impact(dom, flags)
    if dom.active and flags & AFFECT_CONFIG:
        assert dom.persistent is not None
        return dom.persistent, False
    return dom.config, bool(flags & AFFECT_LIVE)


def defs(dom: Domain, flags: int) -> tuple[DomainConfig | None, DomainConfig | None]:
    """(live config, persistent config) a setter changes; None for the one it leaves alone."""
    flags = _impact(dom, flags)
    if dom.active:
        return (dom.live if flags & AFFECT_LIVE else None), (dom.persistent if flags & AFFECT_CONFIG else None)
    return None, dom.persistent


def _exclusive(flags: int) -> None:
    if flags & AFFECT_LIVE and flags & AFFECT_CONFIG:
        raise _api_arg(_EXCLUSIVE_AFFECT)


# ---- vCPUs -----------------------------------------------------------------------------------------------


def online_vcpus(cfg: DomainConfig) -> range:
    """The vCPUs the guest has online: the first <vcpu current='N'> (the VMM boots only those)."""
    return range(cfg.current_vcpus)


def max_vcpus(cfg: DomainConfig) -> int:
    return cfg.vcpus


async def _status(dom: Domain) -> dict[str, Any]:
    if dom.vmm is None:
        raise invalid_operation("domain is not running")
    try:
        return await dom.vmm.request("status")
    except VmmError as err:  # it is ending: the watcher accounts for that
        raise VirtError(ErrorCode.OPERATION_FAILED, f"cannot query the VMM: {err}") from err


def _affinity(tid: int) -> frozenset[int]:
    try:
        return frozenset(os.sched_getaffinity(tid))
    except OSError as err:
        raise VirtError(
            ErrorCode.SYSTEM_ERROR, f"cannot get CPU affinity of process {tid}: {err.strerror}", ErrorDomain.NONE
        ) from err


async def get_vcpus(s: Session, dom: Domain, maxinfo: int, maplen: int) -> bytes:
    if maxinfo > VCPUINFO_MAX:
        raise _rpc_internal("maxinfo > REMOTE_VCPUINFO_MAX")
    if maxinfo * maplen > CPUMAPS_MAX:
        raise _rpc_internal("maxinfo * maplen > REMOTE_CPUMAPS_MAX")
    if maxinfo <= 0:
        raise _api_arg("maxinfo in virDomainGetVcpus must be greater than zero")
    if maplen < 0:
        raise _api_arg("maplen in virDomainGetVcpus must be zero")  # (the daemon passes no cpumaps then)
    if not dom.active:
        raise invalid_operation("cannot retrieve vcpu information for inactive domain")
    cfg, handle = dom.config, dom.vmm
    tids = vcpu_threads(await _status(dom)) if handle is not None else {}
    info = Packer()
    maps = bytearray()
    n = 0
    for index in online_vcpus(cfg):
        if n >= maxinfo:
            break
        tid = tids.get(index)
        st = task_stat(handle.pid, tid) if handle is not None and tid is not None else None
        info.uint(index)
        # A vCPU whose thread has ended (the guest ended under a preserve policy) runs nowhere.
        info.int(VCPU_RUNNING if st is not None else VCPU_OFFLINE)
        info.uhyper(st.cpu_ns if st is not None else 0)
        info.int(st.processor if st is not None else -1)
        if maplen > 0:
            cpus = _affinity(tid) if tid is not None and st is not None else frozenset[int]()
            maps += host.cpumap_bytes(cpus, maplen)
        n += 1
    p = Packer()
    p.uint(n)
    out = p.getvalue() + info.getvalue()
    p = Packer()
    p.opaque(bytes(maps) + bytes(maxinfo * maplen - len(maps)) if maplen > 0 else b"")
    return out + p.getvalue()


def _pins_in(cfg: DomainConfig, host_cpus: frozenset[int], index: int) -> frozenset[int]:
    pin = cfg.cputune.vcpu(index)
    return pin if pin is not None else host_cpus


def get_vcpu_pin_info(s: Session, dom: Domain, ncpumaps: int, maplen: int, flags: int) -> bytes:
    if ncpumaps > VCPUINFO_MAX:
        raise _rpc_internal("ncpumaps > REMOTE_VCPUINFO_MAX")
    if ncpumaps * maplen > CPUMAPS_MAX:
        raise _rpc_internal("maxinfo * maplen > REMOTE_CPUMAPS_MAX")
    if maplen <= 0 and ncpumaps > 0:
        raise _api_arg("cpumaps in virDomainGetVcpuPinInfo must not be NULL")  # (none passed for maplen 0)
    if ncpumaps <= 0:
        raise _api_arg("ncpumaps in virDomainGetVcpuPinInfo must be greater than zero")
    if maplen <= 0:
        raise _api_arg("maplen in virDomainGetVcpuPinInfo must be greater than zero")
    _exclusive(flags)
    cfg, _live = one_def(dom, flags)
    online = host.online_cpus()
    count = min(max_vcpus(cfg), ncpumaps)
    maps = b"".join(host.cpumap_bytes(_pins_in(cfg, online, i), maplen) for i in range(count))
    p = Packer()
    p.opaque(maps + bytes(ncpumaps * maplen - len(maps)))
    p.int(count)
    return p.getvalue()


def _pin_cpus(cpumap: bytes, api: str) -> frozenset[int]:
    if not cpumap:
        raise _api_arg(f"cpumap in {api} must not be NULL")
    cpus = host.cpumap_cpus(cpumap)
    if not cpus:
        raise VirtError(ErrorCode.INVALID_ARG, "Empty cpu list for pinning")
    return cpus


async def pin_vcpu_flags(s: Session, dom: Domain, vcpu: int, cpumap: bytes, flags: int) -> None:
    if not cpumap:
        raise _api_arg("cpumap in virDomainPinVcpuFlags must not be NULL")
    live, persistent = defs(dom, flags)
    if persistent is not None and vcpu >= max_vcpus(persistent):
        raise VirtError(
            ErrorCode.INVALID_ARG,
            f"vcpu {vcpu} is out of range of persistent cpu count {len(online_vcpus(persistent))}",
        )
    cpus = _pin_cpus(cpumap, "virDomainPinVcpuFlags")
    if live is not None and vcpu >= max_vcpus(live):
        raise VirtError(ErrorCode.INVALID_ARG, f"vcpu {vcpu} is out of range of live cpu count {max_vcpus(live)}")
    await s.manager.edit_config(
        dom, set_vcpupin(vcpu, cpus), live is not None, persistent is not None, apply_live=s.manager.apply_cputune
    )


async def pin_emulator(s: Session, dom: Domain, cpumap: bytes, flags: int) -> None:
    if not cpumap:
        raise _api_arg("cpumap in virDomainPinEmulator must not be NULL")
    live, persistent = defs(dom, flags)
    cpus = _pin_cpus(cpumap, "virDomainPinEmulator")
    await s.manager.edit_config(
        dom, set_emulatorpin(cpus), live is not None, persistent is not None, apply_live=s.manager.apply_cputune
    )


def get_emulator_pin_info(s: Session, dom: Domain, maplen: int, flags: int) -> bytes:
    if maplen > CPUMAPS_MAX:  # (libvirtd would allocate it, then fail to encode the reply)
        raise _rpc_internal("maplen > REMOTE_CPUMAPS_MAX")
    if maplen <= 0:
        # The daemon passes no buffer for maplen 0, which the public API refuses first.
        raise _api_arg("cpumap in virDomainGetEmulatorPinInfo must not be NULL")
    _exclusive(flags)
    cfg, _live = one_def(dom, flags)
    pin = cfg.cputune.emulatorpin
    p = Packer()
    p.opaque(host.cpumap_bytes(pin if pin is not None else host.online_cpus(), maplen))
    p.int(1)
    return p.getvalue()


def get_max_vcpus(s: Session, dom: Domain) -> int:
    # libvirt's drivers answer virDomainGetVcpusFlags(LIVE | MAXIMUM): "domain is not running" when shut off.
    cfg, _live = one_def(dom, AFFECT_LIVE)
    return max_vcpus(cfg)


# ---- CPU time and memory of a domain ----------------------------------------------------------------------


def get_cpu_stats(s: Session, dom: Domain, nparams: int, start_cpu: int, ncpus: int, flags: int) -> bytes:
    if nparams > NODE_STATS_MAX:
        raise _rpc_internal("nparams too large")
    if ncpus > CPU_STATS_NCPUS_MAX:
        raise _rpc_internal("ncpus too large")
    if start_cpu == -1:
        if ncpus != 1:
            raise _api_arg("ncpus must be 1 when start_cpu is -1")
    elif start_cpu < 0:
        raise _api_arg("start_cpu in virDomainGetCPUStats must be zero or greater")
    if nparams and not ncpus:
        raise _api_arg("params in virDomainGetCPUStats must not be NULL")  # (the daemon passes none then)
    if not dom.active:
        raise invalid_operation("domain is not running")
    if start_cpu >= 0:
        raise VirtError(
            ErrorCode.NO_SUPPORT,
            "virDomainGetCPUStats per host CPU (it needs a per-domain cpuacct cgroup, which the mshv driver "
            "does not create); start_cpu -1 gives the domain's total",
        )
    user, system = s.manager.cpu_times(dom)  # the VMM's threads, as utime/stime of its process
    total = [("cpu_time", TP_ULLONG, user + system), ("user_time", TP_ULLONG, user), ("system_time", TP_ULLONG, system)]
    params = total[:nparams]
    p = Packer()
    pack_typed_params(p, params)
    p.int(len(params) if nparams else len(total))
    return p.getvalue()


def _has_balloon_entry(cfg: DomainConfig) -> bool:
    # <memballoon model='none'/> is the only memballoon a definition may have (canonical XML keeps it).
    return "<memballoon model='none'/>" not in cfg.xml


def memory_stats(s: Session, dom: Domain, max_stats: int, flags: int) -> bytes:
    if max_stats > MEMORY_STATS_MAX:
        raise _rpc_internal("maxStats > REMOTE_DOMAIN_MEMORY_STATS_MAX")
    stats: list[tuple[int, int]] = []
    if max_stats:
        if not dom.active:
            raise invalid_operation("domain is not running")
        cfg, handle = dom.config, dom.vmm
        # No balloon driver talks to the guest: what libvirt's QEMU driver reports for a guest without one,
        # the balloon's size (the guest's memory, which nothing changes), and the VMM's resident memory.
        if _has_balloon_entry(cfg):
            stats.append((MEMORY_STAT_ACTUAL_BALLOON, cfg.current_memory_kib))
        st = task_stat(handle.pid) if handle is not None else None
        if st is not None:
            stats.append((MEMORY_STAT_RSS, st.rss_kib))
        stats = stats[: min(max_stats, MEMORY_STAT_NR)]
    p = Packer()
    p.uint(len(stats))
    for tag, value in stats:
        p.int(tag)
        p.uhyper(value)
    return p.getvalue()


# ---- scheduler (virsh schedinfo): CPU shares and bandwidth need a per-domain cpu cgroup ---------------------

_SCHED_PARAMS = (
    ("cpu_shares", TP_ULLONG),
    ("vcpu_period", TP_ULLONG),
    ("vcpu_quota", TP_LLONG),
    ("emulator_period", TP_ULLONG),
    ("emulator_quota", TP_LLONG),
    ("global_period", TP_ULLONG),
    ("global_quota", TP_LLONG),
    ("iothread_period", TP_ULLONG),
    ("iothread_quota", TP_LLONG),
)


def _no_cpu_cgroup() -> VirtError:
    # What libvirt's QEMU driver answers for a running domain when the cgroup CPU controller is not there;
    # this driver creates no per-domain cgroups at all.
    return invalid_operation("cgroup CPU controller is not mounted")


def get_scheduler_type(s: Session, dom: Domain) -> bytes:
    if not _privileged(s):
        raise VirtError(ErrorCode.OPERATION_UNSUPPORTED, "CPU tuning is not available in session mode")
    if dom.active:
        raise _no_cpu_cgroup()
    p = Packer()
    p.string("posix")  # a shut-off domain has no cgroup: libvirt answers with its defaults
    p.int(len(_SCHED_PARAMS))
    return p.getvalue()


def get_scheduler_parameters_flags(s: Session, dom: Domain, nparams: int, flags: int) -> bytes:
    if nparams > SCHEDULER_PARAMETERS_MAX:
        raise _rpc_internal("nparams too large")
    if nparams <= 0:
        raise _api_arg("*nparams in virDomainGetSchedulerParametersFlags must be greater than zero")
    _exclusive(flags)
    if not _privileged(s):
        raise VirtError(ErrorCode.CONFIG_UNSUPPORTED, "CPU tuning is not available in session mode")
    _live, persistent = defs(dom, flags)
    if persistent is None:
        raise _no_cpu_cgroup()
    # The persistent config's <cputune> values: it can hold none of them (they need the cpu cgroup), so 0.
    params = [(name, kind, 0) for name, kind in _SCHED_PARAMS[:nparams]]
    p = Packer()
    pack_typed_params(p, params)
    return p.getvalue()


def get_scheduler_parameters(s: Session, dom: Domain, nparams: int) -> bytes:
    if nparams > SCHEDULER_PARAMETERS_MAX:
        raise _rpc_internal("nparams too large")
    if nparams <= 0:
        raise _api_arg("*nparams in virDomainGetSchedulerParameters must be greater than zero")
    return get_scheduler_parameters_flags(s, dom, nparams, 0)


# ---- jobs and device statistics ---------------------------------------------------------------------------


def get_job_info(s: Session, dom: Domain) -> bytes:
    if not dom.active:
        raise invalid_operation("domain is not running")
    p = Packer()
    p.int(0)  # VIR_DOMAIN_JOB_NONE: no migration, save or dump job ever runs
    for _ in range(11):
        p.uhyper(0)
    return p.getvalue()


def get_job_stats(s: Session, dom: Domain, flags: int) -> bytes:
    if flags & JOB_STATS_KEEP_COMPLETED and not flags & JOB_STATS_COMPLETED:
        raise _api_arg(
            "Flag 'VIR_DOMAIN_JOB_STATS_COMPLETED' is required by flag 'VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED'"
        )
    if not flags & JOB_STATS_COMPLETED and not dom.active:
        raise invalid_operation("domain is not running")
    p = Packer()
    p.int(0)  # VIR_DOMAIN_JOB_NONE, and no completed job to report either
    pack_typed_params(p, [])
    return p.getvalue()


def disk_by_name(cfg: DomainConfig, name: str) -> DiskDevice | None:
    """libvirt's virDomainDiskByName: a target (``vda``) unless ``name`` starts with '/', else the disk whose
    source is that path, if only one disk has it."""
    if not name.startswith("/"):
        return next((d for d in cfg.disks if d.target == name), None)
    found = [d for d in cfg.disks if d.path == name]
    return found[0] if len(found) == 1 else None


BLOCK_STATS_PARAMETERS_MAX = 16  # REMOTE_DOMAIN_BLOCK_STATS_PARAMETERS_MAX
# virDomainBlockStatsFlags' fields in libvirt's QEMU driver order (qemuDomainBlockStatsFlags; no "errs": it is
# meaningless for QEMU), each from the VMM's block-stats counter of that name.
BLOCK_STATS_FIELDS = (
    ("wr_bytes", "wr_bytes"),
    ("wr_operations", "wr_req"),
    ("rd_bytes", "rd_bytes"),
    ("rd_operations", "rd_req"),
    ("flush_operations", "flush_req"),
    ("wr_total_times", "wr_total_times"),
    ("rd_total_times", "rd_total_times"),
    ("flush_total_times", "flush_total_times"),
)
COUNTERS = tuple(key for _, key in BLOCK_STATS_FIELDS)


async def disk_counters(dom: Domain) -> dict[int, dict[str, int]]:
    """Each disk's request counters by PCI slot, as its VMM's relay counted them (the VMM's ``block-stats``:
    qemu-storage-daemon's export counts nothing, the VMM's compiled relay counts every request)."""
    if dom.vmm is None:
        raise invalid_operation("domain is not running")
    try:
        info = await dom.vmm.request("block-stats")
    except VmmError as err:
        raise VirtError(ErrorCode.OPERATION_FAILED, f"cannot query the VMM: {err}") from err
    disks = info.get("disks")
    entries = [d for d in disks if isinstance(d, dict)] if isinstance(disks, list) else []
    return {int(d["slot"]): {k: int(d[k]) for k in COUNTERS} for d in entries}


async def _gather(dom: Domain, path: str) -> dict[str, int]:
    """qemuDomainBlocksStatsGather: one disk's counters, or with an empty path the sum over every disk."""
    if not dom.active:
        raise invalid_operation("domain is not running")
    cfg = dom.config
    disks = cfg.disks
    if path:
        disk = disk_by_name(cfg, path)
        if disk is None:
            raise VirtError(ErrorCode.INVALID_ARG, f"invalid path: {path}")
        disks = (disk,)
    counters = await disk_counters(dom) if disks else {}
    total = dict.fromkeys(COUNTERS, 0)
    for disk in disks:
        entry = counters.get(disk.address.slot)
        if entry is None:
            raise VirtError(ErrorCode.INTERNAL_ERROR, f"cannot find statistics for device '{disk.target}'")
        for k in COUNTERS:
            total[k] += entry[k]
    return total


async def block_stats(s: Session, dom: Domain, path: str) -> bytes:
    total = await _gather(dom, path)
    p = Packer()
    for key in ("rd_req", "rd_bytes", "wr_req", "wr_bytes"):
        p.hyper(total[key])
    p.hyper(-1)  # errs: libvirt's QEMU driver never reports it (the VMM's failed count is in its status)
    return p.getvalue()


async def block_stats_flags(s: Session, dom: Domain, path: str, nparams: int, flags: int) -> bytes:
    if nparams > BLOCK_STATS_PARAMETERS_MAX:
        raise _rpc_internal("nparams too large")
    total = await _gather(dom, path)
    params: list[TypedParam] = []
    if nparams > 0:  # 0 asks only how many there are
        params = [(name, TP_LLONG, total[key]) for name, key in BLOCK_STATS_FIELDS[:nparams]]
    p = Packer()
    pack_typed_params(p, params)
    p.int(len(BLOCK_STATS_FIELDS) if nparams == 0 else len(params))
    return p.getvalue()


def _not_assigned(path: str) -> VirtError:
    return VirtError(ErrorCode.INVALID_ARG, f"invalid path {path} not assigned to domain")  # qemuDomainGetBlockInfo


def _stat_sizes(disk: DiskDevice) -> tuple[int, int, int]:
    """(capacity, allocation, physical) of an image on the host, as libvirt 9.0 reads them for an inactive
    domain (virStorageSourceUpdateBackingSizes, then the format header for the capacity: qcow2's size field)."""
    assert disk.path is not None
    try:
        fd = os.open(disk.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise cannot_access(disk.path, err) from err
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            capacity, allocation, physical = st.st_size, st.st_blocks * 512, st.st_size
        else:  # a block device: its size, and everything counts as allocated
            capacity = allocation = physical = os.lseek(fd, 0, os.SEEK_END)
        if disk.format == "qcow2":
            header = os.pread(fd, QCOW2_HEADER.size, 0)
            if len(header) < QCOW2_HEADER.size or header[:4] != QCOW2_MAGIC:
                raise VirtError(ErrorCode.INTERNAL_ERROR, f"cannot read header '{disk.path}'")
            capacity = QCOW2_HEADER.unpack(header)[5]  # the virtual size
            if not stat.S_ISREG(st.st_mode):
                allocation = 0  # qcow2 on a block device: only the running backend knows its highest write
    except OSError as err:
        raise VirtError(
            ErrorCode.SYSTEM_ERROR, f"cannot read header '{disk.path}': {err.strerror}", ErrorDomain.NONE
        ) from err
    finally:
        os.close(fd)
    return capacity, allocation, physical


def _active_physical(disk: DiskDevice) -> int:
    """A running disk's ``physical`` as libvirt 9.0 reports it from QEMU: the format node's actual-size, which
    is the image file's allocated bytes (file-posix: st_blocks * 512); where that is 0 (a block device, a file
    with nothing allocated), the size read from the image, as the driver does without QEMU's figure."""
    assert disk.path is not None
    try:
        st = os.stat(disk.path)
    except OSError as err:
        raise cannot_access(disk.path, err) from err
    if stat.S_ISREG(st.st_mode) and st.st_blocks:
        return int(st.st_blocks) * 512
    return _stat_sizes(disk)[2]


async def disk_counters_and_sizes(dom: Domain) -> dict[int, dict[str, int]]:
    """domstats' per-disk figures of a running domain in one VMM request (``block-stats`` with ``sizes``):
    the relay's counters, the capacity the device offers and the highest offset written, by PCI slot."""
    if dom.vmm is None:
        raise invalid_operation("domain is not running")
    try:
        info = await dom.vmm.request("block-stats", args={"sizes": True})
    except VmmError as err:
        raise VirtError(ErrorCode.OPERATION_FAILED, f"cannot query the VMM: {err}") from err
    disks = info.get("disks")
    entries = [d for d in disks if isinstance(d, dict)] if isinstance(disks, list) else []
    keys = (*COUNTERS, "virtual_size", "wr_highest_offset")
    return {int(d["slot"]): {k: int(d[k]) for k in keys} for d in entries if all(k in d for k in keys)}


async def backend_block_info(dom: Domain) -> dict[int, dict[str, Any]]:
    """What each disk's backend reports of its image (the VMM's ``block-info``), by PCI slot."""
    if dom.vmm is None:
        raise invalid_operation("domain is not running")
    try:
        info = await dom.vmm.request("block-info")
    except VmmError as err:
        raise VirtError(ErrorCode.OPERATION_FAILED, f"cannot query the VMM: {err}") from err
    disks = info.get("disks")
    return {d["slot"]: d for d in disks if isinstance(d, dict)} if isinstance(disks, list) else {}


async def domain_block_stats(dom: Domain) -> list[TypedParam]:
    """virConnectGetAllDomainStats' block group as libvirt 9.0's QEMU driver fills it (qemuDomainGetStatsBlock):
    block.count, then per disk its name and path, the request counters (rd/wr/fl .reqs .bytes .times, from the
    VMM's relay), allocation (the highest offset written), capacity and physical; for an inactive domain the
    sizes read from the image, each only when not 0. What the VMM cannot answer is left out, as libvirt does
    when QEMU gives none."""
    cfg = dom.config
    out: list[TypedParam] = [("block.count", TP_UINT, len(cfg.disks))]
    entries: dict[int, dict[str, Any]] = {}
    if dom.active and dom.vmm is not None and cfg.disks:  # no disks: nothing to ask its VMM for
        with contextlib.suppress(VirtError):  # libvirt reports what it has when QEMU cannot answer
            entries = await disk_counters_and_sizes(dom)
    for n, disk in enumerate(cfg.disks):
        out.append((f"block.{n}.name", TP_STRING, disk.target))
        if disk.path is None:
            continue
        out.append((f"block.{n}.path", TP_STRING, disk.path))
        sizes: list[tuple[str, int]] = []
        if dom.active:
            entry = entries.get(disk.address.slot)
            if entry is None:
                continue
            for group, key in (("rd", "rd"), ("wr", "wr"), ("fl", "flush")):  # qemuDomainGetStatsBlockExportFrontend's
                out.append((f"block.{n}.{group}.reqs", TP_ULLONG, entry[f"{key}_req"]))
                if group != "fl":
                    out.append((f"block.{n}.{group}.bytes", TP_ULLONG, entry[f"{key}_bytes"]))
                out.append((f"block.{n}.{group}.times", TP_ULLONG, entry[f"{key}_total_times"]))
            sizes = [("allocation", entry["wr_highest_offset"])]
            if entry["virtual_size"]:
                sizes.append(("capacity", entry["virtual_size"]))
            with contextlib.suppress(VirtError):
                sizes.append(("physical", await asyncio.to_thread(_active_physical, disk)))
        else:
            try:
                capacity, allocation, physical = await asyncio.to_thread(_stat_sizes, disk)
            except VirtError:
                continue  # libvirt drops the error and the figures
            found = (("allocation", allocation), ("capacity", capacity), ("physical", physical))
            sizes = [(k, v) for k, v in found if v]
        out += [(f"block.{n}.{k}", TP_ULLONG, v) for k, v in sizes]
    return out


async def get_block_info(s: Session, dom: Domain, path: str, flags: int) -> bytes:
    cfg = dom.config
    disk = disk_by_name(cfg, path)
    if disk is None:
        raise _not_assigned(path)
    if disk.path is None:
        raise VirtError(ErrorCode.INVALID_ARG, f"disk '{path}' does not currently have a source assigned")
    if not dom.active or dom.vmm is None:
        capacity, allocation, physical = await asyncio.to_thread(_stat_sizes, disk)
    else:
        entry = (await backend_block_info(dom)).get(disk.address.slot)
        if entry is None:
            raise VirtError(ErrorCode.INTERNAL_ERROR, f"failed to gather stats for disk '{disk.target}'")
        # qemuDomainGetBlockInfo's rules on what QEMU reports: capacity is the virtual size; allocation the
        # highest offset written (a qcow2 file: its allocated size), the allocated size while nothing was
        # written; physical is the image's own size where allocated size is 0 or allocation equals it, else
        # the allocated size.
        capacity, actual = int(entry["virtual_size"]), int(entry["actual_size"])
        kind = disk.actual_type or disk.type  # a volume disk: what its volume is
        allocation = actual if kind == "file" and disk.format == "qcow2" else int(entry["wr_highest_offset"])
        if actual == 0 or allocation == 0 or allocation == actual:
            allocation = allocation or actual
            physical = (await asyncio.to_thread(_stat_sizes, disk))[2]
        else:
            physical = actual
    p = Packer()
    for value in (allocation, capacity, physical):  # remote_domain_get_block_info_ret's order
        p.uhyper(value)
    return p.getvalue()


RESIZE_BYTES = 1  # VIR_DOMAIN_BLOCK_RESIZE_BYTES; libvirt 9.0 knows no other flag
ULLONG_MAX = (1 << 64) - 1


async def block_resize(s: Session, dom: Domain, path: str, size: int, flags: int) -> None:
    """qemuDomainBlockResize's checks in its order, then the backend resizes the image (the guest is told by
    a config-change interrupt); the XML does not change."""
    if not flags & RESIZE_BYTES:
        if size > ULLONG_MAX // 1024:
            raise VirtError(ErrorCode.OVERFLOW, f"size must be less than {ULLONG_MAX // 1024}")
        size *= 1024
    if not dom.active or dom.vmm is None:
        raise invalid_operation("domain is not running")
    disk = disk_by_name(dom.config, path)
    if disk is None:
        raise VirtError(ErrorCode.INVALID_ARG, f"disk '{path}' was not found in the domain config")
    if disk.path is None or disk.readonly:
        raise VirtError(ErrorCode.OPERATION_UNSUPPORTED, f"can't resize empty or readonly disk '{disk.target}'")
    if disk.format == "qcow2":
        size = (size + 511) // 512 * 512  # qcow2 is sized in 512-byte sectors: rounded up, as libvirt does
    try:
        await dom.vmm.request("block-resize", args={"slot": disk.address.slot, "size": size})
    except VmmError as err:
        raise VirtError(ErrorCode.INTERNAL_ERROR, f"unable to execute QEMU command 'block_resize': {err}") from err


def _find_net(dom: Domain, device: str) -> int:
    """virDomainNetFind: a MAC address names the interface with it (refused when several have it), anything
    else its tap or its alias (netN); the interface's index."""
    cfg = dom.config
    mac = parse_mac(device)
    if mac is not None:
        found = [i for i, net in enumerate(cfg.nets) if net.mac == mac]
        if len(found) > 1:
            raise VirtError(ErrorCode.OPERATION_FAILED, f"multiple devices matching MAC address {mac} found")
        if found:
            return found[0]
    else:
        for i, running in enumerate(dom.nets):
            if device in (running.ifname, f"net{i}"):
                return i
    raise VirtError(ErrorCode.INVALID_ARG, f"'{device}' is not a known interface")


async def interface_stats(s: Session, dom: Domain, device: str) -> bytes:
    """The counters of the interface's virtio-net data path in the VMM, as the guest sees them (rx: what the
    guest received), which is what libvirt reports from the tap with its rx and tx swapped."""
    if not dom.active:
        raise invalid_operation("domain is not running")
    index = _find_net(dom, device)
    mac = dom.config.nets[index].mac
    status = await _status(dom)
    entry = next((d for d in status.get("virtio", []) if d.get("device_id") == 1 and d.get("mac") == mac), None)
    if entry is None:
        raise VirtError(ErrorCode.OPERATION_FAILED, f"the VMM reports no virtio-net device with MAC address {mac}")
    p = Packer()
    for key in ("rx_bytes", "rx_packets", None, "rx_drops", "tx_bytes", "tx_packets", None, "tx_drops"):
        p.hyper(int(entry.get(key, 0)) if key is not None else 0)  # no error counts: the data path has none
    return p.getvalue()


IFADDR_SOURCE_LEASE, IFADDR_SOURCE_AGENT, IFADDR_SOURCE_ARP = 0, 1, 2
_ARP_TABLE = "/proc/net/arp"
_IFACES_MAX = 2048  # REMOTE_DOMAIN_INTERFACE_MAX


def _arp_table() -> list[tuple[str, str]]:
    """(IPv4 address, MAC) of the host's neighbour table (what libvirt's virArpTableGet reads)."""
    try:
        with open(_ARP_TABLE) as f:
            rows = f.read().splitlines()[1:]
    except OSError as err:
        detail = f"failed to read {_ARP_TABLE}: {err.strerror}"
        raise VirtError(ErrorCode.SYSTEM_ERROR, detail, ErrorDomain.NONE) from None
    return [(cols[0], cols[3].lower()) for cols in (row.split() for row in rows) if len(cols) >= 4]


async def interface_addresses(s: Session, dom: Domain, source: int, flags: int) -> bytes:
    """domifaddr --source lease (the DHCP leases of libvirt's network driver for each type='network'
    interface's MAC) or --source arp (the host's ARP table), as libvirt's QEMU driver answers them."""
    if source == IFADDR_SOURCE_AGENT:
        raise VirtError(ErrorCode.ARGUMENT_UNSUPPORTED, "the mshv driver has no guest agent")
    if source not in (IFADDR_SOURCE_LEASE, IFADDR_SOURCE_ARP):
        raise VirtError(ErrorCode.ARGUMENT_UNSUPPORTED, f"Unknown IP address data source {source}")
    if not dom.active or dom.live is None:
        raise invalid_operation("domain is not running")
    cfg, running = dom.live, list(dom.nets)
    found: list[tuple[str, str, list[tuple[int, str, int]]]] = []  # (tap, MAC, [(type, address, prefix)])
    if source == IFADDR_SOURCE_LEASE:
        for net, run in zip(cfg.nets, running, strict=False):
            if net.type != "network":
                continue
            leases = await dhcp_leases(s.manager.session, net.network or "", net.mac)
            if leases:
                found.append((run.ifname, net.mac, [(le.type, le.ipaddr, le.prefix) for le in leases]))
    else:
        table = await asyncio.to_thread(_arp_table)
        for net, run in zip(cfg.nets, running, strict=False):
            found += [(run.ifname, net.mac, [(0, ip, 0)]) for ip, mac in table if mac == net.mac]
    p = Packer()
    p.uint(min(len(found), _IFACES_MAX))
    for name, mac, addrs in found[:_IFACES_MAX]:
        p.string(name)
        p.opt_string(mac)
        p.uint(len(addrs))
        for kind, addr, prefix in addrs:
            p.int(kind)
            p.string(addr)
            p.uint(prefix)
    return p.getvalue()


# ---- host -------------------------------------------------------------------------------------------------


def _node_stats_reply(nparams: int, count: int, values: list[tuple[str, int]]) -> bytes:
    p = Packer()
    p.uint(len(values))
    for field, value in values:
        p.string(field)
        p.uhyper(value)
    p.int(count if nparams == 0 else 0)  # the daemon only fills in the count when asked for it
    return p.getvalue()


def node_cpu_stats(s: Session, cpu_num: int, nparams: int, flags: int) -> bytes:
    if nparams > NODE_STATS_MAX:
        raise _rpc_internal("nparams too large")
    count, values = host.node_cpu_stats(cpu_num, nparams)
    return _node_stats_reply(nparams, count, values)


def node_memory_stats(s: Session, nparams: int, cell: int, flags: int) -> bytes:
    if nparams > NODE_STATS_MAX:
        raise _rpc_internal("nparams too large")
    count, values = host.node_memory_stats(cell, nparams)
    return _node_stats_reply(nparams, count, values)


def cells_free_memory(s: Session, start: int, count: int) -> bytes:
    if count > NODE_MAX_CELLS:
        raise VirtError(ErrorCode.RPC, "maxcells > REMOTE_NODE_MAX_CELLS", ErrorDomain.RPC)
    cells = host.cells_free_memory(start, count)
    p = Packer()
    p.uint(len(cells))
    for free in cells:
        p.uhyper(free)
    return p.getvalue()


def node_cpu_map(s: Session, need_map: int, need_online: int, flags: int) -> bytes:
    count, cpumap, online = host.node_cpu_map() if need_map or need_online else (host.host_cpu_count(), b"", 0)
    p = Packer()
    p.opaque(cpumap if need_map else b"")
    p.uint(online if need_online else 0)
    p.int(count)
    return p.getvalue()


@functools.cache
def _host_sysinfo() -> str | None:
    return host.read_host_sysinfo()  # once per daemon, as libvirt's drivers read it once at start-up


async def get_sysinfo(s: Session, flags: int) -> str:
    sysinfo = await asyncio.to_thread(_host_sysinfo) if _privileged(s) else None
    if sysinfo is None:
        raise VirtError(ErrorCode.CONFIG_UNSUPPORTED, "Host SMBIOS information is not available")
    return sysinfo


async def get_cpu_model_names(s: Session, arch: str, need_results: int, flags: int) -> bytes:
    models = await asyncio.to_thread(host.cpu_model_names, arch)
    if len(models) > CPU_MODELS_MAX:
        raise VirtError(
            ErrorCode.RPC, f"Too many CPU models '{len(models)}' for limit '{CPU_MODELS_MAX}'", ErrorDomain.RPC
        )
    p = Packer()
    shown = models if need_results else []
    p.uint(len(shown))
    for name in shown:
        p.string(name)
    p.int(len(models))
    return p.getvalue()


def compare_hypervisor_cpu(
    s: Session, emulator: str | None, arch: str | None, machine: str | None, virttype: str | None, xml: str, flags: int
) -> int:
    return host.compare_hypervisor_cpu(arch, virttype)


def baseline_hypervisor_cpu(
    s: Session,
    emulator: str | None,
    arch: str | None,
    machine: str | None,
    virttype: str | None,
    cpus: list[str],
    flags: int,
) -> str:
    return host.baseline_hypervisor_cpu(arch, virttype, cpus)


# ---- the rows ---------------------------------------------------------------------------------------------

_AFFECT = AFFECT_LIVE | AFFECT_CONFIG

PROCEDURES: tuple[Procedure, ...] = (
    # host
    proc(227, node_cpu_stats, INT, INT, Flags(0), ret=ret_raw),
    proc(228, node_memory_stats, INT, INT, Flags(0), ret=ret_raw),
    proc(102, lambda s: host.free_memory_bytes(), ret=ret_uhyper),
    proc(101, cells_free_memory, INT, INT, ret=ret_raw),
    proc(293, node_cpu_map, INT, INT, Flags(0), ret=ret_raw),
    proc(203, get_sysinfo, Flags(0), ret=ret_str),
    proc(312, get_cpu_model_names, STR, INT, Flags(0), ret=ret_raw),
    proc(393, compare_hypervisor_cpu, OPT_STR, OPT_STR, OPT_STR, OPT_STR, STR, Flags(1 | 2), ret=ret_int),
    proc(394, baseline_hypervisor_cpu, *(OPT_STR,) * 4, _Strings(CPU_BASELINE_MAX), Flags(1 | 2), ret=ret_str),
    proc(149, lambda s: True, ret=ret_bool),  # secure: the client adds whether its transport is encrypted
    # vCPUs and pinning
    proc(18, get_max_vcpus, DOM, ret=ret_int),
    proc(20, get_vcpus, DOM, INT, INT, ret=ret_raw),
    proc(230, get_vcpu_pin_info, DOM, INT, INT, Flags(_AFFECT), ret=ret_raw),
    proc(26, lambda s, dom, vcpu, cpumap: pin_vcpu_flags(s, dom, vcpu, cpumap, AFFECT_LIVE), DOM, UINT, CPUMAP),
    proc(225, pin_vcpu_flags, DOM, UINT, CPUMAP, Flags(_AFFECT)),
    proc(279, pin_emulator, DOM, CPUMAP, Flags(_AFFECT)),
    proc(280, get_emulator_pin_info, DOM, INT, Flags(_AFFECT), ret=ret_raw),
    # CPU, memory, scheduler, jobs, devices
    proc(262, get_cpu_stats, DOM, UINT, INT, UINT, Flags(TYPED_PARAM_STRING_OKAY), ret=ret_raw),
    proc(159, memory_stats, DOM, UINT, Flags(0), ret=ret_raw),
    proc(56, get_scheduler_type, DOM, ret=ret_raw),
    proc(57, get_scheduler_parameters, DOM, INT, ret=ret_raw),
    proc(223, get_scheduler_parameters_flags, DOM, INT, Flags(_AFFECT | TYPED_PARAM_STRING_OKAY), ret=ret_raw),
    proc(163, get_job_info, DOM, ret=ret_raw),
    proc(298, get_job_stats, DOM, Flags(JOB_STATS_COMPLETED | JOB_STATS_KEEP_COMPLETED), ret=ret_raw),
    proc(64, block_stats, DOM, STR, ret=ret_raw),
    proc(243, block_stats_flags, DOM, STR, INT, Flags(TYPED_PARAM_STRING_OKAY), ret=ret_raw),
    proc(194, get_block_info, DOM, STR, Flags(0), ret=ret_raw),
    proc(251, block_resize, DOM, STR, UHYPER, Flags(RESIZE_BYTES)),
    proc(65, interface_stats, DOM, STR, ret=ret_raw),
    proc(353, interface_addresses, DOM, UINT, Flags(0), ret=ret_raw),
)
