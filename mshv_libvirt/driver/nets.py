"""A domain's interfaces at start and stop: a port of libvirt's network driver for type='network', a tap on
the right bridge for each (taps.py), and the VMM's "net" config with the taps' descriptors; at stop the
ports are deleted (the taps go with the VMM's descriptors)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import uuid as uuidlib
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mshv_libvirt.atomicfile import remove_durable, sweep_temporaries, write_atomic
from mshv_libvirt.domain import DomainConfig
from mshv_libvirt.domain.xml import NetLive
from mshv_libvirt.errors import ErrorCode, VirtError

from .netports import NetworkPort, create_port, delete_port, delete_port_of
from .taps import Tap, TapBusy, create_tap, interface_exists
from .vmm_launch import HeldFds

log = logging.getLogger(__name__)

VNET_PREFIX = "vnet"  # VIR_NET_GENERATED_VNET_PREFIX
_VNET_MAX = 1 << 16  # names wrap around after this many, as libvirt's virNetDevGenerateName
_BUSY_RETRIES = 8
# Test-only hook: the daemon SIGKILLs itself right after the network driver created a port, before anything
# records it (the window the start-up sweep of unclaimed ports closes).
KILL_AFTER_PORT_CREATE_ENV = "MSHV_LIBVIRT_TEST_KILL_AFTER_PORT_CREATE"


@dataclass(frozen=True)
class RunningNet:
    """A started interface: its tap's name and, for type='network', its port."""

    ifname: str
    port: NetworkPort | None = None

    def live(self) -> NetLive:
        if self.port is None:
            return NetLive(self.ifname)
        return NetLive(self.ifname, portid=self.port.portid, bridge=self.port.bridge)

    def to_json(self) -> dict[str, Any]:
        port = self.port
        return {
            "ifname": self.ifname,
            "port": None
            if port is None
            else {
                "network": port.network,
                "network_uuid": port.network_uuid.hex(),
                "portid": port.portid,
                "bridge": port.bridge,
            },
        }

    @classmethod
    def from_json(cls, raw: Any) -> RunningNet:
        port = raw.get("port")
        return cls(
            str(raw["ifname"]),
            None
            if port is None
            else NetworkPort(
                str(port["network"]), bytes.fromhex(str(port["network_uuid"])), str(port["portid"]), str(port["bridge"])
            ),
        )


class IfnameAllocator:
    """libvirt's generated tap names: vnetN with N counting up for the daemon's life (a name that exists is
    skipped), past the names of the running domains a restarted daemon re-attached to."""

    def __init__(self) -> None:
        self._last = -1

    def reserve(self, name: str) -> None:
        m = re.fullmatch(rf"{VNET_PREFIX}([0-9]+)", name)
        if m is not None:
            self._last = max(self._last, int(m.group(1)))

    def next(self) -> str:
        for _ in range(_VNET_MAX):
            self._last = (self._last + 1) % _VNET_MAX
            name = f"{VNET_PREFIX}{self._last}"
            if not interface_exists(name):
                return name
        raise VirtError(ErrorCode.INTERNAL_ERROR, f"No free {VNET_PREFIX}N network device name")


class PortJournal:
    """The ports asked of the network driver and not yet in a runtime record: ``<run_dir>/ports/<portid>``,
    written durably before the port is created and removed once the record holds it (or the port is gone).
    A daemon killed in between leaves the file, and the next one deletes the port. The owner alone cannot
    tell: a transient domain is unknown to the next daemon."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir / "ports"

    def note(self, portid: str, network: str) -> None:
        self.dir.mkdir(mode=0o700, exist_ok=True)
        write_atomic(self.dir / portid, json.dumps({"network": network}).encode())

    def forget(self, portid: str) -> None:
        remove_durable(self.dir / portid)
        with contextlib.suppress(OSError):
            self.dir.rmdir()  # when empty: no run-dir leftover once nothing is in flight (note() makes it again)

    def entries(self) -> dict[str, str]:
        """portid -> network name of every entry a daemon left."""
        sweep_temporaries(self.dir)
        out: dict[str, str] = {}
        try:
            paths = list(self.dir.iterdir())
        except FileNotFoundError:
            return out
        for path in paths:
            try:
                out[str(uuidlib.UUID(path.name))] = str(json.loads(path.read_text())["network"])
            except (OSError, ValueError, KeyError, TypeError) as err:
                log.error("ignoring unreadable port journal entry %s: %s", path, err)
        return out

    async def delete_unclaimed(
        self, session: bool, held: Callable[[], Collection[str]], in_flight: Callable[[], Collection[str]]
    ) -> int:
        """Delete the ports of entries neither a runtime record ``held()`` nor a start ``in_flight()`` (both
        read at each entry: starts go on meanwhile), then those entries and the held ones; returns how many
        ports. An entry in flight is its start's to remove."""
        deleted = 0
        for portid, network in self.entries().items():
            if portid in in_flight():
                continue
            if portid not in held():
                await delete_port_of(session, network, portid)  # one that is gone is no error
                log.warning("deleted port %s of network %s: its daemon died before recording it", portid, network)
                deleted += 1
            self.forget(portid)
        return deleted


@dataclass
class PluggedNets(HeldFds):
    """The taps (the daemon's descriptors, closed once the VMM has its own), the VMM's "net" entries and
    what the domain's runtime record keeps of them."""

    config: list[dict[str, Any]] = field(default_factory=list)
    running: list[RunningNet] = field(default_factory=list)


async def plug(
    cfg: DomainConfig, session: bool, names: IfnameAllocator, in_flight: set[str], journal: PortJournal
) -> PluggedNets:
    """Ports and taps for every interface of ``cfg``, in order; on a failure what was made is undone. Each
    port's UUID goes into ``in_flight`` and ``journal`` before the port is asked for (the caller takes it out
    of both once the domain's runtime record holds the port, or the port is deleted): a sweep of unclaimed
    ports keeps it, and the next daemon deletes it should this one die first."""
    plugged = PluggedNets()
    try:
        for net in cfg.nets:
            port: NetworkPort | None = None
            bridge = net.bridge
            if net.type == "network":
                portid = str(uuidlib.uuid4())
                in_flight.add(portid)
                journal.note(portid, net.network or "")
                port = await create_port(session, net.network or "", cfg.name, str(cfg.uuid), net.mac, portid)
                if os.environ.get(KILL_AFTER_PORT_CREATE_ENV):
                    log.warning("test hook %s: SIGKILL after creating port %s", KILL_AFTER_PORT_CREATE_ENV, portid)
                    os.kill(os.getpid(), signal.SIGKILL)
                bridge = port.bridge
            try:
                tap = _tap(net.target, names, net.mac, net.mtu, bridge, max(net.queues, 1))
            except BaseException:
                if port is not None:
                    await _delete_quietly(session, port)
                raise
            plugged.running.append(RunningNet(tap.name, port))
            plugged.config.append(
                {
                    "slot": net.address.slot,
                    "fd": plugged.keep(tap.fd),
                    "queue_fds": [plugged.keep(fd) for fd in tap.queue_fds],
                    "mac": net.mac,
                    "mtu": net.mtu,
                    "link_up": net.link_state != "down",
                }
            )
    except BaseException:
        plugged.close()
        await unplug(plugged.running, session)
        raise
    return plugged


def _tap(
    target: str | None, names: IfnameAllocator, mac: str, mtu: int | None, bridge: str | None, queues: int = 1
) -> Tap:
    if target is not None:
        return create_tap(target, mac, mtu=mtu, bridge=bridge, queues=queues)
    for _ in range(_BUSY_RETRIES):
        try:
            return create_tap(names.next(), mac, mtu=mtu, bridge=bridge, queues=queues)
        except TapBusy:
            continue  # taken between the check and the create (another daemon's VM): the next name
    return create_tap(names.next(), mac, mtu=mtu, bridge=bridge, queues=queues)


async def _delete_quietly(session: bool, port: NetworkPort) -> None:
    try:
        await delete_port(session, port)
    except VirtError as err:
        # The VM is gone either way; libvirt's network driver keeps the port until it is deleted by hand.
        log.error("cannot delete port %s of network %s: %s", port.portid, port.network, err)


async def unplug(running: list[RunningNet], session: bool) -> None:
    """The interfaces' VMM is gone (or never ran): delete their ports."""
    for net in running:
        if net.port is not None:
            await _delete_quietly(session, net.port)
