"""What the daemon prepares so a VMM can run with least privilege (docs/SECURITY.md).

The daemon opens everything the VMM will use and hands the descriptors over (``"fds"`` in its config):
the hypervisor device (/dev/mshv, or /dev/kvm for the emulated device: root's only), the kernel and initrd
(checked here, before anything is spawned: regular, readable, not larger than guest memory), the console pty,
the control socket (bound and listening), the exit file, the serial log and its backups, and the crash dump's
temporary file. The VMM then needs no path access at all, so it can drop every other right: it runs as the
configured unprivileged user (system mode), with no_new_privs, Landlock and seccomp (vmm/sandbox.py).
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from mshv_libvirt.atomicfile import write_atomic
from mshv_libvirt.vmm import images
from mshv_libvirt.vmm.config import DEFAULT_LOG_MAX_BACKUPS, DEFAULT_LOG_MAX_SIZE, MAX_LOG_BACKUPS

from . import kernel_cache

SYSTEM_CONF = Path("/etc/libvirt/mshv.conf")
SYSTEM_USER = "libvirt-mshv"  # created by scripts/install.sh


class LaunchError(Exception):
    """The VMM cannot be started as configured (the message says why)."""


@dataclass(frozen=True)
class VmmOptions:
    """How VMMs are started: ``user``/``group`` as in qemu.conf, the serial log's cap as in virtlogd.conf."""

    user: str | None = None  # None: the daemon's own user (session mode)
    group: str | None = None  # None: the user's primary group
    serial_log_max_size: int = DEFAULT_LOG_MAX_SIZE
    serial_log_max_backups: int = DEFAULT_LOG_MAX_BACKUPS
    test_hooks: bool = False  # test-only control commands in the VMM (docs/SECURITY.md)
    kernel_cache: Path | None = None  # decompressed kernel payloads (kernel_cache.py); None: none kept

    def credentials(self) -> dict[str, Any]:
        """``subprocess`` keyword arguments that switch to ``user``/``group`` (empty: no switch)."""
        if self.user is None:
            return {}
        try:
            pw = pwd.getpwnam(self.user) if not self.user.isdigit() else pwd.getpwuid(int(self.user))
        except KeyError:
            raise LaunchError(
                f"the VMM user '{self.user}' does not exist (scripts/install.sh creates {SYSTEM_USER}; "
                f"or set user in {SYSTEM_CONF})"
            ) from None
        gid = pw.pw_gid
        if self.group is not None:
            try:
                gid = grp.getgrnam(self.group).gr_gid if not self.group.isdigit() else int(self.group)
            except KeyError:
                raise LaunchError(f"the VMM group '{self.group}' does not exist") from None
        if pw.pw_uid == os.geteuid() and gid == os.getegid():
            return {}
        return {"user": pw.pw_uid, "group": gid, "extra_groups": []}


def read_conf(path: Path) -> dict[str, str | int]:
    """``key = "value"`` / ``key = 123`` lines with ``#`` comments, the subset of libvirt's conf syntax we use."""
    out: dict[str, str | int] = {}
    try:
        text = path.read_text()
    except FileNotFoundError:
        return out
    except OSError as err:
        raise LaunchError(f"cannot read {path}: {err.strerror}") from err
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip() if not raw.strip().startswith("#") else ""
        if not line:
            continue
        key, sep, value = (part.strip() for part in line.partition("="))
        if not sep or not key.isidentifier():
            raise LaunchError(f"{path}:{number}: expected key = value")
        if len(value) >= 2 and value[0] == value[-1] == '"':
            out[key] = value[1:-1]
        elif value.isdigit():
            out[key] = int(value)
        else:
            raise LaunchError(f"{path}:{number}: {key} must be a quoted string or a number")
    return out


def options_from_conf(conf: dict[str, str | int], *, system: bool) -> VmmOptions:
    def number(key: str, default: int, low: int, high: int) -> int:
        value = conf.get(key, default)
        if not isinstance(value, int) or not low <= value <= high:
            raise LaunchError(f"{key} must be a number between {low} and {high}")
        return value

    user = conf.get("user", SYSTEM_USER if system else None)
    group = conf.get("group")
    return VmmOptions(
        user=None if user is None else str(user),
        group=None if group is None else str(group),
        serial_log_max_size=number("serial_log_max_size", DEFAULT_LOG_MAX_SIZE, 4096, 1 << 40),
        serial_log_max_backups=number("serial_log_max_backups", DEFAULT_LOG_MAX_BACKUPS, 0, MAX_LOG_BACKUPS),
    )


@dataclass
class HeldFds:
    """Descriptors the daemon holds for a VMM it starts (the VMM inherits them); closing closes the daemon's
    copies."""

    pass_fds: list[int] = field(default_factory=list)

    def keep(self, fd: int) -> int:
        self.pass_fds.append(fd)
        return fd

    def close(self) -> None:
        for fd in self.pass_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.pass_fds = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Launch(HeldFds):
    """Descriptors and arguments for one VMM start."""

    config: dict[str, Any] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    credentials: dict[str, Any] = field(default_factory=dict)


def _listen(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a stale socket of a previous VMM of this domain
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(8)
    except BaseException:
        sock.close()
        raise
    return sock


def crash_dump_part(final: str) -> Path:
    """Where a sandboxed VMM's core goes until the daemon names it (see :func:`settle_crash_dump`)."""
    p = Path(final)
    return p.with_name(f".{p.name}.part")


def prepare(vmm_config: dict[str, Any], options: VmmOptions, *, config_path: Path, stderr_dir: Path) -> Launch:
    """Open and check everything; write the VMM config (with its ``"fds"``) to ``config_path``."""
    from mshv_libvirt.vmm import console, sandbox  # the VMM's own openers, so both sides agree

    credentials = options.credentials()
    cfg = dict(vmm_config)
    launch = Launch(config=cfg, credentials=credentials)
    try:
        limit = int(cfg["memory_bytes"])
        fds: dict[str, Any] = {}
        total = 0
        for what in ("kernel", "initrd"):
            if cfg.get(what):
                try:
                    fd, size = images.open_checked(what, str(cfg[what]), limit)
                except images.ImageError as err:
                    raise images.ImageError(f"Cannot load the {what}: {err}") from err
                fds[what] = launch.keep(fd)
                total += size
                if what == "kernel" and options.kernel_cache is not None:
                    cached = kernel_cache.open_entry(options.kernel_cache, fd)
                    if cached is not None:
                        fds["kernel_payload"] = launch.keep(cached)
        if total > limit:
            raise images.ImageError(
                f"Cannot load the initrd: kernel '{cfg['kernel']}' and initrd '{cfg['initrd']}' together are "
                f"larger than the guest memory ({total} bytes > {limit} bytes)"
            )
        with contextlib.suppress(sandbox.SandboxError):  # no device at all: the VMM's build step says so
            device, fd = sandbox.probe_hypervisor()
            fds["hypervisor"], fds["hypervisor_device"] = launch.keep(fd), device
        master, slave = os.openpty()
        fds["console_master"], fds["console_slave"] = launch.keep(master), launch.keep(slave)
        if cfg.get("control_socket"):
            sock = _listen(Path(cfg["control_socket"]))
            fds["control"] = launch.keep(sock.detach())
        if cfg.get("exit_file"):
            fds["exit"] = launch.keep(
                os.open(cfg["exit_file"], os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            )
        if cfg.get("serial_log"):
            Path(cfg["serial_log"]).parent.mkdir(parents=True, exist_ok=True)
            logs = console.open_log_files(str(cfg["serial_log"]), options.serial_log_max_backups)
            fds["serial_log"] = [launch.keep(fd) for fd in logs]
        if cfg.get("crash_dump"):
            part = crash_dump_part(str(cfg["crash_dump"]))
            part.parent.mkdir(parents=True, exist_ok=True)
            fds["crash_dump"] = launch.keep(os.open(part, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600))
        cfg.update(
            fds=fds,
            sandbox=True,
            pidfile=None,  # written by the daemon: the VMM may not create files
            serial_log_max_size=options.serial_log_max_size,
            serial_log_max_backups=options.serial_log_max_backups,
            test_hooks=options.test_hooks,
        )
        config_path.write_text(json.dumps(cfg))
        os.chmod(config_path, 0o600)
        launch.args = ["--config-fd", str(launch.keep(os.open(config_path, os.O_RDONLY | os.O_CLOEXEC)))]
        stderr_dir.mkdir(parents=True, exist_ok=True)
    except images.ImageError as err:
        launch.close()
        raise LaunchError(str(err)) from err
    except OSError as err:
        launch.close()
        raise LaunchError(f"cannot prepare the VMM: {err}") from err
    except BaseException:
        launch.close()
        raise
    return launch


def write_pidfile(path: Path, pid: int) -> None:
    write_atomic(path, f"{pid}\n".encode(), mode=0o644)


def settle_crash_dump(config_path: Path, crashed: bool) -> None:
    """After a VMM ended: give a written core its final name (a crash), else drop the temporary file."""
    try:
        final = json.loads(config_path.read_text()).get("crash_dump")
    except (OSError, ValueError, AttributeError):
        return
    if not isinstance(final, str):
        return
    part = crash_dump_part(final)
    try:
        if crashed and part.stat().st_size > 0:
            os.replace(part, final)
        else:
            part.unlink()
    except FileNotFoundError:
        pass
