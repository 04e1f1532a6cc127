"""<disk> end to end: a domain with a virtio-blk disk started through virsh against the real daemon, the
tiny guest writing through it (console key ``j``) and the host reading the bytes back from the image; the
daemon's start checks: an image that cannot be opened gets libvirt's storage error, a volume disk is
refused by name, and a writable image another running domain holds is refused with QEMU's lock wording
until that domain's VMM is gone (SIGKILLed here: the lock dies with its process); domblkstat by
target and by source path."""

from __future__ import annotations

import functools
import os
import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from tests.support.daemon import DaemonProcess, running_daemon, virsh, vmm_processes, vmm_request, wait_for
from tests.support.disks import SECTOR, assert_image_holds, disk_xml, document, qemu_img_info, write_through_console
from tests.support.guests import TINY_BANNER, TINY_BLK_BYTES, TINY_BLK_READS_PER_PRESS, TINY_BLK_SECTOR
from tests.support.libvirtd import unique
from tests.support.procfs import image_locked, process_gone

libvirt = pytest.importorskip("libvirt")

pytestmark = pytest.mark.virsh

MiB = 1 << 20


def refusal(dom: Any) -> tuple[int, int, str]:
    with pytest.raises(libvirt.libvirtError) as info:
        dom.create()
    return (info.value.get_error_code(), info.value.get_error_domain(), info.value.get_error_message())


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    with running_daemon(tmp_path_factory.mktemp("disks") / "d") as d:
        yield d


@pytest.fixture(scope="module")
def conn(daemon: DaemonProcess) -> Iterator[Any]:
    c = libvirt.open(daemon.uri)
    yield c
    c.close()


def test_an_image_that_cannot_be_opened_gets_libvirts_storage_error(
    conn: Any, tiny_kernel: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.img"
    dom = conn.defineXML(document("disk-missing", tiny_kernel, disk_xml(missing)))
    try:
        assert refusal(dom) == (
            libvirt.VIR_ERR_SYSTEM_ERROR,
            libvirt.VIR_FROM_STORAGE,
            # libvirt 9.0's storage_source.c wording; the ids are the daemon's, which opens the image
            f"Cannot access storage file '{missing}' (as uid:{os.geteuid()}, gid:{os.getegid()}): "
            "No such file or directory",
        )
        assert not dom.isActive()
    finally:
        dom.undefine()


def test_the_guest_writes_a_raw_image_and_a_second_domain_waits_for_its_lock(
    kvm: None, daemon: DaemonProcess, conn: Any, tiny_kernel: Path, tmp_path: Path
) -> None:
    img = tmp_path / "disk.raw"
    size = 2 * MiB
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(img), str(size)], check=True, timeout=30)
    first = conn.defineXML(document("disk-first", tiny_kernel, disk_xml(img)))
    second = conn.defineXML(document("disk-second", tiny_kernel, disk_xml(img)))
    try:
        out = virsh(daemon.uri, "start", "disk-first").stdout
        assert "Domain 'disk-first' started" in out, out
        blklist = virsh(daemon.uri, "domblklist", "disk-first").stdout
        assert re.search(rf"^\s*vda\s+{re.escape(str(img))}\s*$", blklist, flags=re.M), blklist
        line = write_through_console(daemon, "disk-first", 2)
        assert line["press"] == 2 and line["capacity"] == size // SECTOR, line
        assert_image_holds(img, 2)  # the guest flushed: the host reads its bytes from the image

        started = virsh(daemon.uri, "start", "disk-second", check=False)
        assert started.returncode != 0
        assert f'Failed to get "write" lock\nIs another process using the image [{img}]?' in started.stderr, (
            started.stderr
        )
        assert not second.isActive() and first.isActive()

        pid = daemon.vmm_pid("disk-first")
        # The tests' own scan sees the VMM, its backend's reaper (a fork of it) and qemu-storage-daemon.
        run = daemon.processes()
        assert vmm_processes(daemon.run_dir) == {"disk-first": pid}, run
        assert [p.argv[0].rsplit("/", 1)[-1] for p in run.values()].count("qemu-storage-daemon") == 1, run
        assert len(run) == 3, run
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: process_gone(pid) and not first.isActive())
        # The VMM's backend followed it: no process of the run is left, nothing holds the image.
        wait_for(lambda: not daemon.processes(), what=daemon.processes)
        wait_for(lambda: not image_locked(img))
        out = virsh(daemon.uri, "start", "disk-second").stdout
        assert "Domain 'disk-second' started" in out, out
        assert image_locked(img)
        line = write_through_console(daemon, "disk-second", 1)
        assert line["press"] == 1, line
        second.destroy()
        wait_for(lambda: not second.isActive() and not image_locked(img))
        wait_for(lambda: not daemon.processes(), what=daemon.processes)
        assert_image_holds(img, 1)
    finally:
        for dom in (first, second):
            if dom.isActive():
                dom.destroy()
            dom.undefine()


def test_the_guest_writes_a_qcow2_image_that_qemu_img_reads_back(
    kvm: None, daemon: DaemonProcess, conn: Any, tiny_kernel: Path, tmp_path: Path
) -> None:
    img = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), str(2 * MiB)], check=True, timeout=30)
    dom = conn.defineXML(document("disk-qcow2", tiny_kernel, disk_xml(img, "qcow2")))
    try:
        dom.create()
        assert write_through_console(daemon, "disk-qcow2", 1)["press"] == 1
        dom.destroy()
        # destroy returns once the VMM stopped its backend: the image is free and a start at once succeeds
        dom.create()
        dom.destroy()
        wait_for(lambda: not dom.isActive() and not image_locked(img))
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefine()
    check = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    raw = tmp_path / "converted.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(img), str(raw)], check=True, timeout=30)
    assert_image_holds(raw, 1)


def test_read_only_disks_share_an_image(
    kvm: None, daemon: DaemonProcess, conn: Any, tiny_kernel: Path, tmp_path: Path
) -> None:
    img = tmp_path / "shared.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(img), str(MiB)], check=True, timeout=30)
    doms = [conn.defineXML(document(f"disk-ro-{n}", tiny_kernel, disk_xml(img, readonly=True))) for n in (1, 2)]
    try:
        for dom in doms:
            dom.create()  # no write lock on a read-only image: both run
        assert all(dom.isActive() for dom in doms)
        for dom in doms:
            wait_for(lambda dom=dom: TINY_BANNER in daemon.serial_log(dom.name()).read_text(errors="replace"), 60)
        # each VMM holds the descriptor the daemon handed over, opened read-only
        modes = [
            _fdinfo_flags(pid, fd.name) & os.O_ACCMODE
            for pid in (daemon.vmm_pid(dom.name()) for dom in doms)
            for fd in Path(f"/proc/{pid}/fd").iterdir()
            if fd.resolve() == img
        ]
        assert modes == [os.O_RDONLY, os.O_RDONLY]
    finally:
        for dom in doms:
            if dom.isActive():
                dom.destroy()
            dom.undefine()


def _fdinfo_flags(pid: int, fd: str) -> int:
    for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("flags:"):
            return int(line.split()[1], 8)
    raise AssertionError(f"no flags in /proc/{pid}/fdinfo/{fd}")


def virsh_blkstat(uri: str, dom: str, disk: str) -> dict[str, int]:
    """``virsh domblkstat``'s lines (``<disk> <field> <value>``) as a dict."""
    out = virsh(uri, "domblkstat", dom, disk).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()]
    assert all(len(r) == 3 and r[0] == disk for r in rows), out
    return {r[1]: int(r[2]) for r in rows}


def test_domblkstat_and_domstats_count_the_guests_requests_by_target_or_source_across_a_daemon_restart(
    kvm: None, tiny_kernel: Path, tmp_path: Path
) -> None:
    """The tiny guest's 'j' press is one 4 KiB write, one flush and one 4 KiB read on its first disk (vda)
    (tests/support/guests.py): after ``presses`` of them the figures are exactly that, counted by the VMM's
    relay (qemu-storage-daemon's export counts nothing), through libvirt-python and virsh, by target, by
    source path and summed; vdb saw nothing. They live in the VMM, so a restarted daemon reports the same."""
    raw, qcow2 = tmp_path / "stat.raw", tmp_path / "stat.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), str(MiB)], check=True, timeout=30)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), str(MiB)], check=True, timeout=30)
    disks = disk_xml(raw) + disk_xml(qcow2, "qcow2", dev="vdb")
    with running_daemon(tmp_path / "d") as d:  # its own: it is restarted below
        c = libvirt.open(d.uri)
        dom = c.defineXML(document("disk-stat", tiny_kernel, disks))
        try:
            dom.create()
            presses = 3
            assert write_through_console(d, "disk-stat", presses)["press"] == presses
            moved = presses * TINY_BLK_BYTES
            reads = presses * TINY_BLK_READS_PER_PRESS  # each press reads its pattern back, then times more reads
            read = reads * TINY_BLK_BYTES
            vda, idle = (reads, read, presses, moved, -1), (0, 0, 0, 0, -1)  # errs: QEMU's driver has none
            for name, want in (("vda", vda), (str(raw), vda), ("vdb", idle), (str(qcow2), idle), ("", vda)):
                assert dom.blockStats(name) == want, name
            flags = dom.blockStatsFlags("vda")
            assert list(flags) == [
                "wr_bytes", "wr_operations", "rd_bytes", "rd_operations", "flush_operations",
                "wr_total_times", "rd_total_times", "flush_total_times",
            ]  # fmt: skip
            assert (flags["wr_operations"], flags["wr_bytes"], flags["flush_operations"]) == (presses, moved, presses)
            assert (flags["rd_operations"], flags["rd_bytes"]) == (reads, read)
            assert all(flags[k] > 0 for k in ("wr_total_times", "rd_total_times", "flush_total_times")), flags
            assert set(dom.blockStatsFlags("vdb").values()) == {0}
            for name in ("vdz", str(tmp_path / "other.raw"), "stat.raw"):
                with pytest.raises(libvirt.libvirtError) as info:
                    dom.blockStats(name)
                assert (info.value.get_error_code(), info.value.get_error_message()) == (
                    libvirt.VIR_ERR_INVALID_ARG,
                    f"invalid argument: invalid path: {name}",
                )
            for name in ("vda", str(raw)):  # virsh names the fields as libvirt's QEMU driver gives them
                assert virsh_blkstat(d.uri, "disk-stat", name) == {
                    "rd_req": reads, "rd_bytes": read, "wr_req": presses, "wr_bytes": moved,
                    "flush_operations": presses, "rd_total_times": flags["rd_total_times"],
                    "wr_total_times": flags["wr_total_times"], "flush_total_times": flags["flush_total_times"],
                }, name  # fmt: skip
            bad = virsh(d.uri, "domblkstat", "disk-stat", "vdz", check=False)
            assert bad.returncode == 1 and "error: invalid argument: invalid path: vdz" in bad.stderr, bad.stderr
            ((_, record),) = c.domainListGetStats([dom], libvirt.VIR_DOMAIN_STATS_BLOCK)
            counters = {k: v for k, v in record.items() if re.fullmatch(r"block\.\d\.(rd|wr|fl)\.\w+", k)}
            assert list(counters) == [
                f"block.{n}.{k}" for n in (0, 1)
                for k in ("rd.reqs", "rd.bytes", "rd.times", "wr.reqs", "wr.bytes", "wr.times", "fl.reqs", "fl.times")
            ]  # fmt: skip
            assert (counters["block.0.rd.reqs"], counters["block.0.rd.bytes"]) == (reads, read)
            assert counters["block.0.wr.reqs"] == counters["block.0.fl.reqs"] == presses
            assert counters["block.0.wr.bytes"] == moved
            assert counters["block.0.rd.times"] == flags["rd_total_times"]
            assert {v for k, v in counters.items() if k.startswith("block.1.")} == {0}
            names = [k for k in record if k.startswith("block.0.")]
            assert names[:2] == ["block.0.name", "block.0.path"] and names[-3:] == [
                "block.0.allocation",
                "block.0.capacity",
                "block.0.physical",
            ]  # libvirt's order: the frontend's counters between the header and the sizes
            c.close()
            d.stop()
            d.start()  # the new daemon takes the running domain over: the counters are the VMM's
            c = libvirt.open(d.uri)
            dom = c.lookupByName("disk-stat")
            assert dom.blockStats("vda") == vda and dom.blockStatsFlags("vda") == flags
            assert write_through_console(d, "disk-stat", 1)["press"] == presses + 1
            more = TINY_BLK_READS_PER_PRESS
            assert dom.blockStats("") == (
                reads + more,
                read + more * TINY_BLK_BYTES,
                presses + 1,
                moved + TINY_BLK_BYTES,
                -1,
            )
        finally:
            if dom.isActive():
                dom.destroy()
            dom.undefine()
            c.close()


def test_domblkinfo_as_libvirt_reports_it_for_raw_and_qcow2_inactive_and_running(
    kvm: None, daemon: DaemonProcess, conn: Any, tiny_kernel: Path, tmp_path: Path
) -> None:
    raw, qcow2 = tmp_path / "info.raw", tmp_path / "info.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), str(MiB)], check=True, timeout=30)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), str(2 * MiB)], check=True, timeout=30)
    dom = conn.defineXML(document("disk-info", tiny_kernel, disk_xml(raw) + disk_xml(qcow2, "qcow2", dev="vdb")))
    try:
        # Inactive: libvirt reads the files (capacity: the size, or qcow2's virtual size; allocation: the
        # blocks the file holds; physical: its length). Oracles: qemu-img info and stat.
        for name, img in (("vda", raw), (str(raw), raw), ("vdb", qcow2), (str(qcow2), qcow2)):
            info, st = qemu_img_info(img), img.stat()
            assert info["actual-size"] == st.st_blocks * 512
            assert dom.blockInfo(name) == [info["virtual-size"], st.st_blocks * 512, st.st_size], name
        assert dom.blockInfo("vdb")[0] == 2 * MiB
        not_assigned = (libvirt.VIR_ERR_INVALID_ARG, "invalid argument: invalid path vdz not assigned to domain")
        with pytest.raises(libvirt.libvirtError) as info_error:
            dom.blockInfo("vdz")
        assert (info_error.value.get_error_code(), info_error.value.get_error_message()) == not_assigned

        dom.create()
        assert write_through_console(daemon, "disk-info", 1)["press"] == 1
        # Running: what the backend reports, by qemuDomainGetBlockInfo's rules. The raw disk's allocation is
        # the highest offset the guest wrote (its pattern's end); its physical is then the blocks the file
        # holds unless those are the same. The qcow2 disk (not written) reports its file's blocks and length.
        highest = TINY_BLK_SECTOR * SECTOR + TINY_BLK_BYTES
        st = raw.stat()
        blocks = st.st_blocks * 512
        assert dom.blockInfo("vda") == [MiB, highest, st.st_size if blocks in (0, highest) else blocks]
        st = qcow2.stat()
        assert dom.blockInfo(str(qcow2)) == [2 * MiB, st.st_blocks * 512, st.st_size]
        out = virsh(daemon.uri, "domblkinfo", "disk-info", "vdb").stdout
        want_out = f"Capacity:       {2 * MiB}\nAllocation:     {st.st_blocks * 512}\nPhysical:       {st.st_size}\n"
        assert out.strip("\n") == want_out.strip("\n"), out
        bad = virsh(daemon.uri, "domblkinfo", "disk-info", "vdz", check=False)
        want = virsh("test:///default", "domblkinfo", "test", "vdz", check=False)
        assert bad.returncode == want.returncode == 1 and bad.stderr == want.stderr, bad.stderr
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefine()


def test_domstats_block_as_libvirt_9_names_it_running_and_inactive(
    kvm: None, daemon: DaemonProcess, conn: Any, tiny_kernel: Path, tmp_path: Path
) -> None:
    raw, qcow2 = tmp_path / "stats.raw", tmp_path / "stats.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), str(MiB)], check=True, timeout=30)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), str(2 * MiB)], check=True, timeout=30)
    dom = conn.defineXML(document("disk-stats", tiny_kernel, disk_xml(raw) + disk_xml(qcow2, "qcow2", dev="vdb")))

    def block_group() -> dict[str, Any]:
        ((got, record),) = conn.domainListGetStats([dom], libvirt.VIR_DOMAIN_STATS_BLOCK)
        assert got.name() == "disk-stats"
        assert isinstance(record, dict)
        return record

    try:
        # Inactive: the sizes read from the files (qemu-img info and stat are the oracle), each when not 0.
        raw_blocks = raw.stat().st_blocks * 512
        inactive = {
            "block.count": 2,
            "block.0.name": "vda",
            "block.0.path": str(raw),
            **({"block.0.allocation": raw_blocks} if raw_blocks else {}),
            "block.0.capacity": MiB,
            "block.0.physical": MiB,
            "block.1.name": "vdb",
            "block.1.path": str(qcow2),
            "block.1.allocation": qemu_img_info(qcow2)["actual-size"],
            "block.1.capacity": 2 * MiB,
            "block.1.physical": qcow2.stat().st_size,
        }
        assert block_group() == inactive

        dom.create()
        assert write_through_console(daemon, "disk-stats", 1)["press"] == 1
        # Running: the request counters (one write, flush and read on vda; the times as the first answer
        # gave them: nothing moves meanwhile), allocation the highest offset written (the guest's pattern's end
        # on vda; nothing on vdb), physical the allocated size (qemu-img info -U).
        first = block_group()
        times = {k: first[k] for k in first if k.endswith(".times")}
        counted = {
            f"block.{n}.{k}": v
            for n, done in ((0, 1), (1, 0))
            for k, v in (
                ("rd.reqs", done * TINY_BLK_READS_PER_PRESS),
                ("rd.bytes", done * TINY_BLK_READS_PER_PRESS * TINY_BLK_BYTES),
                ("rd.times", times[f"block.{n}.rd.times"]),
                ("wr.reqs", done), ("wr.bytes", done * TINY_BLK_BYTES), ("wr.times", times[f"block.{n}.wr.times"]),
                ("fl.reqs", done), ("fl.times", times[f"block.{n}.fl.times"]),
            )
        }  # fmt: skip
        assert all(times[k] > 0 for k in times if k.startswith("block.0.")), times
        running = {
            "block.count": 2,
            "block.0.name": "vda",
            "block.0.path": str(raw),
            **{k: v for k, v in counted.items() if k.startswith("block.0.")},
            "block.0.allocation": TINY_BLK_SECTOR * SECTOR + TINY_BLK_BYTES,
            "block.0.capacity": MiB,
            "block.0.physical": qemu_img_info(raw)["actual-size"],
            "block.1.name": "vdb",
            "block.1.path": str(qcow2),
            **{k: v for k, v in counted.items() if k.startswith("block.1.")},
            "block.1.allocation": 0,
            "block.1.capacity": 2 * MiB,
            "block.1.physical": qemu_img_info(qcow2)["actual-size"],
        }
        assert block_group() == running
        out = virsh(daemon.uri, "domstats", "--block", "disk-stats").stdout
        assert out.split() == ["Domain:", "'disk-stats'"] + [f"{k}={v}" for k, v in running.items()], out
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefine()


# ---- domcapabilities <disk>: what define accepts, in the shape of libvirt's QEMU driver ---------------

DOMAINCAPS_RNG = Path("/usr/share/libvirt/schemas/domaincaps.rng")
DISK_DEFAULTS = (("diskDevice", "disk"), ("bus", "virtio"), ("model", "virtio"))
DISK_REFUSAL = {"diskDevice": "disk device '{}'", "bus": "disk bus '{}'", "model": "disk model '{}'"}


def disk_enums(caps_xml: str) -> dict[str, list[str]]:
    disk = etree.fromstring(caps_xml.encode()).find("devices/disk")
    assert disk is not None and disk.get("supported") == "yes", caps_xml
    return {e.get("name", ""): [v.text or "" for v in e.findall("value")] for e in disk.findall("enum")}


def probe_disk(enum: str, value: str) -> str:
    """A virtio disk with one of its enum attributes set to ``value``."""
    device, bus, model = (value if enum == name else dflt for name, dflt in DISK_DEFAULTS)
    return (
        f"<disk type='file' device='{device}' model='{model}'><source file='/nonexistent.img'/>"
        f"<target dev='vda' bus='{bus}'/></disk>"
    )


def test_domcapabilities_disk_lists_exactly_what_define_accepts(
    system_libvirtd: None, daemon: DaemonProcess, conn: Any, tiny_kernel: Path
) -> None:
    """The oracle for the shape and the candidate values is libvirt's QEMU driver on this host (its
    domcapabilities from libvirtd's qemu:///system); the oracle for "supported" is define itself."""
    ours = virsh(daemon.uri, "domcapabilities").stdout
    qemu = disk_enums(virsh("qemu:///system", "domcapabilities").stdout)
    listed = disk_enums(ours)
    assert list(listed) == list(qemu) == ["diskDevice", "bus", "model"]
    for name, values in listed.items():
        assert values == [v for v in qemu[name] if v in values], (name, values, qemu[name])  # QEMU's order
    for name, candidates in qemu.items():
        for value in candidates:
            xml = document(f"disk-caps-{name}-{value}", tiny_kernel, probe_disk(name, value))
            if value in listed[name]:
                conn.defineXML(xml).undefine()
                continue
            with pytest.raises(libvirt.libvirtError) as info:
                conn.defineXML(xml)
            err = info.value
            assert (err.get_error_code(), err.get_error_domain()) == (
                libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
                libvirt.VIR_FROM_DOMAIN,
            ), (name, value, err.get_error_message())
            assert f"{DISK_REFUSAL[name].format(value)} is not supported by the mshv driver" in str(err), str(err)
    assert conn.listDefinedDomains() == []
    assert listed == {"diskDevice": ["disk"], "bus": ["virtio"], "model": ["virtio", "virtio-non-transitional"]}
    if DOMAINCAPS_RNG.is_file():  # what libvirt's own clients validate against
        schema = etree.RelaxNG(etree.parse(str(DOMAINCAPS_RNG)))
        assert schema.validate(etree.fromstring(ours.encode())), schema.error_log


@pytest.mark.parametrize("model", ["virtio", "virtio-non-transitional"])
def test_each_listed_disk_model_runs_and_the_guest_writes(
    kvm: None, daemon: DaemonProcess, conn: Any, tiny_kernel: Path, tmp_path: Path, model: str
) -> None:
    assert model in disk_enums(virsh(daemon.uri, "domcapabilities").stdout)["model"]
    img = tmp_path / "model.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(img), str(MiB)], check=True, timeout=30)
    disk = disk_xml(img).replace("device='disk'>", f"device='disk' model='{model}'>")
    name = f"disk-model-{model}"
    dom = conn.defineXML(document(name, tiny_kernel, disk))
    try:
        assert f"<disk type='file' device='disk' model='{model}'>" in dom.XMLDesc(0)  # printed as libvirt does
        dom.create()
        assert write_through_console(daemon, name, 1)["press"] == 1
        dom.destroy()
        wait_for(lambda: not image_locked(img))
        assert_image_holds(img, 1)
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefine()


def inactive_disks(dom: Any) -> list[str]:
    return re.findall(r"<disk .*?</disk>", dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), flags=re.S)


def test_attach_and_detach_disk_change_the_persistent_config_only(
    kvm: None, daemon: DaemonProcess, conn: Any, tiny_kernel: Path, tmp_path: Path
) -> None:
    first, second = tmp_path / "a.raw", tmp_path / "b.raw"
    for img in (first, second):
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(img), str(MiB)], check=True, timeout=30)
    dom = conn.defineXML(document("disk-attach", tiny_kernel, ""))
    # The oracle for what an attach leaves: the same domain defined with those disks from the start, as
    # virsh attach-disk writes them (no <driver>, no bus).
    plain = "<disk type='file' device='disk'><source file='{}'/><target dev='{}'/></disk>"
    both = conn.defineXML(
        document("disk-attach-ref", tiny_kernel, plain.format(first, "vda") + plain.format(second, "vdb"))
    )
    want = inactive_disks(both)
    both.undefine()
    try:
        # virsh attach-disk's own XML (no bus: virtio from the name), vdb first: vda still goes before it,
        # as virDomainDiskInsert orders disks by target; the addresses are the first free slots.
        virsh(daemon.uri, "attach-disk", "disk-attach", str(second), "vdb", "--config")
        virsh(daemon.uri, "attach-disk", "disk-attach", str(first), "vda", "--config")
        got = inactive_disks(dom)
        assert [re.sub(r"<address [^>]*/>", "", d) for d in got] == [re.sub(r"<address [^>]*/>", "", d) for d in want]
        slots = [re.search(r"slot='(0x[0-9a-f]+)'", d) for d in got]
        assert sorted(m.group(1) for m in slots if m) == ["0x02", "0x03"]
        again = virsh(daemon.uri, "attach-disk", "disk-attach", str(first), "vdb", "--config", check=False)
        assert again.returncode == 1
        assert "error: Requested operation is not valid: target vdb already exists" in again.stderr, again.stderr
        with pytest.raises(libvirt.libvirtError) as missing:
            dom.detachDeviceFlags(disk_xml(first, dev="vdz"), libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        assert (missing.value.get_error_code(), missing.value.get_error_message()) == (
            libvirt.VIR_ERR_DEVICE_MISSING,
            "device not found: no target device vdz",
        )

        dom.create()  # the attached disks are there at start
        blklist = virsh(daemon.uri, "domblklist", "disk-attach").stdout
        assert re.findall(r"^\s*(vd[a-z])\s+(\S+)\s*$", blklist, flags=re.M) == [
            ("vda", str(first)),
            ("vdb", str(second)),
        ]
        # running: no hotplug, so a live change is refused and nothing changes; --config alone applies
        for cmd in (["attach-disk", "disk-attach", str(first), "vdc"], ["detach-disk", "disk-attach", "vdb"]):
            live = virsh(daemon.uri, *cmd, "--live", check=False)
            assert live.returncode == 1 and "no hotplug" in live.stderr, live.stderr
        with pytest.raises(libvirt.libvirtError) as live_error:
            dom.detachDeviceFlags(disk_xml(second, dev="vdb"), libvirt.VIR_DOMAIN_AFFECT_LIVE)
        assert live_error.value.get_error_code() == libvirt.VIR_ERR_OPERATION_UNSUPPORTED
        virsh(daemon.uri, "detach-disk", "disk-attach", "vdb", "--config")
        assert len(inactive_disks(dom)) == 1 and "vdb" in virsh(daemon.uri, "domblklist", "disk-attach").stdout
        dom.destroy()
        dom.create()  # the next start has the persistent config: vda only
        blklist = virsh(daemon.uri, "domblklist", "disk-attach").stdout
        assert re.findall(r"^\s*(vd[a-z])\s+(\S+)\s*$", blklist, flags=re.M) == [("vda", str(first))]
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefine()


def volume_xml(pool: str, volume: str, dev: str = "vda", fmt: str = "raw") -> str:
    return (
        f"<disk type='volume' device='disk'><driver name='qemu' type='{fmt}'/><source pool='{pool}' volume='{volume}'/>"
        f"<target dev='{dev}' bus='virtio'/></disk>"
    )


@pytest.fixture
def test_pool(system_libvirtd: None, tmp_path: Path) -> Iterator[Any]:
    """A dir pool with 1 MiB volumes 'v.raw' and 'v.qcow2', made and removed straight through libvirt's
    storage:///system (not through the code under test)."""
    storage = libvirt.open("storage:///system")
    name = unique("mshvblk")
    target = tmp_path / "pool"
    target.mkdir()
    pool = storage.storagePoolDefineXML(
        f"<pool type='dir'><name>{name}</name><target><path>{target}</path></target></pool>", 0
    )
    try:
        pool.create(0)
        for vol, fmt in (("v.raw", "raw"), ("v.qcow2", "qcow2")):
            pool.createXML(
                f"<volume><name>{vol}</name><capacity>{MiB}</capacity><target><format type='{fmt}'/></target></volume>",
                0,
            )
        yield pool
    finally:
        if pool.isActive():
            for vol in pool.listAllVolumes():
                vol.delete(0)
            pool.destroy()
        pool.undefine()
        storage.close()


def test_a_volume_disk_is_resolved_through_libvirts_storage_driver_at_start(
    kvm: None, tiny_kernel: Path, test_pool: Any, tmp_path: Path
) -> None:
    pool = test_pool.name()
    path = Path(test_pool.storageVolLookupByName("v.raw").path())
    # a daemon of its own: it is restarted below, and re-attaches to the running domain
    with running_daemon(tmp_path / "d") as d:
        c = libvirt.open(d.uri)
        dom = c.defineXML(document("disk-volume", tiny_kernel, volume_xml(pool, "v.raw")))
        try:
            dom.create()
            assert write_through_console(d, "disk-volume", 1)["press"] == 1
            assert_image_holds(path, 1)  # the guest's bytes are in the volume libvirt's storage driver named
            live = dom.XMLDesc(0)
            assert f"<source pool='{pool}' volume='v.raw'/>" in live and str(path) not in live, live  # as libvirt
            assert dom.blockInfo(str(path))[0] == MiB  # the running disk is known by the volume's path too
            assert not dom.isUpdated()  # what the start resolved is no change of the configuration
            dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_TITLE, "t", None, None, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            assert dom.blockInfo(str(path))[0] == MiB  # a live edit re-parses the XML: the path stays
            c.close()
            d.stop()
            d.start()  # the new daemon takes the running domain over from its record
            c = libvirt.open(d.uri)
            dom = c.lookupByName("disk-volume")
            assert dom.isActive() and dom.blockInfo(str(path))[0] == MiB
            dom.destroy()
            wait_for(lambda: not dom.isActive() and not image_locked(path))
        finally:
            if dom.isActive():
                dom.destroy()
            dom.undefine()
            c.close()


def test_a_written_qcow2_volume_reports_its_allocation_as_a_qcow2_file(
    kvm: None, daemon: DaemonProcess, conn: Any, tiny_kernel: Path, test_pool: Any
) -> None:
    """libvirt's rule for a qcow2 file (allocation: the blocks it holds, not the highest offset written)
    holds for a volume that is a qcow2 file: the guest writes, so the two differ."""
    path = Path(test_pool.storageVolLookupByName("v.qcow2").path())
    disk = volume_xml(test_pool.name(), "v.qcow2", fmt="qcow2")
    dom = conn.defineXML(document("disk-volume-qcow2", tiny_kernel, disk))
    try:
        dom.create()
        assert write_through_console(daemon, "disk-volume-qcow2", 1)["press"] == 1
        st = path.stat()
        assert dom.blockInfo("vda") == [MiB, st.st_blocks * 512, st.st_size]
        dom.destroy()
        wait_for(lambda: not dom.isActive() and not image_locked(path))
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefine()
    check = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_volume_disk_that_cannot_be_resolved_gets_libvirts_error(
    daemon: DaemonProcess, conn: Any, tiny_kernel: Path, test_pool: Any
) -> None:
    pool = test_pool.name()
    storage = libvirt.open("storage:///system")  # the oracle: libvirt's own answers to the same lookups
    try:
        cases = []

        def missing_pool() -> object:
            return storage.storagePoolLookupByName("nope" + pool)

        def missing_volume() -> object:
            return storage.storagePoolLookupByName(pool).storageVolLookupByName("nope.raw")

        lookups: list[tuple[Callable[[], object], str]] = [
            (missing_pool, volume_xml("nope" + pool, "v.raw")),
            (missing_volume, volume_xml(pool, "nope.raw")),
        ]
        for lookup, xml in lookups:
            with pytest.raises(libvirt.libvirtError) as want:
                lookup()
            cases.append(
                (xml, (want.value.get_error_code(), want.value.get_error_domain(), want.value.get_error_message()))
            )
    finally:
        storage.close()
    dom = conn.defineXML(document("disk-volume-attach", tiny_kernel, ""))
    try:  # a volume that resolves attaches
        dom.attachDeviceFlags(volume_xml(pool, "v.raw"), libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        assert f"<source pool='{pool}' volume='v.raw'/>" in dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    finally:
        dom.undefine()
    # and libvirt's own refusal of a pool that is not active (domain_conf.c), once the pool is stopped
    inactive = (
        libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
        libvirt.VIR_FROM_DOMAIN,
        f"unsupported configuration: storage pool '{pool}' containing volume 'v.raw' is not active",
    )
    cases.append((volume_xml(pool, "v.raw"), inactive))
    for n, (xml, expected) in enumerate(cases):
        if n == len(cases) - 1:
            test_pool.destroy()
        dom = conn.defineXML(document("disk-volume-bad", tiny_kernel, xml))
        try:
            assert refusal(dom) == expected
            assert not dom.isActive()
        finally:
            dom.undefine()
        # attach-device --config resolves the volume too (qemuDomainAttachDeviceConfig), with the same answers
        dom = conn.defineXML(document("disk-volume-attach", tiny_kernel, ""))
        try:
            with pytest.raises(libvirt.libvirtError) as attach:
                dom.attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
            got = (attach.value.get_error_code(), attach.value.get_error_domain(), attach.value.get_error_message())
            assert got == expected
            assert "<disk" not in dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        finally:
            dom.undefine()


def blk_status(daemon: DaemonProcess, name: str) -> list[dict[str, Any]]:
    """The VMM's own account of its virtio-blk devices (device id 2), in slot order."""
    return [v for v in vmm_request(daemon, name, "status")["virtio"] if v["device_id"] == 2]


def test_blockresize_grows_the_image_through_the_backend_and_the_guest_reads_the_new_capacity(
    kvm: None, daemon: DaemonProcess, conn: Any, tiny_kernel: Path, tmp_path: Path
) -> None:
    raw, qcow2, ro = tmp_path / "grow.raw", tmp_path / "grow.qcow2", tmp_path / "ro.raw"
    for img, fmt in ((raw, "raw"), (qcow2, "qcow2"), (ro, "raw")):
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(img), str(MiB)], check=True, timeout=30)
    disks = disk_xml(raw) + disk_xml(qcow2, "qcow2", dev="vdb") + disk_xml(ro, dev="vdc", readonly=True)
    dom = conn.defineXML(document("disk-resize", tiny_kernel, disks))

    def error(call: Callable[[], object]) -> tuple[int, str]:
        with pytest.raises(libvirt.libvirtError) as info:
            call()
        return info.value.get_error_code(), info.value.get_error_message()

    try:
        # qemuDomainBlockResize's refusals, in its order: not running, then the disk, then a read-only one
        not_running = (libvirt.VIR_ERR_OPERATION_INVALID, "Requested operation is not valid: domain is not running")
        assert error(lambda: dom.blockResize("vda", 2 * MiB, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)) == not_running
        dom.create()
        assert write_through_console(daemon, "disk-resize", 1)["capacity"] == MiB // SECTOR
        assert error(lambda: dom.blockResize("vdz", 2 * MiB, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)) == (
            libvirt.VIR_ERR_INVALID_ARG,
            "invalid argument: disk 'vdz' was not found in the domain config",
        )
        assert error(lambda: dom.blockResize("vdc", 2 * MiB, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)) == (
            libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
            "Operation not supported: can't resize empty or readonly disk 'vdc'",
        )
        before = blk_status(daemon, "disk-resize")
        out = virsh(daemon.uri, "blockresize", "disk-resize", "vda", "2M").stdout
        assert "Block device 'vda' is resized" in out, out
        # the image grew (qemu-img info and stat are the oracle), the device says so and told its driver
        assert qemu_img_info(raw)["virtual-size"] == raw.stat().st_size == 2 * MiB
        after = blk_status(daemon, "disk-resize")
        assert after[0]["capacity"] == 2 * MiB // SECTOR
        assert after[0]["config_generation"] == before[0]["config_generation"] + 1
        assert [a["config_generation"] for a in after[1:]] == [b["config_generation"] for b in before[1:]]
        assert write_through_console(daemon, "disk-resize", 1)["capacity"] == 2 * MiB // SECTOR  # the guest reads it
        assert dom.blockInfo("vda")[0] == 2 * MiB
        # without BYTES the size is in KiB; qcow2 is rounded up to whole sectors
        dom.blockResize(str(raw), 3072, 0)
        assert qemu_img_info(raw)["virtual-size"] == 3 * MiB
        dom.blockResize("vdb", 2 * MiB + 100, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
        assert qemu_img_info(qcow2)["virtual-size"] == 2 * MiB + SECTOR
        assert blk_status(daemon, "disk-resize")[1]["capacity"] == (2 * MiB + SECTOR) // SECTOR
        assert "<disk" in dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)  # the XML names no size: unchanged
        dom.destroy()
        wait_for(lambda: not dom.isActive() and not image_locked(raw))
        check = subprocess.run(["qemu-img", "check", str(qcow2)], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefine()


def qemu_document(name: str, disks: str) -> str:
    """A domain for libvirt's QEMU driver (qemu:///system), the oracle: defined, never started."""
    return (
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>32</memory>"
        f"<os><type arch='x86_64' machine='pc'>hvm</type></os><devices>{disks}</devices></domain>"
    )


def answer(call: Callable[[], object]) -> object:
    """What a call returns, or its error's code and message (libvirt's QEMU driver reports its own errors in
    its error domain, VIR_FROM_QEMU: the domain is not compared)."""
    try:
        return call()
    except libvirt.libvirtError as err:
        return (err.get_error_code(), err.get_error_message())


def block_info(dom: Any, disk: str) -> object:
    return dom.blockInfo(disk)


def block_stats(dom: Any, disk: str) -> object:
    return dom.blockStats(disk)


def block_resize(dom: Any, disk: str) -> object:
    return dom.blockResize(disk, MiB, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)


def test_inactive_disk_answers_match_libvirts_qemu_driver(
    system_libvirtd: None, daemon: DaemonProcess, conn: Any, tiny_kernel: Path, tmp_path: Path
) -> None:
    """The same disks on a domain of ours and one of libvirt's QEMU driver on this host (qemu:///system),
    neither running: domblkinfo, domstats --block, domblkstat and blockresize. (Each call that parses XML
    there re-probes QEMU on this host, ~16-35 s, so attach/detach are compared by their messages in
    test_attach_and_detach_disk_change_the_persistent_config_only instead, checked by hand once.)"""
    raw, qcow2 = tmp_path / "o.raw", tmp_path / "o.qcow2"
    for img, fmt, size in ((raw, "raw", MiB), (qcow2, "qcow2", 2 * MiB)):
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(img), str(size)], check=True, timeout=30)
    disks = disk_xml(raw) + disk_xml(qcow2, "qcow2", dev="vdc")
    qemu_conn = libvirt.open("qemu:///system")
    name = unique("mshvblkref")
    theirs = qemu_conn.defineXML(qemu_document(name, disks))
    ours = conn.defineXML(document("disk-oracle", tiny_kernel, disks))
    try:
        for disk in ("vda", "vdc", str(raw), str(qcow2), "vdz", "o.raw"):
            for query in (block_info, block_stats, block_resize):
                assert answer(functools.partial(query, ours, disk)) == answer(functools.partial(query, theirs, disk))
        ((_, mine),) = conn.domainListGetStats([ours], libvirt.VIR_DOMAIN_STATS_BLOCK)
        ((_, qemus),) = qemu_conn.domainListGetStats([theirs], libvirt.VIR_DOMAIN_STATS_BLOCK)
        assert mine == qemus
    finally:
        ours.undefine()
        theirs.undefine()
        qemu_conn.close()
