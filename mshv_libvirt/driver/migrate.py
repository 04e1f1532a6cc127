"""Migration from the on-disk layout of earlier versions, run at every daemon start (under the pid file lock).

Earlier versions used the domain name itself in every file name::

    <config_dir>/<name>.xml, <config_dir>/autostart/<name>.xml
    <run_dir>/<name>.json (runtime record), <name>.vmm.json, <name>.ctl, <name>.pid, <name>.exit
    <log_dir>/<name>.log, <log_dir>/<name>.serial.log

which let names collide with each other and with temporaries (issue 19). What is moved, and how:

- A config whose file name is not its escaped name is written to ``<esc>.xml``, its autostart link
  re-made, then the old link and the old file are removed. Which layout a file is in is decided by
  the ``<name>`` inside it (``a%25.xml`` is domain ``a%`` in the new layout, ``a%25`` in the old),
  so this needs no marker; files are processed longest name first, so a target still holding an old
  file of another domain has been vacated before it is written.
- A runtime record becomes ``<run_dir>/<id>/record.json``, carrying the paths the running VMM was
  given (its control socket, exit file ... stay where they are until it ends: a process's paths
  cannot be changed under it), then the old record is removed. Leftovers of ended VMMs are removed
  by the daemon's usual start-up clean-up.
- Logs are renamed (never overwritten) once; ``<log_dir>/.mshv-layout`` records that, because a log
  name alone cannot tell the layouts apart (``x.serial.log`` is domain ``x.serial``'s new log).

Every step is idempotent, and an old file is removed only after its replacement is durable, so a
SIGKILL anywhere leaves a state the next start completes. Test-only hook: with
``MSHV_LIBVIRT_TEST_KILL_AT_MIGRATION_STEP=N`` the daemon SIGKILLs itself just before step N.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

from lxml import etree

from mshv_libvirt.atomicfile import fsync_dir, remove_durable, write_atomic

from . import layout
from .store import ConfigStore
from .vmm_client import VmmFiles

log = logging.getLogger(__name__)

KILL_AT_STEP_ENV = "MSHV_LIBVIRT_TEST_KILL_AT_MIGRATION_STEP"
_RECORD_KEYS = {"name": str, "id": int, "state": int, "reason": int, "xml": str}


class _Steps:
    def __init__(self) -> None:
        raw = os.environ.get(KILL_AT_STEP_ENV, "")
        self.kill_at = int(raw) if raw.isdigit() else 0
        self.done = 0

    def __call__(self, what: str) -> None:
        if self.done + 1 == self.kill_at:
            log.warning("test hook %s: SIGKILL before migration step %d (%s)", KILL_AT_STEP_ENV, self.kill_at, what)
            os.kill(os.getpid(), signal.SIGKILL)
        self.done += 1
        log.info("layout migration step %d: %s", self.done, what)


def migrate_legacy_layout(config_dir: Path, run_dir: Path, log_dir: Path) -> int:
    """Bring the directories to the current layout; returns the number of steps taken."""
    step = _Steps()
    names = _migrate_configs(config_dir, step)
    names |= _migrate_records(run_dir, log_dir, step)
    _migrate_logs(log_dir, names, step)
    return step.done


# -- configs --------------------------------------------------------------------------------------


def _xml_name(path: Path) -> str | None:
    """The <name> in a config file (no validation: only used to tell the layouts apart)."""
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)
    try:
        root = etree.parse(str(path), parser).getroot()
    except (OSError, etree.XMLSyntaxError):
        return None
    el = root.find("name")
    return el.text if el is not None else None


def _migrate_configs(config_dir: Path, step: _Steps) -> set[str]:
    """Returns the names of all defined domains (for the log migration)."""
    names: set[str] = set()
    legacy: list[tuple[str, Path]] = []
    for entry in config_dir.iterdir():
        if not entry.name.endswith(".xml") or entry.is_symlink() or not entry.is_file():
            continue
        stem = entry.name[: -len(".xml")]
        decoded = layout.unescape_name(stem)
        if decoded == stem:
            names.add(stem)  # an ordinary name: the same file in both layouts
            continue
        name = _xml_name(entry)
        if name == stem:
            legacy.append((stem, entry))
        elif name is not None and name == decoded:
            names.add(name)
        # else: a file that names another domain; the loader reports it
    store = ConfigStore(config_dir)
    for name, entry in sorted(legacy, key=lambda item: (-len(item[0].encode()), item[0])):
        if _migrate_config(store, name, entry, step):
            names.add(name)
    return names


def _migrate_config(store: ConfigStore, name: str, old: Path, step: _Steps) -> bool:
    target = store.path(name)
    if len(target.name.encode()) > layout.NAME_MAX:
        log.error("cannot migrate %s: the escaped file name of domain %r exceeds NAME_MAX; left as it is", old, name)
        return False
    if target.exists() and _xml_name(target) != name:
        log.error("cannot migrate %s: %s holds another domain's config; left as it is", old, target)
        return False
    step(f"config of {name!r} -> {target.name}")
    write_atomic(target, old.read_bytes())
    old_link = store.autostart_dir / old.name
    if old_link.is_symlink():
        step(f"autostart link of {name!r}")
        store.set_autostart(name, True)
        step(f"remove old autostart link {old_link.name}")
        remove_durable(old_link)
    step(f"remove old config {old.name}")
    remove_durable(old)
    return True


# -- runtime records ------------------------------------------------------------------------------


def _legacy_record(path: Path) -> dict[str, Any] | None:
    try:
        raw = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or "memory_bytes" in raw:  # a VMM config, not a record
        return None
    for key, kind in _RECORD_KEYS.items():
        if not isinstance(raw.get(key), kind) or isinstance(raw.get(key), bool):
            return None
    name = raw["name"]
    if not name or "/" in name or not 1 <= raw["id"] <= layout.MAX_DOMAIN_ID:
        return None
    return raw


def legacy_files(run_dir: Path, log_dir: Path, dom_id: int, name: str) -> VmmFiles:
    """The files of a VMM an earlier version started (its logs as this migration renames them)."""
    return VmmFiles(
        dir=layout.runtime_dir(run_dir, dom_id),
        config=run_dir / f"{name}.vmm.json",
        control=run_dir / f"{name}.ctl",
        pidfile=run_dir / f"{name}.pid",
        exit_file=run_dir / f"{name}.exit",
        serial_log=layout.serial_log(log_dir, name),
        stderr_log=layout.vmm_log(log_dir, name),
    )


def _free_id(run_dir: Path, want: int, uuid: object) -> int:
    """``want`` unless its runtime directory holds another domain's record (a downgrade came between)."""
    record = layout.runtime_dir(run_dir, want) / layout.RECORD
    try:
        held = json.loads(record.read_bytes()).get("uuid")
    except (OSError, ValueError, AttributeError):
        return want
    if held == uuid:
        return want
    ids = [i for i in (layout.runtime_dir_id(e) for e in os.listdir(run_dir)) if i is not None]
    return max(ids, default=0) + 1


def _migrate_records(run_dir: Path, log_dir: Path, step: _Steps) -> set[str]:
    names: set[str] = set()
    for entry in sorted(run_dir.iterdir()):
        if not entry.name.endswith(".json") or entry.is_symlink() or not entry.is_file():
            continue
        raw = _legacy_record(entry)
        if raw is None:
            continue
        name = raw["name"]
        dom_id = _free_id(run_dir, raw["id"], raw.get("uuid"))
        files = legacy_files(run_dir, log_dir, dom_id, name)
        step(f"runtime record of {name!r} -> {files.record.relative_to(run_dir)}")
        files.dir.mkdir(mode=0o700, exist_ok=True)
        fsync_dir(run_dir)
        write_atomic(files.record, json.dumps({**raw, "id": dom_id, "files": files.to_json()}).encode())
        step(f"remove old runtime record {entry.name}")
        remove_durable(entry)
        names.add(name)
    return names


# -- logs -----------------------------------------------------------------------------------------


def _rename(src: Path, dst: Path, step: _Steps) -> None:
    if not src.is_file() or src.is_symlink() or dst.exists() or len(dst.name.encode()) > layout.NAME_MAX:
        return
    step(f"log {src.name} -> {dst.relative_to(src.parent)}")
    dst.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.rename(src, dst)  # a VMM writing it keeps writing to it: same inode
    fsync_dir(dst.parent)
    fsync_dir(src.parent)


def _migrate_logs(log_dir: Path, names: set[str], step: _Steps) -> None:
    mark = log_dir / layout.LOG_LAYOUT_MARK
    if mark.exists():
        return
    # Serial logs first: x's old serial log x.serial.log is where domain "x.serial" keeps its VMM log now.
    for name in sorted(names):
        _rename(log_dir / f"{name}.serial.log", layout.serial_log(log_dir, name), step)
    # Longest first, as for configs: "%2Ex.log" (domain "%2Ex") must move before ".x.log" takes its place.
    for name in sorted(names, key=lambda n: (-len(n.encode()), n)):
        if layout.escape_name(name) != name:
            _rename(log_dir / f"{name}.log", layout.vmm_log(log_dir, name), step)
    step("mark the logs migrated")
    write_atomic(mark, b"2\n", mode=0o644)
