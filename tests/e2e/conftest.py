from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from tests.support import libvirtd
from tests.support.daemon import DaemonProcess, running_daemon
from tests.support.events import ensure_event_loop


@pytest.fixture(scope="session", autouse=True)
def _need_virsh() -> None:
    if shutil.which("virsh") is None:
        pytest.skip("virsh (Debian libvirt-clients) is not installed")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    with running_daemon(tmp_path / "d") as d:
        yield d


@pytest.fixture
def system_daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    """The system instance (libvirt's "privileged" driver: SMBIOS, CPU tuning), on temporary paths.

    With a mshv.conf of its own: the host's /etc/libvirt/mshv.conf and its default VMM user
    (libvirt-mshv, which only scripts/install.sh creates; .ci/run does not) are not the test's to rely on.
    Its VMMs run as nobody:nogroup, an unprivileged user every Debian system has."""
    conf = tmp_path / "mshv.conf"
    conf.write_text('user = "nobody"\ngroup = "nogroup"\n')
    d = DaemonProcess(tmp_path / "sys", ("--vmm-conf", str(conf)), system=True).start()
    try:
        yield d
    finally:
        d.stop()
        d.destroy_all_vmms()


@pytest.fixture(scope="session")
def system_libvirtd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """libvirt's system libvirtd (storage:///system, network:///system): started here when not running."""
    with libvirtd.system_libvirtd(tmp_path_factory.mktemp("libvirtd") / "libvirtd.log"):
        yield


@pytest.fixture
def session_libvirtd() -> Iterator[libvirtd.SessionLibvirtd]:
    """A private session libvirtd run as an unprivileged user (storage:///session)."""
    with libvirtd.session_libvirtd() as d:
        yield d


@pytest.fixture
def session_daemon(tmp_path: Path, session_libvirtd: libvirtd.SessionLibvirtd) -> Iterator[DaemonProcess]:
    """Our daemon with the private session libvirtd as its user's (``$XDG_RUNTIME_DIR``)."""
    d = DaemonProcess(tmp_path / "d", env={"XDG_RUNTIME_DIR": str(session_libvirtd.runtime_dir)}).start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture
def conn(daemon: DaemonProcess) -> Iterator[libvirt.virConnect]:
    """A libvirt-python connection to the test's daemon (the event loop runs: callbacks work)."""
    ensure_event_loop()
    c = libvirt.open(daemon.uri)
    yield c
    with contextlib.suppress(libvirt.libvirtError):
        c.close()


@pytest.fixture
def ref() -> Iterator[libvirt.virConnect]:
    """libvirt's own test:///default driver, the oracle (its state is shared by every connection of this
    process: query it, or name what you define uniquely)."""
    c = libvirt.open("test:///default")
    yield c
    c.close()
