"""Migration of the old on-disk layout at daemon start, SIGKILLed at every step (issue 19 item 2).

The old layout (every file named after the domain, see driver/migrate.py) is built here as the
previous version left it, with real VMMs started the way it started them: running and paused guests
with names that need escaping, configs whose new names are other configs' old names, an autostart
link, a domain whose VMM ended while no daemon ran, a stale temporary. For every step N the daemon
is started with the documented test hook that SIGKILLs it before step N; the next (clean) start must
then find every domain as it was, and every guest still running, re-attached.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mshv_libvirt.domain import parse_domain_xml
from mshv_libvirt.driver import layout
from mshv_libvirt.driver.migrate import KILL_AT_STEP_ENV
from mshv_libvirt.lifecycle import PausedReason, RunningReason, State
from tests.support.daemon import DaemonProcess, PtyProcess, domain_xml, virsh, vmm_processes, vmm_request_at, wait_for
from tests.support.guests import TINY_BANNER
from tests.support.procfs import process_alive
from tests.support.report import write_report

pytestmark = [pytest.mark.virsh, pytest.mark.slow]

# name -> (state in the old runtime record, virsh domstate after the migration)
RUNNING = {
    ".tmp-run": ("running", "running (booted)"),  # a name the old sweep took for a temporary
    "x.vmm": ("paused", "paused (user)"),  # its old record x.vmm.json was x's VMM config
    "plain": ("running", "running (booted)"),  # an ordinary name: its config keeps its file name
}
DEFINED = [
    ".tmp-victim",  # autostart; the old sweep deleted its config
    "a%25",  # its new file name is a%2525.xml ...
    "a%",  # ... so that a% can take a%25.xml
    "%2Etmp",  # likewise: %252Etmp.xml ...
    ".tmp",  # ... and .tmp takes %2Etmp.xml
    "x",
    "gone",  # was running; its VMM powered off while no daemon ran
]
BOOTED = [name for name, (state, _) in RUNNING.items() if state == "running"]  # (a paused one prints nothing)
UUIDS = {name: f"6d1f3c2e-0000-4000-8000-{i:012d}" for i, name in enumerate([*RUNNING, *DEFINED])}
# (virDomainState, reason) as the old record stored them
STATE = {
    "running": (int(State.RUNNING), int(RunningReason.BOOTED)),
    "paused": (int(State.PAUSED), int(PausedReason.USER)),
}
MAX_STEPS = 200


def xml_of(name: str, kernel: Path) -> str:
    return parse_domain_xml(domain_xml(name, kernel, memory_mib=32, uuid=UUIDS[name])).xml


@dataclass
class OldLayout:
    """The directories as the previous version left them, and the VMMs it started."""

    d: DaemonProcess
    kernel: Path
    vmms: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    saved: dict[Path, bytes] = field(default_factory=dict)

    @property
    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.vmms.items()}

    def build(self) -> None:
        d = self.d
        for directory in (d.config_dir / "autostart", d.run_dir):
            directory.mkdir(parents=True, exist_ok=True)
        for name in [*RUNNING, *DEFINED]:
            self.write(d.config_dir / f"{name}.xml", xml_of(name, self.kernel).encode())
        (d.config_dir / "autostart" / ".tmp-victim.xml").symlink_to(d.config_dir / ".tmp-victim.xml")
        for i, (name, (state, _)) in enumerate(RUNNING.items()):
            self.vmms[name] = self.spawn_vmm(name, paused=state == "paused")
            self.write_record(name, 10 + i, self.vmms[name].pid, state)
        # gone: its VMM wrote its exit report (the guest powered off), then no daemon took notice.
        dead = subprocess.Popen(["true"])
        dead.wait()
        self.write_record("gone", 20, dead.pid, "running")
        self.write(d.run_dir / "gone.exit", b'{"reason": "shutdown", "detail": "guest powered off"}')
        self.write(d.run_dir / "gone.vmm.json", b"{}")
        self.write(d.run_dir / "gone.serial.log", b"TINY-GUEST-UP cmdline=gone\n")
        self.write(d.config_dir / f".tmp-plain.xml.{dead.pid}.1.2", b"<domain")  # a torn temporary
        for name in BOOTED:
            wait_for(lambda n=name: TINY_BANNER in (d.run_dir / f"{n}.serial.log").read_text(errors="replace"))

    def write(self, path: Path, data: bytes) -> None:
        path.write_bytes(data)
        self.saved[path] = data

    def write_record(self, name: str, dom_id: int, pid: int, state: str) -> None:
        st, reason = STATE[state]
        record = {"name": name, "uuid": UUIDS[name], "id": dom_id, "pid": pid, "state": st, "reason": reason}
        record["xml"] = xml_of(name, self.kernel)
        self.write(self.d.run_dir / f"{name}.json", json.dumps(record).encode())

    def spawn_vmm(self, name: str, paused: bool) -> subprocess.Popen[bytes]:
        """Exactly as the previous version started a VMM: its files named after the domain, in the run dir."""
        run = self.d.run_dir
        config = {
            "name": name,
            "uuid": UUIDS[name],
            "memory_bytes": 32 << 20,
            "vcpus": 1,
            "kernel": str(self.kernel),
            "initrd": None,
            "cmdline": "console=ttyS0",
            "acpi": True,
            "on_reboot": "restart",
            "on_poweroff": "destroy",
            "on_crash": "destroy",
            "crash_dump": None,
            "start_paused": paused,
            "control_socket": str(run / f"{name}.ctl"),
            "pidfile": str(run / f"{name}.pid"),
            "exit_file": str(run / f"{name}.exit"),
            "serial_log": str(run / f"{name}.serial.log"),
        }
        (run / f"{name}.vmm.json").write_text(json.dumps(config))
        with open(run / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "mshv_libvirt.vmm", "--config", str(run / f"{name}.vmm.json")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        wait_for(lambda: (run / f"{name}.ctl").exists(), timeout=30)
        assert vmm_request_at(run / f"{name}.ctl", "status")["state"] == ("paused" if paused else "running")
        return proc

    def restore(self) -> None:
        """Back to the old layout (the VMMs never noticed: nothing of theirs moved but renamed logs)."""
        d = self.d
        log_dir = d.run_dir
        for name in [*RUNNING, *DEFINED]:
            for new, old in (
                (layout.serial_log(log_dir, name), log_dir / f"{name}.serial.log"),
                (layout.vmm_log(log_dir, name), log_dir / f"{name}.log"),
            ):
                if new.exists() and not old.exists():
                    new.rename(old)
        with contextlib.suppress(FileNotFoundError):
            (log_dir / layout.SERIAL).rmdir()
        for entry in [*d.config_dir.iterdir(), *(d.config_dir / "autostart").iterdir()]:
            if entry.is_file() or entry.is_symlink():
                entry.unlink()
        for entry in d.run_dir.iterdir():
            if layout.runtime_dir_id(entry.name) is not None:
                shutil.rmtree(entry)
        for leftover in (layout.LOG_LAYOUT_MARK, layout.DAEMON_PIDFILE):
            with contextlib.suppress(FileNotFoundError):
                (d.run_dir / leftover).unlink()
        for path, data in self.saved.items():
            path.write_bytes(data)
        (d.config_dir / "autostart" / ".tmp-victim.xml").symlink_to(d.config_dir / ".tmp-victim.xml")

    def stop_vmms(self) -> None:
        for proc in self.vmms.values():
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()


@pytest.fixture
def old_layout(kvm: None, tmp_path: Path, tiny_kernel: Path) -> Iterator[OldLayout]:
    old = OldLayout(DaemonProcess(tmp_path / "d", ("--no-autostart",)), tiny_kernel)
    try:
        old.build()
        yield old
    finally:
        old.d.stop()
        old.stop_vmms()
        old.d.destroy_all_vmms()


def check_everything_found(old: OldLayout) -> None:
    d = old.d
    everything = sorted([*RUNNING, *DEFINED])
    assert sorted(virsh(d.uri, "list", "--all", "--name").stdout.split()) == everything
    for name, (_, state) in RUNNING.items():
        assert virsh(d.uri, "domstate", "--reason", "--domain", name).stdout.strip() == state, name
        assert d.vmm_pid(name) == old.pids[name]
    for name in DEFINED:
        want = "shut off (shutdown)" if name == "gone" else "shut off (unknown)"
        assert virsh(d.uri, "domstate", "--reason", "--domain", name).stdout.strip() == want, name
    assert vmm_processes(d.run_dir) == old.pids  # every guest still running, none added
    for name in everything:
        inactive = virsh(d.uri, "dumpxml", "--inactive", "--domain", name).stdout
        assert parse_domain_xml(inactive).xml == xml_of(name, old.kernel), name  # nothing of a config lost
        autostart = virsh(d.uri, "dominfo", "--domain", name).stdout
        assert ("enable" if name == ".tmp-victim" else "disable") in autostart.split("Autostart:")[1].split("\n")[0]
    # Only the new layout's names remain: configs under their escaped names, no old record or temporary.
    assert sorted(p.name for p in d.config_dir.iterdir() if p.is_file()) == sorted(
        layout.config_file(d.config_dir, n).name for n in everything
    )
    assert [p.name for p in (d.config_dir / "autostart").iterdir()] == ["%2Etmp-victim.xml"]
    assert not [p for p in d.run_dir.glob("*.json") if not p.name.endswith(".vmm.json")]
    for name in [*BOOTED, "gone"]:
        assert TINY_BANNER in d.serial_log(name).read_text(errors="replace"), name


def test_sigkill_at_every_migration_step_loses_nothing(old_layout: OldLayout) -> None:
    old = old_layout
    d = old.d
    steps = None
    for n in range(1, MAX_STEPS + 1):
        if n > 1:
            old.restore()
        d.env = {KILL_AT_STEP_ENV: str(n)}
        try:
            d.start()
        except RuntimeError:
            assert d.proc is not None and d.proc.returncode == -signal.SIGKILL, d.log.read_text()[-2000:]
            assert f"SIGKILL before migration step {n} " in d.log.read_text()
            d.env = {}
            d.start()
        else:
            steps = n - 1  # the hook's step was never reached: this start migrated everything
        d.env = {}
        try:
            check_everything_found(old)
        except AssertionError as err:
            raise AssertionError(f"after a SIGKILL before migration step {n}: {err}") from err
        if steps is not None:
            break
        d.stop()
    assert steps is not None and steps >= 15, steps
    print(f"old layout migrated in {steps} steps; SIGKILLed before each, nothing lost")
    write_report(
        "layout_migration",
        {
            "steps": steps,
            "daemon_sigkills": steps,
            "restarts_with_domains_intact": steps + 1,
            "domains": len(RUNNING) + len(DEFINED),
            "running_guests_kept": len(RUNNING),
            "domains_lost": 0,
        },
    )

    # The migrated guests are fully managed: console, destroy (their old files go with them).
    con = PtyProcess(["virsh", "-c", d.uri, "console", "--domain", ".tmp-run"])
    try:
        con.wait_console_ready()
        con.write(b"MIGRATED-ECHO")
        con.read_until(b"MIGRATED-ECHO")
    finally:
        con.kill()
    virsh(d.uri, "resume", "x.vmm")
    for name in RUNNING:
        virsh(d.uri, "destroy", "--domain", name)
    wait_for(lambda: not any(process_alive(p) for p in old.pids.values()), timeout=15)
    assert d.runtime_leftovers() == []
    old_files = [p.name for p in d.run_dir.iterdir() if p.name.endswith((".ctl", ".pid", ".exit", ".json"))]
    assert old_files == [layout.DAEMON_PIDFILE]
    # and they start again, in the new layout
    virsh(d.uri, "start", "--domain", ".tmp-run")
    wait_for(lambda: d.serial_log(".tmp-run").read_text(errors="replace").count(TINY_BANNER) == 2)
    assert (d.runtime_dir(".tmp-run") / layout.CONTROL).is_socket()
    virsh(d.uri, "destroy", "--domain", ".tmp-run")
    d.stop()
    seen = len(d.log.read_bytes())
    d.start()  # a start with nothing to migrate takes no step
    assert b"layout migration step" not in d.log.read_bytes()[seen:]
