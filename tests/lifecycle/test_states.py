"""The lifecycle table against an independent expectation table written in libvirt-python's own constants."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import libvirt
import pytest

from mshv_libvirt.errors import ErrorCode, VirtError
from mshv_libvirt.lifecycle import (
    STATES,
    TABLE,
    CrashedDetail,
    CrashedReason,
    DefinedDetail,
    Event,
    IllegalOp,
    Input,
    PausedReason,
    PMSuspendedDetail,
    ResumedDetail,
    RunningReason,
    ShutdownDetail,
    ShutdownReason,
    ShutoffReason,
    StartedDetail,
    State,
    Status,
    StoppedDetail,
    SuspendedDetail,
    Transition,
    UndefinedDetail,
    lookup,
    policy_input,
    transition,
)

# --- enum values against libvirt-python --------------------------------------------------------------------

_ENUM_PREFIXES: list[tuple[type[IntEnum], str]] = [
    (State, "VIR_DOMAIN_"),
    (RunningReason, "VIR_DOMAIN_RUNNING_"),
    (PausedReason, "VIR_DOMAIN_PAUSED_"),
    (ShutdownReason, "VIR_DOMAIN_SHUTDOWN_"),
    (ShutoffReason, "VIR_DOMAIN_SHUTOFF_"),
    (CrashedReason, "VIR_DOMAIN_CRASHED_"),
    (Event, "VIR_DOMAIN_EVENT_"),
    (DefinedDetail, "VIR_DOMAIN_EVENT_DEFINED_"),
    (UndefinedDetail, "VIR_DOMAIN_EVENT_UNDEFINED_"),
    (StartedDetail, "VIR_DOMAIN_EVENT_STARTED_"),
    (SuspendedDetail, "VIR_DOMAIN_EVENT_SUSPENDED_"),
    (ResumedDetail, "VIR_DOMAIN_EVENT_RESUMED_"),
    (StoppedDetail, "VIR_DOMAIN_EVENT_STOPPED_"),
    (ShutdownDetail, "VIR_DOMAIN_EVENT_SHUTDOWN_"),
    (PMSuspendedDetail, "VIR_DOMAIN_EVENT_PMSUSPENDED_"),
    (CrashedDetail, "VIR_DOMAIN_EVENT_CRASHED_"),
]


@pytest.mark.parametrize(("enum", "prefix"), _ENUM_PREFIXES, ids=[e.__name__ for e, _ in _ENUM_PREFIXES])
def test_enum_values_match_libvirt(enum: type[IntEnum], prefix: str) -> None:
    for member in enum:
        assert getattr(libvirt, prefix + member.name) == member.value, member


# Every libvirt reason/detail exists on our side too (ShutdownReason is left out: VIR_DOMAIN_SHUTDOWN_* also holds
# the shutdown *mode* flags).
_COMPLETE: list[tuple[type[IntEnum], str]] = [(e, p) for e, p in _ENUM_PREFIXES[1:] if e not in (ShutdownReason, Event)]


@pytest.mark.parametrize(("enum", "prefix"), _COMPLETE, ids=[e.__name__ for e, _ in _COMPLETE])
def test_enums_cover_libvirt(enum: type[IntEnum], prefix: str) -> None:
    theirs = {n.removeprefix(prefix) for n in dir(libvirt) if n.startswith(prefix)}
    assert theirs <= set(enum.__members__)


# --- the expected table, written independently with libvirt's constants ------------------------------------


@dataclass(frozen=True)
class Ok:
    state: int | None  # None: unchanged
    reason: int | None
    events: tuple[tuple[int, int], ...]
    action: str
    reboot: bool = False


NOOP = Ok(None, None, (), "NONE")
NOT_RUNNING = "domain is not running"
ALREADY = "domain is already running"

V = libvirt
BOOTED = (V.VIR_DOMAIN_EVENT_STARTED, V.VIR_DOMAIN_EVENT_STARTED_BOOTED)
PAUSED_EV = (V.VIR_DOMAIN_EVENT_SUSPENDED, V.VIR_DOMAIN_EVENT_SUSPENDED_PAUSED)
SD_GUEST = (V.VIR_DOMAIN_EVENT_SHUTDOWN, V.VIR_DOMAIN_EVENT_SHUTDOWN_GUEST)
ST_SHUTDOWN = (V.VIR_DOMAIN_EVENT_STOPPED, V.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN)
PANICKED = (V.VIR_DOMAIN_EVENT_CRASHED, V.VIR_DOMAIN_EVENT_CRASHED_PANICKED)
ST_CRASHED = (V.VIR_DOMAIN_EVENT_STOPPED, V.VIR_DOMAIN_EVENT_STOPPED_CRASHED)
UNPAUSED = (V.VIR_DOMAIN_EVENT_RESUMED, V.VIR_DOMAIN_EVENT_RESUMED_UNPAUSED)
RENAMED = (
    (V.VIR_DOMAIN_EVENT_UNDEFINED, V.VIR_DOMAIN_EVENT_UNDEFINED_RENAMED),
    (V.VIR_DOMAIN_EVENT_DEFINED, V.VIR_DOMAIN_EVENT_DEFINED_RENAMED),
)
RENAME_ACTIVE = "cannot rename active domain"

DESTROYED = Ok(
    V.VIR_DOMAIN_SHUTOFF,
    V.VIR_DOMAIN_SHUTOFF_DESTROYED,
    ((V.VIR_DOMAIN_EVENT_STOPPED, V.VIR_DOMAIN_EVENT_STOPPED_DESTROYED),),
    "KILL_VMM",
)
# libvirt 9.0's QEMU driver, modern QEMU (qemuProcessHandleShutdown, processMonitorEOFEvent, qemuProcessFakeReboot,
# processGuestPanicEvent): a guest power-off is SHUTDOWN/GUEST then STOPPED/SHUTDOWN.
POWERED_OFF = Ok(V.VIR_DOMAIN_SHUTOFF, V.VIR_DOMAIN_SHUTOFF_SHUTDOWN, (SD_GUEST, ST_SHUTDOWN), "CLEANUP")
PRESERVED_OFF = Ok(V.VIR_DOMAIN_SHUTDOWN, V.VIR_DOMAIN_SHUTDOWN_UNKNOWN, (SD_GUEST,), "NONE")
FAKE_REBOOT = Ok(None, None, (), "RESTART_VMM", reboot=True)
DIED = Ok(
    V.VIR_DOMAIN_SHUTOFF,
    V.VIR_DOMAIN_SHUTOFF_CRASHED,
    ((V.VIR_DOMAIN_EVENT_STOPPED, V.VIR_DOMAIN_EVENT_STOPPED_FAILED),),
    "CLEANUP",
)

LIVE_GUEST: dict[str, Ok] = {
    "GUEST_POWEROFF_DESTROY": POWERED_OFF,
    "GUEST_POWEROFF_RESTART": FAKE_REBOOT,
    "GUEST_POWEROFF_PRESERVE": PRESERVED_OFF,
    "GUEST_REBOOT_RESTART": FAKE_REBOOT,
    "GUEST_REBOOT_DESTROY": POWERED_OFF,
    "GUEST_REBOOT_PRESERVE": PRESERVED_OFF,
    "GUEST_CRASH_DESTROY": Ok(V.VIR_DOMAIN_SHUTOFF, V.VIR_DOMAIN_SHUTOFF_CRASHED, (PANICKED, ST_CRASHED), "CLEANUP"),
    "GUEST_CRASH_RESTART": Ok(
        V.VIR_DOMAIN_RUNNING, V.VIR_DOMAIN_RUNNING_CRASHED, (PANICKED, UNPAUSED), "RESTART_VMM", reboot=True
    ),
    "GUEST_CRASH_PRESERVE": Ok(V.VIR_DOMAIN_CRASHED, V.VIR_DOMAIN_CRASHED_PANICKED, (PANICKED,), "NONE"),
    "VMM_DIED": DIED,
}
IGNORED_GUEST: dict[str, Ok] = dict.fromkeys(LIVE_GUEST, NOOP)

FROZEN_USER: dict[str, Ok | str] = {
    "START": ALREADY,
    "START_PAUSED": ALREADY,
    "SUSPEND": NOT_RUNNING,
    "RESUME": NOT_RUNNING,
    "SHUTDOWN": NOT_RUNNING,
    "REBOOT": NOT_RUNNING,
    "RESET": NOT_RUNNING,
    "DESTROY": DESTROYED,
    "INJECT_NMI": NOT_RUNNING,
    "SEND_KEY": NOT_RUNNING,
    "RENAME": RENAME_ACTIVE,
}

EXPECTED: dict[int, dict[str, Ok | str]] = {
    V.VIR_DOMAIN_SHUTOFF: {
        "START": Ok(V.VIR_DOMAIN_RUNNING, V.VIR_DOMAIN_RUNNING_BOOTED, (BOOTED,), "SPAWN_VMM"),
        "START_PAUSED": Ok(V.VIR_DOMAIN_PAUSED, V.VIR_DOMAIN_PAUSED_USER, (BOOTED, PAUSED_EV), "SPAWN_VMM_PAUSED"),
        "SUSPEND": NOT_RUNNING,
        "RESUME": NOT_RUNNING,
        "SHUTDOWN": NOT_RUNNING,
        "REBOOT": NOT_RUNNING,
        "RESET": NOT_RUNNING,
        "DESTROY": NOT_RUNNING,
        "INJECT_NMI": NOT_RUNNING,
        "SEND_KEY": NOT_RUNNING,
        "RENAME": Ok(None, None, RENAMED, "RENAME"),
        **IGNORED_GUEST,
    },
    V.VIR_DOMAIN_RUNNING: {
        "START": ALREADY,
        "START_PAUSED": ALREADY,
        "SUSPEND": Ok(V.VIR_DOMAIN_PAUSED, V.VIR_DOMAIN_PAUSED_USER, (PAUSED_EV,), "PAUSE_VMM"),
        "RESUME": NOOP,
        "SHUTDOWN": Ok(None, None, (), "REQUEST_SHUTDOWN"),
        "REBOOT": Ok(None, None, (), "REQUEST_REBOOT"),
        "RESET": Ok(None, None, (), "RESET_VMM", reboot=True),
        "DESTROY": DESTROYED,
        "INJECT_NMI": Ok(None, None, (), "INJECT_NMI"),
        "SEND_KEY": Ok(None, None, (), "SEND_KEY"),
        "RENAME": RENAME_ACTIVE,
        **LIVE_GUEST,
    },
    V.VIR_DOMAIN_PAUSED: {
        "START": ALREADY,
        "START_PAUSED": ALREADY,
        "SUSPEND": NOOP,
        "RESUME": Ok(
            V.VIR_DOMAIN_RUNNING,
            V.VIR_DOMAIN_RUNNING_UNPAUSED,
            ((V.VIR_DOMAIN_EVENT_RESUMED, V.VIR_DOMAIN_EVENT_RESUMED_UNPAUSED),),
            "RESUME_VMM",
        ),
        "SHUTDOWN": NOT_RUNNING,
        "REBOOT": NOT_RUNNING,
        "RESET": Ok(None, None, (), "RESET_VMM", reboot=True),
        "DESTROY": DESTROYED,
        "INJECT_NMI": Ok(None, None, (), "INJECT_NMI"),
        "SEND_KEY": Ok(None, None, (), "SEND_KEY"),
        "RENAME": RENAME_ACTIVE,
        **LIVE_GUEST,
        # the fake reboot starts the CPUs again: a paused domain is resumed
        "GUEST_POWEROFF_RESTART": Ok(
            V.VIR_DOMAIN_RUNNING, V.VIR_DOMAIN_RUNNING_BOOTED, (UNPAUSED,), "RESTART_VMM", reboot=True
        ),
    },
    V.VIR_DOMAIN_SHUTDOWN: {
        **FROZEN_USER,
        **IGNORED_GUEST,
        # The guest had already powered off, so the exit is the end of that shutdown, not a failure.
        "VMM_DIED": Ok(V.VIR_DOMAIN_SHUTOFF, V.VIR_DOMAIN_SHUTOFF_SHUTDOWN, (ST_SHUTDOWN,), "CLEANUP"),
    },
    V.VIR_DOMAIN_CRASHED: {**FROZEN_USER, **IGNORED_GUEST, "VMM_DIED": DIED},
}

INPUT_NAMES = [
    "START",
    "START_PAUSED",
    "SUSPEND",
    "RESUME",
    "SHUTDOWN",
    "REBOOT",
    "RESET",
    "DESTROY",
    "INJECT_NMI",
    "SEND_KEY",
    "RENAME",
    "GUEST_POWEROFF_DESTROY",
    "GUEST_POWEROFF_RESTART",
    "GUEST_POWEROFF_PRESERVE",
    "GUEST_REBOOT_RESTART",
    "GUEST_REBOOT_DESTROY",
    "GUEST_REBOOT_PRESERVE",
    "GUEST_CRASH_DESTROY",
    "GUEST_CRASH_RESTART",
    "GUEST_CRASH_PRESERVE",
    "VMM_DIED",
]
PAIRS = [(s, i) for s in EXPECTED for i in INPUT_NAMES]


def test_expectations_are_complete() -> None:
    assert {i.name for i in Input} == set(INPUT_NAMES)
    for row in EXPECTED.values():
        assert set(row) == set(INPUT_NAMES)


def test_table_is_complete() -> None:
    assert {int(s) for s in STATES} == set(EXPECTED)
    assert set(TABLE) == {(s, i) for s in STATES for i in Input}


@pytest.mark.parametrize(("state", "inp"), PAIRS, ids=[f"{State(s).name}-{i}" for s, i in PAIRS])
def test_every_pair(state: int, inp: str) -> None:
    expected = EXPECTED[state][inp]
    if isinstance(expected, str):
        assert isinstance(TABLE[(State(state), Input[inp])], IllegalOp)
        with pytest.raises(VirtError) as exc:
            transition(State(state), Input[inp])
        assert exc.value.code == ErrorCode.OPERATION_INVALID == V.VIR_ERR_OPERATION_INVALID
        assert exc.value.detail == expected
        assert str(exc.value) == f"Requested operation is not valid: {expected}"
        return
    t = transition(State(state), Input[inp])
    assert isinstance(t, Transition)
    if expected.state is None:
        assert t.status is None
    else:
        assert t.status is not None
        assert (int(t.status.state), int(t.status.reason)) == (expected.state, expected.reason)
    assert [(int(e), int(d)) for e, d in t.events] == list(expected.events)
    assert t.action.name == expected.action
    assert t.reboot_event is expected.reboot


def test_event_order_poweroff_and_crash() -> None:
    names = [(Event(e).name, d) for e, d in transition(State.RUNNING, Input.GUEST_POWEROFF_DESTROY).events]
    assert names == [("SHUTDOWN", ShutdownDetail.GUEST), ("STOPPED", StoppedDetail.SHUTDOWN)]
    crash = transition(State.RUNNING, Input.GUEST_CRASH_DESTROY).events
    assert [e for e, _ in crash] == [Event.CRASHED, Event.STOPPED]
    assert crash[1] == (Event.STOPPED, StoppedDetail.CRASHED)
    restart = transition(State.RUNNING, Input.GUEST_CRASH_RESTART)
    assert [e for e, _ in restart.events] == [Event.CRASHED, Event.RESUMED] and restart.reboot_event
    # QEMU's order: the panic, the reset of the fake reboot (REBOOT event), then the CPUs resume.
    assert restart.emissions() == (
        (Event.CRASHED, CrashedDetail.PANICKED),
        "reboot",
        (Event.RESUMED, ResumedDetail.UNPAUSED),
    )
    paused = transition(State.PAUSED, Input.GUEST_POWEROFF_RESTART)
    assert paused.emissions() == ("reboot", (Event.RESUMED, ResumedDetail.UNPAUSED))
    assert transition(State.RUNNING, Input.RESET).emissions() == ("reboot",)
    assert transition(State.RUNNING, Input.SUSPEND).emissions() == ((Event.SUSPENDED, 0),)


def test_next_status_keeps_reason_on_noop() -> None:
    cur = Status(State.PAUSED, PausedReason.IOERROR)
    assert transition(State.PAUSED, Input.SUSPEND).next_status(cur) is cur
    assert transition(State.RUNNING, Input.SUSPEND).next_status(Status(State.RUNNING, 1)) == Status(
        State.PAUSED, PausedReason.USER
    )


@pytest.mark.parametrize("state", [State.NOSTATE, State.BLOCKED, State.PMSUSPENDED])
def test_states_outside_table_are_internal_errors(state: State) -> None:
    with pytest.raises(VirtError) as exc:
        lookup(state, Input.START)
    assert exc.value.code == ErrorCode.INTERNAL_ERROR


def test_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        TABLE[(State.SHUTOFF, Input.START)] = IllegalOp("x")  # type: ignore[index]


# --- policy_input -------------------------------------------------------------------------------------------

POLICIES = [
    ("poweroff", "destroy", "GUEST_POWEROFF_DESTROY"),
    ("poweroff", "restart", "GUEST_POWEROFF_RESTART"),
    ("poweroff", "preserve", "GUEST_POWEROFF_PRESERVE"),
    ("reboot", "destroy", "GUEST_REBOOT_DESTROY"),
    ("reboot", "restart", "GUEST_REBOOT_RESTART"),
    ("reboot", "preserve", "GUEST_REBOOT_PRESERVE"),
    ("crash", "destroy", "GUEST_CRASH_DESTROY"),
    ("crash", "restart", "GUEST_CRASH_RESTART"),
    ("crash", "preserve", "GUEST_CRASH_PRESERVE"),
    ("crash", "coredump-destroy", "GUEST_CRASH_DESTROY"),
    ("crash", "coredump-restart", "GUEST_CRASH_RESTART"),
]


@pytest.mark.parametrize(("kind", "policy", "name"), POLICIES)
def test_policy_input(kind: str, policy: str, name: str) -> None:
    assert policy_input(kind, policy) is Input[name]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "policy"),
    [
        ("reboot", "rename-restart"),
        ("crash", "rename-restart"),
        ("poweroff", "coredump-destroy"),
        ("poweroff", "Destroy"),
        ("poweroff", ""),
        ("shutdown", "destroy"),
    ],
)
def test_policy_input_rejects_unknown(kind: str, policy: str) -> None:
    with pytest.raises(VirtError) as exc:
        policy_input(kind, policy)  # type: ignore[arg-type]
    assert exc.value.code == ErrorCode.CONFIG_UNSUPPORTED
    assert policy in exc.value.detail
