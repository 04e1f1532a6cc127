"""vCPU and emulator pinning, vCPU information, and the per-domain statistics every driver answers, through
libvirt-python and virsh against the real daemon and real VMMs.

Oracles: the kernel's view of the VMM's threads, read here from /proc (Cpus_allowed_list, stat), with the
vCPU thread ids taken from the VMM's own control socket; libvirt's test:///default in the same test for
what its test driver implements with the same semantics (the <cputune> parser and its messages, pin info
and emulator pinning of a persistent config, "domain is not running" and unknown-device errors); and
libvirt's QEMU driver source for the rest (its messages quoted where compared).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import libvirt
import pytest

from mshv_libvirt.rpc.xdr import Packer
from tests.support.daemon import DaemonProcess, domain_xml, virsh, vmm_request, wait_for
from tests.support.errors import error_of
from tests.support.procfs import rss_kib
from tests.support.rawrpc import ERROR, OK, error_message, raw

pytestmark = pytest.mark.virsh

CLOCK_TICK_NS = 10_000_000  # USER_HZ 100 on Linux
AFFECT_LIVE, AFFECT_CONFIG = libvirt.VIR_DOMAIN_AFFECT_LIVE, libvirt.VIR_DOMAIN_AFFECT_CONFIG


def code_message(call: Callable[[], object]) -> tuple[int, str]:
    code, _domain, message = error_of(call)
    return code, message


def online_cpus() -> list[int]:
    out: list[int] = []
    for part in Path("/sys/devices/system/cpu/online").read_text().strip().split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


ONLINE = online_cpus()
FIRST, LAST = ONLINE[0], ONLINE[-1]


def cpus_of(cpumap: tuple[bool, ...] | list[bool]) -> set[int]:
    return {i for i, on in enumerate(cpumap) if on}


def cpumap_tuple(cpus: set[int]) -> tuple[bool, ...]:
    return tuple(i in cpus for i in range(max(ONLINE) + 1))


def allowed(pid: int, tid: int) -> set[int]:
    """The kernel's affinity of a thread: Cpus_allowed_list in /proc/<pid>/task/<tid>/status."""
    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            out: set[int] = set()
            for part in line.split(":", 1)[1].strip().split(","):
                lo, _, hi = part.partition("-")
                out.update(range(int(lo), int(hi or lo) + 1))
            return out
    raise AssertionError("no Cpus_allowed_list")


def thread_ticks(pid: int, tid: int | None = None) -> int:
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = Path(path).read_bytes().rsplit(b")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def vcpu_tids(d: DaemonProcess, name: str) -> dict[int, int]:
    """vCPU index -> thread id from the VMM, each checked to be that VMM's thread named vcpuN."""
    pid = d.vmm_pid(name)
    tids = {int(k): int(v) for k, v in vmm_request(d, name, "status")["vcpu_tids"].items()}
    for index, tid in tids.items():
        assert Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip() == f"vcpu{index}"
    return tids


def other_threads(d: DaemonProcess, name: str) -> list[int]:
    pid = d.vmm_pid(name)
    vcpus = set(vcpu_tids(d, name).values())
    return [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir() if int(t.name) not in vcpus]


@pytest.fixture
def private_ref(tmp_path: Path) -> Iterator[libvirt.virConnect]:
    """A test driver of its own (a test:/// node file), to define domains in."""
    node = tmp_path / "empty-node.xml"
    node.write_text("<node><memory>8192000</memory></node>")
    c = libvirt.open(f"test://{node}")
    yield c
    c.close()


def _test_xml(name: str, cputune: str, vcpus: int = 2) -> str:
    return (
        f"<domain type='test'><name>{name}</name><memory>65536</memory><vcpu>{vcpus}</vcpu>"
        f"{cputune}<os><type>hvm</type></os></domain>"
    )


def _cputune_section(xml: str) -> str:
    m = re.search(r"  <cputune>\n.*?  </cputune>\n", xml, re.S)
    return m.group(0) if m else ""


# ---- <cputune> as libvirt parses and prints it ----------------------------------------------------------------

CPUTUNE_CORPUS = [
    "<cputune><vcpupin vcpu='0' cpuset='1'/></cputune>",
    "<cputune><emulatorpin cpuset='0-1'/><vcpupin vcpu='2' cpuset='1,3-5,^4'/><vcpupin vcpu='0' cpuset='0'/></cputune>",
    "<cputune><vcpupin vcpu='7' cpuset='0'/></cputune>",  # a vCPU the domain lacks: ignored
    "<cputune><vcpupin vcpu='1' cpuset='16383'/></cputune>",
    "<cputune><vcpupin vcpu='1' cpuset='2,0-1,1'/><emulatorpin cpuset='5-7,^6'/></cputune>",
    "<cputune/>",
    # refused
    "<cputune><vcpupin cpuset='1'/></cputune>",
    "<cputune><vcpupin vcpu='0'/></cputune>",
    "<cputune><vcpupin vcpu='0' cpuset='x'/></cputune>",
    "<cputune><vcpupin vcpu='0' cpuset='0'/><vcpupin vcpu='0' cpuset='1'/></cputune>",
    "<cputune><emulatorpin cpuset='0'/><emulatorpin cpuset='1'/></cputune>",
    "<cputune><emulatorpin/></cputune>",
    "<cputune><vcpupin vcpu='0' cpuset='0,^0'/></cputune>",
    "<cputune><vcpupin vcpu='-1' cpuset='0'/></cputune>",
    "<cputune><vcpupin vcpu='a' cpuset='0'/></cputune>",
    "<cputune><vcpupin vcpu='4294967296' cpuset='0'/></cputune>",
    "<cputune><vcpupin vcpu='0' cpuset='16384'/></cputune>",
    "<cputune><vcpupin vcpu='0' cpuset=''/></cputune>",
    "<cputune><vcpupin vcpu='0' cpuset='3-1'/></cputune>",
    "<cputune><emulatorpin cpuset='^3-4'/></cputune>",
]
# Deviations, each deliberate: scheduler and cache tuning need a per-domain cgroup / resctrl, which this
# driver does not manage, so they are refused with libvirt's unsupported-configuration error.
CPUTUNE_UNSUPPORTED = [
    "<cputune><shares>2048</shares></cputune>",
    "<cputune><period>100000</period><quota>50000</quota></cputune>",
    "<cputune><iothreadpin iothread='1' cpuset='0'/></cputune>",
]


def test_cputune_parses_and_prints_as_libvirt(
    conn: libvirt.virConnect, private_ref: libvirt.virConnect, tmp_path: Path
) -> None:
    ref = private_ref
    kernel = tmp_path / "k"
    kernel.write_bytes(b"\0" * 512)
    compared = 0
    for i, tune in enumerate(CPUTUNE_CORPUS):
        ours_xml = domain_xml(f"ct{i}", kernel, vcpus=3, extra=tune)
        theirs_xml = _test_xml(f"ct{i}", tune, vcpus=3)
        try:
            want = _cputune_section(ref.defineXML(theirs_xml).XMLDesc(0))
        except libvirt.libvirtError as err:
            expected = (err.get_error_code(), err.get_error_domain(), err.get_error_message())
            assert error_of(partial(conn.defineXML, ours_xml)) == expected, tune
        else:
            assert _cputune_section(conn.defineXML(ours_xml).XMLDesc(0)) == want, tune
        compared += 1
    assert compared == len(CPUTUNE_CORPUS)
    for tune in CPUTUNE_UNSUPPORTED:
        code, _domain, message = error_of(partial(conn.defineXML, domain_xml("ctu", kernel, extra=tune)))
        assert code == libvirt.VIR_ERR_CONFIG_UNSUPPORTED and "<cputune>" in message, message


# ---- a shut-off domain ------------------------------------------------------------------------------------------

PINNED = "<cputune><vcpupin vcpu='0' cpuset='1'/><vcpupin vcpu='1' cpuset='0'/><emulatorpin cpuset='0'/></cputune>"


@pytest.fixture
def pinned(
    conn: libvirt.virConnect, private_ref: libvirt.virConnect, tmp_path: Path
) -> tuple[libvirt.virDomain, libvirt.virDomain]:
    """The same shut-off persistent domain, every vCPU pinned, here and in libvirt's test driver."""
    kernel = tmp_path / "k"
    kernel.write_bytes(b"\0" * 512)
    return conn.defineXML(domain_xml("pin", kernel, vcpus=2, extra=PINNED)), private_ref.defineXML(
        _test_xml("pin", PINNED)
    )


def _test_node(tmp_path: Path, domain: str) -> str:
    """A test:/// URI whose node holds ``domain`` (virsh runs in its own process: test:///default there has
    none of the definitions made here)."""
    node = tmp_path / "node.xml"
    node.write_text(f"<node><memory>8192000</memory>{domain}</node>")
    return f"test://{node}"


def test_pin_info_of_a_shut_off_domain(
    pinned: tuple[libvirt.virDomain, libvirt.virDomain], daemon: DaemonProcess, tmp_path: Path
) -> None:
    ours, theirs = pinned
    for flags in (0, AFFECT_CONFIG):
        assert [cpus_of(m) for m in ours.vcpuPinInfo(flags)] == [cpus_of(m) for m in theirs.vcpuPinInfo(flags)]
        assert cpus_of(ours.emulatorPinInfo(flags)) == cpus_of(theirs.emulatorPinInfo(flags)) == {0}
    for flags in (AFFECT_LIVE, AFFECT_LIVE | AFFECT_CONFIG):
        assert error_of(partial(ours.vcpuPinInfo, flags)) == error_of(partial(theirs.vcpuPinInfo, flags))
        assert error_of(partial(ours.emulatorPinInfo, flags)) == error_of(partial(theirs.emulatorPinInfo, flags))
    # virsh prints the same tables (its own formatting of the same answers).
    node = _test_node(tmp_path, _test_xml("pin", PINNED))
    want = virsh(node, "vcpupin", "pin", "--config").stdout
    assert want.startswith(" VCPU   CPU Affinity\n")
    assert virsh(daemon.uri, "vcpupin", "pin", "--config").stdout == want
    assert virsh(daemon.uri, "vcpupin", "pin").stdout == want  # (issue 12: it printed nothing)
    assert virsh(daemon.uri, "emulatorpin", "pin").stdout == virsh(node, "emulatorpin", "pin").stdout


def test_pinning_a_shut_off_domain_persists(
    pinned: tuple[libvirt.virDomain, libvirt.virDomain], daemon: DaemonProcess, conn: libvirt.virConnect
) -> None:
    ours, theirs = pinned
    # Emulator pinning of the persistent config: libvirt's test driver implements it as QEMU's does.
    for dom in (ours, theirs):
        dom.pinEmulator(cpumap_tuple({1}), AFFECT_CONFIG)
    assert _cputune_section(ours.XMLDesc(0)) == _cputune_section(theirs.XMLDesc(0))
    assert code_message(lambda: ours.pinEmulator(cpumap_tuple(set()), 0)) == code_message(
        lambda: theirs.pinEmulator(cpumap_tuple(set()), 0)
    )  # "Empty cpu list for pinning" (each driver's own error domain)
    # vCPU pinning of the config (the test driver only pins live domains): QEMU's semantics and messages.
    ours.pinVcpuFlags(1, cpumap_tuple({1}), AFFECT_CONFIG)
    assert "<vcpupin vcpu='1' cpuset='1'/>" in ours.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert code_message(lambda: ours.pinVcpuFlags(2, cpumap_tuple({1}), AFFECT_CONFIG)) == (
        libvirt.VIR_ERR_INVALID_ARG,
        "invalid argument: vcpu 2 is out of range of persistent cpu count 2",
    )
    assert code_message(lambda: ours.pinVcpuFlags(0, cpumap_tuple({1}), AFFECT_LIVE)) == (
        libvirt.VIR_ERR_OPERATION_INVALID,
        "Requested operation is not valid: domain is not running",
    )
    assert code_message(lambda: ours.pinVcpu(0, cpumap_tuple({1}))) == code_message(
        lambda: ours.pinVcpuFlags(0, cpumap_tuple({1}), AFFECT_LIVE)
    )  # the old API pins the live domain
    # virsh vcpupin with --config, then what a new daemon reads back.
    virsh(daemon.uri, "vcpupin", "pin", "0", str(LAST), "--config")
    daemon.stop()
    daemon.start()
    c = libvirt.open(daemon.uri)
    try:
        tune = _cputune_section(c.lookupByName("pin").XMLDesc(0))
        assert tune == (
            "  <cputune>\n"
            f"    <vcpupin vcpu='0' cpuset='{LAST}'/>\n"
            "    <vcpupin vcpu='1' cpuset='1'/>\n"
            "    <emulatorpin cpuset='1'/>\n"
            "  </cputune>\n"
        )
    finally:
        c.close()


def test_shut_off_domain_answers_as_libvirt(pinned: tuple[libvirt.virDomain, libvirt.virDomain]) -> None:
    ours, theirs = pinned
    not_running = (libvirt.VIR_ERR_OPERATION_INVALID, "Requested operation is not valid: domain is not running")
    # The test driver checks these as QEMU's does: same code and message (each driver's own error domain).
    for call in (
        lambda d: d.maxVcpus(),
        lambda d: d.memoryStats(),
        lambda d: d.getCPUStats(True),
        lambda d: d.blockStats("vdz"),
        lambda d: d.interfaceStats("vdz"),
    ):
        assert code_message(partial(call, ours)) == code_message(partial(call, theirs)) == not_running
    # No job APIs in the test driver: libvirt's QEMU driver checks that the domain runs (unless asking for
    # a completed job, of which there is none).
    assert code_message(lambda: ours.jobInfo()) == not_running
    assert code_message(lambda: ours.jobStats(0)) == not_running
    assert ours.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED) == {"type": libvirt.VIR_DOMAIN_JOB_NONE}
    assert code_message(lambda: ours.vcpus()) == (
        libvirt.VIR_ERR_OPERATION_INVALID,
        "Requested operation is not valid: cannot retrieve vcpu information for inactive domain",
    )  # QEMU's message (the test driver words it differently)


def test_raw_pin_and_stats_arguments(
    daemon: DaemonProcess, pinned: tuple[libvirt.virDomain, libvirt.virDomain]
) -> None:
    """What the client library checks before sending, checked again by the daemon as libvirtd does."""
    ours, _ = pinned

    def dom_args(*values: tuple[str, int | bytes]) -> bytes:
        p = Packer()
        p.string("pin")
        p.opaque_fixed(ours.UUID(), 16)
        p.int(-1)
        for kind, v in values:
            if kind == "i":
                p.int(int(v))
            elif kind == "u":
                p.uint(int(v))
            else:
                assert isinstance(v, bytes)
                p.opaque(v)
        return p.getvalue()

    cases = [
        (20, dom_args(("i", 0), ("i", 1)), "maxinfo in virDomainGetVcpus must be greater than zero"),
        (20, dom_args(("i", 16385), ("i", 1)), "internal error: maxinfo > REMOTE_VCPUINFO_MAX"),
        (230, dom_args(("i", 1), ("i", 0), ("u", 0)), "cpumaps in virDomainGetVcpuPinInfo must not be NULL"),
        (280, dom_args(("i", 2**31 - 1), ("u", 0)), "internal error: maplen > REMOTE_CPUMAPS_MAX"),  # bounded
        (225, dom_args(("u", 0), ("b", b""), ("u", 2)), "cpumap in virDomainPinVcpuFlags must not be NULL"),
        (262, dom_args(("u", 3), ("i", -1), ("u", 2), ("u", 0)), "ncpus must be 1 when start_cpu is -1"),
        (262, dom_args(("u", 17), ("i", -1), ("u", 1), ("u", 0)), "internal error: nparams too large"),
        (298, dom_args(("u", 2)), "Flag 'VIR_DOMAIN_JOB_STATS_COMPLETED' is required by flag "
         "'VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED'"),
    ]  # fmt: skip
    with raw(daemon.socket) as c:
        for proc, payload, message in cases:
            status, reply = c.roundtrip(proc, payload)
            assert status == ERROR and error_message(reply)[1] == message, proc


# ---- a running domain ---------------------------------------------------------------------------------------

BOOT = 60.0


@pytest.fixture
def running(kvm: None, conn: libvirt.virConnect, daemon: DaemonProcess, tiny_kernel: Path) -> libvirt.virDomain:
    """Two vCPUs, vCPU 1 pinned to the last online host CPU, the emulator to the first."""
    tune = f"<cputune><vcpupin vcpu='1' cpuset='{LAST}'/><emulatorpin cpuset='{FIRST}'/></cputune>"
    dom = conn.defineXML(domain_xml("run", tiny_kernel, vcpus=2, extra=tune))
    dom.create()
    wait_for(lambda: len(vmm_request(daemon, "run", "status")["vcpu_tids"]) == 2, timeout=BOOT)
    return dom


def test_pins_are_applied_at_start(running: libvirt.virDomain, daemon: DaemonProcess) -> None:
    pid, tids = daemon.vmm_pid("run"), vcpu_tids(daemon, "run")
    assert allowed(pid, tids[0]) == set(ONLINE)  # unpinned: every online host CPU, as libvirt sets it
    assert allowed(pid, tids[1]) == {LAST}
    others = other_threads(daemon, "run")
    assert others and all(allowed(pid, t) == {FIRST} for t in others)
    assert [cpus_of(m) for m in running.vcpuPinInfo(0)] == [set(ONLINE), {LAST}]
    assert cpus_of(running.emulatorPinInfo(0)) == {FIRST}


def test_vcpu_info_is_the_threads(running: libvirt.virDomain, daemon: DaemonProcess, ref: libvirt.virConnect) -> None:
    pid, tids = daemon.vmm_pid("run"), vcpu_tids(daemon, "run")
    before = {i: thread_ticks(pid, t) * CLOCK_TICK_NS for i, t in tids.items()}
    info, maps = running.vcpus()
    after = {i: thread_ticks(pid, t) * CLOCK_TICK_NS for i, t in tids.items()}
    assert [n for n, *_ in info] == [0, 1]
    for (number, state, cpu_time, cpu), cpumap in zip(info, maps, strict=True):
        assert state == libvirt.VIR_VCPU_RUNNING and cpu in ONLINE
        assert before[number] <= cpu_time <= after[number]
        assert cpus_of(cpumap) == allowed(pid, tids[number])
    assert running.maxVcpus() == 2 and ref.lookupByName("test").maxVcpus() == 2  # (test:///default: 2 vCPUs)
    out = virsh(daemon.uri, "vcpuinfo", "run").stdout
    affinity = "".join("y" if c in ONLINE else "-" for c in range(max(ONLINE) + 1))
    assert re.findall(r"^CPU Affinity:\s+(\S+)$", out, re.M) == [affinity, "".join(
        "y" if c == LAST else "-" for c in range(max(ONLINE) + 1))]  # fmt: skip


def test_live_and_config_pinning(running: libvirt.virDomain, daemon: DaemonProcess) -> None:
    pid = daemon.vmm_pid("run")
    tids = vcpu_tids(daemon, "run")
    running.pinVcpu(0, cpumap_tuple({FIRST}))  # the old API: live
    assert allowed(pid, tids[0]) == {FIRST} and allowed(pid, tids[1]) == {LAST}
    assert f"<vcpupin vcpu='0' cpuset='{FIRST}'/>" in running.XMLDesc(0)
    assert "<vcpupin vcpu='0'" not in running.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    virsh(daemon.uri, "emulatorpin", "run", ",".join(map(str, ONLINE)), "--live")
    assert all(allowed(pid, t) == set(ONLINE) for t in other_threads(daemon, "run"))
    running.pinVcpuFlags(1, cpumap_tuple({FIRST}), AFFECT_CONFIG)  # the next start, not now
    assert allowed(pid, tids[1]) == {LAST}
    assert f"<vcpupin vcpu='1' cpuset='{FIRST}'/>" in running.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    # A reset rebuilds the VM in place with new vCPU threads: they get the live pins again.
    running.reset(0)

    def repinned() -> bool:
        new = vcpu_tids(daemon, "run")
        return (
            len(new) == 2
            and set(new.values()).isdisjoint(tids.values())
            and allowed(pid, new[0]) == {FIRST}
            and allowed(pid, new[1]) == {LAST}
        )

    wait_for(repinned, timeout=BOOT)
    # Restarted, the domain runs with its config's pins.
    running.destroy()
    running.create()
    wait_for(lambda: len(vmm_request(daemon, "run", "status")["vcpu_tids"]) == 2, timeout=BOOT)
    pid, tids = daemon.vmm_pid("run"), vcpu_tids(daemon, "run")
    assert allowed(pid, tids[0]) == set(ONLINE) and allowed(pid, tids[1]) == {FIRST}


def test_pins_the_host_cannot_honour_fail_cleanly(running: libvirt.virDomain, daemon: DaemonProcess) -> None:
    """A CPU the host does not have (virsh and libvirt-python refuse it before sending: sent raw). Live:
    libvirt's sched_setaffinity error and nothing changes; in the config: the next start fails with it."""
    absent = max(ONLINE) + 1
    pid, tids = daemon.vmm_pid("run"), vcpu_tids(daemon, "run")
    before = running.XMLDesc(0)
    bitmap = bytearray((absent + 8) // 8)
    bitmap[absent // 8] |= 1 << (absent % 8)
    p = Packer()
    p.string("run")
    p.opaque_fixed(running.UUID(), 16)
    p.int(running.ID())
    p.uint(0)
    p.opaque(bytes(bitmap))
    head = p.getvalue()
    with raw(daemon.socket) as c:
        status, reply = c.roundtrip(26, head)
        assert status == ERROR
        code, message = error_message(reply)
        assert (code, message) == (
            libvirt.VIR_ERR_SYSTEM_ERROR,
            f"cannot set CPU affinity on process {tids[0]}: Invalid argument",
        )
        assert running.XMLDesc(0) == before and allowed(pid, tids[0]) == set(ONLINE)
        flags = Packer()
        flags.uint(AFFECT_CONFIG)
        status, _ = c.roundtrip(225, head + flags.getvalue())
        assert status == OK
    running.destroy()
    code, message = code_message(running.create)
    assert code == libvirt.VIR_ERR_SYSTEM_ERROR and re.fullmatch(
        r"cannot set CPU affinity on process \d+: Invalid argument", message
    ), message
    assert running.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF
    wait_for(lambda: not daemon.processes(), timeout=20, what=daemon.processes)


def test_running_domain_statistics(running: libvirt.virDomain, daemon: DaemonProcess, ref: libvirt.virConnect) -> None:
    pid = daemon.vmm_pid("run")
    before = thread_ticks(pid) * CLOCK_TICK_NS
    (total,) = running.getCPUStats(True)
    after = thread_ticks(pid) * CLOCK_TICK_NS
    assert set(total) == set(ref.lookupByName("test").getCPUStats(True)[0])  # cpu_time, user_time, system_time
    assert before <= total["cpu_time"] <= after and total["cpu_time"] == total["user_time"] + total["system_time"]
    # Per host CPU needs a per-domain cpuacct cgroup (none here): not supported, virsh says so.
    assert code_message(lambda: running.getCPUStats(False))[0] == libvirt.VIR_ERR_NO_SUPPORT
    res = virsh(daemon.uri, "cpu-stats", "run", check=False)
    assert res.returncode == 1 and "error: Failed to retrieve CPU statistics for domain 'run'" in res.stderr
    assert re.search(r"^\tcpu_time\s+\d+\.\d+ seconds$", virsh(daemon.uri, "cpu-stats", "run", "--total").stdout, re.M)
    # No balloon driver: the balloon's size (the guest's memory) and the VMM's resident memory, in KiB.
    rss_before = rss_kib(pid)
    stats = running.memoryStats()
    rss_after = rss_kib(pid)
    assert set(stats) == {"actual", "rss"} and stats["actual"] == 64 * 1024
    assert min(rss_before, rss_after) - 4096 <= stats["rss"] <= max(rss_before, rss_after) + 4096
    # No job runs; devices the domain lacks, as the test driver (whose running domain lacks them too) says.
    assert running.jobInfo() == [libvirt.VIR_DOMAIN_JOB_NONE] + [0] * 11
    assert running.jobStats(0) == {"type": libvirt.VIR_DOMAIN_JOB_NONE}
    theirs = ref.lookupByName("test")
    for call in (lambda d: d.blockStats("vdz"), lambda d: d.interfaceStats("vdz")):
        assert code_message(partial(call, running)) == code_message(partial(call, theirs))
    assert running.blockStats("") == (0, 0, 0, 0, -1)  # the sum over no disks; errors unknown, as QEMU's
    want = virsh("test:///default", "domifstat", "test", "vdz", check=False)
    got = virsh(daemon.uri, "domifstat", "run", "vdz", check=False)
    assert got.returncode == want.returncode == 1
    assert got.stderr == want.stderr.replace(" test ", " run ")
    # domblkstat: virDomainBlockStatsFlags answers (the test driver lacks it, so virsh falls back to
    # virDomainBlockStats there and adds "Failed to get block stats"); QEMU's driver has it, as this one.
    got = virsh(daemon.uri, "domblkstat", "run", "vdz", check=False)
    assert (got.returncode, got.stderr) == (1, "error: invalid argument: invalid path: vdz\n")
    out = virsh(daemon.uri, "domjobinfo", "run").stdout
    assert re.match(r"Job type:\s+None\s*$", out), out


# ---- scheduler (virsh schedinfo) ------------------------------------------------------------------------------

SCHED_PARAMS = [
    "cpu_shares",
    "vcpu_period",
    "vcpu_quota",
    "emulator_period",
    "emulator_quota",
    "global_period",
    "global_quota",
    "iothread_period",
    "iothread_quota",
]


def test_scheduler_in_session_mode_is_refused_as_libvirt(
    pinned: tuple[libvirt.virDomain, libvirt.virDomain], daemon: DaemonProcess
) -> None:
    """libvirt's QEMU driver (qemuDomainGetSchedulerType / ...ParametersFlags) when not privileged."""
    ours, _ = pinned
    refused = (
        libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
        "Operation not supported: CPU tuning is not available in session mode",
    )
    assert code_message(ours.schedulerType) == refused
    assert code_message(lambda: ours.schedulerParametersFlags(AFFECT_CONFIG)) == refused  # (it asks the type first)
    p = Packer()
    p.string("pin")
    p.opaque_fixed(ours.UUID(), 16)
    p.int(-1)
    p.int(9)
    p.uint(AFFECT_CONFIG)
    with raw(daemon.socket) as c:
        status, reply = c.roundtrip(223, p.getvalue())
    assert status == ERROR and error_message(reply) == (
        libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
        "unsupported configuration: CPU tuning is not available in session mode",
    )


def test_scheduler_of_the_system_instance(kvm: None, system_daemon: DaemonProcess, tiny_kernel: Path) -> None:
    """Privileged, as libvirt's QEMU driver on a host without the cgroup CPU controller for the domain (this
    driver creates no per-domain cgroups): a shut-off domain answers libvirt's defaults and its config's
    values (it can hold none: 0), a running one is refused."""
    c = libvirt.open(system_daemon.uri)
    try:
        dom = c.defineXML(domain_xml("sched", tiny_kernel))
        assert dom.schedulerType() == ("posix", 9)
        assert dom.schedulerParameters() == dict.fromkeys(SCHED_PARAMS, 0)
        assert dom.schedulerParametersFlags(AFFECT_CONFIG) == dict.fromkeys(SCHED_PARAMS, 0)
        out = virsh(system_daemon.uri, "schedinfo", "sched").stdout
        assert out.splitlines()[0] == "Scheduler      : posix"
        assert [line.split(":")[0].strip() for line in out.splitlines()[1:] if line] == SCHED_PARAMS
        dom.create()
        no_cgroup = (
            libvirt.VIR_ERR_OPERATION_INVALID,
            "Requested operation is not valid: cgroup CPU controller is not mounted",
        )
        assert code_message(dom.schedulerType) == no_cgroup
        assert code_message(lambda: dom.schedulerParametersFlags(AFFECT_LIVE)) == no_cgroup
        # (libvirt-python and virsh ask for the scheduler type first, so --config is refused the same way)
        assert code_message(lambda: dom.schedulerParametersFlags(AFFECT_CONFIG)) == no_cgroup
        res = virsh(system_daemon.uri, "schedinfo", "sched", check=False)
        assert res.returncode == 1 and "cgroup CPU controller is not mounted" in res.stderr
        dom.destroy()
    finally:
        c.close()


def test_read_only_connections_may_look_not_pin(
    pinned: tuple[libvirt.virDomain, libvirt.virDomain], daemon: DaemonProcess
) -> None:
    """libvirt's public API refuses pinning on read-only connections (virCheckReadOnlyGoto), not queries."""
    c = libvirt.open(daemon.ro_uri)  # (the client does not know the socket is read-only)
    try:
        dom = c.lookupByName("pin")
        assert [cpus_of(m) for m in dom.vcpuPinInfo(AFFECT_CONFIG)] == [{1}, {0}]
        for api, call in (
            ("virDomainPinVcpuFlags", lambda: dom.pinVcpuFlags(0, cpumap_tuple({0}), AFFECT_CONFIG)),
            ("virDomainPinEmulator", lambda: dom.pinEmulator(cpumap_tuple({0}), AFFECT_CONFIG)),
        ):
            assert code_message(call) == (
                libvirt.VIR_ERR_OPERATION_DENIED,
                f"operation forbidden: read only access prevents {api}",
            )
    finally:
        c.close()


def test_vcpuinfo_lists_only_online_vcpus(
    kvm: None, conn: libvirt.virConnect, daemon: DaemonProcess, tiny_kernel: Path
) -> None:
    """<vcpu current='1'>2</vcpu>: one vCPU runs, so getVcpus and virsh vcpuinfo show one (libvirt's
    QEMU driver lists online vCPUs only); the VMM's own control socket agrees."""
    xml = domain_xml("curvcpu", tiny_kernel, vcpus=2).replace("<vcpu>2</vcpu>", "<vcpu current='1'>2</vcpu>")
    dom = conn.defineXML(xml)
    dom.create()
    try:
        wait_for(lambda: len(vcpu_tids(daemon, "curvcpu")) == 1, timeout=30)
        info, maps = dom.vcpus()
        assert [v[0] for v in info] == [0] and len(maps) == 1
        out = virsh(daemon.uri, "vcpuinfo", "curvcpu").stdout
        assert out.count("VCPU:") == 1
        assert dom.vcpusFlags(libvirt.VIR_DOMAIN_VCPU_MAXIMUM) == 2 and dom.vcpusFlags(0) == 1
    finally:
        dom.destroy()
