"""Render the lifecycle table as Markdown (docs/lifecycle.md is generated from it; a test keeps them equal).

``python -m mshv_libvirt.lifecycle.render > docs/lifecycle.md``
"""

from __future__ import annotations

from enum import IntEnum

from mshv_libvirt.lifecycle import states
from mshv_libvirt.lifecycle.states import (
    STATES,
    TABLE,
    CrashedReason,
    Event,
    IllegalOp,
    Input,
    PausedReason,
    RunningReason,
    ShutdownReason,
    ShutoffReason,
    State,
    Status,
)

_REASONS: dict[State, type[IntEnum]] = {
    State.RUNNING: RunningReason,
    State.PAUSED: PausedReason,
    State.SHUTOFF: ShutoffReason,
    State.SHUTDOWN: ShutdownReason,
    State.CRASHED: CrashedReason,
}


def _status(status: Status | None) -> str:
    if status is None:
        return "(unchanged)"
    reason = _REASONS[status.state](status.reason).name.lower()
    return f"{status.state.name.lower()} ({reason})"


def _event(event: Event, detail: int) -> str:
    detail_enum = getattr(states, event.name.title().replace("_", "") + "Detail", None)
    name = detail_enum(detail).name.lower() if detail_enum is not None else str(detail)
    return f"{event.name.lower()}/{name}"


def render() -> str:
    lines = [
        "# Domain lifecycle (generated from mshv_libvirt/lifecycle/states.py; do not edit)",
        "",
        "Every (state, input) pair: the new state (reason), the libvirt lifecycle events in emission order, and",
        "what the driver does to the VMM process; or the error a client gets.",
        "",
        "Guest endings are those of libvirt 9.0's QEMU driver with a modern QEMU: a power-off is shutdown/guest then",
        "stopped/shutdown; a guest reset (i8042, ACPI reset register, or a triple fault, which KVM also turns into a",
        "reset) is only the reboot event under on_reboot=restart and a power-off otherwise; restart after a power-off",
        "or a crash is QEMU's fake reboot (reboot event, CPUs started again); a crash is a guest panic reported",
        "through the pvpanic port (0x505); a VMM that ends without saying why is stopped/failed. Details in the",
        "docstring of states.py.",
        "",
    ]
    for state in STATES:
        lines += [f"## {state.name.lower()}", "", "| input | new state | events | action |", "|---|---|---|---|"]
        for inp in Input:
            out = TABLE[(state, inp)]
            if isinstance(out, IllegalOp):
                lines.append(f"| {inp.value} | error: {out.detail} | | |")
                continue
            events = ", ".join("reboot event" if e == "reboot" else _event(*e) for e in out.emissions())
            lines.append(f"| {inp.value} | {_status(out.status)} | {events} | {out.action.value} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
