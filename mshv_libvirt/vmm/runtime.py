"""The VMM process: one running domain, its console, its control socket and its lifecycle.

The main thread runs a selector loop over the control socket and its clients, the console pty
and a wakeup pipe; vCPU threads only run guest code and post :class:`VmExit` records. Lifecycle
decisions (stop the vCPUs, rebuild for a reboot, write the exit file, leave) are taken here, in one
thread, so they never race each other.

Exit file reasons: ``shutdown`` (guest powered off or halted), ``reboot`` (guest reset, also a triple
fault, with on_reboot=destroy), ``crash`` (the guest reported a panic through pvpanic), ``destroyed``
(destroy command or SIGTERM/SIGINT), ``error`` (the VMM itself failed).

``inject-nmi`` raises an NMI on vCPU 0 (an interrupt request of type NMI to APIC id 0); ``send-key``
feeds scancodes to the guest through the i8042, each key held ``holdtime`` ms like QEMU's send-key:
press the keys in order one hold apart, then release them in reverse order. Key events wait in a
bounded queue served by the main loop, so the command never blocks it.

Under on_poweroff/on_reboot/on_crash = preserve the guest's ending does not end the process: every
vCPU is finished, the partition and its memory stay, ``status`` reports ``shutdown``/``crashed`` and
only ``destroy`` (or a signal) ends it, with reason ``destroyed``.

``set-link`` (``domif-setlink``) takes ``mac`` and ``up``: the virtio-net device with that MAC
changes STATUS's link bit and interrupts its driver; the state outlives a reset or reboot of the
VM. ``status`` lists each virtio-net device's counters from its compiled I/O thread (rx/tx
packets, bytes, drops: ``domifstat``).

``block-info`` asks each disk's backend (QMP) for its image's virtual and allocated size and the
highest offset written (``domblkinfo``). ``block-resize`` (``slot``, ``size`` in bytes) has the backend
resize the image (QMP block_resize), sets the device's capacity from the backend's configuration and
interrupts the driver with a config change (``blockresize``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import queue
import selectors
import signal
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mshv_libvirt.atomicfile import write_atomic
from mshv_libvirt.hv import MshvError

from . import builder, images, phases, sandbox
from .config import VmmConfig
from .console import Console
from .control import CommandError, ControlServer, JsonObject
from .vcpu import VcpuEvent, VmExit, VmExitKind, install_kick_handler

# Disks, NICs, the RNG, key presses and core dumps import their modules when a VM has them or a command
# needs them (in the main thread, which may still read the package: see sandbox.py), so a VMM starts
# without them (tests/vmm/test_startup.py counts what a start imports).
if TYPE_CHECKING:
    from . import vhost_user
    from .devices.virtio.blk import BackendInfo, Relay
    from .devices.virtio.net import VirtioNet
    from .devices.virtio.pci import VirtioPciFunction

log = logging.getLogger(__name__)

HV_X64_INTERRUPT_TYPE_NMI = 4  # hv_defs.h: an interrupt request of this type is an NMI (vector ignored)
DEFAULT_KEY_HOLD_MS = 100  # QEMU's send-key default, which libvirt relies on for holdtime 0
MAX_KEYS = 16  # VIR_DOMAIN_SEND_KEY_MAX_KEYS
MAX_KEY_EVENTS = 2 * MAX_KEYS * 32  # presses and releases of at most 32 send-key requests still to come

BuildFn = Callable[[VmmConfig, Callable[[bytes], object], Callable[[VmExit], None], bool], builder.Vm]


def _default_build(
    config: VmmConfig, write: Callable[[bytes], object], on_exit: Callable[[VmExit], None], paused: bool
) -> builder.Vm:
    return builder.build_vm(config, write, on_exit, paused=paused)


def _virtio_status(function: VirtioPciFunction) -> JsonObject:
    """A virtio-pci function's counters: doorbells that exited to the VMM, interrupts, MSI-X irqfd writes."""
    from .devices.virtio.blk import VirtioBlk
    from .devices.virtio.net import VirtioNet
    from .devices.virtio.rng import VirtioRng

    device = function.device
    status: JsonObject = {
        "device_id": device.device_id,
        "bar": function.mapped_at,
        "status": function.status,
        "notify_exits": function.notify_exits,
        "interrupts": function.interrupts,
        "irqfd": [{"gsi": line.gsi, "fired": line.fired} for line in function.lines],
    }
    if isinstance(device, VirtioBlk):
        thread = device.thread
        status.update(
            backend_pid=device.backend.pid,
            backend_alive=device.backend.alive,
            features=device.features,
            activations=device.activations,
            error=device.error,
            thread=thread.native_id if thread is not None and thread.is_alive() else None,
            capacity=device.config_read(0, 8),  # sectors, as the driver reads them
            config_generation=function.config_generation,
            relay=device.relay.stats(),
        )
    if isinstance(device, VirtioNet):
        status.update(
            mac=":".join(f"{b:02x}" for b in device.mac),
            link_up=bool(device.config_read(6, 2) & 1),  # what the driver reads in STATUS
            activations=device.activations,
            error=device.error,
            **device.stats(),
            max_queue_pairs=device.max_pairs,
            queue_pairs=device.pairs,  # running: 1 from DRIVER_OK, then what VQ_PAIRS_SET asked for
            pairs=device.pair_stats(),
            ctrl_commands=device.ctrl_commands,
            rx_mode=dict(device.rx_mode),
            config_mac=":".join(f"{b:02x}" for b in device.config_mac),
        )
    if isinstance(device, VirtioRng):
        thread = device.thread
        status.update(
            served=device.served,
            requests=device.requests,
            thread=thread.native_id if thread is not None and thread.is_alive() else None,
        )
    return status


def _dicts(value: object) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


class Vmm:
    def __init__(self, config: VmmConfig, build: BuildFn | None = None) -> None:
        self.config = config
        self._build = build or self._build_with_disks
        self._disks: dict[int, tuple[vhost_user.Backend, BackendInfo]] = {}  # by PCI slot, for the VMM's life
        self._relays: dict[int, Relay] = {}  # each disk's counters, by slot, likewise (made at the first build)
        self._selector = selectors.DefaultSelector()
        self._exits: queue.SimpleQueue[tuple[int, VmExit]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._vm: builder.Vm | None = None
        self._console: Console | None = None
        self._control: ControlServer | None = None
        self._paused = False
        self._reboot_on_shutdown = False  # set by the "reboot" command (ACPI-driven reboot)
        self._finish: tuple[str, str] | None = None
        self._preserved: str | None = None  # "shutdown" | "crashed": the guest ended, the VM is kept frozen
        self._console_watched = False
        self._generation = 0  # bumps at every rebuild so stale exits from an old VM are ignored
        self._key_events: deque[tuple[float, bytes]] = deque()  # (due on the monotonic clock, scancodes)
        self._keys_free_at = 0.0  # when the last queued key event is due: a new send-key starts after it
        self.boots = 0
        self._links: dict[str, bool] = {}  # set-link's state by MAC, kept across VM rebuilds

    # -- plumbing --------------------------------------------------------------------------------
    def _build_with_disks(
        self, config: VmmConfig, write: Callable[[bytes], object], on_exit: Callable[[VmExit], None], paused: bool
    ) -> builder.Vm:
        # Made here, on the main thread and (when sandboxed) inside the sandbox, so each relay's C thread
        # narrows its own seccomp list; kept for the VMM's life, so a rebuilt VM counts on.
        if config.disks:
            from .devices.virtio import blk
        for disk in config.disks:
            if disk.slot in self._disks and disk.slot not in self._relays:
                relay = blk.Relay(disk.queues)
                self._relays[disk.slot] = relay
                self._selector.register(relay.error_fd, selectors.EVENT_READ, self._relay_failed(disk.slot))
        return builder.build_vm(config, write, on_exit, paused=paused, disks=self._disks, relays=self._relays)

    def _relay_failed(self, slot: int) -> Callable[[int], None]:
        """A disk's relay stopped on a queue the guest (or the backend) broke: the device needs a reset."""

        def failed(_mask: int) -> None:
            from .devices.virtio.blk import VirtioBlk

            relay = self._relays[slot]
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(relay.error_fd)
            why = f"virtio-blk relay {relay.error() or 'stopped'}"
            log.error("virtio-blk slot %d: %s", slot, why)
            vm = self._vm
            for function in vm.platform.virtio if vm else []:
                if isinstance(function.device, VirtioBlk) and function.device.relay is relay:
                    function.device.error = why
                    with function.lock:
                        function.needs_reset(why)

        return failed

    def _block_stats(self, request: JsonObject) -> JsonObject:
        """Each disk's request counters (domblkstat, domstats --block), as its relay counted them since the
        VMM started: QEMU's query-blockstats fields, times in ns. With ``"sizes": true`` (domstats), also
        what a domain's block group needs of the backend, in the same answer: the capacity the device offers
        (its config, which follows block-resize) and the highest offset written to the file node (one QMP
        query; the image's allocated size is the driver's own fstat, as QEMU's actual-size is)."""
        from . import vhost_user

        sizes = request.get("sizes") is True
        disks = []
        for slot, relay in sorted(self._relays.items()):
            st = relay.stats()
            entry: JsonObject = {
                "slot": slot,
                **{k: st[k] for k in ("rd_req", "rd_bytes", "wr_req", "wr_bytes", "flush_req")},
                "rd_total_times": st["rd_total_ns"],
                "wr_total_times": st["wr_total_ns"],
                "flush_total_times": st["flush_total_ns"],
                "failed": st["rd_failed"] + st["wr_failed"] + st["flush_failed"],
            }
            if sizes and slot in self._disks:
                backend, info = self._disks[slot]
                try:
                    stats = backend.qmp("query-blockstats", **{"query-nodes": True})
                except (vhost_user.BackendError, OSError, ValueError) as err:
                    raise CommandError(f"virtio-blk in PCI slot {slot}: {err}") from err
                file = next((n["stats"] for n in _dicts(stats) if n.get("node-name") == "file0"), None)
                if not isinstance(file, dict):
                    raise CommandError(f"virtio-blk in PCI slot {slot}: the backend does not describe its image")
                entry["virtual_size"] = struct.unpack_from("<Q", info.config, 0)[0] * 512
                entry["wr_highest_offset"] = int(file["wr_highest_offset"])
            disks.append(entry)
        return {"disks": disks}

    def _block_dirty(self) -> JsonObject:
        """The guest pages (4 KiB page numbers) each disk's device wrote since the last call, by slot; cleared."""
        return {"disks": [{"slot": slot, "pages": relay.dirty()} for slot, relay in sorted(self._relays.items())]}

    def _start_disk_backends(self, cfg: VmmConfig) -> None:
        """One qemu-storage-daemon per disk, started and negotiated once; every VM build reuses it."""
        if not cfg.disks:
            return
        from . import vhost_user
        from .devices.virtio import blk

        for disk in cfg.disks:
            image = vhost_user.BlockImage(
                disk.path,
                disk.format,
                readonly=disk.readonly,
                direct=disk.cache in ("none", "directsync"),
                no_flush=disk.cache == "unsafe",
                writethrough=disk.cache in ("writethrough", "directsync"),
                aio=disk.io,
                queues=disk.queues,
                fd=disk.fd,
            )
            try:
                backend = vhost_user.Backend(image)
            except (vhost_user.BackendError, OSError) as err:
                raise builder.AttachDevicesError(f"virtio-blk in PCI slot {disk.slot}: {err}") from err
            try:
                self._disks[disk.slot] = (backend, blk.prepare(backend))
            except (vhost_user.VhostUserError, OSError) as err:
                backend.stop()
                raise builder.AttachDevicesError(f"virtio-blk in PCI slot {disk.slot}: {err}") from err
            log.info("virtio-blk slot %d: qemu-storage-daemon pid %d serves %s", disk.slot, backend.pid, disk.path)

    def _backend_ended(self, slot: int) -> Callable[[int], None]:
        """A disk's backend died under the running VM: the device needs a reset and says why; the VM runs on."""

        def ended(_mask: int) -> None:
            from .devices.virtio.blk import VirtioBlk

            backend, _ = self._disks[slot]
            self._selector.unregister(backend.pidfd)
            why = f"qemu-storage-daemon {backend.pid} for {backend.image.path} {backend.describe_end()}"
            log.error("virtio-blk slot %d: %s", slot, why)
            vm = self._vm
            for function in vm.platform.virtio if vm else []:
                if isinstance(function.device, VirtioBlk) and function.device.backend is backend:
                    function.device.error = why
                    with function.lock:
                        function.needs_reset(why)

        return ended

    def _stop_disk_backends(self) -> None:
        while self._disks:
            _, (backend, _) = self._disks.popitem()
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(backend.pidfd)
            try:
                backend.stop()
            except Exception:
                log.exception("stopping qemu-storage-daemon %d failed", backend.pid)
        while self._relays:  # the VM is gone: no ring is served any more
            _, relay = self._relays.popitem()
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(relay.error_fd)
            relay.stop()
            relay.close()

    def _post_exit(self, generation: int) -> Callable[[VmExit], None]:
        def post(exit_: VmExit) -> None:
            if generation == self._generation:
                self._exits.put((generation, exit_))
                with contextlib.suppress(BlockingIOError):
                    os.write(self._wake_w, b"x")

        return post

    def _emit(self, event: str, **fields: Any) -> None:
        log.info("event %s %s", event, fields)
        if self._control is not None:
            self._control.broadcast({"event": event, **fields})

    def _start_vm(self, paused: bool) -> None:
        assert self._console is not None
        self._generation += 1
        self._vm = self._build(self.config, self._console.write, self._post_exit(self._generation), paused)
        self._vm.platform.serial.on_rx_room = self._wake  # console input resumes as soon as the guest drains
        self._vm.platform.serial.attach_console(self._console)  # guest output to pty and log from C
        self._paused = paused
        self.boots += 1
        for net in self._nets():
            mac = ":".join(f"{b:02x}" for b in net.mac)
            if mac in self._links and self._links[mac] != net.link_up:
                net.set_link(self._links[mac], notify=False)  # a fresh device: its driver reads STATUS

    def _stop_vm(self) -> None:
        vm, self._vm = self._vm, None
        if vm is not None:
            self._generation += 1  # exits still in flight belong to the old VM
            vm.close()

    # -- lifecycle -------------------------------------------------------------------------------
    def _set_paused(self, paused: bool) -> None:
        vm = self._vm
        if vm is None:
            raise CommandError("domain is not running")
        if paused == self._paused:
            return
        event = VcpuEvent.PAUSE if paused else VcpuEvent.RESUME
        try:
            for t in vm.vcpus:
                t.request(event)  # every answer is fine: PAUSED/RESUMED, or FINISHED if it died
        except TimeoutError as err:
            raise CommandError(f"operation failed: {err}") from err
        self._paused = paused
        self._emit("paused" if paused else "resumed")

    def _preserve(self, event: str, state: str, detail: str) -> None:
        """Stop every vCPU for good but keep the VM (partition, memory, devices) for inspection."""
        vm = self._vm
        assert vm is not None
        for t in vm.vcpus:
            try:
                t.request(VcpuEvent.FINISH)  # FINISHED, also from a thread that already ended
            except TimeoutError as err:
                log.error("preserving the VM: %s", err)
        self._preserved = state
        self._paused = False
        self._reboot_on_shutdown = False
        self._emit(event, preserved=True, detail=detail)

    def _reboot(self, detail: str) -> None:
        if self.config.on_reboot == "preserve":
            self._preserve("reboot", "shutdown", detail)
            return
        if self.config.on_reboot == "destroy":
            self._emit("reboot", detail=detail)
            self._finish = ("reboot", detail)
            return
        self._stop_vm()
        self._reboot_on_shutdown = False
        # QEMU resets a guest that resets itself without resuming it: a VM paused meanwhile stays paused.
        self._start_vm(paused=self._paused)
        self._emit("reboot", detail=detail)

    def _handle_vm_exit(self, exit_: VmExit) -> None:
        if self._vm is None or self._finish is not None or self._preserved is not None:
            return
        log.info("vm exit %s: %s", exit_.kind.value, exit_.detail)
        if exit_.kind is VmExitKind.SHUTDOWN and self._reboot_on_shutdown:
            self._reboot("reboot requested by the host")
        elif exit_.kind is VmExitKind.SHUTDOWN and self.config.on_poweroff == "preserve":
            self._preserve("shutdown", "shutdown", exit_.detail)
        elif exit_.kind is VmExitKind.SHUTDOWN:
            self._emit("shutdown", detail=exit_.detail)
            self._finish = ("shutdown", exit_.detail)
        elif exit_.kind is VmExitKind.REBOOT:
            self._reboot(exit_.detail)
        elif exit_.kind is VmExitKind.CRASH and self.config.on_crash == "preserve":
            self._preserve("crashed", "crashed", exit_.detail)
        elif exit_.kind is VmExitKind.CRASH:
            detail = exit_.detail + self._dump_core()
            self._emit("crashed", detail=detail)
            self._finish = ("crash", detail)
        else:
            self._emit("crashed", detail=exit_.detail)
            self._finish = ("error", exit_.detail)

    def _dump_core(self) -> str:
        """on_crash = coredump-*: the guest's memory to an ELF core before the VM is torn down."""
        vm, path = self._vm, self.config.crash_dump
        if vm is None or not path:
            return ""
        from . import coredump

        try:
            regions = ((r.gpa, r.size, mem) for r, mem in vm.ram.regions)
            size = coredump.write_core(path, regions, fd=self.config.fds.crash_dump)
        except OSError as err:
            log.error("core dump to %s failed: %s", path, err)
            return f"; core dump to {path} failed: {err}"
        log.info("guest memory dumped to %s (%d bytes)", path, size)
        return f"; core dumped to {path}"

    def _nets(self) -> list[VirtioNet]:
        vm = self._vm
        if vm is None or not vm.platform.virtio:
            return []
        from .devices.virtio.net import VirtioNet

        return [f.device for f in vm.platform.virtio if isinstance(f.device, VirtioNet)]

    def _set_link(self, request: JsonObject) -> None:
        mac, up = request.get("mac"), request.get("up")
        if not isinstance(mac, str) or not isinstance(up, bool):
            raise CommandError("set-link needs 'mac' (a string) and 'up' (a boolean)")
        want = mac.lower()
        for net in self._nets():
            if ":".join(f"{b:02x}" for b in net.mac) == want:
                net.set_link(up)
                self._links[want] = up
                return
        raise CommandError(f"no network interface with MAC address {mac!r}")

    def _block_info(self) -> JsonObject:
        """Each disk's sizes as its backend knows them (domblkinfo): the format node's virtual and allocated
        size, and the highest offset written to the file beneath it (QMP; the backend counts nothing else)."""
        from . import vhost_user

        disks = []
        for slot, (backend, _) in sorted(self._disks.items()):
            try:
                nodes = backend.qmp("query-named-block-nodes", flat=True)
                stats = backend.qmp("query-blockstats", **{"query-nodes": True})
            except (vhost_user.BackendError, OSError, ValueError) as err:
                raise CommandError(f"virtio-blk in PCI slot {slot}: {err}") from err
            image = next((n["image"] for n in _dicts(nodes) if n.get("node-name") == "disk0"), None)
            file = next((n["stats"] for n in _dicts(stats) if n.get("node-name") == "file0"), None)
            if not isinstance(image, dict) or not isinstance(file, dict):
                raise CommandError(f"virtio-blk in PCI slot {slot}: the backend does not describe its image")
            disks.append(
                {
                    "slot": slot,
                    "virtual_size": int(image["virtual-size"]),
                    "actual_size": int(image.get("actual-size", 0)),
                    "wr_highest_offset": int(file["wr_highest_offset"]),
                }
            )
        return {"disks": disks}

    def _block_resize(self, request: JsonObject) -> JsonObject:
        """blockresize: the backend grows (or shrinks) the image, the device's capacity follows from the
        backend's configuration, and the driver gets a config-change interrupt."""
        from . import vhost_user
        from .devices.virtio.blk import VirtioBlk

        slot, size = request.get("slot"), request.get("size")
        if not isinstance(slot, int) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise CommandError("block-resize needs 'slot' and 'size' (bytes, an integer)")
        if slot not in self._disks:
            raise CommandError(f"no disk in PCI slot {slot}")
        backend, info = self._disks[slot]
        try:
            backend.qmp("block_resize", **{"node-name": "disk0", "size": size})
        except vhost_user.QmpError as err:
            raise CommandError(err.desc) from err  # QEMU's words, which libvirt passes on
        except (vhost_user.BackendError, OSError, ValueError) as err:
            raise CommandError(str(err)) from err
        # qemu-storage-daemon 7.2 serves the new range at once but keeps its old configuration (GET_CONFIG
        # answers the old capacity; tests/vmm/test_vhost_user.py): the capacity is the node's new size.
        try:
            nodes = backend.qmp("query-named-block-nodes", flat=True)
        except (vhost_user.BackendError, OSError, ValueError) as err:
            raise CommandError(str(err)) from err
        image = next((n["image"] for n in _dicts(nodes) if n.get("node-name") == "disk0"), None)
        if not isinstance(image, dict):
            raise CommandError(f"virtio-blk in PCI slot {slot}: the backend does not describe its image")
        sectors = int(image["virtual-size"]) // 512
        config = bytearray(info.config)
        struct.pack_into("<Q", config, 0, sectors)
        self._disks[slot] = (backend, dataclasses.replace(info, config=bytes(config)))  # what a rebuilt VM offers
        vm = self._vm
        for function in vm.platform.virtio if vm else []:
            if isinstance(function.device, VirtioBlk) and function.device.backend is backend:
                with function.lock:
                    function.device.set_capacity(sectors)
        return {"capacity": sectors * 512}

    def _press_power_button(self) -> None:
        vm = self._vm
        if vm is None:
            raise CommandError("domain is not running")
        if vm.platform.acpi_pm is None:
            raise CommandError("the guest has no ACPI power button (acpi is disabled)")
        vm.platform.acpi_pm.press_power_button()

    def _inject_nmi(self) -> None:
        vm = self._vm
        if vm is None:
            raise CommandError("domain is not running")
        try:
            vm.partition.assert_interrupt(0, 0, interrupt_type=HV_X64_INTERRUPT_TYPE_NMI)
        except (MshvError, OSError) as err:
            raise CommandError(f"operation failed: cannot inject an NMI: {err}") from err
        log.info("NMI injected into vCPU 0")

    def _send_key(self, request: JsonObject) -> None:
        keys, hold = request.get("keys"), request.get("holdtime", 0)
        if (
            not isinstance(keys, list)
            or not 1 <= len(keys) <= MAX_KEYS
            or not all(isinstance(k, int) and not isinstance(k, bool) and 0 < k <= 0xFF for k in keys)
        ):
            raise CommandError(f"send-key needs 'keys': 1 to {MAX_KEYS} key numbers (qnum, 1..255)")
        if not isinstance(hold, int) or isinstance(hold, bool) or not 0 <= hold <= 0xFFFFFFFF:
            raise CommandError("send-key 'holdtime' must be an unsigned number of milliseconds")
        if self._vm is None:
            raise CommandError("domain is not running")
        if len(self._key_events) + 2 * len(keys) > MAX_KEY_EVENTS:
            raise CommandError("operation failed: too many keys are still waiting to be sent")
        step = (hold or DEFAULT_KEY_HOLD_MS) / 1000
        due = max(time.monotonic(), self._keys_free_at)
        from .devices import keymap

        events = [keymap.press(k) for k in keys] + [keymap.release(k) for k in reversed(keys)]
        for scancodes in events:
            self._key_events.append((due, scancodes))
            due += step
        self._keys_free_at = due
        self._deliver_keys()

    def _deliver_keys(self) -> None:
        now = time.monotonic()
        while self._key_events and self._key_events[0][0] <= now:
            _, scancodes = self._key_events.popleft()
            vm = self._vm
            if vm is None or self._preserved is not None or not scancodes:
                continue
            taken = vm.platform.i8042.inject_keys(scancodes)
            if taken < len(scancodes):
                log.warning("keyboard buffer full: %d scancode bytes dropped", len(scancodes) - taken)

    def _loop_timeout(self) -> float:
        if not self._key_events:
            return 0.05
        return min(0.05, max(0.0, self._key_events[0][0] - time.monotonic()))

    def _state(self) -> str:
        if self._preserved is not None:
            return self._preserved
        return "paused" if self._paused else "running"

    def status(self) -> JsonObject:
        vm = self._vm
        return {
            "state": self._state(),
            "pty": self._console.pty_path if self._console else None,
            "vcpus": self.config.vcpus,
            "cpu_time_ns": time.process_time_ns(),
            "memory_kib": self.config.memory_bytes // 1024,
            "boots": self.boots,
            "backend": vm.system.backend if vm is not None else None,
            "vcpu_threads": [t.thread.native_id for t in vm.vcpus if t.thread and t.thread.is_alive()] if vm else [],
            # vCPU index -> OS thread id, for the driver's per-vCPU statistics and CPU pinning
            "vcpu_tids": {str(t.index): t.thread.native_id for t in vm.vcpus if t.thread and t.thread.is_alive()}
            if vm
            else {},
            "exits": sum(t.exits for t in vm.vcpus) if vm else 0,
            # Of those, the ones Python completed (the rest the compiled run loop did, vmm/runloop.py).
            "python_exits": sum(t.python_exits for t in vm.vcpus) if vm else 0,
            "python_exit_sites": dict(sum((t.python_exit_sites.copy() for t in vm.vcpus), Counter()).most_common())
            if vm
            else {},
            "virtio": [_virtio_status(f) for f in vm.platform.virtio] if vm else [],
            "sandbox": st.as_json() if (st := sandbox.state()) is not None else None,
        }

    def handle_command(self, cmd: str, request: JsonObject) -> JsonObject:
        if self._finish is not None:
            raise CommandError("domain is shutting down")
        if cmd == "status":
            return self.status()
        if cmd == "block-info":
            return self._block_info()
        if cmd == "block-stats":
            return self._block_stats(request)
        if cmd == "block-dirty":
            return self._block_dirty()
        if self._preserved is not None and cmd in (
            "pause",
            "resume",
            "shutdown",
            "reboot",
            "reset",
            "inject-nmi",
            "send-key",
            "set-link",
            "block-resize",
        ):
            # The guest already ended; its frozen vCPUs must never run again. Only destroy applies.
            raise CommandError(f"domain is not running (the guest is {self._preserved}, preserved until destroy)")
        if cmd == "pause":
            self._set_paused(True)
        elif cmd == "resume":
            self._set_paused(False)
        elif cmd == "shutdown":
            self._press_power_button()
        elif cmd == "reboot":
            self._press_power_button()
            self._reboot_on_shutdown = True
        elif cmd == "reset":
            self._reboot_on_shutdown = False
            self._stop_vm()
            self._start_vm(paused=self._paused)  # like a reset button: a paused VM stays paused
            self._emit("reboot", detail="reset")
        elif cmd == "inject-nmi":
            self._inject_nmi()
        elif cmd == "send-key":
            self._send_key(request)
        elif cmd == "set-link":
            self._set_link(request)
        elif cmd == "block-resize":
            return self._block_resize(request)
        elif cmd == "destroy":
            self._finish = ("destroyed", "destroyed by the host")
        elif cmd.startswith("test-") and self.config.test_hooks:
            return self._test_hook(cmd, request)
        else:
            raise CommandError(f"unknown command {cmd!r}")
        return {"state": self._state()}

    def _test_hook(self, cmd: str, request: JsonObject) -> JsonObject:
        """Test-only commands (config "test_hooks"; docs/SECURITY.md): probe the sandbox from inside.

        ``test-open {"path", "write"}``: open a path from the main thread, answer the errno.
        ``test-syscall {"syscall", "thread": "main"|"vcpu"}``: issue a system call (zero arguments) there;
        a forbidden one ends the VMM through the SIGSYS reporter.
        """
        if cmd == "test-open":
            path = request.get("path")
            if not isinstance(path, str):
                raise CommandError("test-open needs a 'path'")
            flags = (os.O_WRONLY | os.O_CREAT if request.get("write") else os.O_RDONLY) | os.O_CLOEXEC
            try:
                os.close(os.open(path, flags, 0o600))
            except OSError as err:
                return {"opened": False, "errno": err.errno, "error": err.strerror}
            return {"opened": True}
        if cmd == "test-syscall":
            name, thread = request.get("syscall"), request.get("thread", "vcpu")
            try:
                nr = sandbox.syscall_number(str(name))
            except ValueError as err:
                raise CommandError(str(err)) from err
            if thread == "main":
                return {"result": sandbox.issue_syscall(nr)}
            vm = self._vm
            if vm is None or not vm.vcpus or vm.vcpus[0].thread is None:
                raise CommandError("no vCPU thread is running")
            sandbox.request_test_call(nr)
            vm.vcpus[0].kick()
            return {"requested": True}
        raise CommandError(f"unknown command {cmd!r}")

    # -- main loop -------------------------------------------------------------------------------
    def _console_input(self, _mask: int) -> None:
        vm, console = self._vm, self._console
        if vm is None or console is None:
            return
        room = vm.platform.serial.rx_space()
        if room == 0:
            # The guest has not drained its FIFO: stop watching the pty (it stays readable, the
            # loop would spin) until _rearm_console sees room again; the bytes wait in the pty.
            self._selector.unregister(console.fileno())
            self._console_watched = False
            return
        data = console.read_input(room)
        if data:
            vm.platform.serial.enqueue_input(data)

    def _rearm_console(self) -> None:
        vm, console = self._vm, self._console
        if self._console_watched or vm is None or console is None or vm.platform.serial.rx_space() == 0:
            return
        self._selector.register(console.fileno(), selectors.EVENT_READ, self._console_input)
        self._console_watched = True

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"r")

    def _drain_wakeups(self, _mask: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._finish = ("destroyed", f"terminated by signal {signal.Signals(signum).name}")
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"s")

    def run(self) -> int:
        """Run until the domain ends; returns the process exit status."""
        install_kick_handler()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the daemon's session going away is not ours
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        cfg = self.config
        if cfg.pidfile:
            write_atomic(Path(cfg.pidfile), f"{os.getpid()}\n".encode(), mode=0o644)
        reason, detail = "error", "VMM did not start"
        try:
            fds = cfg.fds
            master, slave = fds.console_master, fds.console_slave
            self._console = Console(
                cfg.serial_log,
                log_fds=fds.serial_log,
                max_size=cfg.serial_log_max_size,
                max_backups=cfg.serial_log_max_backups,
                pty_fds=(master, slave) if master is not None and slave is not None else None,
            )
            if cfg.control_socket or fds.control is not None:
                path = cfg.control_socket or f"fd {fds.control}"
                self._control = ControlServer(path, self.handle_command, self._selector, listen_fd=fds.control)
            if fds.hypervisor is not None:
                sandbox.hand_over_device(fds.hypervisor_device, fds.hypervisor)
            elif cfg.sandbox:
                with contextlib.suppress(sandbox.SandboxError):  # none: the build step says so
                    sandbox.hand_over_device(*sandbox.probe_hypervisor())
            self._start_disk_backends(cfg)  # before the sandbox: it can start no process
            if cfg.sandbox:
                cfg = self.config = self._open_images(cfg)
                # Everything the VMM will ever open is open now: from here on it opens nothing for writing.
                sandbox.enter(report_fd=fds.exit, write_paths=self._write_dirs())
            self._selector.register(self._wake_r, selectors.EVENT_READ, self._drain_wakeups)
            self._selector.register(self._console.fileno(), selectors.EVENT_READ, self._console_input)
            for slot, (backend, _) in self._disks.items():
                if backend.pidfd >= 0:
                    self._selector.register(backend.pidfd, selectors.EVENT_READ, self._backend_ended(slot))
            self._console_watched = True
            phases.mark("setup")  # console, control socket, disk backends, sandbox
            self._start_vm(paused=cfg.start_paused)
            while self._finish is None:
                for key, mask in self._selector.select(timeout=self._loop_timeout()):
                    key.data(mask)
                self._deliver_keys()
                self._rearm_console()
                while self._finish is None:
                    try:
                        generation, exit_ = self._exits.get_nowait()
                    except queue.Empty:
                        break
                    if generation == self._generation:  # else it came from a VM already torn down
                        self._handle_vm_exit(exit_)
            reason, detail = self._finish
        except builder.BuildError as err:
            reason, detail = "error", str(err)
            log.error("%s", err)
        except images.ImageError as err:
            reason, detail = "error", f"{builder.LoadKernelError(str(err))}"
            log.error("%s", detail)
        except Exception as err:
            reason, detail = "error", f"{type(err).__name__}: {err}"
            log.exception("VMM failed")
        finally:
            try:
                self._stop_vm()
            except Exception:
                log.exception("teardown failed")
            self._stop_disk_backends()
            self._write_exit(reason, detail)
            if self._control is not None:
                self._control.flush_all()
                self._control.close()
            if self._console is not None:
                self._console.close()
            if cfg.pidfile:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(cfg.pidfile)
        return 0 if reason in ("shutdown", "reboot", "destroyed") else 1

    @staticmethod
    def _open_images(cfg: VmmConfig) -> VmmConfig:
        """A VMM given image paths instead of descriptors opens them before it loses the right to."""
        handed = cfg.fds
        limit = cfg.memory_bytes
        if handed.kernel is None:
            handed = dataclasses.replace(handed, kernel=images.open_checked("kernel", cfg.kernel, limit)[0])
        if cfg.initrd and handed.initrd is None:
            handed = dataclasses.replace(handed, initrd=images.open_checked("initrd", cfg.initrd, limit)[0])
        # virtio-rng backends: kept open for the VMM's life (every rebuild reads the same descriptor)
        rngs = tuple(
            r if r.fd is not None else dataclasses.replace(r, fd=os.open(r.backend, os.O_RDONLY | os.O_CLOEXEC))
            for r in cfg.rng
        )
        return dataclasses.replace(cfg, fds=handed, rng=rngs)

    def _write_dirs(self) -> tuple[str, ...]:
        """Directories a sandboxed VMM still writes by path: only where it was given paths, not fds."""
        cfg, fds = self.config, self.config.fds
        paths = [cfg.pidfile, cfg.exit_file if fds.exit is None else None]
        paths += [cfg.crash_dump if fds.crash_dump is None else None]
        paths += [cfg.control_socket if fds.control is None else None]
        return tuple(sorted({os.path.dirname(os.path.abspath(p)) for p in paths if p}))

    def _write_exit(self, reason: str, detail: str) -> None:
        cfg = self.config
        data = json.dumps({"reason": reason, "detail": detail}).encode()
        if cfg.fds.exit is not None:
            write_exit_fd(cfg.fds.exit, data)
        elif cfg.exit_file:
            write_atomic(Path(cfg.exit_file), data, mode=0o644)


def write_exit_fd(fd: int, data: bytes) -> None:
    """The exit report into the handed exit file, in place (the daemon reads it once the VMM is gone)."""
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
        os.fsync(fd)
    except OSError as err:
        log.error("cannot write the exit report: %s", err)


def run_in_thread_safe_main(config: VmmConfig) -> int:
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("the VMM must run in the main thread (it installs signal handlers)")
    return Vmm(config).run()
