"""Ports of libvirt's network driver for ``<interface type='network'>``, as libvirt's own hypervisor drivers
take them (virDomainNetCreatePort / virNetworkPortDelete): at start the daemon asks the network driver
(``network:///system``, or the session one, on the socket the relay uses) for a port owned by the domain,
and the port's plug names the bridge the tap joins; when the VM stops or dies the port is deleted, so the
network's port accounting (net-port-list, DHCP and bandwidth) stays right. A connection per request: these
happen at start and stop, never per packet.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid as uuidlib
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from xml.sax.saxutils import escape

from lxml import etree

from mshv_libvirt.errors import ErrorCode, ErrorDomain, VirtError
from mshv_libvirt.rpc.xdr import Packer, Unpacker, XdrError

__all__ = ["NetworkPort", "create_port", "delete_port", "delete_port_of", "delete_unclaimed"]

PROC_NETWORK_LOOKUP_BY_NAME = 46
PROC_NETWORK_PORT_CREATE_XML = 406
PROC_NETWORK_PORT_GET_XML_DESC = 409
PROC_NETWORK_PORT_DELETE = 410
_STRING_MAX = 4 << 20  # REMOTE_STRING_MAX
_TIMEOUT = 30.0  # a network driver that does not answer a port request in this long is not coming back


@dataclass(frozen=True)
class NetworkPort:
    network: str
    network_uuid: bytes
    portid: str  # the port's UUID, shown as <source portid> in the live XML
    bridge: str  # the plug's bridge: what the tap joins


def _passed_on(code: int, domain: int, message: str) -> VirtError:
    """The network driver's error as it gave it (code, domain, message), as the relay passes its errors."""
    try:
        err = VirtError(ErrorCode(code), message, ErrorDomain(domain))
    except ValueError:
        err = VirtError(ErrorCode.INTERNAL_ERROR, message, ErrorDomain.NETWORK)
    err.message = message
    return err


@contextlib.asynccontextmanager
async def _connected(session: bool) -> AsyncIterator[Callable[[int, bytes], Awaitable[Unpacker]]]:
    """A connection to the network driver for a few calls (``call(proc, payload)`` gives each ret), its
    errors as libvirt's."""
    # Imported here: the relay module imports the driver package.
    from mshv_libvirt.rpc.client import DaemonError, Handlers, RemoteClient, RemoteClosed
    from mshv_libvirt.rpc.relay import NETWORK, socket_path

    path = socket_path(NETWORK, session, readonly=False)
    uri = f"network:///{'session' if session else 'system'}"
    client: RemoteClient | None = None

    async def call(proc: int, payload: bytes) -> Unpacker:
        assert client is not None
        try:
            return await client.call_ok(proc, payload)
        except DaemonError as err:
            raise _passed_on(err.error.code, err.error.domain, err.error.message) from None

    try:
        async with asyncio.timeout(_TIMEOUT):
            client = await RemoteClient.connect(path, Handlers(), f"{uri} on {path}")
            try:
                await client.open(uri, readonly=False)
            except DaemonError as err:
                raise _passed_on(err.error.code, err.error.domain, err.error.message) from None
            yield call
    except (OSError, TimeoutError, RemoteClosed, XdrError) as err:
        raise VirtError(
            ErrorCode.OPERATION_FAILED, f"libvirt's network driver ({uri} on {path}) is not available: {err}"
        ) from None
    finally:
        if client is not None:
            client.close()


async def _call(session: bool, calls: list[tuple[int, bytes]]) -> list[Unpacker]:
    """Each call's ret, on one connection opened for them."""
    async with _connected(session) as call:
        return [await call(proc, payload) for proc, payload in calls]


def _network(p: Packer, name: str, raw_uuid: bytes) -> None:
    p.string(name)  # remote_nonnull_network
    p.opaque_fixed(raw_uuid, 16)


def _port_xml(domain: str, domain_uuid: str, mac: str, port_uuid: str) -> str:
    # virDomainNetDefToNetworkPort: the port's UUID, its owner, the guest's MAC
    return (
        f"<networkport><uuid>{port_uuid}</uuid><owner><name>{escape(domain)}</name><uuid>{domain_uuid}</uuid>"
        f"</owner><mac address='{mac}'/></networkport>"
    )


def _plug_bridge(xml: str, network: str) -> str:
    """The bridge of the port's plug. Plugs into a bridge (a libvirt network with its own bridge, or
    forward mode='bridge') are what a tap can join; a macvtap or hostdev plug is not."""
    plug = etree.fromstring(xml.encode()).find("plug")
    kind = plug.get("type") if plug is not None else None
    bridge = plug.get("bridge") if plug is not None else None
    if kind not in ("network", "bridge") or not bridge:
        raise VirtError(
            ErrorCode.CONFIG_UNSUPPORTED,
            f"network '{network}' gives a port of type '{kind}'; the mshv driver can only attach a tap to a bridge",
        )
    return bridge


async def create_port(session: bool, network: str, domain: str, domain_uuid: str, mac: str, portid: str) -> NetworkPort:
    """Port ``portid`` of ``network`` for the interface with ``mac`` of ``domain``; its bridge from the port's
    plug. The caller picks the UUID, so that it can count the port as its own before it exists."""
    p = Packer()
    p.string(network)
    (found,) = await _call(session, [(PROC_NETWORK_LOOKUP_BY_NAME, p.getvalue())])
    name, net_uuid = found.string(_STRING_MAX), found.opaque_fixed(16)
    p = Packer()
    _network(p, name, net_uuid)
    p.string(_port_xml(domain, domain_uuid, mac, portid))
    p.uint(0)
    (created,) = await _call(session, [(PROC_NETWORK_PORT_CREATE_XML, p.getvalue())])
    created.string(_STRING_MAX)
    created.opaque_fixed(16)
    port_uuid = created.opaque_fixed(16)
    port = NetworkPort(name, net_uuid, str(uuidlib.UUID(bytes=port_uuid)), "")
    try:
        p = Packer()
        _network(p, name, net_uuid)
        p.opaque_fixed(port_uuid, 16)
        p.uint(0)
        (desc,) = await _call(session, [(PROC_NETWORK_PORT_GET_XML_DESC, p.getvalue())])
        bridge = _plug_bridge(desc.string(_STRING_MAX), name)
    except BaseException:
        await delete_port(session, port)
        raise
    return NetworkPort(name, net_uuid, port.portid, bridge)


async def delete_port(session: bool, port: NetworkPort) -> None:
    """virNetworkPortDelete; a port (or network) already gone is no error: it is what was asked for."""
    p = Packer()
    _network(p, port.network, port.network_uuid)
    p.opaque_fixed(uuidlib.UUID(port.portid).bytes, 16)
    p.uint(0)
    try:
        await _call(session, [(PROC_NETWORK_PORT_DELETE, p.getvalue())])
    except VirtError as err:
        if err.code not in (ErrorCode.NO_NETWORK, ErrorCode.NO_NETWORK_PORT):
            raise


async def delete_port_of(session: bool, network: str, portid: str) -> None:
    """virNetworkPortDelete of port ``portid`` of the network named ``network``; a port or network already
    gone is no error."""
    p = Packer()
    p.string(network)
    try:
        (found,) = await _call(session, [(PROC_NETWORK_LOOKUP_BY_NAME, p.getvalue())])
    except VirtError as err:
        if err.code is ErrorCode.NO_NETWORK:
            return
        raise
    name, net_uuid = found.string(_STRING_MAX), found.opaque_fixed(16)
    await delete_port(session, NetworkPort(name, net_uuid, portid, ""))


PROC_CONNECT_LIST_ALL_NETWORKS = 283
PROC_NETWORK_LIST_ALL_PORTS = 404
_LIST_MAX = 16384  # REMOTE_NETWORK_LIST_MAX, REMOTE_NETWORK_PORT_LIST_MAX
_LIST_NETWORKS_ACTIVE = 2  # VIR_CONNECT_LIST_NETWORKS_ACTIVE: an inactive network has no ports


def _owner(xml: str) -> tuple[str, str] | None:
    """The port's <owner> (uuid, name), as virDomainNetDefToNetworkPort writes it."""
    owner = etree.fromstring(xml.encode()).find("owner")
    if owner is None:
        return None
    return (owner.findtext("uuid") or "").strip().lower(), owner.findtext("name") or ""


async def delete_unclaimed(
    session: bool, owners: Mapping[str, str], claimed: Callable[[], Collection[str]]
) -> list[NetworkPort]:
    """Delete every port of the network driver's active networks whose <owner> is one of ``owners`` (domain
    UUID -> name, both must match) and whose UUID is not in ``claimed()`` (read at each port, so that a
    port counted as claimed meanwhile is kept); returns the deleted ports.

    A daemon that died after creating a port and before recording it in the domain's runtime record leaves
    the port in libvirt's network driver, which keeps it for ever: this finds it by the owner we gave it."""
    if not owners:
        return []
    deleted: list[NetworkPort] = []
    async with _connected(session) as call:
        p = Packer()
        p.int(1)  # need_results
        p.uint(_LIST_NETWORKS_ACTIVE)
        listed = await call(PROC_CONNECT_LIST_ALL_NETWORKS, p.getvalue())
        networks = [(listed.string(_STRING_MAX), listed.opaque_fixed(16)) for _ in range(listed.array_len(_LIST_MAX))]
        for name, net_uuid in networks:
            p = Packer()
            _network(p, name, net_uuid)
            p.int(1)
            p.uint(0)
            try:
                ports = await call(PROC_NETWORK_LIST_ALL_PORTS, p.getvalue())
            except VirtError as err:
                if err.code is ErrorCode.NO_NETWORK:
                    continue  # stopped or removed since it was listed
                raise
            portids = []
            for _ in range(ports.array_len(_LIST_MAX)):
                ports.string(_STRING_MAX)
                ports.opaque_fixed(16)
                portids.append(ports.opaque_fixed(16))
            for raw in portids:
                port = NetworkPort(name, net_uuid, str(uuidlib.UUID(bytes=raw)), "")
                p = Packer()
                _network(p, name, net_uuid)
                p.opaque_fixed(raw, 16)
                p.uint(0)
                try:
                    owner = _owner((await call(PROC_NETWORK_PORT_GET_XML_DESC, p.getvalue())).string(_STRING_MAX))
                except VirtError as err:
                    if err.code in (ErrorCode.NO_NETWORK, ErrorCode.NO_NETWORK_PORT):
                        continue  # deleted by its owner meanwhile
                    raise
                if owner is None or owners.get(owner[0]) != owner[1] or port.portid in claimed():
                    continue
                p = Packer()
                _network(p, name, net_uuid)
                p.opaque_fixed(raw, 16)
                p.uint(0)
                try:
                    await call(PROC_NETWORK_PORT_DELETE, p.getvalue())
                except VirtError as err:
                    if err.code not in (ErrorCode.NO_NETWORK, ErrorCode.NO_NETWORK_PORT):
                        raise
                    continue
                deleted.append(port)
    return deleted


PROC_NETWORK_GET_DHCP_LEASES = 341
_LEASES_MAX = 65536  # REMOTE_NETWORK_DHCP_LEASES_MAX


@dataclass(frozen=True)
class Lease:
    type: int  # VIR_IP_ADDR_TYPE_IPV4 (0) | _IPV6 (1)
    ipaddr: str
    prefix: int


async def dhcp_leases(session: bool, network: str, mac: str) -> list[Lease]:
    """virNetworkGetDHCPLeases of ``network`` for ``mac``: what its dnsmasq leased (libvirt's lease file)."""
    p = Packer()
    p.string(network)
    (found,) = await _call(session, [(PROC_NETWORK_LOOKUP_BY_NAME, p.getvalue())])
    name, net_uuid = found.string(_STRING_MAX), found.opaque_fixed(16)
    p = Packer()
    _network(p, name, net_uuid)
    p.opt_string(mac)
    p.int(1)  # need_results
    p.uint(0)
    (u,) = await _call(session, [(PROC_NETWORK_GET_DHCP_LEASES, p.getvalue())])
    leases: list[Lease] = []
    try:
        for _ in range(u.array_len(_LEASES_MAX)):
            u.string(_STRING_MAX)  # iface
            u.hyper()  # expirytime
            kind = u.int()
            u.opt_string(_STRING_MAX)  # mac
            u.opt_string(_STRING_MAX)  # iaid
            ipaddr = u.string(_STRING_MAX)
            prefix = u.uint()
            u.opt_string(_STRING_MAX)  # hostname
            u.opt_string(_STRING_MAX)  # clientid
            leases.append(Lease(int(kind), ipaddr, int(prefix)))
    except XdrError as err:
        raise VirtError(ErrorCode.RPC, f"malformed DHCP leases from libvirt's network driver: {err}") from None
    return leases
