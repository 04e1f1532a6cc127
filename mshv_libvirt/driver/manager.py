"""The domain manager: defined/running domains, the lifecycle table applied, VMM processes supervised.

Every state change goes through ``lifecycle.transition``; this module only carries out the table's
action (spawn, pause, kill ... the VMM) and then publishes the table's events, so what clients see
is exactly the table. Operations on one domain are serialized by that domain's lock; the domain
table itself is only mutated on the event loop thread, between awaits.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import json
import logging
import os
import time
import uuid as uuidlib
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lxml import etree

from mshv_libvirt.atomicfile import remove_durable, sweep_temporaries, write_atomic
from mshv_libvirt.domain import DomainConfig, format_domain_xml, parse_domain_xml
from mshv_libvirt.domain.xml import CPU_MODES_RUNNABLE, DiskDevice
from mshv_libvirt.errors import ErrorCode, ErrorDomain, VirtError, invalid_operation, no_domain, unsupported
from mshv_libvirt.lifecycle import (
    Action,
    DefinedDetail,
    Event,
    Input,
    PausedReason,
    RunningReason,
    ShutoffReason,
    State,
    Status,
    Transition,
    policy_input,
    transition,
)
from mshv_libvirt.lifecycle.states import UndefinedDetail, lookup
from mshv_libvirt.proc import host_memory_kib, pid_alive, task_stat

from . import cputune, disks, layout, netports, nets
from .migrate import migrate_legacy_layout
from .store import ConfigStore
from .vmm_client import VmmError, VmmFiles, VmmHandle, find_vmm_processes, is_our_vmm, same_file
from .vmm_launch import VmmOptions, settle_crash_dump

log = logging.getLogger(__name__)

SHUTOFF_UNKNOWN = Status(State.SHUTOFF, ShutoffReason.UNKNOWN)
PRESERVED = (State.SHUTDOWN, State.CRASHED)

# A VMM that kept the guest's partition after it ended (on_* = preserve): its pushed event (or, for an
# ending no daemon saw, its ``status`` state) -> the table input.
_PRESERVED_EVENTS = {
    "shutdown": Input.GUEST_POWEROFF_PRESERVE,
    "reboot": Input.GUEST_REBOOT_PRESERVE,
    "crashed": Input.GUEST_CRASH_PRESERVE,
}
_PRESERVED_STATUS = {"shutdown": Input.GUEST_POWEROFF_PRESERVE, "crashed": Input.GUEST_CRASH_PRESERVE}


@dataclass(frozen=True)
class DomainEvent:
    kind: str  # "lifecycle" | "reboot"
    name: str
    uuid: bytes
    id: int
    event: int = 0
    detail: int = 0


@dataclass
class Domain:
    name: str
    uuid: uuidlib.UUID
    persistent: DomainConfig | None  # None: transient (exists only while running)
    live: DomainConfig | None = None  # the config the VMM runs with
    id: int = -1
    status: Status = SHUTOFF_UNKNOWN
    vmm: VmmHandle | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    console_owner: object | None = None
    removed: bool = False
    # The client connection that started it with VIR_DOMAIN_START_AUTODESTROY: when that connection
    # ends, the domain is destroyed (libvirt's close callback). Cleared when the domain stops.
    autodestroy: object | None = None
    # The running interfaces' taps and network ports (by index in the live config's nets), kept in the
    # runtime record: their ports are deleted when the VMM is gone, whichever daemon sees that.
    nets: list[nets.RunningNet] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.status.state is not State.SHUTOFF

    @property
    def config(self) -> DomainConfig:
        # A transient domain exists (and answers queries) from createXML on, before its VMM is up.
        cfg = self.live if (self.active or self.persistent is None) and self.live is not None else self.persistent
        if cfg is None:
            raise VirtError(ErrorCode.INTERNAL_ERROR, f"domain '{self.name}' has no configuration")
        return cfg


@dataclass(frozen=True)
class Paths:
    config_dir: Path
    run_dir: Path
    log_dir: Path
    dump_dir: Path | None = None  # core files of crashed guests (on_crash = coredump-*); default log_dir/dump
    cache_dir: Path | None = None  # decompressed kernels (kernel_cache.py); default run_dir/cache

    @property
    def dumps(self) -> Path:
        return self.dump_dir if self.dump_dir is not None else self.log_dir / "dump"

    @property
    def kernel_cache(self) -> Path:
        return (self.cache_dir if self.cache_dir is not None else self.run_dir / "cache") / "kernels"

    @classmethod
    def system(cls) -> Paths:
        return cls(
            Path("/etc/libvirt/mshv"),
            Path("/run/libvirt/mshv"),
            Path("/var/log/libvirt/mshv"),
            Path("/var/lib/libvirt/mshv/dump"),
            Path("/var/cache/libvirt/mshv"),
        )

    @classmethod
    def session(cls) -> Paths:
        config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "libvirt" / "mshv"
        cache = user_cache_dir() / "libvirt" / "mshv"
        return cls(config, user_runtime_dir() / "libvirt" / "mshv" / "run", cache / "log", cache_dir=cache)


def user_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def user_runtime_dir() -> Path:
    """$XDG_RUNTIME_DIR, or the cache dir where it is unset (GLib's fallback, which libvirt's client uses)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) if runtime else user_cache_dir()


Listener = Callable[[DomainEvent], None]


def _failed(detail: str) -> VirtError:
    return VirtError(ErrorCode.OPERATION_FAILED, detail, ErrorDomain.DOMAIN)


async def _open_disks(cfg: DomainConfig) -> disks.OpenedDisks:
    """:func:`disks.open_disks` off the event loop (an image on a slow or hung file system must not stall
    every client); a start cancelled meanwhile still closes what the thread opened, and with it the locks."""
    job = asyncio.ensure_future(asyncio.to_thread(disks.open_disks, cfg))

    def close_unclaimed(done: asyncio.Future[disks.OpenedDisks]) -> None:
        if not done.cancelled() and done.exception() is None:
            done.result().close()

    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        job.add_done_callback(close_unclaimed)
        raise


async def _check_nested(cfg: DomainConfig) -> None:
    """A required vmx/svm the kernel (or hypervisor) cannot give is refused before any VMM runs, with
    the error libvirt's QEMU driver gives for a CPU feature the host lacks."""
    from mshv_libvirt.rpc.host import hypervisor_offer  # host facts, probed once per daemon

    offer = await asyncio.to_thread(hypervisor_offer)
    wanted = cfg.cpu.nested_feature
    if offer.nested_feature is None:
        raise unsupported(f"host doesn't support nested virtualization ('{wanted}'): {offer.nested_refusal}")
    if wanted != offer.nested_feature:
        raise unsupported(
            f"host doesn't support CPU feature '{wanted}': nested virtualization here uses '{offer.nested_feature}'"
        )


def process_cpu_times(pid: int) -> tuple[int, int]:
    """(user, system) CPU time of a process from /proc/<pid>/stat, in ns ((0, 0) if it is gone)."""
    st = task_stat(pid)
    return (st.user_ns, st.system_ns) if st is not None else (0, 0)


def process_cpu_ns(pid: int) -> int:
    """utime + stime of a process, in ns (0 if it is gone)."""
    return sum(process_cpu_times(pid))


XmlEdit = Callable[["etree._Element"], None]
LiveApply = Callable[["Domain", DomainConfig], Awaitable[None]]


def _edited(cfg: DomainConfig, edit: XmlEdit, *, trusted: bool = False) -> DomainConfig:
    """``cfg`` changed by ``edit`` on its XML tree, re-parsed so every rule of a define applies (runs the
    validators: call it off the event loop). ``trusted``: an edit of our own that cannot make the config
    invalid, re-read without validators."""
    root = etree.fromstring(cfg.xml.encode())
    edit(root)
    return parse_domain_xml(etree.tostring(root, encoding="unicode"), check_libvirt_schema=not trusted, trusted=trusted)


def _volume_paths(cfg: DomainConfig) -> dict[str, list[str]]:
    return {d.target: [d.path, d.actual_type or "file"] for d in cfg.disks if d.type == "volume" and d.path is not None}


def without_volume_paths(cfg: DomainConfig) -> DomainConfig:
    """``cfg`` as its XML says it: volume disks without what their start resolved them to."""
    if not any(d.type == "volume" and d.path is not None for d in cfg.disks):
        return cfg
    disks = tuple(dataclasses.replace(d, path=None, actual_type=None) if d.type == "volume" else d for d in cfg.disks)
    return dataclasses.replace(cfg, disks=disks)


def _with_volume_paths(cfg: DomainConfig, paths: dict[str, list[str]]) -> DomainConfig:
    """A running domain's volume disks with the path and type they were resolved to at its start (its record)."""
    if not isinstance(paths, dict) or not paths:
        return cfg
    disks = []
    for d in cfg.disks:
        found = paths.get(d.target) if d.type == "volume" else None
        if isinstance(found, list) and len(found) == 2:
            d = dataclasses.replace(d, path=str(found[0]), actual_type=str(found[1]))
        disks.append(d)
    return dataclasses.replace(cfg, disks=tuple(disks))


def live_config(cfg: DomainConfig) -> DomainConfig:
    """The config a started domain runs with. Without a balloon device the guest gets all of <memory>,
    and libvirt's QEMU driver then reports currentMemory equal to it (qemuProcessRefreshBalloonState):
    so does dominfo and the running dumpxml here."""
    if cfg.current_memory_kib == cfg.memory_kib:
        return cfg
    return _edited(cfg, _set_current_memory(cfg.memory_kib), trusted=True)


def _set_current_memory(kib: int) -> XmlEdit:
    def edit(root: etree._Element) -> None:
        cur = root.find("currentMemory")
        if cur is not None:
            cur.text = str(kib)

    return edit


def set_text(tag: str, value: str | None) -> XmlEdit:
    """An edit that replaces (or, for None/"", removes) a top-level text element such as <title>."""

    def edit(root: etree._Element) -> None:
        for old in root.findall(tag):
            root.remove(old)
        if value:
            etree.SubElement(root, tag).text = value

    return edit


def set_vcpus(count: int, *, maximum: bool) -> XmlEdit:
    """setvcpus --config as libvirt's drivers do it: the current (online) count, at most the maximum
    ("requested cpu amount exceeds maximum (3 > 2)"), or with ``maximum`` the <vcpu> maximum, which
    lowers the current count only when it would exceed it."""

    def edit(root: etree._Element) -> None:
        el = root.find("vcpu")
        if el is None:
            el = etree.SubElement(root, "vcpu")
        old_max = int(el.text or 1)
        old_current = int(el.get("current") or old_max)
        if count < 1:
            raise VirtError(ErrorCode.INVALID_ARG, "vcpu count must be at least 1")
        if maximum:
            new_max, new_current = count, min(old_current, count)
        elif count > old_max:
            raise VirtError(ErrorCode.INVALID_ARG, f"requested cpu amount exceeds maximum ({count} > {old_max})")
        else:
            new_max, new_current = old_max, count
        el.attrib.clear()
        el.set("placement", "static")
        if new_current != new_max:
            el.set("current", str(new_current))
        el.text = str(new_max)

    return edit


def add_device(device: etree._Element) -> XmlEdit:
    """attach-device --config: the device joins <devices>; the re-parse checks it and assigns its address."""

    def edit(root: etree._Element) -> None:
        devices = root.find("devices")
        if devices is None:
            devices = etree.SubElement(root, "devices")
        devices.append(copy.deepcopy(device))

    return edit


def insert_disk(device: etree._Element, index: int) -> XmlEdit:
    """attach-device --config of a <disk>: placed as the ``index``-th <disk> (libvirt keeps disks ordered by
    target); the re-parse checks it and assigns its address."""

    def edit(root: etree._Element) -> None:
        devices = root.find("devices")
        if devices is None:
            devices = etree.SubElement(root, "devices")
        disks = devices.findall("disk")
        new = copy.deepcopy(device)
        if index < len(disks):
            disks[index].addprevious(new)
        elif disks:
            disks[-1].addnext(new)
        else:
            devices.insert(0, new)

    return edit


def remove_device(tag: str, index: int) -> XmlEdit:
    """detach-device --config: the ``index``-th <tag> of <devices> (canonical XML keeps their order)."""

    def edit(root: etree._Element) -> None:
        devices = root.find("devices")
        found = devices.findall(tag) if devices is not None else []
        if devices is None or index >= len(found):
            raise VirtError(ErrorCode.INTERNAL_ERROR, "domain XML is not in canonical form")
        devices.remove(found[index])

    return edit


def set_link_state(index: int, state: str) -> XmlEdit:
    """domif-setlink: the ``index``-th <interface>'s <link state>."""

    def edit(root: etree._Element) -> None:
        devices = root.find("devices")
        found = devices.findall("interface") if devices is not None else []
        if index >= len(found):
            raise VirtError(ErrorCode.INTERNAL_ERROR, "domain XML is not in canonical form")
        for old in found[index].findall("link"):
            found[index].remove(old)
        etree.SubElement(found[index], "link", state=state)

    return edit


def set_memory(kib: int, *, maximum: bool) -> XmlEdit:
    """<memory> (maximum) or <currentMemory>, in KiB; currentMemory never exceeds memory."""

    def edit(root: etree._Element) -> None:
        mem, cur = root.find("memory"), root.find("currentMemory")
        if mem is None or cur is None:
            raise VirtError(ErrorCode.INTERNAL_ERROR, "domain XML is not in canonical form")
        if maximum:
            mem.text = str(kib)
            cur.text = str(min(kib, int(cur.text or kib)))
        elif kib > int(mem.text or 0):
            raise VirtError(ErrorCode.INVALID_ARG, "cannot set memory higher than max memory")
        else:
            cur.text = str(kib)

    return edit


async def parse_untrusted(xml: str, validate: bool) -> DomainConfig:
    """A client's domain XML, parsed and validated in a worker thread (never on the event loop: the
    validators take up to a second within the bounds). Our own checks name what we cannot honour;
    libvirt's schema (when installed) then catches anything libvirt itself would refuse, so a config
    we store is one libvirt tools accept. ``validate``: the VALIDATE flag, libvirt's schema first."""
    return await asyncio.to_thread(parse_domain_xml, xml, check_libvirt_schema=True, validate=validate)


class DomainTable(dict[str, "Domain"]):
    """Domains by name, with a uuid index kept in step (lookups by uuid are on every RPC's path)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_uuid: dict[bytes, Domain] = {}

    def __setitem__(self, name: str, dom: Domain) -> None:
        old = self.get(name)
        if old is not None:
            self.by_uuid.pop(old.uuid.bytes, None)
        super().__setitem__(name, dom)
        self.by_uuid[dom.uuid.bytes] = dom

    def __delitem__(self, name: str) -> None:
        dom = self[name]
        super().__delitem__(name)
        if self.by_uuid.get(dom.uuid.bytes) is dom:
            del self.by_uuid[dom.uuid.bytes]

    def pop(self, name: str, default: Any = None) -> Any:
        if name not in self:
            return default
        dom = self[name]
        del self[name]
        return dom


class DomainManager:
    def __init__(
        self,
        paths: Paths,
        *,
        autostart: bool = True,
        vmm_options: VmmOptions | None = None,
        session: bool = False,
    ) -> None:
        self.vmm_options = vmm_options or VmmOptions()  # VMM user, serial log cap (vmm_launch.py)
        self.session = session  # network ports come from network:///session then
        self._ifnames = nets.IfnameAllocator()
        # The ports of each start in progress (nets.plug fills one set each), not yet in a domain's nets.
        self._ports_in_flight: list[set[str]] = []
        self._port_sweep_pending = False
        # Absolute: records and VMM configs name these paths, and a daemon may change its directory.
        self.paths = paths = Paths(
            Path(os.path.abspath(paths.config_dir)),
            Path(os.path.abspath(paths.run_dir)),
            Path(os.path.abspath(paths.log_dir)),
            Path(os.path.abspath(paths.dump_dir)) if paths.dump_dir is not None else None,
            Path(os.path.abspath(paths.cache_dir)) if paths.cache_dir is not None else None,
        )
        self.vmm_options = dataclasses.replace(self.vmm_options, kernel_cache=self.paths.kernel_cache)
        self.store = ConfigStore(paths.config_dir)
        self._port_journal = nets.PortJournal(paths.run_dir)
        self._domains = DomainTable()
        self._listeners: list[Listener] = []
        self._next_id = 1
        self._autostart = autostart
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        # <disk type='volume'> at start: (pool, volume) -> (path, 'file'|'block') from libvirt's storage
        # driver (rpc/volumes.py, set by the daemon); None: volume disks are refused at start.
        self.translate_volume: Callable[[str, str], Awaitable[tuple[str, str]]] | None = None

    # -- start-up ---------------------------------------------------------------------------------
    async def load(self) -> None:
        """Migrate an earlier layout, read defined domains, re-attach to still-running VMMs, then autostart."""
        self.store.ensure()
        self._finish_renames()
        self.paths.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.paths.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        migrate_legacy_layout(self.paths.config_dir, self.paths.run_dir, self.paths.log_dir)
        for name, xml in self.store.load_all().items():
            try:
                # Stored by define after every check: read back without running a validator.
                cfg = parse_domain_xml(xml, trusted=True)
            except VirtError as err:
                log.error("ignoring unreadable config %s: %s", self.store.path(name), err)
                continue
            if cfg.name != name:
                log.error("ignoring %s: it defines domain %r", self.store.path(name), cfg.name)
                continue
            self._domains[name] = Domain(name, cfg.uuid, cfg)
        sweep_temporaries(self.paths.run_dir)
        dirs = sorted(i for i in (layout.runtime_dir_id(e) for e in os.listdir(self.paths.run_dir)) if i is not None)
        # Never reuse the id (and so the runtime directory) of anything still on disk.
        self._next_id = max(dirs, default=0) + 1
        for dom_id in dirs:
            record = layout.runtime_dir(self.paths.run_dir, dom_id) / layout.RECORD
            if record.exists():
                await self._reattach(record)
        await self._reap_orphans()
        # Ports an earlier daemon created and died before recording; in the background: the network
        # driver may be slow or absent, and what starts meanwhile counts its ports in flight.
        self._port_sweep_pending = True
        self._task(self._sweep_ports())
        if self._autostart:
            for dom in list(self._domains.values()):
                if dom.persistent is not None and not dom.active and self.store.autostart(dom.name):
                    try:
                        await self.start(dom, paused=False)
                    except VirtError as err:
                        log.error("autostart of %s failed: %s", dom.name, err)

    async def _reap_orphans(self) -> None:
        """VMMs no runtime record accounts for: a daemon killed while one was still starting.

        The client never saw that start succeed, so the domain stays shut off: stop the VMM and
        remove its files rather than leave a VM running behind the domain's back (where the next
        start would put a second VMM next to it).
        """
        attached = {d.vmm.pid: d.vmm.files for d in self._domains.values() if d.vmm is not None}
        for config, pid in find_vmm_processes(self.paths.run_dir):
            if pid in attached and is_our_vmm(pid, attached[pid]):
                continue
            log.warning("stopping VMM pid %d (%s): it has no runtime record (start never completed)", pid, config)
            await VmmHandle.reap(pid, config)
        # Whatever no running domain uses: runtime directories of ended VMMs, and the top-level files
        # of VMMs an earlier version started (their records were migrated, see migrate.py).
        # (Compared resolved: a record keeps the spelling of the run dir the daemon that wrote it was given.)
        in_use: set[str] = set()
        for files in attached.values():
            in_use |= {os.path.realpath(p) for p in (files.dir, files.config, files.control, files.pidfile)}
            in_use.add(os.path.realpath(files.exit_file))
        for entry in list(self.paths.run_dir.iterdir()):
            dom_id = layout.runtime_dir_id(entry.name)
            if os.path.realpath(entry) in in_use:
                continue
            if dom_id is not None and entry.is_dir():
                VmmFiles.for_domain(self.paths.run_dir, self.paths.log_dir, dom_id, "").remove_runtime()
            elif (
                entry.name.endswith((".pid", ".json", ".ctl", ".exit"))
                and entry.name != layout.DAEMON_PIDFILE
                and not entry.is_dir()
            ):
                with contextlib.suppress(OSError):
                    entry.unlink()

    async def _reattach(self, record: Path) -> None:
        try:
            raw = json.loads(record.read_text())
            name, dom_id = str(raw["name"]), int(raw["id"])
            pid = int(raw["pid"]) if raw.get("pid") is not None else None
            live = _with_volume_paths(parse_domain_xml(str(raw["xml"]), trusted=True), raw.get("volumes") or {})
            status = Status(State(int(raw["state"])), int(raw["reason"]))
            files = VmmFiles.from_json(raw["files"])
            running = [nets.RunningNet.from_json(n) for n in raw.get("nets", [])]
            if not same_file(files.dir, record.parent):
                raise ValueError(f"it belongs in {files.dir}")
        except (OSError, ValueError, KeyError, TypeError, VirtError) as err:
            log.error("ignoring unreadable runtime record %s: %s", record, err)
            return  # its directory is removed with the other leftovers
        dom = self._domains.get(name)
        if dom is None:
            dom = Domain(name, live.uuid, None)
            self._domains[name] = dom
        dom.live, dom.id, dom.status, dom.nets = live, dom_id, status, running
        for net in running:
            self._ifnames.reserve(net.ifname)
        self._next_id = max(self._next_id, dom_id + 1)
        handle: VmmHandle | None = None
        preserved: Input | None = None
        if pid is not None and pid > 0 and pid_alive(pid) and is_our_vmm(pid, files):
            try:
                handle = await VmmHandle.attach(name, files, pid)
                st = await handle.request("status")
                if st.get("state") == "paused" and status.state is State.RUNNING:
                    dom.status = Status(State.PAUSED, PausedReason.UNKNOWN)
                elif st.get("state") == "running" and status.state is State.PAUSED:
                    dom.status = Status(State.RUNNING, RunningReason.UNPAUSED)
                elif status.state not in PRESERVED:
                    # The guest ended under a preserve policy while no daemon watched.
                    preserved = _PRESERVED_STATUS.get(str(st.get("state")))
            except VmmError as err:
                log.warning("cannot re-attach to %s (pid %d): %s", name, pid, err)
                handle = None
                if pid_alive(pid):
                    # Alive but not answering: it cannot be managed, and a second VMM must never be
                    # started next to it. Stop it; its ending is accounted for below.
                    await VmmHandle.reap(pid, files.config)
        if handle is not None:
            self._adopt(dom, handle)
            log.info("re-attached to %s (pid %d)", name, pid)
            if preserved is not None:
                async with dom.lock:
                    self._apply_guest_input(dom, preserved)
            return
        # It ended while no daemon watched: account for it exactly as if we had seen it.
        dom.vmm = None
        async with dom.lock:
            await self._vmm_ended(dom, files)

    # -- events -----------------------------------------------------------------------------------
    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def unsubscribe(self, listener: Listener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def _emit(self, dom: Domain, kind: str, event: int = 0, detail: int = 0, *, name: str | None = None) -> None:
        ev = DomainEvent(kind, name or dom.name, dom.uuid.bytes, dom.id, int(event), int(detail))
        for listener in list(self._listeners):
            try:
                listener(ev)
            except Exception:
                log.exception("event listener failed")

    # -- lookup -----------------------------------------------------------------------------------
    def domains(self) -> list[Domain]:
        return [d for d in self._domains.values() if not d.removed]

    def by_name(self, name: str) -> Domain:
        dom = self._domains.get(name)
        if dom is None or dom.removed:
            raise no_domain(f"no domain with matching name '{name}'")
        return dom

    def by_uuid(self, raw: bytes) -> Domain:
        want = uuidlib.UUID(bytes=raw)
        dom = self._domains.by_uuid.get(raw)
        if dom is not None and not dom.removed:
            return dom
        raise no_domain(f"no domain with matching uuid '{want}'")

    def by_id(self, dom_id: int) -> Domain:
        for dom in self.domains():
            if dom.active and dom.id == dom_id:
                return dom
        raise no_domain(f"no domain with matching id {dom_id}")

    def resolve(self, name: str, raw_uuid: bytes) -> Domain:
        """The domain a client's remote_nonnull_domain names (uuid first, as libvirt's drivers do)."""
        try:
            dom = self.by_uuid(raw_uuid)
        except VirtError:
            raise no_domain(f"no domain with matching uuid '{uuidlib.UUID(bytes=raw_uuid)}' ({name})") from None
        return dom

    # -- define / undefine ------------------------------------------------------------------------
    def _check_unique(self, cfg: DomainConfig) -> Domain | None:
        existing = self._domains.get(cfg.name)
        if existing is not None and not existing.removed:
            if existing.uuid != cfg.uuid:
                raise VirtError(
                    ErrorCode.OPERATION_FAILED,
                    f"domain '{cfg.name}' already exists with uuid {existing.uuid}",
                    ErrorDomain.DOMAIN,
                )
            return existing
        for dom in self.domains():
            if dom.uuid == cfg.uuid:
                raise VirtError(
                    ErrorCode.OPERATION_FAILED,
                    f"domain '{dom.name}' is already defined with uuid {cfg.uuid}",
                    ErrorDomain.DOMAIN,
                )
        return None

    async def define(self, xml: str, *, validate: bool = False) -> Domain:
        cfg = await parse_untrusted(xml, validate)
        layout.check_name(cfg.name)
        while True:
            existing = self._check_unique(cfg)
            if existing is None:
                dom = Domain(cfg.name, cfg.uuid, cfg)
                # Hold the new domain's lock while its file is written: an undefine (or a redefine)
                # that finds it in the table meanwhile must wait, or it would act on a file not yet
                # there and leave a config behind for a domain no longer defined.
                async with dom.lock:
                    self._domains[cfg.name] = dom
                    try:
                        await asyncio.to_thread(self.store.save, cfg.name, cfg.xml)
                    except OSError as err:
                        dom.removed = True
                        if self._domains.get(cfg.name) is dom:
                            del self._domains[cfg.name]
                        raise _failed(f"cannot save config of '{cfg.name}': {err}") from err
                self._emit(dom, "lifecycle", Event.DEFINED, DefinedDetail.ADDED)
                return dom
            dom = existing
            async with dom.lock:
                if dom.removed or dom.name != cfg.name:
                    continue  # undefined or renamed while we waited: look again
                try:
                    await asyncio.to_thread(self.store.save, cfg.name, cfg.xml)
                except OSError as err:
                    raise _failed(f"cannot save config of '{cfg.name}': {err}") from err
                # A running transient domain made persistent is "added", as in libvirt's QEMU driver.
                detail = DefinedDetail.ADDED if dom.persistent is None else DefinedDetail.UPDATED
                dom.persistent = cfg
                if not dom.active:
                    dom.live = None
                self._write_record(dom)
            self._emit(dom, "lifecycle", Event.DEFINED, detail)
            return dom

    async def undefine(self, dom: Domain) -> None:
        async with dom.lock:
            if dom.removed:
                raise no_domain(f"no domain with matching name '{dom.name}'")
            if dom.persistent is None:
                raise invalid_operation("cannot undefine transient domain")
            try:
                await asyncio.to_thread(self.store.delete, dom.name)
            except OSError as err:
                raise _failed(f"cannot delete config of '{dom.name}': {err}") from err
            if dom.active:
                dom.live = dom.live or dom.persistent
                dom.persistent = None  # keeps running as a transient domain
                self._write_record(dom)
            else:
                self._forget(dom)
        self._emit(dom, "lifecycle", Event.UNDEFINED, UndefinedDetail.REMOVED)

    async def edit_config(
        self, dom: Domain, edit: XmlEdit, live: bool, config: bool, apply_live: LiveApply | None = None
    ) -> None:
        """Change the persistent config (saved at once) and/or the live one. The VMM is only touched through
        ``apply_live`` (given the new live config before it is recorded; if it fails, nothing changes);
        without it, callers only pass live edits that need no VMM action, such as a title."""
        async with dom.lock:
            if dom.removed:
                raise no_domain(f"no domain with matching name '{dom.name}'")
            if live and not dom.active:
                raise invalid_operation("domain is not running")
            if config and dom.persistent is None:
                raise invalid_operation("cannot change persistent config of a transient domain")
            new_live = await asyncio.to_thread(_edited, dom.live, edit) if live and dom.live is not None else None
            if new_live is not None and dom.live is not None:  # the re-parsed XML names no volume's path
                new_live = _with_volume_paths(new_live, _volume_paths(dom.live))
            if new_live is not None and apply_live is not None:
                await apply_live(dom, new_live)
            if config and dom.persistent is not None:
                new = await asyncio.to_thread(_edited, dom.persistent, edit)
                await asyncio.to_thread(self.store.save, dom.name, new.xml)
                dom.persistent = new
            if new_live is not None:
                dom.live = new_live
                self._write_record(dom)

    def autostart(self, dom: Domain) -> bool:
        return dom.persistent is not None and self.store.autostart(dom.name)

    async def set_autostart(self, dom: Domain, on: bool) -> None:
        if dom.persistent is None:
            raise invalid_operation("cannot set autostart for transient domain")
        await asyncio.to_thread(self.store.set_autostart, dom.name, on)

    # -- lifecycle --------------------------------------------------------------------------------
    async def create_transient(
        self, xml: str, paused: bool, *, validate: bool = False, autodestroy: object | None = None
    ) -> Domain:
        cfg = await parse_untrusted(xml, validate)
        layout.check_name(cfg.name)
        existing = self._check_unique(cfg)
        if existing is not None:
            if existing.active:
                raise invalid_operation(f"domain '{cfg.name}' is already active")
            async with existing.lock:
                existing.live = cfg
            await self.start(existing, paused, live=cfg, autodestroy=autodestroy)
            return existing
        dom = Domain(cfg.name, cfg.uuid, None, live=cfg)
        self._domains[cfg.name] = dom
        try:
            await self.start(dom, paused, live=cfg, autodestroy=autodestroy)
        except BaseException:
            if not dom.active:
                self._domains.pop(cfg.name, None)
                dom.removed = True
            raise
        return dom

    async def start(
        self, dom: Domain, paused: bool, live: DomainConfig | None = None, autodestroy: object | None = None
    ) -> None:
        async with dom.lock:
            if dom.removed:
                raise no_domain(f"no domain with matching name '{dom.name}'")
            t = transition(dom.status.state, Input.START_PAUSED if paused else Input.START)
            base = live or dom.persistent
            dom.live = live_config(base) if base is not None else None
            await self._spawn(dom, paused=t.action is Action.SPAWN_VMM_PAUSED)
            self._commit(dom, t)
            dom.autodestroy = autodestroy

    async def suspend(self, dom: Domain) -> None:
        await self._user_op(dom, Input.SUSPEND)

    async def resume(self, dom: Domain) -> None:
        await self._user_op(dom, Input.RESUME)

    async def shutdown(self, dom: Domain) -> None:
        await self._user_op(dom, Input.SHUTDOWN)

    async def reboot(self, dom: Domain) -> None:
        await self._user_op(dom, Input.REBOOT)

    async def reset(self, dom: Domain) -> None:
        await self._user_op(dom, Input.RESET)

    async def destroy(self, dom: Domain) -> None:
        await self._user_op(dom, Input.DESTROY)

    async def _user_op(self, dom: Domain, inp: Input) -> None:
        async with dom.lock:
            if dom.removed:
                raise no_domain(f"no domain with matching name '{dom.name}'")
            t = transition(dom.status.state, inp)
            await self._act(dom, t)
            self._commit(dom, t)

    async def _act(self, dom: Domain, t: Transition) -> None:
        handle = dom.vmm
        try:
            if t.action is Action.PAUSE_VMM and handle is not None:
                await handle.request("pause")
            elif t.action is Action.RESUME_VMM and handle is not None:
                await handle.request("resume")
            elif t.action is Action.REQUEST_SHUTDOWN and handle is not None:
                await handle.request("shutdown")
            elif t.action is Action.REQUEST_REBOOT and handle is not None:
                await handle.request("reboot")
            elif t.action is Action.RESET_VMM and handle is not None:
                await handle.request("reset")
            elif t.action is Action.KILL_VMM:
                dom.vmm = None  # the exit watcher must not account for this exit again
                if handle is not None:
                    await handle.kill()
                    handle.files.remove_runtime()
                await self._unplug(dom)
            elif t.action in (Action.SPAWN_VMM, Action.SPAWN_VMM_PAUSED):
                await self._spawn(dom, paused=t.action is Action.SPAWN_VMM_PAUSED)
        except VmmError as err:
            raise _failed(str(err)) from err

    def _commit(self, dom: Domain, t: Transition) -> None:
        """Record the table's new status, persist the runtime record and publish the table's events."""
        dom.status = t.next_status(dom.status)
        if not dom.active:
            dom.live = None
            dom.console_owner = None
            dom.autodestroy = None
        for emission in t.emissions():
            if emission == "reboot":
                self._emit(dom, "reboot")
            else:
                self._emit(dom, "lifecycle", *emission)
        if not dom.active:
            dom.id = -1
            if dom.persistent is None:
                self._forget(dom)
        else:
            self._write_record(dom)

    def _forget(self, dom: Domain) -> None:
        dom.removed = True
        if self._domains.get(dom.name) is dom:
            del self._domains[dom.name]

    # -- VMM processes ----------------------------------------------------------------------------
    def _write_record(self, dom: Domain, status: Status | None = None) -> None:
        """Persist what a restarted daemon needs to take the running domain over again.

        Every active domain has a VMM, a preserved one (SHUTDOWN/CRASHED) included: it holds the frozen
        partition, and a restarted daemon re-attaches to it like to any other.
        """
        status = status or dom.status
        if status.state is State.SHUTOFF or dom.live is None or dom.vmm is None:
            return
        files = dom.vmm.files
        record = {
            "name": dom.name,
            "uuid": str(dom.uuid),
            "id": dom.id,
            "pid": dom.vmm.pid,
            "state": int(status.state),
            "reason": int(status.reason),
            "xml": dom.live.xml,
            # what each volume disk was resolved to at start: the XML names only its pool and volume
            "volumes": _volume_paths(dom.live),
            "files": files.to_json(),  # exactly what this VMM was given (see VmmFiles)
            "nets": [net.to_json() for net in dom.nets],
        }
        write_atomic(files.record, json.dumps(record).encode())

    def _vmm_config(self, dom: Domain, cfg: DomainConfig, paused: bool, dom_id: int, files: VmmFiles) -> dict[str, Any]:
        if cfg.kernel is None:
            raise VirtError(
                ErrorCode.CONFIG_UNSUPPORTED,
                f"domain '{dom.name}' has no <os><kernel>: the mshv driver boots a Linux kernel image directly",
                ErrorDomain.DOMAIN,
            )
        if cfg.cpu_mode is not None and cfg.cpu_mode not in CPU_MODES_RUNNABLE:
            # What libvirt's QEMU driver answers at start for a mode domcapabilities lists as unsupported.
            raise VirtError(
                ErrorCode.CONFIG_UNSUPPORTED,
                f"CPU mode '{cfg.cpu_mode}' for {cfg.arch} hyperv domain on x86_64 host is not supported by hypervisor",
                ErrorDomain.DOMAIN,
            )
        # Guest memory is pinned by the hypervisor when it is mapped (the mshv driver pins every page of a
        # region), so a domain larger than the host cannot start; say so instead of letting the VMM grind.
        host_kib = host_memory_kib()
        if host_kib and cfg.memory_kib > host_kib:
            raise VirtError(
                ErrorCode.OPERATION_FAILED,
                f"domain '{dom.name}' needs {cfg.memory_kib} KiB of memory but the host has {host_kib} KiB",
                ErrorDomain.DOMAIN,
            )
        # Dumps: <id>-<short name>-<time>-<daemon pid>.core, libvirt's short-name idea: bounded length.
        dump = f"{dom_id}-{layout.escape_name(dom.name)[:20]}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.core"
        return {
            "name": dom.name,
            "uuid": str(dom.uuid),
            "memory_bytes": cfg.memory_kib * 1024,  # no balloon: the guest gets all of <memory>
            "vcpus": cfg.current_vcpus,  # online at boot
            "max_vcpus": cfg.vcpus,  # the others are described to the guest as present but disabled
            "kernel": cfg.kernel,
            "initrd": cfg.initrd,
            "cmdline": cfg.cmdline or "",
            "acpi": cfg.acpi,
            # The VMM reboots in place under on_reboot=restart and keeps the frozen partition under
            # preserve; any other action (restart of a powered-off or crashed guest included) is carried
            # out here once the VMM has exited with the reason in its exit file.
            "on_reboot": cfg.on_reboot if cfg.on_reboot in ("restart", "preserve") else "destroy",
            "on_poweroff": "preserve" if cfg.on_poweroff == "preserve" else "destroy",
            "on_crash": "preserve" if cfg.on_crash == "preserve" else "destroy",
            # coredump-destroy/-restart: the VMM writes the core, then the table destroys or restarts.
            "crash_dump": str(self.paths.dumps / dump) if cfg.on_crash.startswith("coredump-") else None,
            "start_paused": paused,
            "control_socket": str(files.control),
            "pidfile": str(files.pidfile),
            "exit_file": str(files.exit_file),
            "serial_log": str(files.serial_log),
            "threads_per_core": cfg.cpu.threads_per_core,
            "nested": cfg.cpu.nested,
            # <rng>: the VMM opens the backend before its sandbox closes the file system
            "rng": [
                {
                    "slot": rng.address.slot,
                    "backend": rng.backend,
                    "rate_bytes": rng.rate_bytes or None,
                    "rate_period_ms": rng.rate_period_ms or 1000,
                }
                for rng in cfg.rngs
            ],
            "clock_offset": cfg.clock_offset,
        }

    async def _translate_volumes(self, cfg: DomainConfig) -> DomainConfig:
        """Each volume disk with its volume's path (virDomainDiskTranslateSourcePool at every start)."""
        if not any(d.type == "volume" for d in cfg.disks):
            return cfg
        translate = self.translate_volume
        found: list[DiskDevice] = []
        for disk in cfg.disks:
            if disk.type == "volume" and disk.pool is not None and disk.volume is not None:
                if translate is None:
                    raise unsupported(f"disk '{disk.target}' of type='volume' needs libvirt's storage driver")
                path, kind = await translate(disk.pool, disk.volume)
                disk = dataclasses.replace(disk, path=path, actual_type=kind)
            found.append(disk)
        return dataclasses.replace(cfg, disks=tuple(found))

    async def _spawn(self, dom: Domain, paused: bool, *, keep_id: bool = False) -> None:
        cfg = dom.live or dom.persistent
        assert cfg is not None
        cfg = await self._translate_volumes(cfg)
        if dom.live is not None:
            dom.live = cfg  # the running config knows each volume's path (domblkinfo, domblkstat by path)
        if self._port_sweep_pending and any(net.type == "network" for net in cfg.nets):
            await self._sweep_ports()  # the start-up sweep could not reach the network driver (yet): now
        # The images are opened, checked and locked before anything else, then the interfaces plugged.
        with await _open_disks(cfg) as opened:
            made: set[str] = set()
            self._ports_in_flight.append(made)
            try:
                plugged = await nets.plug(cfg, self.session, self._ifnames, made, self._port_journal)
                try:
                    with plugged:
                        await self._spawn_with(dom, cfg, paused, opened, plugged, keep_id=keep_id)
                except BaseException:
                    await nets.unplug(plugged.running, self.session)  # the taps went with the descriptors
                    raise
            finally:
                # in the runtime record now, or deleted (a port whose delete failed is left to the owner sweep)
                for portid in made:
                    self._port_journal.forget(portid)
                self._ports_in_flight.remove(made)
        # the daemon's copies are closed: the VMM's own (and its backends') hold the images and their locks,
        # and the taps

    async def _spawn_with(
        self,
        dom: Domain,
        cfg: DomainConfig,
        paused: bool,
        opened: disks.OpenedDisks,
        plugged: nets.PluggedNets,
        *,
        keep_id: bool,
    ) -> None:
        # The id names the runtime directory: taken at once (before any await: starts run concurrently),
        # and not given again even if the start fails, as libvirt does. A restart in place (QEMU's fake
        # reboot) keeps the domain's id, and so its directory.
        dom_id = dom.id if keep_id else self._next_id
        if not keep_id:
            self._next_id += 1
        files = VmmFiles.for_domain(self.paths.run_dir, self.paths.log_dir, dom_id, dom.name)
        vmm_config = self._vmm_config(dom, cfg, paused, dom_id, files)
        vmm_config["disks"] = opened.config
        vmm_config["net"] = plugged.config
        if cfg.cpu.nested == "require":
            await _check_nested(cfg)
        try:
            handle = await VmmHandle.spawn(
                dom.name, files, vmm_config, self.vmm_options, pass_fds=opened.pass_fds + plugged.pass_fds
            )
        except VmmError as err:
            files.remove_runtime()
            raise _failed(f"domain '{dom.name}' failed to start: {err}") from err
        try:
            await self._pin(handle, cfg)  # as libvirt, a pin that cannot be applied fails the start
        except VirtError:
            await handle.kill()
            files.remove_runtime()
            raise
        dom.id = dom_id
        dom.nets = list(plugged.running)
        self._adopt(dom, handle)
        # Record the VMM at once: a daemon killed before the caller commits the transition must still
        # find (and re-attach to) this VMM. The status is the one the spawn transitions lead to.
        provisional = Status(State.PAUSED, PausedReason.USER) if paused else Status(State.RUNNING, RunningReason.BOOTED)
        self._write_record(dom, provisional)

    async def apply_links(self, dom: Domain, cfg: DomainConfig) -> None:
        """The running VM's interfaces take ``cfg``'s link states (STATUS link bit and a config interrupt)."""
        handle, old = dom.vmm, dom.live
        if handle is None or old is None:
            raise invalid_operation("domain is not running")
        for before, after in zip(old.nets, cfg.nets, strict=True):
            if (before.link_state != "down") == (after.link_state != "down"):
                continue
            try:
                await handle.request("set-link", args={"mac": after.mac, "up": after.link_state != "down"})
            except VmmError as err:
                raise _failed(f"cannot set the link state of interface {after.mac}: {err}") from err

    async def _sweep_ports(self) -> None:
        """Delete the ports libvirt's network driver holds for our domains that no runtime state claims: a
        daemon killed between creating a port and recording it leaves one, which nothing else would delete."""
        owners = {str(d.uuid): d.name for d in self._domains.values()}

        def held() -> set[str]:
            return {n.port.portid for d in self._domains.values() for n in d.nets if n.port is not None}

        def in_flight() -> set[str]:
            return set().union(*self._ports_in_flight)

        def claimed() -> set[str]:
            return held() | in_flight()

        try:
            journaled = await self._port_journal.delete_unclaimed(self.session, held, in_flight)
            deleted = await netports.delete_unclaimed(self.session, owners, claimed)
        except VirtError as err:
            log.warning("cannot look for unclaimed network ports (again at the next start): %s", err)
            return
        self._port_sweep_pending = False
        for port in deleted:
            log.warning(
                "deleted port %s of network %s: its domain's runtime state does not hold it", port.portid, port.network
            )
        log.info("network port sweep done: %d unclaimed port(s) deleted", journaled + len(deleted))

    async def _unplug(self, dom: Domain) -> None:
        """The VMM is gone, and with it the taps: release the interfaces' network ports."""
        running, dom.nets = dom.nets, []
        await nets.unplug(running, self.session)

    async def _pin(self, handle: VmmHandle, cfg: DomainConfig) -> None:
        """Apply ``cfg``'s <cputune> to the VMM's threads (their ids from its status)."""
        try:
            status = await handle.request("status")
        except VmmError as err:
            raise _failed(str(err)) from err
        cputune.apply(handle.pid, cputune.vcpu_threads(status), cfg.cputune)

    async def apply_cputune(self, dom: Domain, cfg: DomainConfig) -> None:
        """A LiveApply for <cputune> edits of a running domain."""
        if dom.vmm is None:
            raise invalid_operation("domain is not running")
        await self._pin(dom.vmm, cfg)

    async def _repin(self, dom: Domain, handle: VmmHandle) -> None:
        """The VMM rebuilt the VM in place (reboot, reset): its new vCPU threads get their pins again."""
        async with dom.lock:
            if dom.vmm is handle and dom.active:
                try:
                    await self._pin(handle, dom.config)
                except VirtError as err:
                    log.warning("domain %s: cannot pin the rebuilt vCPUs: %s", dom.name, err)

    def _task(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _adopt(self, dom: Domain, handle: VmmHandle) -> None:
        dom.vmm = handle
        handle.on_event = lambda ev: self._on_vmm_event(dom, handle, ev)
        self._task(self._watch(dom, handle))
        # An event pushed before on_event was set (e.g. a guest crashing at once under
        # on_crash=preserve, right after the VMM answered its first status) was not seen: ask again.
        self._task(self._resync_preserved(dom, handle))

    def _on_vmm_event(self, dom: Domain, handle: VmmHandle, ev: dict[str, Any]) -> None:
        # In-place reboots and preserved endings are handled here; every other ending is taken from
        # the exit file once the VMM is gone.
        name = ev.get("event")
        if name == "reboot" and not ev.get("preserved"):
            self._task(self._repin(dom, handle))
        if ev.get("preserved") and name in _PRESERVED_EVENTS:
            self._task(self._guest_input(dom, handle, _PRESERVED_EVENTS[str(name)]))
        elif name == "reboot" and ev.get("detail") == "reset":
            pass  # our own reset command: the RESET transition already accounted for it
        elif name == "reboot" and dom.vmm is handle and dom.config.on_reboot == "restart":
            self._task(self._guest_input(dom, handle, Input.GUEST_REBOOT_RESTART))

    async def _guest_input(self, dom: Domain, handle: VmmHandle, inp: Input) -> None:
        async with dom.lock:
            if dom.vmm is handle:
                self._apply_guest_input(dom, inp)

    def _apply_guest_input(self, dom: Domain, inp: Input) -> None:
        """A report from the live VMM (it stays attached): the table's transition, committed."""
        t = lookup(dom.status.state, inp)
        if isinstance(t, Transition):
            if inp in _PRESERVED_EVENTS.values():
                log.info("domain %s: guest ended, partition preserved (%s)", dom.name, inp.value)
            self._commit(dom, t)

    async def _resync_preserved(self, dom: Domain, handle: VmmHandle) -> None:
        async with dom.lock:
            if dom.vmm is not handle or dom.status.state in PRESERVED:
                return
            try:
                st = await handle.request("status", timeout=5.0)
            except VmmError:
                return  # it is ending: the watcher accounts for that
            inp = _PRESERVED_STATUS.get(str(st.get("state")))
            if inp is not None and dom.vmm is handle:
                self._apply_guest_input(dom, inp)

    async def _watch(self, dom: Domain, handle: VmmHandle) -> None:
        await handle.exited
        async with dom.lock:
            if dom.vmm is not handle:
                return  # destroyed or restarted by us: already accounted for
            dom.vmm = None
            await self._vmm_ended(dom, handle.files)

    async def _vmm_ended(self, dom: Domain, files: VmmFiles) -> None:
        """The VMM is gone: turn its exit report (or its absence) into a lifecycle input."""
        info = files.read_exit() or {}
        reason = info.get("reason")
        cfg = dom.config
        if dom.status.state in PRESERVED:
            # The guest had already ended and its partition was kept: whatever the exit file says
            # (e.g. "destroyed" by a SIGTERM from someone else), the table's VMM_DIED row decides.
            inp = Input.VMM_DIED
        elif reason == "shutdown":
            inp = policy_input("poweroff", cfg.on_poweroff)
        elif reason == "reboot":
            inp = policy_input("reboot", cfg.on_reboot)
        elif reason == "crash":
            inp = policy_input("crash", cfg.on_crash)
        elif reason == "destroyed":
            inp = Input.DESTROY  # someone else stopped it (e.g. SIGTERM): libvirt reports it destroyed
        else:
            inp = Input.VMM_DIED
        if info.get("detail"):
            log.info("domain %s ended: %s (%s)", dom.name, reason, info.get("detail"))
        else:
            log.warning("domain %s: VMM ended without an exit report", dom.name)
        out = lookup(dom.status.state, inp)
        if not isinstance(out, Transition):
            out = transition(dom.status.state, Input.VMM_DIED)
        settle_crash_dump(files.config, reason == "crash")
        files.remove_runtime()
        await self._unplug(dom)
        if out.action is Action.RESTART_VMM:
            # QEMU's fake reboot: the same domain (id included) boots again, paused only if it stays paused.
            restarted = Transition(out.status, out.events, Action.NONE, out.reboot_event)
            try:
                await self._spawn(dom, paused=out.next_status(dom.status).state is State.PAUSED, keep_id=True)
            except VirtError as err:
                log.error("restart of %s failed: %s", dom.name, err)
                # Booting again failed: the domain is off; report it as failed.
                self._commit(dom, transition(dom.status.state, Input.VMM_DIED))
                return
            self._commit(dom, restarted)
            return
        self._commit(dom, out)

    # -- NMI, keys, rename, autodestroy -------------------------------------------------------------
    async def inject_nmi(self, dom: Domain) -> None:
        await self._vmm_op(dom, Input.INJECT_NMI, "inject-nmi")

    async def send_key(self, dom: Domain, keys: list[int], holdtime: int) -> None:
        """``keys`` are qnums (see vmm/devices/keymap.py); ``holdtime`` in ms, 0 for the default."""
        await self._vmm_op(dom, Input.SEND_KEY, "send-key", {"keys": keys, "holdtime": holdtime})

    async def _vmm_op(self, dom: Domain, inp: Input, cmd: str, args: dict[str, Any] | None = None) -> None:
        """A request to the running VM that changes no state (the table says where it is allowed)."""
        async with dom.lock:
            if dom.removed:
                raise no_domain(f"no domain with matching name '{dom.name}'")
            transition(dom.status.state, inp)
            handle = dom.vmm
            if handle is None:
                raise invalid_operation("domain is not running")
            try:
                await handle.request(cmd, args=args)
            except VmmError as err:
                raise _failed(str(err)) from err

    def _rename_journal(self, uuid: uuidlib.UUID) -> Path:
        return self.paths.config_dir / f".rename-{uuid}.json"

    async def rename(self, dom: Domain, new_name: str) -> None:
        """virDomainRename: a shut-off persistent domain's config moves to ``new_name``.

        Crash-safe through a journal written first: a daemon killed at any point finds, on start-up, either
        the old config (the new one was never complete) or completes the move (see ``_finish_renames``).
        """
        async with dom.lock:
            if dom.removed:
                raise no_domain(f"no domain with matching name '{dom.name}'")
            t = transition(dom.status.state, Input.RENAME)  # "cannot rename active domain"
            if dom.persistent is None:
                raise invalid_operation("cannot rename a transient domain")
            # virDomainObjListRename's checks, then the QEMU driver's, in their order.
            if new_name == dom.name:
                raise invalid_operation("Can't rename domain to itself")
            other = self._domains.get(new_name)
            if other is not None and not other.removed:
                raise invalid_operation(f"domain with name '{new_name}' already exists")
            if "/" in new_name:
                raise VirtError(ErrorCode.XML_ERROR, f"name {new_name} cannot contain '/'", ErrorDomain.DOMAIN)
            root = etree.fromstring(dom.persistent.xml.encode())
            set_text("name", new_name)(root)
            # Every rule of a define applies to the new name (and the stored file is one the next daemon reads).
            new = await asyncio.to_thread(
                parse_domain_xml, etree.tostring(root, encoding="unicode"), check_libvirt_schema=True
            )
            old_name = dom.name
            self._domains[new_name] = dom  # taken from now on: a define of that name must not slip in
            try:
                await asyncio.to_thread(self._move_config, dom.uuid, old_name, new_name, new.xml)
            except OSError as err:
                del self._domains[new_name]
                self._domains[old_name] = dom  # (re-indexes the uuid)
                raise _failed(f"cannot rename '{old_name}' to '{new_name}': {err}") from err
            del self._domains[old_name]
            self._domains[new_name] = dom
            dom.name, dom.persistent = new_name, new
            undefined, defined = t.events
            self._emit(dom, "lifecycle", *undefined, name=old_name)
            self._emit(dom, "lifecycle", *defined)

    def _move_config(self, uuid: uuidlib.UUID, old: str, new: str, xml: str) -> None:
        journal = self._rename_journal(uuid)
        autostart = self.store.autostart(old)
        write_atomic(journal, json.dumps({"old": old, "new": new, "autostart": autostart}).encode())
        self.store.save(new, xml)
        self._complete_rename(journal, old, new, autostart)

    def _complete_rename(self, journal: Path, old: str, new: str, autostart: bool) -> None:
        if autostart:
            self.store.set_autostart(new, True)
        self.store.delete(old)  # the old config and its autostart link
        remove_durable(journal)

    def _finish_renames(self) -> None:
        """Renames a killed daemon left half done: completed when the new config was fully written, else undone."""
        for journal in sorted(self.paths.config_dir.glob(".rename-*.json")):
            try:
                raw = json.loads(journal.read_text())
                old, new, autostart = str(raw["old"]), str(raw["new"]), bool(raw["autostart"])
                want = uuidlib.UUID(journal.name[len(".rename-") : -len(".json")])
            except (OSError, ValueError, KeyError, TypeError) as err:
                log.error("ignoring unreadable rename journal %s: %s", journal, err)
                remove_durable(journal)
                continue
            try:
                # write_atomic: the new config is there whole or not at all.
                written = (
                    self.store.path(new).exists()
                    and parse_domain_xml(self.store.path(new).read_text(), trusted=True).uuid == want
                )
            except (OSError, VirtError) as err:
                log.error("rename of %s to %s left %s unreadable (%s): both kept", old, new, self.store.path(new), err)
                continue
            if written:
                log.warning("completing the rename of %s to %s", old, new)
                self._complete_rename(journal, old, new, autostart)
            else:
                log.warning("undoing the unfinished rename of %s to %s", old, new)
                remove_durable(journal)

    def release_autodestroy(self, owner: object) -> None:
        """``owner``'s connection ended: destroy the domains it started with VIR_DOMAIN_START_AUTODESTROY."""
        if self._closing:
            return  # the daemon is stopping: close() takes care of them
        for dom in self.domains():
            if dom.autodestroy is owner:
                self._task(self._autodestroy(dom, owner))

    async def _autodestroy(self, dom: Domain, owner: object) -> None:
        async with dom.lock:
            if dom.removed or dom.autodestroy is not owner:
                return  # stopped (or started again by someone else) meanwhile
            log.info("destroying %s: the connection that started it with autodestroy closed", dom.name)
            t = transition(dom.status.state, Input.DESTROY)
            try:
                await self._act(dom, t)
            except VirtError as err:
                log.error("autodestroy of %s failed: %s", dom.name, err)
                return
            self._commit(dom, t)

    # -- queries ----------------------------------------------------------------------------------
    def info(self, dom: Domain) -> tuple[int, int, int, int, int]:
        """(state, max memory KiB, memory KiB, vcpus, cpu time ns) like virDomainGetInfo."""
        cfg = dom.config
        handle = dom.vmm
        # CPU time of the VMM process (all its vCPU threads), as libvirt reads it for QEMU: no round trip.
        cpu = process_cpu_ns(handle.pid) if dom.active and handle is not None else 0
        return int(dom.status.state), cfg.memory_kib, cfg.current_memory_kib, cfg.current_vcpus, cpu

    def cpu_times(self, dom: Domain) -> tuple[int, int]:
        """(user, system) ns of the domain's VMM process; (0, 0) when it is not running."""
        handle = dom.vmm
        return process_cpu_times(handle.pid) if dom.active and handle is not None else (0, 0)

    def xml(self, dom: Domain, inactive: bool) -> str:
        if inactive and dom.persistent is not None:
            return format_domain_xml(dom.persistent)
        cfg = dom.config
        pty = dom.vmm.pty if dom.active and dom.vmm is not None else None
        running = [net.live() for net in dom.nets] if dom.active else []
        return format_domain_xml(cfg, domain_id=dom.id if dom.active else None, pty=pty, nets=running)

    def console_pty(self, dom: Domain) -> str:
        if not dom.active or dom.vmm is None:
            raise invalid_operation("domain is not running")
        if dom.vmm.pty is None:
            raise _failed("the domain has no serial console")
        return dom.vmm.pty

    async def close(self) -> None:
        """Stop watching (VMMs keep running: they are not tied to the daemon).

        Domains started with autodestroy go first: every connection ends with the daemon, as in libvirtd,
        whose shutdown closes its clients and so runs their close callbacks.
        """
        self._closing = True
        for dom in self.domains():
            if dom.autodestroy is not None:
                await self._autodestroy(dom, dom.autodestroy)
        for task in list(self._tasks):
            task.cancel()
        for dom in self._domains.values():
            if dom.vmm is not None:
                dom.vmm.close()
