"""domrename is crash-safe: a SIGKILL at any moment of the move leaves, once the next daemon has started, exactly
one config of the domain (old name or new), its autostart link with it, and no journal."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

from mshv_libvirt.domain import parse_domain_xml
from mshv_libvirt.driver.manager import DomainManager, Paths
from tests.support.waits import jitter

UUID = "0b7c2d3e-4f50-4a61-8b72-9c83d4e5f607"


def config(name: str) -> str:
    return f"""<domain type='hyperv'>
  <name>{name}</name><uuid>{UUID}</uuid>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64'>hvm</type><kernel>/boot/k</kernel></os>
</domain>
"""


# The real rename code (what DomainManager.rename runs in its worker thread), back and forth, until killed.
CHILD = r"""
import sys, uuid
from pathlib import Path
from mshv_libvirt.domain import parse_domain_xml
from mshv_libvirt.driver.manager import DomainManager, Paths

root = Path(sys.argv[1])
m = DomainManager(Paths(root / "etc", root / "run", root / "log"))
m.store.ensure()
names = ("left", "right")
xml = {n: parse_domain_xml(Path(sys.argv[2 + i]).read_text()).xml for i, n in enumerate(names)}
now = next(n for n in names if m.store.path(n).exists())
i = 0
while True:
    new = names[1 - names.index(now)]
    m._move_config(uuid.UUID(sys.argv[4]), now, new, xml[new])
    now = new
    if i == 0:
        sys.stdout.write("ready\n")
        sys.stdout.flush()
    i += 1
"""


def test_sigkill_during_rename_leaves_exactly_one_domain(tmp_path: Path) -> None:
    files = []
    for name in ("left", "right"):
        f = tmp_path / f"{name}.src.xml"
        f.write_text(config(name))
        files.append(str(f))
    paths = Paths(tmp_path / "etc", tmp_path / "run", tmp_path / "log")
    first = DomainManager(paths)
    first.store.ensure()
    first.store.save("left", parse_domain_xml(config("left")).xml)
    first.store.set_autostart("left", True)
    rng = random.Random(4321)
    outcomes = {"left": 0, "right": 0, "mid-rename": 0}
    for _ in range(40):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), *files, UUID], stdout=subprocess.PIPE)
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == b"ready\n"
            jitter(rng, 0, 0.05)  # where the kill lands
        finally:
            child.kill()
            child.wait()
        # What a daemon starting now does before reading the configs.
        m = DomainManager(paths)
        if list(paths.config_dir.glob(".rename-*")):
            outcomes["mid-rename"] += 1
        m._finish_renames()
        loaded = m.store.load_all()
        assert len(loaded) == 1, sorted(loaded)
        ((name, text),) = loaded.items()
        cfg = parse_domain_xml(text)
        assert cfg.name == name and str(cfg.uuid) == UUID
        assert m.store.autostart(name) and not m.store.autostart("right" if name == "left" else "left")
        assert (m.store.autostart_dir / f"{name}.xml").resolve() == m.store.path(name).resolve()
        assert not list(paths.config_dir.glob(".rename-*"))
        outcomes[name] += 1
    print("rename kill outcomes:", outcomes)
    assert outcomes["left"] and outcomes["right"] and outcomes["mid-rename"]  # kills landed inside a rename
