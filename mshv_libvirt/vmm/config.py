"""The VMM's configuration file (written by the driver; format in docs/DESIGN.md), parsed and validated."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ON_REBOOT = ("restart", "destroy", "preserve")
ON_POWEROFF = ("destroy", "preserve")
ON_CRASH = ("destroy", "preserve")
NESTED = ("off", "optional", "require")
CLOCK_OFFSETS = ("utc", "localtime")


DEFAULT_LOG_MAX_SIZE = 2 << 20  # virtlogd's max_size
DEFAULT_LOG_MAX_BACKUPS = 3  # virtlogd's max_backups
MAX_LOG_BACKUPS = 16

# Descriptors the daemon opens and hands over (``"fds"`` in the config): with all of them the VMM opens
# no file itself, which is what lets it run sandboxed (docs/SECURITY.md).
FD_FIELDS = (
    "hypervisor",
    "kernel",
    "kernel_payload",
    "initrd",
    "console_master",
    "console_slave",
    "control",
    "exit",
    "crash_dump",
)


class ConfigError(ValueError):
    """The VMM configuration is invalid (the message names the field)."""


@dataclass(frozen=True)
class HandedFds:
    hypervisor: int | None = None
    hypervisor_device: str = "/dev/kvm"  # what ``hypervisor`` is: /dev/kvm (emulated device) or /dev/mshv
    kernel: int | None = None
    # The kernel's payload as the daemon's cache holds it decompressed (driver/kernel_cache.py), if it does
    kernel_payload: int | None = None
    initrd: int | None = None
    console_master: int | None = None
    console_slave: int | None = None
    control: int | None = None  # a listening UNIX socket
    exit: int | None = None  # the exit file, written in place (read only once the VMM is gone)
    crash_dump: int | None = None
    serial_log: tuple[int, ...] = ()  # the log, then its backups .1 .. .N

    @classmethod
    def from_dict(cls, raw: object) -> HandedFds:
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise ConfigError("config field 'fds' must be an object")
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if key == "serial_log":
                if not isinstance(value, list) or not all(isinstance(v, int) and v >= 0 for v in value):
                    raise ConfigError("config field 'fds.serial_log' must be a list of descriptors")
                values[key] = tuple(value)
            elif key == "hypervisor_device":
                if value not in ("/dev/kvm", "/dev/mshv"):
                    raise ConfigError("config field 'fds.hypervisor_device' must be /dev/kvm or /dev/mshv")
                values[key] = value
            elif key in FD_FIELDS:
                if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                    raise ConfigError(f"config field 'fds.{key}' must be a descriptor number")
                values[key] = value
            else:
                raise ConfigError(f"config field 'fds.{key}' is unknown")
        return cls(**values)


RNG_BACKENDS = ("/dev/urandom", "/dev/random")


@dataclass(frozen=True)
class RngConfig:
    """A virtio-rng device (``<rng model='virtio'>``): its PCI slot on bus 0, backend and rate limit."""

    slot: int
    backend: str = "/dev/urandom"
    rate_bytes: int | None = None  # <rate bytes=...>: at most this many bytes ...
    rate_period_ms: int = 1000  # ... per this many milliseconds
    fd: int | None = None  # the backend, opened by the daemon or by the VMM before its sandbox

    @classmethod
    def from_dict(cls, raw: object) -> RngConfig:
        if not isinstance(raw, dict) or set(raw) - {"slot", "backend", "rate_bytes", "rate_period_ms", "fd"}:
            raise ConfigError(
                "config field 'rng' must be a list of objects with slot, backend, rate_bytes, rate_period_ms"
            )
        slot, backend = raw.get("slot"), raw.get("backend", "/dev/urandom")
        rate, period, fd = raw.get("rate_bytes"), raw.get("rate_period_ms", 1000), raw.get("fd")
        if not isinstance(slot, int) or isinstance(slot, bool) or not 1 <= slot <= 31:
            raise ConfigError("config field 'rng.slot' must be a PCI slot between 1 and 31")
        if backend not in RNG_BACKENDS:
            raise ConfigError(f"config field 'rng.backend' must be one of {', '.join(RNG_BACKENDS)}")
        for name, value, low in (("rate_bytes", rate, 1), ("rate_period_ms", period, 1), ("fd", fd, 0)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise ConfigError(f"config field 'rng.{name}' must be an integer of at least {low}")
        assert period is not None
        return cls(slot, backend, rate, period, fd)


DISK_FORMATS = ("raw", "qcow2")
DISK_CACHES = ("default", "none", "writeback", "writethrough", "directsync", "unsafe")
DISK_IO = ("native", "threads", "io_uring")
DISK_KEYS = {"slot", "path", "format", "readonly", "serial", "cache", "io", "queues", "fd"}


@dataclass(frozen=True)
class DiskConfig:
    """A virtio-blk disk: its PCI slot on bus 0, image, format and options; served by a qemu-storage-daemon
    vhost-user-blk backend the VMM starts before its sandbox and keeps for its life."""

    slot: int
    path: str
    format: str = "raw"
    readonly: bool = False
    serial: str | None = None
    cache: str = "default"  # 'none' and 'directsync': O_DIRECT
    queues: int = 1
    fd: int | None = None  # the image opened by the daemon: the backend opens /dev/fd/N (its inherited copy)
    io: str | None = None  # <driver io>: the backend's aio=; None: native with O_DIRECT, else threads

    @classmethod
    def from_dict(cls, raw: object) -> DiskConfig:
        if not isinstance(raw, dict) or set(raw) - DISK_KEYS or "slot" not in raw or "path" not in raw:
            raise ConfigError(f"config field 'disks' must be a list of objects with {', '.join(sorted(DISK_KEYS))}")
        slot, path, fd, queues = raw["slot"], raw["path"], raw.get("fd"), raw.get("queues", 1)
        fmt, cache, serial, ro = (
            raw.get("format", "raw"),
            raw.get("cache", "default"),
            raw.get("serial"),
            raw.get("readonly", False),
        )
        if not isinstance(slot, int) or isinstance(slot, bool) or not 1 <= slot <= 31:
            raise ConfigError("config field 'disks.slot' must be a PCI slot between 1 and 31")
        if not isinstance(path, str) or not path or "\0" in path:
            raise ConfigError("config field 'disks.path' must be a non-empty path")
        if fmt not in DISK_FORMATS:
            raise ConfigError(f"config field 'disks.format' must be one of {', '.join(DISK_FORMATS)}")
        if cache not in DISK_CACHES:
            raise ConfigError(f"config field 'disks.cache' must be one of {', '.join(DISK_CACHES)}")
        io = raw.get("io")
        if io is not None and io not in DISK_IO:
            raise ConfigError(f"config field 'disks.io' must be null or one of {', '.join(DISK_IO)}")
        if io == "native" and cache not in ("none", "directsync"):
            raise ConfigError("config field 'disks.io' 'native' needs cache 'none' or 'directsync' (O_DIRECT)")
        if not isinstance(ro, bool):
            raise ConfigError("config field 'disks.readonly' must be a boolean")
        if serial is not None and (not isinstance(serial, str) or len(serial.encode()) > 20):
            raise ConfigError("config field 'disks.serial' must be a string of at most 20 bytes")
        if not isinstance(queues, int) or isinstance(queues, bool) or not 1 <= queues <= 64:
            raise ConfigError("config field 'disks.queues' must be between 1 and 64")
        if fd is not None and (not isinstance(fd, int) or isinstance(fd, bool) or fd < 0):
            raise ConfigError("config field 'disks.fd' must be a descriptor number")
        return cls(slot, path, fmt, ro, serial, cache, queues, fd, io)


NET_KEYS = {"slot", "fd", "queue_fds", "mac", "mtu", "link_up"}
NET_MAX_QUEUE_PAIRS = 127  # virtio-pci's MSI-X window holds 256 vectors: 2 per pair, the control queue's, config


@dataclass(frozen=True)
class NetConfig:
    """A virtio-net interface: its PCI slot on bus 0 and the tap the daemon opened (IFF_TAP|IFF_NO_PI|
    IFF_VNET_HDR) and handed over, the guest's MAC, the MTU offered to the driver, the initial link state.
    ``queue_fds``: a multiqueue tap's (IFF_MULTI_QUEUE) descriptors of queue pairs 2..N, ``fd`` being pair 1's."""

    slot: int
    fd: int
    mac: str
    mtu: int | None = None
    link_up: bool = True
    queue_fds: tuple[int, ...] = ()

    @property
    def fds(self) -> tuple[int, ...]:
        return (self.fd, *self.queue_fds)

    @classmethod
    def from_dict(cls, raw: object) -> NetConfig:
        if not isinstance(raw, dict) or set(raw) - NET_KEYS or not {"slot", "fd", "mac"} <= set(raw):
            raise ConfigError(f"config field 'net' must be a list of objects with {', '.join(sorted(NET_KEYS))}")
        slot, fd, mac, mtu, link_up = raw["slot"], raw["fd"], raw["mac"], raw.get("mtu"), raw.get("link_up", True)
        if not isinstance(slot, int) or isinstance(slot, bool) or not 1 <= slot <= 31:
            raise ConfigError("config field 'net.slot' must be a PCI slot between 1 and 31")
        if not isinstance(fd, int) or isinstance(fd, bool) or fd < 0:
            raise ConfigError("config field 'net.fd' must be a descriptor number")
        parts = mac.split(":") if isinstance(mac, str) else []
        if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p) for p in parts):
            raise ConfigError("config field 'net.mac' must be a MAC address (six colon-separated hex bytes)")
        if int(parts[0], 16) & 1:
            raise ConfigError("config field 'net.mac' must not be a multicast address")
        if mtu is not None and (not isinstance(mtu, int) or isinstance(mtu, bool) or not 68 <= mtu <= 65535):
            raise ConfigError("config field 'net.mtu' must be between 68 and 65535")
        if not isinstance(link_up, bool):
            raise ConfigError("config field 'net.link_up' must be a boolean")
        queue_fds = raw.get("queue_fds", [])
        if (
            not isinstance(queue_fds, list)
            or len(queue_fds) >= NET_MAX_QUEUE_PAIRS
            or not all(isinstance(q, int) and not isinstance(q, bool) and q >= 0 for q in queue_fds)
        ):
            raise ConfigError(
                f"config field 'net.queue_fds' must be a list of at most {NET_MAX_QUEUE_PAIRS - 1} descriptor numbers"
            )
        return cls(slot, fd, mac.lower(), mtu, link_up, tuple(queue_fds))


@dataclass(frozen=True)
class VmmConfig:
    name: str
    uuid: str
    memory_bytes: int
    vcpus: int  # online at boot
    kernel: str
    initrd: str | None = None
    cmdline: str = "console=ttyS0"
    acpi: bool = True
    # What the VMM does itself when the guest resets / powers off / crashes. "destroy": exit (the exit
    # file says why); "restart" (reboot only): rebuild the VM in place; "preserve": stop every vCPU but
    # keep the partition and the process until destroy. Any other libvirt policy is the driver's job.
    on_reboot: str = "restart"
    on_poweroff: str = "destroy"
    on_crash: str = "destroy"
    # Where to write the guest's memory as an ELF core when it crashes (on_crash = coredump-*).
    crash_dump: str | None = None
    start_paused: bool = False
    control_socket: str | None = None
    pidfile: str | None = None
    exit_file: str | None = None
    serial_log: str | None = None
    # Decompress the bzImage payload on the host and enter the kernel's own startup_64 (see loader.py).
    host_decompress: bool = True
    # <cpu><topology threads='N'>: above 1, ask the hypervisor for SMT scheduling (7.0+ kernels; older
    # ones refuse the bit and the VM starts without it).
    threads_per_core: int = 1
    # Nested virtualization (<feature name='vmx'|'svm'>): "require" fails the build where the kernel or
    # hypervisor refuses it, "optional" starts without it, "off" never asks.
    nested: str = "off"
    # vCPUs described to the guest (<vcpu current='vcpus'>max_vcpus</vcpu>); those past ``vcpus`` are
    # present but disabled in the MADT and MP table, and get no VP. 0: the same as ``vcpus``.
    max_vcpus: int = 0
    # <clock offset>: the CMOS RTC starts at UTC, or at the VMM's local time ("localtime": the TZ the
    # daemon, and so the VMM, runs with).
    clock_offset: str = "utc"
    serial_log_max_size: int = DEFAULT_LOG_MAX_SIZE
    serial_log_max_backups: int = DEFAULT_LOG_MAX_BACKUPS
    fds: HandedFds = HandedFds()
    # Restrict the process (vmm/sandbox.py) before the VM is built; the driver always asks for it.
    sandbox: bool = False
    # Honour the test-only control commands (docs/SECURITY.md); set only by tests.
    test_hooks: bool = False
    rng: tuple[RngConfig, ...] = ()
    disks: tuple[DiskConfig, ...] = ()
    net: tuple[NetConfig, ...] = ()

    def __post_init__(self) -> None:
        if self.max_vcpus == 0:
            object.__setattr__(self, "max_vcpus", self.vcpus)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VmmConfig:
        def get(key: str, kind: type | tuple[type, ...], default: Any = ..., *, optional: bool = False) -> Any:
            if key not in raw or (optional and raw[key] is None):
                if default is ...:
                    raise ConfigError(f"config field {key!r} is required")
                return default
            value = raw[key]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ConfigError(f"config field {key!r} has the wrong type")
            return value

        cfg = cls(
            name=get("name", str),
            uuid=get("uuid", str, ""),
            memory_bytes=get("memory_bytes", int),
            vcpus=get("vcpus", int, 1),
            kernel=get("kernel", str),
            initrd=get("initrd", str, None, optional=True),
            cmdline=get("cmdline", str, "console=ttyS0", optional=True),
            acpi=get("acpi", bool, True),
            on_reboot=get("on_reboot", str, "restart"),
            on_poweroff=get("on_poweroff", str, "destroy"),
            on_crash=get("on_crash", str, "destroy"),
            crash_dump=get("crash_dump", str, None, optional=True),
            start_paused=get("start_paused", bool, False),
            control_socket=get("control_socket", str, None, optional=True),
            pidfile=get("pidfile", str, None, optional=True),
            exit_file=get("exit_file", str, None, optional=True),
            serial_log=get("serial_log", str, None, optional=True),
            host_decompress=get("host_decompress", bool, True),
            threads_per_core=get("threads_per_core", int, 1),
            nested=get("nested", str, "off"),
            max_vcpus=get("max_vcpus", int, 0, optional=True),
            clock_offset=get("clock_offset", str, "utc"),
            serial_log_max_size=get("serial_log_max_size", int, DEFAULT_LOG_MAX_SIZE),
            serial_log_max_backups=get("serial_log_max_backups", int, DEFAULT_LOG_MAX_BACKUPS),
            fds=HandedFds.from_dict(raw.get("fds")),
            sandbox=get("sandbox", bool, False),
            test_hooks=get("test_hooks", bool, False),
            rng=tuple(RngConfig.from_dict(r) for r in get("rng", list, [])),
            disks=tuple(DiskConfig.from_dict(d) for d in get("disks", list, [])),
            net=tuple(NetConfig.from_dict(n) for n in get("net", list, [])),
        )
        if cfg.memory_bytes < 16 << 20 or cfg.memory_bytes % 4096:
            raise ConfigError("config field 'memory_bytes' must be a multiple of 4 KiB and at least 16 MiB")
        if not 1 <= cfg.vcpus <= 254:
            raise ConfigError("config field 'vcpus' must be between 1 and 254")
        if not cfg.vcpus <= cfg.max_vcpus <= 254:
            raise ConfigError("config field 'max_vcpus' must be between 'vcpus' and 254")
        # the topology describes all the CPUs (the maximum), not only the online ones
        if not 1 <= cfg.threads_per_core <= cfg.max_vcpus:
            raise ConfigError("config field 'threads_per_core' must be between 1 and the vCPU count")
        for key, allowed in (
            ("on_reboot", ON_REBOOT),
            ("on_poweroff", ON_POWEROFF),
            ("on_crash", ON_CRASH),
            ("nested", NESTED),
            ("clock_offset", CLOCK_OFFSETS),
        ):
            if getattr(cfg, key) not in allowed:
                raise ConfigError(f"config field {key!r} must be one of {', '.join(allowed)}")
        if cfg.serial_log_max_size < 4096:
            raise ConfigError("config field 'serial_log_max_size' must be at least 4096")
        if not 0 <= cfg.serial_log_max_backups <= MAX_LOG_BACKUPS:
            raise ConfigError(f"config field 'serial_log_max_backups' must be between 0 and {MAX_LOG_BACKUPS}")
        if cfg.fds.serial_log and len(cfg.fds.serial_log) != cfg.serial_log_max_backups + 1:
            raise ConfigError("config field 'fds.serial_log' must hold the log and each of its backups")
        if len({r.slot for r in cfg.rng}) != len(cfg.rng):
            raise ConfigError("config field 'rng' puts two devices in one PCI slot")
        slots = [r.slot for r in cfg.rng] + [d.slot for d in cfg.disks] + [n.slot for n in cfg.net]
        if len(set(slots)) != len(slots):
            raise ConfigError("config fields 'rng', 'disks' and 'net' put two devices in one PCI slot")
        return cfg

    @classmethod
    def load(cls, path: str | Path, fd: int | None = None) -> VmmConfig:
        """From ``path``, or from the descriptor ``fd`` (handed over; ``path`` then only names it)."""
        return cls.from_dict(read_raw(path, fd))


def read_raw(path: str | Path, fd: int | None = None) -> dict[str, Any]:
    try:
        if fd is None:
            text = Path(path).read_bytes()
        else:
            buf = bytearray()
            while chunk := os.pread(fd, 1 << 20, len(buf)):
                buf += chunk
            text = bytes(buf)
        raw = json.loads(text)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read config {path}: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError("config must be a JSON object")
    return raw
