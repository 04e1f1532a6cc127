"""The domain lifecycle as one declarative table.

Every (state, input) pair maps either to a :class:`Transition` (new status, lifecycle events in emission order,
and what to do with the VMM process) or to an :class:`IllegalOp` that becomes ``VIR_ERR_OPERATION_INVALID``.
Numbers are libvirt's so the RPC layer can send them unchanged; behaviour follows libvirt's QEMU driver.

States in the table: SHUTOFF, RUNNING, PAUSED, SHUTDOWN and CRASHED. A host shutdown/reboot request does not
change the state (QEMU keeps reporting RUNNING until the guest acts); SHUTDOWN is only reached when the guest
powers off under ``on_poweroff``/``on_reboot`` = preserve, and CRASHED only under ``on_crash`` = preserve. In both
the VMM keeps the frozen partition around for inspection and only destroy (or the VMM dying) leaves them.

Guest endings follow libvirt's QEMU driver for a QEMU with ``set-action`` (libvirt 9.0, qemu_process.c):

* a power-off is QEMU's SHUTDOWN event from the guest: state SHUTDOWN/UNKNOWN and event SHUTDOWN/GUEST
  (qemuProcessHandleShutdown), then the process ends and processMonitorEOFEvent emits STOPPED/SHUTDOWN with
  SHUTOFF/SHUTDOWN. Under on_poweroff=restart it is a "fake reboot" instead: no lifecycle event, the state is
  untouched, QEMU's RESET gives the REBOOT event, and the CPUs are started again (a paused domain is resumed,
  RESUMED/UNPAUSED).
* a guest reset (i8042, ACPI reset register, or a triple fault, which KVM reports as a reset) is QEMU's RESET: the
  REBOOT event only, state unchanged, under on_reboot=restart; under on_reboot=destroy QEMU turns it into a
  shutdown (``set-action reboot=shutdown``), so it looks exactly like a power-off.
* a crash is a guest panic notification (pvpanic): CRASHED/PANICKED with CRASHED/PANICKED (processGuestPanicEvent);
  destroy then stops it (STOPPED/CRASHED, SHUTOFF/CRASHED); restart is a fake reboot from CRASHED, so the CPUs
  restart with RUNNING/CRASHED and RESUMED/UNPAUSED, plus the REBOOT event of the reset.
* a VMM that ends without reporting why is QEMU's monitor EOF without a SHUTDOWN event: STOPPED/FAILED,
  SHUTOFF/CRASHED.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum, IntEnum
from types import MappingProxyType
from typing import Literal

from mshv_libvirt.errors import ErrorCode, VirtError, invalid_operation, unsupported

# --- virDomainState and its per-state reasons ---------------------------------------------------------------


class State(IntEnum):
    NOSTATE = 0
    RUNNING = 1
    BLOCKED = 2
    PAUSED = 3
    SHUTDOWN = 4
    SHUTOFF = 5
    CRASHED = 6
    PMSUSPENDED = 7


class RunningReason(IntEnum):
    UNKNOWN = 0
    BOOTED = 1
    MIGRATED = 2
    RESTORED = 3
    FROM_SNAPSHOT = 4
    UNPAUSED = 5
    MIGRATION_CANCELED = 6
    SAVE_CANCELED = 7
    WAKEUP = 8
    CRASHED = 9
    POSTCOPY = 10
    POSTCOPY_FAILED = 11


class PausedReason(IntEnum):
    UNKNOWN = 0
    USER = 1
    MIGRATION = 2
    SAVE = 3
    DUMP = 4
    IOERROR = 5
    WATCHDOG = 6
    FROM_SNAPSHOT = 7
    SHUTTING_DOWN = 8
    SNAPSHOT = 9
    CRASHED = 10
    STARTING_UP = 11
    POSTCOPY = 12
    POSTCOPY_FAILED = 13


class ShutdownReason(IntEnum):
    UNKNOWN = 0
    USER = 1


class ShutoffReason(IntEnum):
    UNKNOWN = 0
    SHUTDOWN = 1
    DESTROYED = 2
    CRASHED = 3
    MIGRATED = 4
    SAVED = 5
    FAILED = 6
    FROM_SNAPSHOT = 7
    DAEMON = 8


class CrashedReason(IntEnum):
    UNKNOWN = 0
    PANICKED = 1


# --- virDomainEventType and its per-event details ----------------------------------------------------------


class Event(IntEnum):
    DEFINED = 0
    UNDEFINED = 1
    STARTED = 2
    SUSPENDED = 3
    RESUMED = 4
    STOPPED = 5
    SHUTDOWN = 6
    PMSUSPENDED = 7
    CRASHED = 8


class DefinedDetail(IntEnum):
    ADDED = 0
    UPDATED = 1
    RENAMED = 2
    FROM_SNAPSHOT = 3


class UndefinedDetail(IntEnum):
    REMOVED = 0
    RENAMED = 1


class StartedDetail(IntEnum):
    BOOTED = 0
    MIGRATED = 1
    RESTORED = 2
    FROM_SNAPSHOT = 3
    WAKEUP = 4


class SuspendedDetail(IntEnum):
    PAUSED = 0
    MIGRATED = 1
    IOERROR = 2
    WATCHDOG = 3
    RESTORED = 4
    FROM_SNAPSHOT = 5
    API_ERROR = 6
    POSTCOPY = 7
    POSTCOPY_FAILED = 8


class ResumedDetail(IntEnum):
    UNPAUSED = 0
    MIGRATED = 1
    FROM_SNAPSHOT = 2
    POSTCOPY = 3
    POSTCOPY_FAILED = 4


class StoppedDetail(IntEnum):
    SHUTDOWN = 0
    DESTROYED = 1
    CRASHED = 2
    MIGRATED = 3
    SAVED = 4
    FAILED = 5
    FROM_SNAPSHOT = 6


class ShutdownDetail(IntEnum):
    FINISHED = 0
    GUEST = 1
    HOST = 2


class PMSuspendedDetail(IntEnum):
    MEMORY = 0
    DISK = 1


class CrashedDetail(IntEnum):
    PANICKED = 0
    CRASHLOADED = 1


# --- inputs, actions, outcomes -----------------------------------------------------------------------------


class Input(Enum):
    """What happened: a user API call, or a report from the VMM about the guest (suffix = configured policy)."""

    START = "start"
    START_PAUSED = "start_paused"
    SUSPEND = "suspend"
    RESUME = "resume"
    SHUTDOWN = "shutdown"  # host asks the guest to power off (ACPI power button)
    REBOOT = "reboot"  # host asks the guest to reboot
    RESET = "reset"  # host presses the reset button: the VM restarts at once, without asking the guest
    DESTROY = "destroy"
    INJECT_NMI = "inject_nmi"
    SEND_KEY = "send_key"
    RENAME = "rename"  # a new name for the (inactive) domain's config
    GUEST_POWEROFF_DESTROY = "guest_poweroff_destroy"  # guest powered off; suffix = on_poweroff
    GUEST_POWEROFF_RESTART = "guest_poweroff_restart"
    GUEST_POWEROFF_PRESERVE = "guest_poweroff_preserve"
    GUEST_REBOOT_RESTART = "guest_reboot_restart"  # guest reset (also a triple fault); suffix = on_reboot
    GUEST_REBOOT_DESTROY = "guest_reboot_destroy"
    GUEST_REBOOT_PRESERVE = "guest_reboot_preserve"
    GUEST_CRASH_DESTROY = "guest_crash_destroy"  # the guest reported a panic (pvpanic); suffix = on_crash
    GUEST_CRASH_RESTART = "guest_crash_restart"
    GUEST_CRASH_PRESERVE = "guest_crash_preserve"
    VMM_DIED = "vmm_died"  # the VMM process vanished without reporting why


USER_INPUTS: frozenset[Input] = frozenset(
    {
        Input.START,
        Input.START_PAUSED,
        Input.SUSPEND,
        Input.RESUME,
        Input.SHUTDOWN,
        Input.REBOOT,
        Input.RESET,
        Input.DESTROY,
        Input.INJECT_NMI,
        Input.SEND_KEY,
        Input.RENAME,
    }
)
# Reported by the VMM (or its death), never requested by a client: they cannot be refused, only ignored.
VMM_INPUTS: frozenset[Input] = frozenset(set(Input) - USER_INPUTS)


class Action(Enum):
    """What the driver must do to the VMM process to carry out a transition."""

    NONE = "none"
    SPAWN_VMM = "spawn_vmm"
    SPAWN_VMM_PAUSED = "spawn_vmm_paused"
    PAUSE_VMM = "pause_vmm"
    RESUME_VMM = "resume_vmm"
    REQUEST_SHUTDOWN = "request_shutdown"
    REQUEST_REBOOT = "request_reboot"
    RESET_VMM = "reset_vmm"  # rebuild the VM in the same VMM; a paused VM stays paused
    KILL_VMM = "kill_vmm"
    # The domain boots again: the VMM does it in place for a guest reset; after a VMM that exited (power-off or
    # crash under a restart policy) the driver starts a new one, keeping the domain id as QEMU's fake reboot does.
    RESTART_VMM = "restart_vmm"
    CLEANUP = "cleanup"  # the VMM is already gone: remove runtime files
    INJECT_NMI = "inject_nmi"  # the VMM raises an NMI on vCPU 0
    SEND_KEY = "send_key"  # the VMM feeds scancodes to the guest through its i8042
    RENAME = "rename"  # the driver moves the config to the new name; no VMM exists


@dataclass(frozen=True)
class Status:
    state: State
    reason: int


EventSpec = tuple[Event, int]


@dataclass(frozen=True)
class Transition:
    """A legal outcome. ``status`` None means "keep the current state *and* reason" (no-ops)."""

    status: Status | None
    events: tuple[EventSpec, ...]
    action: Action
    reboot_event: bool = False  # emit VIR_DOMAIN_EVENT_ID_REBOOT (separate from lifecycle events)

    def next_status(self, current: Status) -> Status:
        return current if self.status is None else self.status

    def emissions(self) -> tuple[EventSpec | Literal["reboot"], ...]:
        """Lifecycle events and the REBOOT event in the order clients get them: the reset comes before the CPUs
        start again (QEMU's RESET precedes the RESUME of a fake reboot), so REBOOT precedes RESUMED."""
        if not self.reboot_event:
            return self.events
        at = next((i for i, (event, _) in enumerate(self.events) if event is Event.RESUMED), len(self.events))
        return (*self.events[:at], "reboot", *self.events[at:])


@dataclass(frozen=True)
class IllegalOp:
    """A refused user request; ``detail`` is the message after libvirt's "Requested operation is not valid: "."""

    detail: str

    def error(self) -> VirtError:
        return invalid_operation(self.detail)


Outcome = Transition | IllegalOp

# --- shared outcomes ---------------------------------------------------------------------------------------

_NOOP = Transition(None, (), Action.NONE)
_RESET = Transition(None, (), Action.RESET_VMM, reboot_event=True)

_ALREADY_RUNNING = IllegalOp("domain is already running")
_NOT_RUNNING = IllegalOp("domain is not running")

_BOOTED = (Event.STARTED, StartedDetail.BOOTED)
_SHUTDOWN_GUEST = (Event.SHUTDOWN, ShutdownDetail.GUEST)
_STOPPED_SHUTDOWN = (Event.STOPPED, StoppedDetail.SHUTDOWN)
_PANICKED = (Event.CRASHED, CrashedDetail.PANICKED)
_STOPPED_CRASHED = (Event.STOPPED, StoppedDetail.CRASHED)
_UNPAUSED = (Event.RESUMED, ResumedDetail.UNPAUSED)

_START = Transition(Status(State.RUNNING, RunningReason.BOOTED), (_BOOTED,), Action.SPAWN_VMM)
_START_PAUSED = Transition(
    Status(State.PAUSED, PausedReason.USER),
    (_BOOTED, (Event.SUSPENDED, SuspendedDetail.PAUSED)),
    Action.SPAWN_VMM_PAUSED,
)
_SUSPEND = Transition(
    Status(State.PAUSED, PausedReason.USER), ((Event.SUSPENDED, SuspendedDetail.PAUSED),), Action.PAUSE_VMM
)
_RESUME = Transition(Status(State.RUNNING, RunningReason.UNPAUSED), (_UNPAUSED,), Action.RESUME_VMM)
_DESTROY = Transition(
    Status(State.SHUTOFF, ShutoffReason.DESTROYED), ((Event.STOPPED, StoppedDetail.DESTROYED),), Action.KILL_VMM
)
# QEMU's SHUTDOWN event from the guest (SHUTDOWN/GUEST, state SHUTDOWN/UNKNOWN), then its exit (STOPPED/SHUTDOWN).
_POWEROFF = Transition(
    Status(State.SHUTOFF, ShutoffReason.SHUTDOWN), (_SHUTDOWN_GUEST, _STOPPED_SHUTDOWN), Action.CLEANUP
)
# on_poweroff=restart is a fake reboot: no lifecycle event, the state stays, QEMU's system_reset gives the REBOOT
# event; the CPUs start again, so a domain caught paused by the report is resumed (RUNNING/BOOTED, RESUMED/UNPAUSED).
_POWEROFF_RESTART = Transition(None, (), Action.RESTART_VMM, reboot_event=True)
_POWEROFF_RESTART_PAUSED = Transition(
    Status(State.RUNNING, RunningReason.BOOTED), (_UNPAUSED,), Action.RESTART_VMM, reboot_event=True
)
# preserve is "stop right there": the state QEMU's SHUTDOWN event leaves, the VMM keeps the partition until destroy.
_POWEROFF_PRESERVE = Transition(Status(State.SHUTDOWN, ShutdownReason.UNKNOWN), (_SHUTDOWN_GUEST,), Action.NONE)
# QEMU resets the guest itself and libvirt sees only its RESET: the REBOOT event alone; a paused VM stays paused.
_REBOOT_RESTART = Transition(None, (), Action.RESTART_VMM, reboot_event=True)
_CRASH = Transition(Status(State.SHUTOFF, ShutoffReason.CRASHED), (_PANICKED, _STOPPED_CRASHED), Action.CLEANUP)
# A fake reboot from CRASHED: qemuProcessFakeReboot starts the CPUs with reason CRASHED, so the RESUME handler
# moves the domain to RUNNING/CRASHED and emits RESUMED/UNPAUSED; the reset itself is the REBOOT event.
_CRASH_RESTART = Transition(
    Status(State.RUNNING, RunningReason.CRASHED), (_PANICKED, _UNPAUSED), Action.RESTART_VMM, reboot_event=True
)
_CRASH_PRESERVE = Transition(Status(State.CRASHED, CrashedReason.PANICKED), (_PANICKED,), Action.NONE)
# QEMU's monitor-EOF handling: an exit without a prior shutdown report counts as a crash.
_VMM_DIED = Transition(
    Status(State.SHUTOFF, ShutoffReason.CRASHED), ((Event.STOPPED, StoppedDetail.FAILED),), Action.CLEANUP
)
# ...but after the guest already powered off (preserved SHUTDOWN) the exit is just the end of that shutdown.
_VMM_EXITED_AFTER_SHUTDOWN = Transition(
    Status(State.SHUTOFF, ShutoffReason.SHUTDOWN), (_STOPPED_SHUTDOWN,), Action.CLEANUP
)
_INJECT_NMI = Transition(None, (), Action.INJECT_NMI)
_SEND_KEY = Transition(None, (), Action.SEND_KEY)
# virDomainRename: the old name goes (UNDEFINED/RENAMED, sent with the old name), the new one comes
# (DEFINED/RENAMED, with the new name); only a shut-off domain can be renamed.
_RENAME = Transition(
    None, ((Event.UNDEFINED, UndefinedDetail.RENAMED), (Event.DEFINED, DefinedDetail.RENAMED)), Action.RENAME
)
_RENAME_ACTIVE = IllegalOp("cannot rename active domain")

# Guest reports for a live domain; PAUSED uses them too because a report can be in flight when the pause lands.
_GUEST_LIVE: dict[Input, Outcome] = {
    Input.GUEST_POWEROFF_DESTROY: _POWEROFF,
    Input.GUEST_POWEROFF_RESTART: _POWEROFF_RESTART,
    Input.GUEST_POWEROFF_PRESERVE: _POWEROFF_PRESERVE,
    Input.GUEST_REBOOT_RESTART: _REBOOT_RESTART,
    # QEMU implements on_reboot != restart with set-action reboot=shutdown: the reset looks exactly like a power-off.
    Input.GUEST_REBOOT_DESTROY: _POWEROFF,
    Input.GUEST_REBOOT_PRESERVE: _POWEROFF_PRESERVE,
    Input.GUEST_CRASH_DESTROY: _CRASH,
    Input.GUEST_CRASH_RESTART: _CRASH_RESTART,
    Input.GUEST_CRASH_PRESERVE: _CRASH_PRESERVE,
    Input.VMM_DIED: _VMM_DIED,
}
_GUEST_IGNORED: dict[Input, Outcome] = {inp: _NOOP for inp in _GUEST_LIVE}


def _frozen_row(vmm_exit: Transition) -> dict[Input, Outcome]:
    """SHUTDOWN and CRASHED: a preserved partition the VMM keeps only for inspection."""
    return {
        Input.START: _ALREADY_RUNNING,  # the VMM still exists, so the domain is active
        Input.START_PAUSED: _ALREADY_RUNNING,
        # Its vCPUs must never run again, so nothing but destroy applies (no NMI or key reaches it either).
        Input.SUSPEND: _NOT_RUNNING,
        Input.RESUME: _NOT_RUNNING,
        Input.SHUTDOWN: _NOT_RUNNING,
        Input.REBOOT: _NOT_RUNNING,
        Input.RESET: _NOT_RUNNING,
        Input.DESTROY: _DESTROY,
        Input.INJECT_NMI: _NOT_RUNNING,
        Input.SEND_KEY: _NOT_RUNNING,
        Input.RENAME: _RENAME_ACTIVE,
        **_GUEST_IGNORED,
        Input.VMM_DIED: vmm_exit,
    }


# The one table, written as one row per state with a cell for every Input.
_ROWS: dict[State, dict[Input, Outcome]] = {
    State.SHUTOFF: {
        Input.START: _START,
        Input.START_PAUSED: _START_PAUSED,
        Input.SUSPEND: _NOT_RUNNING,
        Input.RESUME: _NOT_RUNNING,
        Input.SHUTDOWN: _NOT_RUNNING,
        Input.REBOOT: _NOT_RUNNING,
        Input.RESET: _NOT_RUNNING,
        Input.DESTROY: _NOT_RUNNING,
        Input.INJECT_NMI: _NOT_RUNNING,
        Input.SEND_KEY: _NOT_RUNNING,
        Input.RENAME: _RENAME,
        # No VMM, so any report is late (e.g. an exit report racing a destroy): ignore rather than error --
        # nobody asked, and the domain is already where the report would take it.
        **_GUEST_IGNORED,
    },
    State.RUNNING: {
        Input.START: _ALREADY_RUNNING,
        Input.START_PAUSED: _ALREADY_RUNNING,
        Input.SUSPEND: _SUSPEND,
        # QEMU's qemuDomainResume succeeds without doing anything on a running domain; mirrors suspend.
        Input.RESUME: _NOOP,
        # The state stays RUNNING until the guest acts on the request (what virsh domstate shows for QEMU).
        Input.SHUTDOWN: Transition(None, (), Action.REQUEST_SHUTDOWN),
        Input.REBOOT: Transition(None, (), Action.REQUEST_REBOOT),
        # QEMU's driver reports a reset only as the REBOOT event; the domain stays running.
        Input.RESET: _RESET,
        Input.DESTROY: _DESTROY,
        Input.INJECT_NMI: _INJECT_NMI,
        Input.SEND_KEY: _SEND_KEY,
        Input.RENAME: _RENAME_ACTIVE,
        **_GUEST_LIVE,
    },
    State.PAUSED: {
        Input.START: _ALREADY_RUNNING,
        Input.START_PAUSED: _ALREADY_RUNNING,
        Input.SUSPEND: _NOOP,  # QEMU: suspending a paused domain succeeds and changes nothing
        Input.RESUME: _RESUME,
        # A paused guest cannot react to the ACPI button; QEMU refuses with this message.
        Input.SHUTDOWN: _NOT_RUNNING,
        Input.REBOOT: _NOT_RUNNING,
        Input.RESET: _RESET,  # QEMU resets a paused VM too; it stays paused
        Input.DESTROY: _DESTROY,
        # QEMU queues both for a paused guest (it sees them when it runs again), as the i8042 and the LAPIC do here.
        Input.INJECT_NMI: _INJECT_NMI,
        Input.SEND_KEY: _SEND_KEY,
        Input.RENAME: _RENAME_ACTIVE,
        **_GUEST_LIVE,
        Input.GUEST_POWEROFF_RESTART: _POWEROFF_RESTART_PAUSED,
    },
    State.SHUTDOWN: _frozen_row(_VMM_EXITED_AFTER_SHUTDOWN),
    State.CRASHED: _frozen_row(_VMM_DIED),
}

TABLE: Mapping[tuple[State, Input], Outcome] = MappingProxyType(
    {(state, inp): out for state, row in _ROWS.items() for inp, out in row.items()}
)

STATES: tuple[State, ...] = tuple(_ROWS)  # the states the driver ever puts a domain in


def lookup(state: State, inp: Input) -> Outcome:
    """The raw table entry; raises VirtError(INTERNAL_ERROR) for a state the driver never enters."""
    try:
        return TABLE[(state, inp)]
    except KeyError:
        raise VirtError(ErrorCode.INTERNAL_ERROR, f"unexpected domain state {state.name.lower()}") from None


def transition(state: State, inp: Input) -> Transition:
    """The outcome of ``inp`` in ``state``; raises VirtError(OPERATION_INVALID) for refused requests."""
    out = lookup(state, inp)
    if isinstance(out, IllegalOp):
        raise out.error()
    return out


PolicyKind = Literal["poweroff", "reboot", "crash"]

_POLICY_INPUTS: Mapping[tuple[str, str], Input] = MappingProxyType(
    {
        ("poweroff", "destroy"): Input.GUEST_POWEROFF_DESTROY,
        ("poweroff", "restart"): Input.GUEST_POWEROFF_RESTART,
        ("poweroff", "preserve"): Input.GUEST_POWEROFF_PRESERVE,
        ("reboot", "destroy"): Input.GUEST_REBOOT_DESTROY,
        ("reboot", "restart"): Input.GUEST_REBOOT_RESTART,
        ("reboot", "preserve"): Input.GUEST_REBOOT_PRESERVE,
        ("crash", "destroy"): Input.GUEST_CRASH_DESTROY,
        ("crash", "restart"): Input.GUEST_CRASH_RESTART,
        ("crash", "preserve"): Input.GUEST_CRASH_PRESERVE,
        # The core dump is written by the VMM before it reports the crash; the lifecycle is destroy/restart.
        ("crash", "coredump-destroy"): Input.GUEST_CRASH_DESTROY,
        ("crash", "coredump-restart"): Input.GUEST_CRASH_RESTART,
    }
)


def policy_input(kind: PolicyKind, policy: str) -> Input:
    """Map the domain's on_poweroff/on_reboot/on_crash value to the Input the VMM report becomes.

    rename-restart (libxl-only in libvirt) is refused as unsupported configuration.
    """
    try:
        return _POLICY_INPUTS[(kind, policy)]
    except KeyError:
        raise unsupported(f"on_{kind} action '{policy}' is not supported") from None
