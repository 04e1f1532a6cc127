"""libvirt-python's default event loop, run once per test process (callbacks need it)."""

from __future__ import annotations

import threading

import libvirt

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
