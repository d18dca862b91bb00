"""The capability check of the task path: every handoff of the flow contract, in order, turn by turn."""

from __future__ import annotations

from events import TERMINAL_TYPES, FlowReport, check_flow
from tests.support.api import Api
from tests.support.waiting import wait_for


def _turn_ended(event: dict, turn: int) -> bool:
    """The task ended, or (TaskCompleted) completed turn `turn` or a later one."""
    if event["type"] == "TaskCompleted":
        return event["data"].get("turn", 1) >= turn
    return event["type"] in TERMINAL_TYPES


def assert_flow_completes(api: Api, task_id: str, *, timeout_s: float, turns: int = 1) -> list[dict]:
    """Wait until the task completed turn `turns` (1: its first prompt); on failure or timeout,
    name the first missing handoff of whichever turn lacks one. Turns 1 to `turns` are judged."""
    def ended() -> list[dict] | None:
        events = api.events(task_id)
        return events if any(_turn_ended(e, turns) for e in events) else None

    try:
        events = wait_for(ended, timeout_s=timeout_s, what=f"task {task_id} to complete turn {turns}")
    except AssertionError:
        events = api.events(task_id)
    # Turns after `turns` may still run: the turns asked for are judged.
    report = FlowReport(turns=check_flow(events).turns[:turns])
    failure = next((e["data"]["reason"] for e in events if e["type"] == "TaskFailed"), None)
    assert report.ok and len(report.turns) == turns, (
        f"task {task_id}: {report.describe()}"
        + (f"; TaskFailed: {failure}" if failure else "")
        + f"; seen: {[e['type'] for e in events]}"
    )
    assert any(e["type"] == "TaskCompleted" and e["data"].get("turn", 1) == turns for e in events)
    return events
