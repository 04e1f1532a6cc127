"""The start path opens and locks a domain's images off the event loop (driver/manager.py _open_disks);
the oracle for a lock is the kernel's /proc/locks (tests/support/procfs.py), not the driver."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from mshv_libvirt.domain import DomainConfig
from mshv_libvirt.domain.xml import parse_domain_xml
from mshv_libvirt.driver import disks
from mshv_libvirt.driver.manager import _open_disks
from tests.support.procfs import image_locked
from tests.support.waits import wait_for


def config_with_disk(image: Path, driver: str = "") -> DomainConfig:
    return parse_domain_xml(
        "<domain type='hyperv'><name>d</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64'>hvm</type><kernel>/boot/k</kernel></os><devices>"
        f"<disk type='file' device='disk'><driver name='qemu' type='raw'{driver}/><source file='{image}'/>"
        "<target dev='vda' bus='virtio'/></disk></devices></domain>"
    )


def test_an_opened_image_is_locked_until_closed(tmp_path: Path) -> None:
    image = tmp_path / "a.img"
    image.write_bytes(bytes(4096))

    async def start() -> None:
        with await _open_disks(config_with_disk(image)) as opened:
            assert len(opened.pass_fds) == 1 and image_locked(image)

    asyncio.run(start())
    assert not image_locked(image)


def test_a_start_cancelled_while_opening_leaves_no_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real open and lock, held in the worker thread until the start has been cancelled (the window a
    slow file system opens): the lock must still go once the thread returns."""
    image = tmp_path / "a.img"
    image.write_bytes(bytes(4096))
    cancelled = threading.Event()
    real_open = disks.open_disks

    def slow_open(cfg: DomainConfig) -> disks.OpenedDisks:
        opened = real_open(cfg)
        assert cancelled.wait(timeout=10)
        return opened

    monkeypatch.setattr(disks, "open_disks", slow_open)

    async def start_then_cancel() -> None:
        task = asyncio.ensure_future(_open_disks(config_with_disk(image)))
        await asyncio.to_thread(wait_for, lambda: image_locked(image), timeout=10, what="the image locked")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        cancelled.set()
        await asyncio.to_thread(wait_for, lambda: not image_locked(image), timeout=10, what="the lock released")

    asyncio.run(start_then_cancel())


@pytest.mark.parametrize(
    ("driver", "cache", "io"),
    [
        ("", "default", None),
        (" cache='none' io='io_uring'", "none", "io_uring"),
        (" io='threads'", "default", "threads"),
    ],
)
def test_the_vmms_disk_config_carries_the_cache_and_io_modes(tmp_path: Path, driver: str, cache: str, io: str) -> None:
    """What the VMM is told (vmm/config.py DiskConfig reads it back) for <driver cache io>."""
    from mshv_libvirt.vmm.config import DiskConfig

    image = tmp_path / "a.img"
    image.write_bytes(bytes(4096))
    with disks.open_disks(config_with_disk(image, driver)) as opened:
        (entry,) = opened.config
        parsed = DiskConfig.from_dict(entry)
    assert (entry["cache"], entry["io"]) == (parsed.cache, parsed.io) == (cache, io)
