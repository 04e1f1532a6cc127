"""Persistent domain configs, laid out like libvirt's: ``<config_dir>/<esc>.xml`` and autostart links.

``<esc>`` is the escaped name (``layout.escape_name``: the name itself for ordinary names). Every
write goes to a temporary sibling, is fsynced, renamed over the target and the directory is fsynced:
a crash (even SIGKILL) at any point leaves the old file or the new one, never a torn one. Leftover
temporaries from such a crash are ignored and swept on load; no config can look like one.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from mshv_libvirt.atomicfile import fsync_dir, remove_durable, sweep_temporaries, tmp_sibling, write_atomic

from . import layout

log = logging.getLogger(__name__)


class ConfigStore:
    def __init__(self, config_dir: Path) -> None:
        self.dir = config_dir
        self.autostart_dir = config_dir / layout.AUTOSTART

    def ensure(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.autostart_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path(self, name: str) -> Path:
        return layout.config_file(self.dir, name)

    def _link(self, name: str) -> Path:
        return layout.autostart_link(self.dir, name)

    def load_all(self) -> dict[str, str]:
        """name -> XML text of every defined domain; stale temporaries are removed."""
        out: dict[str, str] = {}
        for entry in sorted(self.dir.glob("*.xml")):
            name = layout.unescape_name(entry.name[: -len(".xml")])
            if name is None:
                log.error("ignoring %s: not the file name of any domain name", entry)
                continue
            out[name] = entry.read_text()
        sweep_temporaries(self.dir)
        sweep_temporaries(self.autostart_dir)
        return out

    def save(self, name: str, xml: str) -> None:
        write_atomic(self.path(name), xml.encode())

    def delete(self, name: str) -> None:
        self.set_autostart(name, False)
        remove_durable(self.path(name))

    def autostart(self, name: str) -> bool:
        return self._link(name).is_symlink()

    def set_autostart(self, name: str, on: bool) -> None:
        link = self._link(name)
        if on:
            if not link.is_symlink():
                self.autostart_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                tmp = tmp_sibling(link)
                tmp.symlink_to(self.path(name))
                try:
                    os.replace(tmp, link)
                except BaseException:
                    with contextlib.suppress(OSError):
                        tmp.unlink()
                    raise
                fsync_dir(self.autostart_dir)
        else:
            remove_durable(link)
