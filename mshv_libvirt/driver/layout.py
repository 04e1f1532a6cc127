"""Where the driver keeps things: one naming rule for every file, injective by construction.

Per domain (``<esc>`` is :func:`escape_name` of the domain's name, ``<id>`` its domain id)::

    <config_dir>/<esc>.xml              persistent config (libvirt's ``<name>.xml`` for ordinary names)
    <config_dir>/autostart/<esc>.xml    autostart symlink to it
    <log_dir>/<esc>.log                 the VMM's own log (stdout/stderr), like libvirt's ``qemu/<name>.log``
    <log_dir>/serial/<esc>.log          the guest's serial console log
    <run_dir>/<id>/                     runtime directory of a running domain: record.json (the
                                        daemon's), vmm.json, ctl, vmm.pid, exit.json (the VMM's)

Per daemon: ``<run_dir>/virtmshvd.pid`` (the pid file, locked while a daemon uses these directories)
and ``<log_dir>/.mshv-layout`` (the logs have been migrated from the layout of earlier versions).

Why no two things can share a path: each directory holds one kind of name-derived file, named
``<esc>`` plus one fixed extension, and :func:`escape_name` is injective (it is percent-encoding of a
fixed character set that includes ``%`` itself, so :func:`unescape_name` inverts it). Runtime
directories are named by the domain id, which is unique among running domains and never reused while
one runs; their contents have fixed names, so their path lengths depend on neither the name nor the
id's digits beyond ten. Temporaries (``atomicfile``) start with ``.tmp-``, and no ``<esc>`` starts
with ``.`` (a leading dot is escaped), nor contains ``/`` or a control character.
"""

from __future__ import annotations

import re
from pathlib import Path

from mshv_libvirt.errors import ErrorCode, ErrorDomain, VirtError

NAME_MAX = 255  # bytes in one file name (Linux)
# A domain name is accepted when its escaped form is at most this many bytes of UTF-8: ``<esc>.xml``
# and ``<esc>.log`` then stay within NAME_MAX with room for rotated logs (``<esc>.log.N``).
MAX_ESCAPED_NAME_BYTES = 240
SUN_PATH_MAX = 107  # bytes of an AF_UNIX socket path (sun_path is 108 with the terminating NUL)
MAX_DOMAIN_ID = 2**32 - 1

AUTOSTART = "autostart"
SERIAL = "serial"
DAEMON_PIDFILE = "virtmshvd.pid"
LOG_LAYOUT_MARK = ".mshv-layout"

RECORD = "record.json"
VMM_CONFIG = "vmm.json"
CONTROL = "ctl"
VMM_PIDFILE = "vmm.pid"
EXIT_FILE = "exit.json"

_RUNTIME_DIR = re.compile(r"[1-9][0-9]*")
_ESCAPED = re.compile(r"%([0-9A-F]{2})")


def _needs_escape(ch: str, first: bool) -> bool:
    return ch in "%/" or ord(ch) < 0x20 or ord(ch) == 0x7F or (first and ch == ".")


def escape_name(name: str) -> str:
    """``name`` as it appears in file names: ``%``, ``/``, control characters and a leading ``.`` as ``%XX``."""
    return "".join(f"%{ord(ch):02X}" if _needs_escape(ch, i == 0) else ch for i, ch in enumerate(name))


def unescape_name(stem: str) -> str | None:
    """The name :func:`escape_name` turned into ``stem``, or None when no name escapes to ``stem``."""
    name = _ESCAPED.sub(lambda m: chr(int(m.group(1), 16)), stem)
    return name if escape_name(name) == stem else None


def check_name(name: str) -> None:
    """Refuse a name whose files could not be created (they would exceed NAME_MAX)."""
    size = len(escape_name(name).encode("utf-8", "surrogateescape"))
    if size > MAX_ESCAPED_NAME_BYTES:
        shown = name if len(name) <= 40 else name[:40] + "..."
        raise VirtError(
            ErrorCode.CONFIG_UNSUPPORTED,
            f"domain name '{shown}' is too long: {size} bytes in file names, at most {MAX_ESCAPED_NAME_BYTES} "
            "(each '%', '/', control character and a leading '.' counts 3 bytes, other characters their UTF-8 size)",
            ErrorDomain.DOMAIN,
        )


def config_file(config_dir: Path, name: str) -> Path:
    return config_dir / f"{escape_name(name)}.xml"


def autostart_link(config_dir: Path, name: str) -> Path:
    return config_dir / AUTOSTART / f"{escape_name(name)}.xml"


def vmm_log(log_dir: Path, name: str) -> Path:
    return log_dir / f"{escape_name(name)}.log"


def serial_log(log_dir: Path, name: str) -> Path:
    return log_dir / SERIAL / f"{escape_name(name)}.log"


def runtime_dir(run_dir: Path, dom_id: int) -> Path:
    if not 1 <= dom_id <= MAX_DOMAIN_ID:
        raise ValueError(f"domain id {dom_id} out of range")
    return run_dir / str(dom_id)


def runtime_dir_id(entry: str) -> int | None:
    """The domain id a run-dir entry is the runtime directory of, or None."""
    if _RUNTIME_DIR.fullmatch(entry) and int(entry) <= MAX_DOMAIN_ID:
        return int(entry)
    return None


def longest_socket_path(run_dir: Path) -> int:
    """Bytes of the longest control socket path a domain can get under ``run_dir``."""
    return len(str(runtime_dir(run_dir, MAX_DOMAIN_ID) / CONTROL).encode("utf-8", "surrogateescape"))


def check_run_dir(run_dir: Path) -> None:
    """Refuse a run directory so long that control sockets in it could not be bound."""
    size = longest_socket_path(run_dir)
    if size > SUN_PATH_MAX:
        raise ValueError(
            f"run directory {run_dir} is too long: its control socket paths would be up to {size} bytes, "
            f"AF_UNIX allows {SUN_PATH_MAX} (use a run directory of at most "
            f"{SUN_PATH_MAX - (size - len(str(run_dir).encode('utf-8', 'surrogateescape')))} bytes)"
        )
