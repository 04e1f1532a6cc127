"""libvirt-python's default event loop, run once per test process (callbacks need it)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import libvirt

from tests.support.waits import assert_quiet, wait_for

_started = False
_lock = threading.Lock()


def ensure_event_loop() -> None:
    global _started
    with _lock:
        if _started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, daemon=True, name="libvirt-events").start()
        _started = True


REBOOT = "reboot"  # VIR_DOMAIN_EVENT_ID_REBOOT, in the same ordered list as the lifecycle events
Seen = tuple[int, int] | str  # (event, detail) of a lifecycle event, or REBOOT


class DomainEvents:
    """Lifecycle (and, with ``reboot``, reboot) events of every domain, in the order a libvirt-python
    client receives them: on ``conn`` when given, else on a connection of its own to ``uri``."""

    def __init__(self, conn: libvirt.virConnect | None = None, *, uri: str | None = None, reboot: bool = False) -> None:
        assert (conn is None) != (uri is None), "a connection or a URI"
        ensure_event_loop()
        self.uri = uri
        self._reboot = reboot
        self._lock = threading.Lock()
        self._seen: list[tuple[str, Seen]] = []
        self._own = conn is None
        self.conn = conn if conn is not None else libvirt.open(uri)
        self._register()

    def _register(self) -> None:
        self._cbs = [self.conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on, None)]
        if self._reboot:
            self._cbs.append(
                self.conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_REBOOT, self._on_reboot, None)
            )

    def _on(self, _conn: object, dom: libvirt.virDomain, event: int, detail: int, _opaque: object) -> None:
        with self._lock:
            self._seen.append((dom.name(), (event, detail)))

    def _on_reboot(self, _conn: object, dom: libvirt.virDomain, _opaque: object) -> None:
        with self._lock:
            self._seen.append((dom.name(), REBOOT))

    @property
    def seen(self) -> list[tuple[str, int, int]]:
        """Every lifecycle event so far as (domain name, event, detail)."""
        with self._lock:
            return [(n, s[0], s[1]) for n, s in self._seen if not isinstance(s, str)]

    def of(self, name: str) -> list[Seen]:
        with self._lock:
            return [s for n, s in self._seen if n == name]

    def wait(self, expected: list[tuple[str, int, int]], timeout: float = 10) -> None:
        """Exactly ``expected`` (all domains' lifecycle events), and nothing more for a moment."""
        self._expect("every domain", lambda: self.seen, expected, timeout)

    def wait_domain(self, name: str, expected: list[Seen], timeout: float = 10) -> None:
        """Exactly ``expected`` for domain ``name``, and nothing more for a moment."""
        self._expect(name, lambda: self.of(name), expected, timeout)

    @staticmethod
    def _expect(label: object, read: Callable[[], list[Any]], expected: list[Any], timeout: float) -> None:
        try:
            wait_for(lambda: len(read()) >= len(expected), timeout=timeout)
            assert_quiet(lambda: len(read()) <= len(expected), 0.2, "no event follows those expected")
        except AssertionError as err:
            raise AssertionError(f"events of {label}: {read()}, expected {expected} ({err})") from None
        assert read() == expected

    def reconnect(self) -> None:
        """After a daemon restart: a new connection; what was seen so far is forgotten."""
        assert self._own, "only a recorder with its own connection reconnects"
        self.close()
        with self._lock:
            self._seen.clear()
        self.conn = libvirt.open(self.uri)
        self._register()

    def close(self) -> None:
        for cb in self._cbs:
            with contextlib.suppress(libvirt.libvirtError):
                self.conn.domainEventDeregisterAny(cb)
        if self._own:
            with contextlib.suppress(libvirt.libvirtError):
                self.conn.close()
