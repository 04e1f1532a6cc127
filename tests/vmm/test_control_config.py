"""Config parsing, the control socket server (real UNIX socket, selector loop) and the exit file."""

from __future__ import annotations

import json
import queue
import selectors
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mshv_libvirt.atomicfile import write_atomic
from mshv_libvirt.vmm.config import ConfigError, VmmConfig
from mshv_libvirt.vmm.control import CommandError, ControlServer

BASE: dict[str, Any] = {"name": "vm1", "memory_bytes": 64 << 20, "kernel": "/k"}
BAD: list[tuple[dict[str, Any], str]] = [
    ({"memory_bytes": 4096}, "memory_bytes"),
    ({"vcpus": 0}, "vcpus"),
    ({"vcpus": True}, "vcpus"),
    ({"on_reboot": "rename-restart"}, "on_reboot"),
    ({"on_poweroff": "restart"}, "on_poweroff"),  # restarts after a power-off are the driver's job
    ({"on_crash": "restart"}, "on_crash"),
    ({"on_crash": True}, "on_crash"),
    ({"kernel": 5}, "kernel"),
]


def test_config_defaults_and_validation(tmp_path: Path) -> None:
    cfg = VmmConfig.from_dict(dict(BASE))
    assert (cfg.vcpus, cfg.acpi, cfg.on_reboot, cfg.start_paused, cfg.initrd) == (
        1,
        True,
        "restart",
        False,
        None,
    )
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**BASE, "vcpus": 2, "initrd": None, "on_reboot": "destroy"}))
    assert VmmConfig.load(path).vcpus == 2
    assert (cfg.on_poweroff, cfg.on_crash) == ("destroy", "destroy")
    preserve = VmmConfig.from_dict({**BASE, "on_reboot": "preserve", "on_poweroff": "preserve", "on_crash": "preserve"})
    assert (preserve.on_reboot, preserve.on_poweroff, preserve.on_crash) == ("preserve",) * 3
    for bad, match in BAD:
        with pytest.raises(ConfigError, match=match):
            VmmConfig.from_dict({**BASE, **bad})
    with pytest.raises(ConfigError, match="required"):
        VmmConfig.from_dict({"name": "x"})
    path.write_text("[1]")
    with pytest.raises(ConfigError, match="JSON object"):
        VmmConfig.load(path)


def test_exit_file_is_replaced_atomically(tmp_path: Path) -> None:
    target = tmp_path / "exit.json"
    write_atomic(target, b'{"reason": "shutdown"}', mode=0o644)
    assert json.loads(target.read_text()) == {"reason": "shutdown"}
    assert [p.name for p in tmp_path.iterdir()] == ["exit.json"]


class Loop:
    """Runs a ControlServer's selector in a thread, as the VMM main loop does."""

    def __init__(self, path: Path) -> None:
        self.selector = selectors.DefaultSelector()
        self.calls: list[str] = []
        self.server = ControlServer(str(path), self.handle, self.selector)
        self.stop = threading.Event()
        self.calls_in_loop: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self.run)
        self.thread.start()

    def handle(self, cmd: str, request: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(cmd)
        if cmd == "status":
            return {"state": "running"}
        if cmd == "boom":
            raise CommandError("operation failed: boom")
        raise CommandError(f"unknown command {cmd!r}")

    def run(self) -> None:
        while not self.stop.is_set():
            for key, mask in self.selector.select(timeout=0.02):
                key.data(mask)
            while not self.calls_in_loop.empty():
                self.calls_in_loop.get()()

    def broadcast(self, event: dict[str, Any]) -> None:
        """Like the VMM, only ever touch the server from its loop thread."""
        done = threading.Event()

        def call() -> None:
            self.server.broadcast(event)
            done.set()

        self.calls_in_loop.put(call)
        assert done.wait(5)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.server.close()


def connect(path: Path) -> Any:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    sock.settimeout(5)
    return sock, sock.makefile("rb")


def test_control_round_trips_errors_and_events(tmp_path: Path) -> None:
    path = tmp_path / "vm.ctl"
    loop = Loop(path)
    try:
        assert path.stat().st_mode & 0o777 == 0o600
        a, a_in = connect(path)
        b, b_in = connect(path)
        a.sendall(b'{"id": 1, "cmd": "status"}\n{"id": 2, "cmd": "boom"}\n')
        assert json.loads(a_in.readline()) == {"id": 1, "ok": True, "result": {"state": "running"}}
        assert json.loads(a_in.readline()) == {"id": 2, "ok": False, "error": "operation failed: boom"}
        a.sendall(b"not json\n")
        reply = json.loads(a_in.readline())
        assert reply["ok"] is False and reply["error"].startswith("invalid request")
        a.sendall(b'{"id": 3}\n')
        assert "'cmd'" in json.loads(a_in.readline())["error"]
        # split writes are reassembled into one line
        b.sendall(b'{"id": 9, "cm')
        b.sendall(b'd": "status"}\n')
        assert json.loads(b_in.readline())["id"] == 9
        loop.broadcast({"event": "paused"})
        assert json.loads(a_in.readline()) == {"event": "paused"}
        assert json.loads(b_in.readline()) == {"event": "paused"}
        # a client going away does not disturb the others
        a.close()
        loop.broadcast({"event": "resumed"})
        assert json.loads(b_in.readline()) == {"event": "resumed"}
        b.close()
    finally:
        loop.close()
    assert not path.exists()


def test_control_replaces_a_stale_socket(tmp_path: Path) -> None:
    path = tmp_path / "vm.ctl"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    loop = Loop(path)
    try:
        sock, reader = connect(path)
        sock.sendall(b'{"id": 1, "cmd": "status"}\n')
        assert json.loads(reader.readline())["ok"] is True
        sock.close()
    finally:
        loop.close()


def test_rng_config() -> None:
    cfg = VmmConfig.from_dict({**BASE, "rng": [{"slot": 2}, {"slot": 5, "backend": "/dev/random", "rate_bytes": 64}]})
    assert [(r.slot, r.backend, r.rate_bytes, r.rate_period_ms, r.fd) for r in cfg.rng] == [
        (2, "/dev/urandom", None, 1000, None),
        (5, "/dev/random", 64, 1000, None),
    ]
    for bad, match in (
        ({"rng": [{"slot": 0}]}, "slot between 1 and 31"),
        ({"rng": [{"slot": 32}]}, "slot between 1 and 31"),
        ({"rng": [{"slot": True}]}, "slot between 1 and 31"),
        ({"rng": [{"slot": 2, "backend": "/dev/hwrng"}]}, "one of /dev/urandom, /dev/random"),
        ({"rng": [{"slot": 2, "rate_bytes": 0}]}, "rng.rate_bytes' must be an integer of at least 1"),
        ({"rng": [{"slot": 2, "rate_period_ms": -1}]}, "rng.rate_period_ms"),
        ({"rng": [{"slot": 2, "colour": "red"}]}, "list of objects"),
        ({"rng": [{"slot": 2}, {"slot": 2}]}, "two devices in one PCI slot"),
        ({"rng": {"slot": 2}}, "wrong type"),
    ):
        with pytest.raises(ConfigError, match=match):
            VmmConfig.from_dict({**BASE, **bad})
