"""Host APIs (virsh nodecpustats, nodememstats, freecell, nodecpumap, sysinfo, cpu-models, ...) through
libvirt-python against the real daemon.

Oracles: the host's own files, read here (/proc/stat, /proc/meminfo, /sys/devices/system/{cpu,node}),
bracketing the daemon's answer in time where the value moves; libvirt's test:///default in the same test
where it implements the API with the same semantics (CPU model names, argument checks the client library
makes, key names); and libvirt's source for the rest (messages quoted where they are compared).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from functools import partial
from pathlib import Path

import libvirt
import pytest

from mshv_libvirt.rpc.host import format_smbios
from mshv_libvirt.rpc.xdr import Packer, Unpacker
from tests.support.daemon import DaemonProcess, virsh
from tests.support.errors import error_of
from tests.support.rawrpc import ERROR, OK, error_message, raw

pytestmark = pytest.mark.virsh

TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
NODES = Path("/sys/devices/system/node")
# Memory moves between two reads of ours and one of the daemon's on a busy machine: the oracle brackets
# the answer with reads before and after, widened by this much.
MEMORY_SLACK_KIB = 64 * 1024


# ---- the host's own figures ---------------------------------------------------------------------------------


def proc_stat(cpu: int) -> dict[str, int]:
    """/proc/stat's line for one CPU (-1: all), in libvirt's fields and nanoseconds."""
    header = "cpu" if cpu < 0 else f"cpu{cpu}"
    for line in Path("/proc/stat").read_text().splitlines():
        f = line.split()
        if f[0] == header:
            user, nice, system, idle, iowait, irq, softirq = (int(v) for v in f[1:8])
            return {
                "kernel": (system + irq + softirq) * TICK_NS,
                "user": (user + nice) * TICK_NS,
                "idle": idle * TICK_NS,
                "iowait": iowait * TICK_NS,
            }
    raise AssertionError(f"no {header} line in /proc/stat")


def meminfo(path: Path, prefix: str = "") -> dict[str, int]:
    out = {}
    for line in path.read_text().splitlines():
        f = line[len(prefix) :].split() if line.startswith(prefix) else []
        if len(f) >= 2:
            out[f[0].rstrip(":")] = int(f[1])
    return out


def numa_nodes() -> list[int]:
    return sorted(int(p.name[4:]) for p in NODES.glob("node[0-9]*")) if NODES.is_dir() else []


def node_free_kib(node: int) -> int:
    return meminfo(NODES / f"node{node}" / "meminfo", f"Node {node} ")["MemFree"]


def cpu_list(name: str) -> set[int]:
    out: set[int] = set()
    for part in Path(f"/sys/devices/system/cpu/{name}").read_text().strip().split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def within(value: int, before: int, after: int, slack: int = 0) -> bool:
    return min(before, after) - slack <= value <= max(before, after) + slack


# ---- CPU and memory statistics -------------------------------------------------------------------------------


def test_node_cpu_stats_are_the_hosts_proc_stat(conn: libvirt.virConnect, ref: libvirt.virConnect) -> None:
    ncpus = len(cpu_list("present"))
    for cpu in [-1, *range(ncpus)]:
        before = proc_stat(cpu)
        got = conn.getCPUStats(cpu)
        after = proc_stat(cpu)
        assert set(got) == set(before) == set(ref.getCPUStats(cpu))  # libvirt's four fields
        for field, value in got.items():
            assert before[field] <= value <= after[field], (cpu, field, before[field], value, after[field])
    # Checks the client library makes, as for libvirt's own drivers.
    assert error_of(lambda: conn.getCPUStats(-2)) == error_of(lambda: ref.getCPUStats(-2))
    # A CPU the host does not have: libvirt's virHostCPUGetStatsLinux.
    assert error_of(lambda: conn.getCPUStats(ncpus + 7)) == (
        libvirt.VIR_ERR_INVALID_ARG,
        libvirt.VIR_FROM_NONE,
        "Invalid cpuNum in virHostCPUGetStatsLinux",
    )


def test_virsh_nodecpustats_prints_the_same_figures(daemon: DaemonProcess) -> None:
    before = proc_stat(-1)
    out = virsh(daemon.uri, "nodecpustats").stdout
    after = proc_stat(-1)
    got = {k.strip(): int(v) for k, v in re.findall(r"^(\w+):\s+(\d+)$", out, re.M)}
    assert set(got) == {"user", "system", "idle", "iowait"}, out  # virsh names libvirt's "kernel" system
    for virsh_name, field in (("user", "user"), ("system", "kernel"), ("idle", "idle"), ("iowait", "iowait")):
        assert before[field] <= got[virsh_name] <= after[field]


def test_node_memory_stats_are_the_hosts_meminfo(conn: libvirt.virConnect) -> None:
    before = meminfo(Path("/proc/meminfo"))
    got = conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS)
    after = meminfo(Path("/proc/meminfo"))
    assert set(got) == {"total", "free", "buffers", "cached"}
    assert got["total"] == before["MemTotal"]
    for field, key in (("free", "MemFree"), ("buffers", "Buffers"), ("cached", "Cached")):
        assert within(got[field], before[key], after[key], MEMORY_SLACK_KIB), (field, before[key], got[field])
    nodes = numa_nodes()
    if not nodes:  # libvirt's one fake cell: the whole host
        assert set(conn.getMemoryStats(0)) == {"total", "free", "buffers", "cached"}
        return
    for node in nodes:
        path = NODES / f"node{node}" / "meminfo"
        before = meminfo(path, f"Node {node} ")
        cell = conn.getMemoryStats(node)
        after = meminfo(path, f"Node {node} ")
        assert set(cell) == {"total", "free"}  # a node's meminfo has no Buffers/Cached lines
        assert within(cell["total"], before["MemTotal"], after["MemTotal"])
        assert within(cell["free"], before["MemFree"], after["MemFree"], MEMORY_SLACK_KIB)
    last = max(nodes)
    assert error_of(lambda: conn.getMemoryStats(last + 1)) == (
        libvirt.VIR_ERR_INVALID_ARG,
        libvirt.VIR_FROM_NONE,
        f"cellNum in virHostMemGetStats must be less than or equal to {last}",
    )


def test_free_memory_is_the_nodes_free_memory(conn: libvirt.virConnect, ref: libvirt.virConnect) -> None:
    """libvirt (built with numactl, as Debian's is) sums the NUMA nodes' MemFree; without NUMA it is the
    host's free memory. In bytes, never 0."""
    nodes = numa_nodes()
    if nodes:
        before = sum(node_free_kib(n) for n in nodes)
        free = conn.getFreeMemory()
        after = sum(node_free_kib(n) for n in nodes)
        cells = conn.getCellsFreeMemory(0, len(nodes) + 3)
        assert len(cells) == max(nodes) + 1
        for node in nodes:
            assert within(cells[node] // 1024, node_free_kib(node), node_free_kib(node), MEMORY_SLACK_KIB)
    else:
        before = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 1024
        free = conn.getFreeMemory()
        after = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 1024
        assert len(conn.getCellsFreeMemory(0, 4)) == 1
    assert free % 1024 == 0 and within(free // 1024, before, after, MEMORY_SLACK_KIB), (before, free // 1024)
    last = max(nodes) if nodes else 0
    assert error_of(lambda: conn.getCellsFreeMemory(last + 1, 1)) == (
        libvirt.VIR_ERR_INTERNAL_ERROR,
        libvirt.VIR_FROM_NONE,
        f"internal error: start cell {last + 1} out of range (0-{last})",
    )
    # The client library's checks, the same for libvirt's own drivers:
    assert error_of(lambda: conn.getCellsFreeMemory(-1, 1)) == error_of(lambda: ref.getCellsFreeMemory(-1, 1))


def test_virsh_freecell_lists_the_cells(daemon: DaemonProcess) -> None:
    out = virsh(daemon.uri, "freecell", "--all").stdout
    rows = re.findall(r"^\s*(\d+):\s+(\d+) KiB$", out, re.M)
    assert [int(n) for n, _ in rows] == (numa_nodes() or [0])
    assert re.search(r"^Total:\s+\d+ KiB$", out, re.M), out


def test_node_cpu_map_is_sysfs(conn: libvirt.virConnect, daemon: DaemonProcess) -> None:
    present, online = cpu_list("present"), cpu_list("online")
    count, cpumap, n_online = conn.getCPUMap()
    assert count == max(present) + 1
    assert [i for i, on in enumerate(cpumap) if on] == sorted(online) and n_online == len(online)
    out = virsh(daemon.uri, "nodecpumap").stdout
    expect = "".join("y" if i in online else "-" for i in range(count))
    assert out == f"CPUs present:   {count}\nCPUs online:    {len(online)}\nCPU map:        {expect}\n\n"


def test_connection_is_secure_not_encrypted(conn: libvirt.virConnect, ref: libvirt.virConnect) -> None:
    """The daemon says secure; the client adds that a UNIX socket is not encrypted (one call, 149)."""
    assert (conn.isSecure(), conn.isEncrypted()) == (1, 0)
    assert ref.isSecure() == 1


# ---- server-side checks (what the client library would catch first, sent raw) ------------------------------


def _raw_error(daemon: DaemonProcess, proc: int, payload: bytes) -> tuple[int, str]:
    with raw(daemon.socket) as c:
        status, reply = c.roundtrip(proc, payload)
    assert status == ERROR
    return error_message(reply)


def test_daemon_checks_stats_arguments_like_libvirtd(daemon: DaemonProcess) -> None:
    def args(*ints: int) -> bytes:
        p = Packer()
        for v in ints:
            p.int(v)
        return p.getvalue()

    cases = [
        # (procedure, arguments, libvirt's message): libvirtd's dispatcher, then its public API and util code
        (227, args(-1, 17, 0), "internal error: nparams too large"),
        (227, args(-2, 4, 0), "cpuNum in virNodeGetCPUStats only accepts -1 as a negative value"),
        (227, args(-1, 3, 0), "nparams in virHostCPUGetStatsLinux must be equal to 4"),
        (228, args(3, -1, 0), "nparams in virHostMemGetStatsLinux must be 4"),
        (101, args(0, 1025), "maxcells > REMOTE_NODE_MAX_CELLS"),
        (101, args(0, 0), "maxCells in virNodeGetCellsFreeMemory must be greater than zero"),
        (227, args(-1, 4, 8), "invalid argument: unsupported flags (0x8) in function virNodeGetCPUStats"),
    ]
    for proc, payload, message in cases:
        assert _raw_error(daemon, proc, payload)[1] == message, proc
    # nparams 0 asks how many there are: none are sent, the count is.
    with raw(daemon.socket) as c:
        status, reply = c.roundtrip(227, args(-1, 0, 0))
    assert status == OK
    u = Unpacker(reply)
    assert u.array_len(16) == 0 and u.int() == 4


# ---- SMBIOS --------------------------------------------------------------------------------------------------

NO_SMBIOS = (libvirt.VIR_ERR_CONFIG_UNSUPPORTED, "unsupported configuration: Host SMBIOS information is not available")


def test_sysinfo_in_session_mode_is_libvirts_refusal(conn: libvirt.virConnect) -> None:
    """libvirt's drivers read SMBIOS only when privileged; otherwise every one of them answers this."""
    code, _domain, message = error_of(lambda: conn.getSysinfo())
    assert (code, message) == NO_SMBIOS


def test_sysinfo_of_the_system_instance(system_daemon: DaemonProcess) -> None:
    """Where dmidecode cannot read the host's tables (these hosts boot without DMI: it fails), libvirt's
    answer is the same refusal; where it can, the document is dmidecode's output as libvirt formats it."""
    dmidecode = shutil.which("dmidecode") or shutil.which("dmidecode", path="/usr/sbin:/sbin")
    run = (
        subprocess.run([dmidecode, "-q", "-t", "0,1,2,3,4,11,17"], capture_output=True, text=True)
        if dmidecode
        else None
    )
    c = libvirt.open(system_daemon.uri)
    try:
        if run is None or run.returncode != 0:
            code, _domain, message = error_of(lambda: c.getSysinfo())
            assert (code, message) == NO_SMBIOS
        else:
            assert c.getSysinfo() == format_smbios(run.stdout)
        assert virsh(system_daemon.uri, "sysinfo", check=False).returncode == (
            1 if run is None or run.returncode else 0
        )
    finally:
        c.close()


def _smbios_dump(structures: list[bytes]) -> bytes:
    """A dmidecode --dump-bin file: an SMBIOS 3.0 entry point at 0, the structure table at 0x20."""
    table = b"".join(structures)
    entry = bytearray(b"_SM3_" + bytes(19))
    entry[6], entry[7], entry[8], entry[10] = 0x18, 3, 0, 1
    entry[12:16] = len(table).to_bytes(4, "little")
    entry[16:24] = (0x20).to_bytes(8, "little")
    entry[5] = (-sum(entry)) & 0xFF
    return bytes(entry) + bytes(0x20 - len(entry)) + table


def _structure(kind: int, handle: int, formatted: bytes, strings: list[str]) -> bytes:
    body = bytes([kind, 4 + len(formatted)]) + handle.to_bytes(2, "little") + formatted
    tail = b"".join(s.encode() + b"\0" for s in strings) + b"\0" if strings else b"\0\0"
    return body + tail


def _dmidecode() -> str:
    path = shutil.which("dmidecode", path="/usr/sbin:/sbin:/usr/bin")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("dmidecode is not installed (scripts/install-deps.sh installs it)")
        pytest.skip("dmidecode is not installed")
    return path


def test_smbios_is_formatted_from_dmidecodes_own_output(tmp_path: Path) -> None:
    """Real dmidecode output (decoding SMBIOS tables made here) through the daemon's formatter, against the
    document libvirt's virSysinfoFormat makes of it: sections in libvirt's order and names, values escaped,
    absent or blank values and empty sections left out, an empty memory slot skipped."""
    dmidecode = _dmidecode()
    bios = _structure(
        0, 0, bytes([1, 2, 0x00, 0xE8, 3, 0]) + bytes(8) + bytes([0, 0, 2, 7, 0xFF, 0xFF]),
        ["ACME & Co", "1.2.3", "01/02/2024"],
    )  # fmt: skip
    uuid = bytes.fromhex("00112233445566778899aabbccddeeff")
    system = _structure(
        1, 1, bytes([1, 2, 3, 4]) + uuid + bytes([6, 5, 6]), ["Maker", "Box <1>", " ", "SN1", "SKU", "Fam"]
    )
    oem = _structure(11, 2, bytes([2]), ["first", "sec.ond"])
    end = _structure(127, 3, b"", [])
    dump = tmp_path / "dmi.bin"
    dump.write_bytes(_smbios_dump([bios, system, oem, end]))
    out = subprocess.run(
        [dmidecode, "-q", "-t", "0,1,2,3,4,11,17", "--from-dump", str(dump)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr

    def oem_string(i: int) -> str:
        return subprocess.run(
            [dmidecode, "--from-dump", str(dump), "--oem-string", str(i)], capture_output=True, text=True, check=True
        ).stdout

    # dmidecode prints the system UUID in SMBIOS 2.6+ byte order (its first three fields little-endian).
    assert format_smbios(out.stdout, oem_string) == (
        "<sysinfo type='smbios'>\n"
        "  <bios>\n"
        "    <entry name='vendor'>ACME &amp; Co</entry>\n"
        "    <entry name='version'>1.2.3</entry>\n"
        "    <entry name='date'>01/02/2024</entry>\n"
        "    <entry name='release'>2.7</entry>\n"
        "  </bios>\n"
        "  <system>\n"
        "    <entry name='manufacturer'>Maker</entry>\n"
        "    <entry name='product'>Box &lt;1&gt;</entry>\n"
        "    <entry name='serial'>SN1</entry>\n"
        "    <entry name='uuid'>33221100-5544-7766-8899-aabbccddeeff</entry>\n"
        "    <entry name='sku'>SKU</entry>\n"
        "    <entry name='family'>Fam</entry>\n"
        "  </system>\n"
        "  <oemStrings>\n"
        "    <entry>first</entry>\n"
        "    <entry>sec.ond\n</entry>\n"
        "  </oemStrings>\n"
        "</sysinfo>\n"
    )
    assert format_smbios("") == "<sysinfo type='smbios'/>\n"


# ---- CPU models and the hypervisor CPU -------------------------------------------------------------------------


def test_cpu_model_names_are_libvirts(conn: libvirt.virConnect, ref: libvirt.virConnect) -> None:
    """libvirt's own list for the architecture (its CPU map), as every libvirt driver answers it."""
    for arch in ("x86_64", "i686", "ppc64le", "aarch64", "s390x"):
        assert conn.getCPUModelNames(arch) == ref.getCPUModelNames(arch), arch
    assert "Skylake-Client" in conn.getCPUModelNames("x86_64")
    for arch in ("sparc", "riscv64"):  # known to libvirt, no CPU driver for it
        assert error_of(partial(conn.getCPUModelNames, arch)) == error_of(partial(ref.getCPUModelNames, arch))
    code, _domain, message = error_of(lambda: conn.getCPUModelNames("vax"))
    assert (code, message) == error_of(lambda: ref.getCPUModelNames("vax"))[::2]  # (the test driver's own domain)


def test_hypervisor_cpu_comparison_is_refused_as_libvirt_does(conn: libvirt.virConnect, daemon: DaemonProcess) -> None:
    """Only host-passthrough exists (domcapabilities: host-model and custom unsupported), so there is no
    host CPU model to compare with or to baseline from: libvirt's QEMU driver refuses with
    VIR_ERR_OPERATION_UNSUPPORTED ("... does not support reporting CPU model for virttype ...", "... does not
    support any CPU models for virttype ...") in that case."""
    cpu = "<cpu mode='host-passthrough'/>"
    code, _d, message = error_of(lambda: conn.compareHypervisorCPU(None, None, None, None, cpu, 0))
    assert code == libvirt.VIR_ERR_OPERATION_UNSUPPORTED
    assert (
        message == "Operation not supported: the mshv driver does not support reporting CPU model for virttype 'hyperv'"
    )
    code, _d, message = error_of(lambda: conn.baselineHypervisorCPU(None, None, None, None, [cpu], 0))
    assert code == libvirt.VIR_ERR_OPERATION_UNSUPPORTED
    assert message == "Operation not supported: the mshv driver does not support any CPU models for virttype 'hyperv'"
    # Arguments first, as libvirt's drivers check them: a foreign architecture, then malformed CPUs.
    assert (
        error_of(lambda: conn.compareHypervisorCPU(None, "aarch64", None, None, cpu, 0))[0]
        == libvirt.VIR_ERR_INVALID_ARG
    )
    assert error_of(lambda: conn.baselineHypervisorCPU(None, None, None, None, ["<cpu"], 0))[:2] == (
        libvirt.VIR_ERR_XML_ERROR,
        libvirt.VIR_FROM_CPU,
    )
    assert error_of(lambda: conn.baselineHypervisorCPU(None, None, None, None, ["<host/>"], 0)) == (
        libvirt.VIR_ERR_XML_ERROR,
        libvirt.VIR_FROM_CPU,
        "XML error: XML does not contain expected 'cpu' element",
    )
