"""ConfigStore is crash-safe: a SIGKILL at any point of save/delete leaves the old config or the new one."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
from pathlib import Path

from mshv_libvirt.atomicfile import TMP_MARK
from mshv_libvirt.domain import parse_domain_xml
from mshv_libvirt.driver.store import ConfigStore
from tests.support.waits import jitter

UUID = "6f0c3a52-1c7e-4d55-9a0e-2f4d8c1b7a10"


def config(variant: str) -> str:
    # Two sizes so that a torn write of either is detectable (and the longer one spans several pages).
    padding = "" if variant == "A" else "<!--" + "x" * 20000 + "-->"
    return f"""<domain type='hyperv'>
  <name>crashy</name><uuid>{UUID}</uuid>
  <description>variant {variant}</description>{padding}
  <memory unit='MiB'>{64 if variant == "A" else 128}</memory>
  <vcpu>{1 if variant == "A" else 2}</vcpu>
  <os><type arch='x86_64'>hvm</type><kernel>/boot/{variant}</kernel></os>
</domain>
"""


CHILD = r"""
import sys
from pathlib import Path
from mshv_libvirt.driver.store import ConfigStore

store = ConfigStore(Path(sys.argv[1]))
store.ensure()
a, b = Path(sys.argv[2]).read_text(), Path(sys.argv[3]).read_text()
i = 0
while True:
    store.save("crashy", a if i % 2 == 0 else b)
    store.set_autostart("crashy", i % 3 == 0)
    if i % 5 == 4:
        store.delete("crashy")
    if i == 0:
        sys.stdout.write("ready\n")
        sys.stdout.flush()
    i += 1
"""


def test_sigkill_during_save_and_delete_never_leaves_a_broken_config(tmp_path: Path) -> None:
    a_file, b_file = tmp_path / "a.xml", tmp_path / "b.xml"
    a_file.write_text(config("A"))
    b_file.write_text(config("B"))
    want = {config("A"), config("B")}
    parsed = {parse_domain_xml(x) for x in want}
    assert len(parsed) == 2
    store_dir = tmp_path / "etc"
    rng = random.Random(1234)
    outcomes = {"A": 0, "B": 0, "absent": 0}
    for _ in range(50):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(store_dir), str(a_file), str(b_file)], stdout=subprocess.PIPE
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == b"ready\n"
            jitter(rng, 0, 0.03)  # where the kill lands
        finally:
            child.kill()
            child.wait()
        store = ConfigStore(store_dir)
        path = store.path("crashy")
        if path.exists():
            text = path.read_text()
            assert text in want, f"torn config ({len(text)} bytes)"
            assert parse_domain_xml(text) in parsed
            outcomes["A" if "variant A" in text else "B"] += 1
        else:
            outcomes["absent"] += 1
        loaded = store.load_all()  # also sweeps the temporaries a kill left behind
        assert set(loaded) <= {"crashy"} and all(x in want for x in loaded.values())
        assert not list(store_dir.glob(f"{TMP_MARK}*"))
        link = store.autostart_dir / "crashy.xml"
        assert not link.exists() or link.resolve() == path.resolve()
    print("store kill outcomes:", outcomes)
    assert outcomes["A"] + outcomes["B"] > 0


def test_concurrent_saves_of_one_name_do_not_collide(tmp_path: Path) -> None:
    """Saves run in worker threads of one process: their temporaries must not be shared."""
    store = ConfigStore(tmp_path)
    store.ensure()
    errors: list[BaseException] = []
    texts = [config("A"), config("B")]

    def worker(i: int) -> None:
        try:
            for j in range(100):
                store.save("crashy", texts[(i + j) % 2])
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.path("crashy").read_text() in texts
    assert not list(tmp_path.glob(f"{TMP_MARK}*"))
