"""The capability check of the task path: every handoff of the flow contract, in order."""

from __future__ import annotations

from events import FLOW_CONTRACT, TERMINAL_TYPES, check_flow
from tests.support.api import Api
from tests.support.waiting import wait_for


def assert_flow_completes(api: Api, task_id: str, *, timeout_s: float) -> list[dict]:
    """Wait for TaskCompleted; on failure or timeout, name the first missing handoff."""
    def ended() -> list[dict] | None:
        events = api.events(task_id)
        return events if any(e["type"] in TERMINAL_TYPES for e in events) else None

    try:
        events = wait_for(ended, timeout_s=timeout_s, what=f"task {task_id} to end")
    except AssertionError:
        events = api.events(task_id)
    report = check_flow(e["type"] for e in events)
    failure = next((e["data"]["reason"] for e in events if e["type"] == "TaskFailed"), None)
    assert report.ok, (
        f"task {task_id}: {report.describe()}"
        + (f"; TaskFailed: {failure}" if failure else "")
        + f"; seen: {[e['type'] for e in events]}"
    )
    assert events[-1]["type"] == FLOW_CONTRACT[-1] or any(
        e["type"] == "TaskCompleted" for e in events
    )
    return events
