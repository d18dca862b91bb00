"""Every turn of a conversation is watched: a follow-up's handoff that silently does not happen is
a named gap of that turn within its deadline, and the task fails naming it."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from events import FLOW_CONTRACT, check_flow
from events.flow import DEADLINES, REPROVISIONED_TURN_CONTRACT, TURN_CONTRACT
from tests.support.api import Api
from tests.support.flow import assert_flow_completes
from tests.support.git_remote import make_origin
from tests.support.processes import BatonStack, running_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.capability

DEADLINE_S = 4
MARGIN_S = 6

# fault → (the follow-up's handoff that silently does not happen, the one it is awaited after)
FAULTS = {
    "follow_up_delivery": ("PromptDelivered", "TurnRequested"),
    "follow_up_push": ("BranchPushed", "AgentFinished"),
}


def fast_monitor(handoff: str) -> dict[str, str]:
    """A short deadline for the handoff under test, every other one generous (a busy machine must
    not add a gap of its own)."""
    deadlines = ",".join(f"{d.expected}={DEADLINE_S if d.expected == handoff else 600}" for d in DEADLINES)
    return {"BATON_DEADLINES": deadlines, "BATON_OVERDUE_BACKOFF_S": "0.5,1"}


def at(event: dict) -> datetime:
    return datetime.fromisoformat(event["occurred_at"])


def wait_for_end_of_turn(api: Api, task_id: str, turn: int) -> list[dict]:
    """The task's events once turn `turn` completed or the task failed or was cancelled."""
    def ended(event: dict) -> bool:
        return event["type"] in ("TaskFailed", "TaskCancelled") or (
            event["type"] == "TaskCompleted" and event["data"].get("turn", 1) == turn)

    def events_once_ended() -> list[dict] | None:
        events = api.events(task_id)
        return events if any(map(ended, events)) else None

    return wait_for(events_once_ended, timeout_s=90, what=f"turn {turn} of {task_id} to end")


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_follow_ups_silently_missing_handoff_is_named_with_its_turn_and_fails_the_task(tmp_path: Path, fault: str):
    expected, after = FAULTS[fault]
    with running_stack(tmp_path / "stack", faults=fault, env=fast_monitor(expected)) as stack:
        api = Api(stack.api, stack.token)
        task = api.submit(repo=make_origin(tmp_path).as_uri(), prompt="echo one > a.txt\n", agent="shell")
        task_id = task["task_id"]
        # The fault is a follow-up's only: the first turn's whole path happens.
        assert_flow_completes(api, task_id, timeout_s=90)

        sent = api.http.post(f"/api/tasks/{task_id}/messages", json={"prompt": "echo two > b.txt\n"})
        assert sent.status_code == 202, sent.text
        events = wait_for_end_of_turn(api, task_id, 2)

        # The monitor named turn 2's gap within the deadline and a small margin of the turn's own handoff.
        overdue = next(e for e in events if e["type"] == "StepOverdue")
        assert overdue["data"] == {**overdue["data"], "expected": expected, "after": after, "turn": 2}
        since = [e for e in events if e["type"] == after][-1]
        assert (at(overdue) - at(since)).total_seconds() <= DEADLINE_S + MARGIN_S
        # The task failed with a reason naming the handoff and the turn.
        assert events[-1]["type"] == "TaskFailed"
        assert f"{expected} missing" in events[-1]["data"]["reason"] and "turn 2" in events[-1]["data"]["reason"]
        # The first turn's handoffs did not stand in for the follow-up's, and it had no gap of its own.
        assert [e["data"]["turn"] for e in events if e["type"] == "StepOverdue"] == [2]
        # The board shows the gap with its turn.
        board = api.wait_for_state(task_id, "failed")
        assert [(g["expected"], g["turn"], g["recovered"]) for g in board["gaps"]] == [(expected, 2, False)]


def test_a_conversations_every_turn_follows_its_contract_with_no_gap_named(tmp_path: Path):
    with running_stack(tmp_path / "stack", env={"BATON_LINGER_S": "3"}) as stack:
        api = Api(stack.api, stack.token)
        task_id = api.submit(repo=make_origin(tmp_path).as_uri(), prompt="echo one > a.txt\n", agent="shell")["task_id"]
        assert_flow_completes(api, task_id, timeout_s=90)

        # Turn 2 runs on the lingering session, at once.
        sent = api.http.post(f"/api/tasks/{task_id}/messages", json={"prompt": "echo two > b.txt\n"})
        assert sent.status_code == 202, sent.text
        assert_flow_completes(api, task_id, timeout_s=90, turns=2)

        # Turn 3 comes after the workspace was released: it is re-provisioned.
        wait_for(lambda: any(e["type"] == "WorkspaceReleased" for e in api.events(task_id)),
                 timeout_s=60, what="the workspace to be released after lingering")
        sent = api.http.post(f"/api/tasks/{task_id}/messages", json={"prompt": "echo three > c.txt\n"})
        assert sent.status_code == 202, sent.text
        events = assert_flow_completes(api, task_id, timeout_s=120, turns=3)

        # Each turn was judged by its own contract, and the monitor named no gap in any of them.
        report = check_flow(events)
        assert [turn.contract for turn in report.turns] == [FLOW_CONTRACT, TURN_CONTRACT, REPROVISIONED_TURN_CONTRACT]
        assert report.ok, report.describe()
        assert not [e for e in events if e["type"] in ("StepOverdue", "AgentStalled")]
        assert api.wait_for_state(task_id, "completed")["gaps"] == []
        # Auditors see the same: every turn's handoffs, nothing missing, the task among none with a gap.
        wait_for(lambda: any(e["data"].get("turn") == 3 for e in api.http.get(
            "/api/audit/events", params={"task_id": task_id, "type": "TaskCompleted"}).json()["events"]),
            timeout_s=30, what="the audit log to have turn 3's completion")
        assert api.http.get(f"/api/audit/tasks/{task_id}/timeline").json()["missing"] == []
        flagged = api.http.get("/api/audit/gaps").json()["tasks"]
        assert task_id not in [t["task_id"] for t in flagged]


def test_an_agent_silent_in_a_follow_ups_turn_is_stalled_with_its_turn_and_recovers(
        tmp_path: Path, stalling_stack: BatonStack):
    stack = stalling_stack  # It calls an agent silent for 2 s stalled (BATON_STALL_AFTER_S=2).
    api = Api(stack.api, stack.token)
    task_id = api.submit(repo=make_origin(tmp_path).as_uri(), prompt="echo one > a.txt\n", agent="shell")["task_id"]
    assert_flow_completes(api, task_id, timeout_s=90)

    # The follow-up's agent speaks, falls silent longer than the stall limit, then speaks again.
    sent = api.http.post(f"/api/tasks/{task_id}/messages", json={"prompt": "echo start\nsleep 6\necho end\n"})
    assert sent.status_code == 202, sent.text
    assert_flow_completes(api, task_id, timeout_s=90, turns=2)

    # The monitor's recovery may reach the stream after the turn's end (they race): wait for it.
    def recovered_events() -> list[dict] | None:
        events = api.events(task_id)
        return events if any(e["type"] == "StepRecovered" for e in events) else None

    events = wait_for(recovered_events, timeout_s=30, what="the stall's recovery")
    stalled = [e for e in events if e["type"] == "AgentStalled"]
    assert [e["data"]["turn"] for e in stalled] == [2] and stalled[0]["data"]["silent_s"] >= 2
    recovered = next(e for e in events if e["type"] == "StepRecovered")
    assert recovered["data"]["turn"] == 2 and recovered["data"]["expected"] == "AgentOutput"
    gaps = wait_for(lambda: (g := api.wait_for_state(task_id, "completed")["gaps"]) and g[0]["recovered"] and g,
                    timeout_s=30, what="the board to show the stall recovered")
    assert [(g.get("stalled"), g["turn"], g["recovered"]) for g in gaps] == [(True, 2, True)]


def test_a_re_provisioned_turns_prompt_never_delivered_is_named_after_its_new_workspace(tmp_path: Path):
    env = {**fast_monitor("PromptDelivered"), "BATON_LINGER_S": "2"}
    with running_stack(tmp_path / "stack", faults="follow_up_delivery", env=env) as stack:
        api = Api(stack.api, stack.token)
        task_id = api.submit(repo=make_origin(tmp_path).as_uri(), prompt="echo one > a.txt\n", agent="shell")["task_id"]
        assert_flow_completes(api, task_id, timeout_s=90)
        wait_for(lambda: any(e["type"] == "WorkspaceReleased" for e in api.events(task_id)),
                 timeout_s=60, what="the workspace to be released after lingering")

        # The follow-up re-provisions a workspace and a session, whose prompt then never comes.
        sent = api.http.post(f"/api/tasks/{task_id}/messages", json={"prompt": "echo two > b.txt\n"})
        assert sent.status_code == 202, sent.text
        events = wait_for_end_of_turn(api, task_id, 2)

        overdue = next(e for e in events if e["type"] == "StepOverdue")
        assert (overdue["data"]["expected"], overdue["data"]["after"], overdue["data"]["turn"]) == (
            "PromptDelivered", "WorkspaceReady", 2)
        ready = [e for e in events if e["type"] == "WorkspaceReady"][-1]
        assert (at(overdue) - at(ready)).total_seconds() <= DEADLINE_S + MARGIN_S
        assert events[-1]["type"] == "TaskFailed" and "in turn 2" in events[-1]["data"]["reason"]
        assert check_flow(events).first_gap == "PromptDelivered (turn 2)"
