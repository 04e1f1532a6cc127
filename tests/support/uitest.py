"""Drive a GTK application (virt-manager) through its UI, as upstream's uitests do, with the project's own
small harness: Xvfb, a private D-Bus session bus and the AT-SPI bus with its registry, all started here
and ended by the pids started; the application on that display and bus; and dogtail under Debian's
/usr/bin/python3 (tests/support/uitest_driver.py), which answers JSON-line requests from the test.

Needs Debian's xvfb, dbus-daemon, at-spi2-core and python3-dogtail (scripts/install-deps.sh).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SYSTEM_PYTHON = "/usr/bin/python3"
XVFB = shutil.which("Xvfb")
DBUS_DAEMON = shutil.which("dbus-daemon")
AT_SPI_LAUNCHER = "/usr/libexec/at-spi-bus-launcher"
DRIVER = Path(__file__).with_name("uitest_driver.py")

# A screenshot without ImageMagick: GDK from the same gir packages the application uses.
GDK_SCREENSHOT = """
import sys
import gi
gi.require_version("Gdk", "3.0")
from gi.repository import Gdk
root = Gdk.get_default_root_window()
pixbuf = Gdk.pixbuf_get_from_window(root, 0, 0, root.get_width(), root.get_height())
pixbuf.savev(sys.argv[1], "png", [], [])
"""


def missing_tools() -> list[str]:
    """What this harness needs and does not find, by Debian package."""
    missing = []
    if XVFB is None:
        missing.append("xvfb (Xvfb)")
    if DBUS_DAEMON is None:
        missing.append("dbus-daemon")
    if not os.access(AT_SPI_LAUNCHER, os.X_OK):
        missing.append(f"at-spi2-core ({AT_SPI_LAUNCHER})")
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import dogtail, pyatspi"], capture_output=True, stdin=subprocess.DEVNULL, timeout=60
    )
    if probe.returncode != 0:
        missing.append("python3-dogtail (import dogtail under /usr/bin/python3)")
    return missing


def stop(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL, to the process group started for ``proc`` (start_new_session)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _read_line(fd: int, what: str, log: Path) -> str:
    line = b""
    with os.fdopen(fd, "rb") as r:
        while not line.endswith(b"\n"):
            chunk = r.read(1)
            if not chunk:
                raise AssertionError(f"{what} did not report its address:\n{log.read_text(errors='replace')}")
            line += chunk
    return line.decode().strip()


def _popen_reporting(cmd: list[str], wfd: int, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            pass_fds=(wfd,),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    os.close(wfd)
    return proc


class Desktop:
    """A display and a session bus with the accessibility bus on it; ``env`` is what clients get."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = root / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self._procs: list[subprocess.Popen[bytes]] = []
        base = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "XDG_", "DBUS_"))}
        base.pop("WAYLAND_DISPLAY", None)
        base.pop("NO_AT_BRIDGE", None)
        base.update(
            HOME=str(self.home),
            XDG_CACHE_HOME=str(self.home / ".cache"),
            XDG_CONFIG_HOME=str(self.home / ".config"),
            XDG_DATA_HOME=str(self.home / ".local" / "share"),
            XDG_RUNTIME_DIR=str(self._runtime_dir()),
            GSETTINGS_BACKEND="memory",  # no dconf service needed
            GDK_BACKEND="x11",
            GTK_A11Y="atspi",
        )
        self.env = base

    def _runtime_dir(self) -> Path:
        path = self.root / "run"
        path.mkdir(mode=0o700, exist_ok=True)
        return path

    def start(self) -> None:
        assert XVFB is not None and DBUS_DAEMON is not None
        # Xvfb picks its own display number (-displayfd): parallel runs never collide.
        rfd, wfd = os.pipe()
        log = self.root / "xvfb.log"
        cmd = [XVFB, "-displayfd", str(wfd), "-screen", "0", "1280x800x24", "-nolisten", "tcp"]
        self._procs.append(_popen_reporting(cmd, wfd, log))
        self.env["DISPLAY"] = f":{int(_read_line(rfd, 'Xvfb', log))}"
        rfd, wfd = os.pipe()
        log = self.root / "dbus.log"
        cmd = [DBUS_DAEMON, "--session", "--nofork", "--nopidfile", f"--print-address={wfd}"]
        self._procs.append(_popen_reporting(cmd, wfd, log, self.env))
        self.env["DBUS_SESSION_BUS_ADDRESS"] = _read_line(rfd, "dbus-daemon", log)
        # The accessibility bus (its own dbus-daemon, which starts the registry on demand), started now
        # rather than by D-Bus activation so that it is ours to end.
        with open(self.root / "at-spi.log", "wb") as out:
            self._procs.append(
                subprocess.Popen(
                    [AT_SPI_LAUNCHER, "--launch-immediately"],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=self.env,
                    start_new_session=True,
                )
            )
        self._wait_a11y_bus()

    def _wait_a11y_bus(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        cmd = [SYSTEM_PYTHON, "-c", A11Y_PROBE]
        while True:
            res = subprocess.run(cmd, env=self.env, capture_output=True, stdin=subprocess.DEVNULL, timeout=30)
            if res.returncode == 0:
                return
            if time.monotonic() > deadline:
                logs = (self.root / "at-spi.log").read_text(errors="replace")
                raise AssertionError(f"the AT-SPI bus did not come up: {res.stderr.decode()[-2000:]}\n{logs}")
            time.sleep(0.2)

    def screenshot(self, path: Path) -> Path:
        res = subprocess.run(
            [SYSTEM_PYTHON, "-c", GDK_SCREENSHOT, str(path)],
            env=self.env,
            capture_output=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert res.returncode == 0 and path.stat().st_size > 0, res.stderr.decode(errors="replace")
        return path

    def close(self) -> None:
        for proc in reversed(self._procs):
            stop(proc)
        self._procs.clear()


# The session bus knows the accessibility bus and the registry answers on it.
A11Y_PROBE = """
import gi
gi.require_version("Atspi", "2.0")
from gi.repository import Atspi
desktop = Atspi.get_desktop(0)
assert desktop is not None and desktop.get_name() == "main", desktop
"""


class Ui:
    """The test's end of uitest_driver.py: each call is one request, the reply or an AssertionError."""

    def __init__(self, desktop: Desktop, app: str) -> None:
        self.desktop = desktop
        self.app = app
        self.log = desktop.root / "dogtail.stderr"
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                [SYSTEM_PYTHON, str(DRIVER)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=desktop.env,
                start_new_session=True,
            )

    def request(self, op: str, *path: dict[str, Any], timeout: float = 60, **args: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        req = {"op": op, "app": self.app, "path": list(path), "timeout": timeout, **args}
        self.proc.stdin.write(json.dumps(req).encode() + b"\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()  # the driver's own timeout bounds this
        if not line:
            raise AssertionError(f"the dogtail driver died:\n{self.log.read_text(errors='replace')[-3000:]}")
        reply = json.loads(line)
        if not reply["ok"]:
            raise AssertionError(f"{op} {path}: {reply['error']}")
        return reply["result"]

    def find(self, *path: dict[str, Any], **args: Any) -> dict[str, Any]:
        result: dict[str, Any] = self.request("find", *path, **args)
        return result

    def click(self, *path: dict[str, Any], **args: Any) -> dict[str, Any]:
        result: dict[str, Any] = self.request("click", *path, sensitive=True, **args)
        return result

    def set_text(self, *path: dict[str, Any], text: str, **args: Any) -> dict[str, Any]:
        """Replace an entry's text through AT-SPI (typing can lose a first keystroke while focus moves)."""
        result: dict[str, Any] = self.request("settext", *path, text=text, **args)
        return result

    def exists(self, *path: dict[str, Any]) -> dict[str, Any] | None:
        """The node as it is now (one look, no waiting), or None."""
        result: dict[str, Any] | None = self.request("exists", *path)
        return result

    def texts(self, *path: dict[str, Any], **args: Any) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.request("texts", *path, **args)
        return result

    def keys(self, *path: dict[str, Any], text: str = "", press: tuple[str, ...] = (), **args: Any) -> dict[str, Any]:
        result: dict[str, Any] = self.request("keys", *path, text=text, press=list(press), **args)
        return result

    def shown(self, *path: dict[str, Any]) -> list[str]:
        """What is on screen under ``path``: the names and texts of its showing nodes, in tree order."""
        out: list[str] = []
        for n in self.texts(*path):
            for v in (n["name"], n["text"]) if n["showing"] else ():
                if v and v not in out:
                    out.append(v)
        return out

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            stop(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def node(role: str | None = None, name: str | dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    """One step of a path: the first descendant with this role and name."""
    step: dict[str, Any] = dict(extra)
    if role is not None:
        step["role"] = role
    if name is not None:
        step["name"] = name
    return step


@contextlib.contextmanager
def desktop(root: Path) -> Iterator[Desktop]:
    d = Desktop(root)
    try:
        d.start()
        yield d
    finally:
        d.close()
