"""The VMM's configuration file (written by the driver; format in docs/DESIGN.md), parsed and validated."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ON_REBOOT = ("restart", "destroy", "preserve")
ON_POWEROFF = ("destroy", "preserve")
ON_CRASH = ("destroy", "preserve")
NESTED = ("off", "optional", "require")


class ConfigError(ValueError):
    """The VMM configuration is invalid (the message names the field)."""


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
        ):
            if getattr(cfg, key) not in allowed:
                raise ConfigError(f"config field {key!r} must be one of {', '.join(allowed)}")
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> VmmConfig:
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot read config {path}: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError("config must be a JSON object")
        return cls.from_dict(raw)
