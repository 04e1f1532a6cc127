"""``<disk type='volume'>`` resolved at start through libvirt's storage driver, as libvirt 9.0's
virDomainDiskTranslateSourcePool does (domain_conf.c): the pool by name, which must be active, the volume in
it, its type and path, the pool's type from its XML. The daemon asks as itself (libvirt's QEMU driver opens
``storage:///system`` itself too), on a connection of its own opened for the start and closed after it;
libvirt's answers (a pool or volume that does not exist) reach the client unchanged.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from lxml import etree

from mshv_libvirt.errors import ErrorCode, ErrorDomain, VirtError

from .client import HANDSHAKE_TIMEOUT, DaemonError, Handlers, RemoteClient, RemoteClosed
from .protocol import STRING_MAX, RemoteError
from .relay import STORAGE, socket_path
from .xdr import Packer

if TYPE_CHECKING:
    from .xdr import Unpacker

# remote_protocol.x
POOL_LOOKUP_BY_NAME, POOL_GET_XML_DESC, VOL_LOOKUP_BY_NAME, VOL_GET_INFO, VOL_GET_PATH = 84, 88, 95, 98, 100
POOL_IS_ACTIVE = 154
UUID_LEN = 16
# virStorageVolType, and the disk type each local one becomes (virDomainStorageSourceTranslateSourcePool)
VOL_TYPES = ("file", "block", "dir", "network", "netdir", "ploop")
DISK_TYPE_OF_VOL = {"file": "file", "block": "block"}
# pool types whose volumes are local paths there; the others are network sources or unsupported by libvirt
LOCAL_POOLS = frozenset({"dir", "fs", "netfs", "logical", "disk", "scsi", "zfs", "vstorage"})
# A storage call answers in milliseconds; a storage daemon that does not must not hang a start.
CALL_TIMEOUT = 30.0


def _upstream(err: RemoteError) -> VirtError:
    """libvirt's storage driver's own error, passed on with its code, domain and message."""
    try:
        code = ErrorCode(err.code)
    except ValueError:
        code = ErrorCode.INTERNAL_ERROR
    try:
        domain = ErrorDomain(err.domain)
    except ValueError:
        domain = ErrorDomain.STORAGE
    out = VirtError(code, err.message, domain)
    out.message = err.message  # already formatted by libvirt: no second prefix
    out.args = (err.message,)
    return out


def _unavailable(what: str, why: object) -> VirtError:
    return VirtError(
        ErrorCode.NO_SUPPORT,
        f"storage pools are served by libvirt's storage driver, which is not available ({what}: {why})",
        ErrorDomain.STORAGE,
    )


class _Storage:
    def __init__(self, client: RemoteClient) -> None:
        self.client = client

    async def call(self, proc: int, payload: bytes) -> Unpacker:
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                return await self.client.call_ok(proc, payload)
        except DaemonError as err:
            raise _upstream(err.error) from err
        except (RemoteClosed, TimeoutError) as err:
            raise _unavailable(self.client.what, err) from err


async def translate(pool: str, volume: str, *, session: bool) -> tuple[str, str]:
    """(the volume's path, the disk type it is used as: 'file' or 'block'); libvirt's errors otherwise."""
    path = socket_path(STORAGE, session, readonly=False)
    uri = f"storage:///{'session' if session else 'system'}"
    what = f"{uri} on {path}"
    client: RemoteClient | None = None
    try:
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                client = await RemoteClient.connect(path, Handlers(), what)
                await client.open(uri, False)
        except DaemonError as err:
            raise _upstream(err.error) from err
        except (OSError, TimeoutError, RemoteClosed) as err:
            raise _unavailable(what, err) from err
        return await _translate(_Storage(client), pool, volume)
    finally:
        if client is not None:
            client.close()


async def _translate(storage: _Storage, pool: str, volume: str) -> tuple[str, str]:
    p = Packer()
    p.string(pool)
    u = await storage.call(POOL_LOOKUP_BY_NAME, p.getvalue())
    ref = Packer()  # remote_nonnull_storage_pool: name, uuid
    ref.string(u.string(STRING_MAX))
    ref.opaque_fixed(u.opaque_fixed(UUID_LEN), UUID_LEN)
    pool_ref = ref.getvalue()
    if (await storage.call(POOL_IS_ACTIVE, pool_ref)).int() != 1:
        raise VirtError(
            ErrorCode.CONFIG_UNSUPPORTED,
            f"storage pool '{pool}' containing volume '{volume}' is not active",
            ErrorDomain.DOMAIN,
        )
    p = Packer()
    p.string(volume)
    u = await storage.call(VOL_LOOKUP_BY_NAME, pool_ref + p.getvalue())
    ref = Packer()  # remote_nonnull_storage_vol: pool, name, key
    for _ in range(3):
        ref.string(u.string(STRING_MAX))
    vol_ref = ref.getvalue()
    info = await storage.call(VOL_GET_INFO, vol_ref)
    vol_type_id = info.int()
    vol_type = VOL_TYPES[vol_type_id] if 0 <= vol_type_id < len(VOL_TYPES) else str(vol_type_id)
    p = Packer()
    p.uint(0)
    pool_xml = (await storage.call(POOL_GET_XML_DESC, pool_ref + p.getvalue())).string(STRING_MAX)
    pool_type = etree.fromstring(pool_xml.encode(), etree.XMLParser(resolve_entities=False, no_network=True)).get(
        "type", ""
    )
    if pool_type not in LOCAL_POOLS:
        raise VirtError(
            ErrorCode.OPERATION_UNSUPPORTED,
            f"using '{pool_type}' pools for backing 'volume' disks isn't yet supported",
            ErrorDomain.DOMAIN,
        )
    if vol_type not in DISK_TYPE_OF_VOL:
        raise VirtError(
            ErrorCode.INTERNAL_ERROR,
            f"unexpected storage volume type '{vol_type}' for storage pool type '{pool_type}'",
            ErrorDomain.DOMAIN,
        )
    path = (await storage.call(VOL_GET_PATH, vol_ref)).string(STRING_MAX)
    return path, DISK_TYPE_OF_VOL[vol_type]
