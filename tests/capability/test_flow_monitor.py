"""Every handoff watched: a missing one is a named gap within its deadline, acted on, and rehearsable."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from events.flow import DEADLINES
from tests.support.api import Api
from tests.support.flow import assert_flow_completes
from tests.support.git_remote import make_origin
from tests.support.processes import BatonStack, running_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.capability

DEADLINE_S = 2
"""The deadline of the handoff each fault drops: it never happens, so a short one cannot fire early."""
MARGIN_S = 6


def fast_monitor(handoff: str) -> dict[str, str]:
    """A short deadline for the handoff under test; every other one generous, so that a busy
    machine (CI on two cores) cannot make another handoff late and add a gap of its own."""
    deadlines = ",".join(f"{d.expected}={DEADLINE_S if d.expected == handoff else 600}" for d in DEADLINES)
    return {"BATON_DEADLINES": deadlines, "BATON_OVERDUE_BACKOFF_S": "0.5,1"}

PROMPT = 'echo "working"\necho done > done.txt\n'

# fault → (the handoff that silently does not happen, the one it is awaited after)
FAULTS = {
    "prompt_delivery": ("PromptDelivered", "WorkspaceReady"),
    "workspace_ready": ("WorkspaceReady", "WorkspaceRequested"),
    "agent_output": ("AgentOutput", "PromptDelivered"),
    "branch_push": ("BranchPushed", "AgentFinished"),
}


def at(event: dict) -> datetime:
    return datetime.fromisoformat(event["occurred_at"])


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_silently_missing_handoff_is_named_acted_on_and_shown(tmp_path: Path, fault: str):
    expected, after = FAULTS[fault]
    with running_stack(tmp_path / "stack", faults=fault, env=fast_monitor(expected)) as stack:
        api = Api(stack.api, stack.token)
        # Health says loudly that faults are injected.
        health = api.http.get("/api/health").json()
        assert health["faults"] == [fault] and "FAULT INJECTION ON" in health["warning"]

        task = api.submit(repo=make_origin(tmp_path).as_uri(), prompt=PROMPT, agent="shell")
        events = api.wait_for_end(task["task_id"], timeout_s=90)

        # The monitor named the gap, within the deadline and a small margin.
        overdue = next(e for e in events if e["type"] == "StepOverdue" and e["data"]["expected"] == expected)
        assert overdue["data"]["after"] == after
        since = next(e for e in events if e["type"] == after)
        assert (at(overdue) - at(since)).total_seconds() <= DEADLINE_S + MARGIN_S
        # The task failed with a reason naming the handoff, never "running" forever.
        assert events[-1]["type"] == "TaskFailed"
        assert expected in events[-1]["data"]["reason"]
        # The board shows the gap.
        board = api.wait_for_state(task["task_id"], "failed")
        assert [(g["expected"], g["recovered"]) for g in board["gaps"]] == [(expected, False)]


def test_a_late_handoff_is_recovered_and_the_task_completes(tmp_path: Path):
    env = {"BATON_DEADLINES": "AgentOutput=2", "BATON_OVERDUE_BACKOFF_S": "3,3,3"}
    with running_stack(tmp_path / "stack", env=env) as stack:
        api = Api(stack.api, stack.token)
        # The agent is silent for longer than the AgentOutput deadline, then speaks.
        task = api.submit(repo=make_origin(tmp_path).as_uri(), prompt="sleep 5\necho late", agent="shell")

        events = assert_flow_completes(api, task["task_id"], timeout_s=90)

        types = [e["type"] for e in events]
        assert types.index("StepOverdue") < types.index("StepRecovered") < types.index("TaskCompleted")
        recovered = next(e for e in events if e["type"] == "StepRecovered")["data"]
        assert recovered["expected"] == "AgentOutput" and recovered["waited_s"] >= 4
        board = api.wait_for_state(task["task_id"], "completed")
        assert [(g["expected"], g["recovered"]) for g in board["gaps"]] == [("AgentOutput", True)]


def test_the_monitor_restarted_mid_wait_still_fires_on_time(tmp_path: Path):
    deadline_s = 8
    env = {"BATON_DEADLINES": f"PromptDelivered={deadline_s}", "BATON_OVERDUE_BACKOFF_S": "0.5"}
    with running_stack(tmp_path / "stack", faults="prompt_delivery", env=env) as stack:
        api = Api(stack.api, stack.token)
        task = api.submit(repo=make_origin(tmp_path).as_uri(), prompt=PROMPT, agent="shell")
        wait_for(lambda: any(e["type"] == "WorkspaceReady" for e in api.events(task["task_id"])),
                 timeout_s=60, what="WorkspaceReady")

        # The monitor dies while it waits for PromptDelivered; `baton up` restarts it.
        stack.kill_service("monitor")

        events = api.wait_for_end(task["task_id"], timeout_s=90)
        overdue = next(e for e in events if e["type"] == "StepOverdue")
        ready = next(e for e in events if e["type"] == "WorkspaceReady")
        waited = (at(overdue) - at(ready)).total_seconds()
        assert deadline_s <= waited <= deadline_s + MARGIN_S
        assert [e["type"] for e in events].count("StepOverdue") == 1
        assert "PromptDelivered missing" in events[-1]["data"]["reason"]


def test_a_silent_agent_is_reported_stalled_and_recovers_when_it_speaks_again(
        tmp_path: Path, stalling_stack: BatonStack):
    # The stack calls an agent silent for 2 s stalled (BATON_STALL_AFTER_S=2).
    stack = stalling_stack
    api = Api(stack.api, stack.token)
    task = api.submit(repo=make_origin(tmp_path).as_uri(), prompt="echo start\nsleep 6\necho end",
                      agent="shell")

    events = assert_flow_completes(api, task["task_id"], timeout_s=90)

    types = [e["type"] for e in events]
    assert types.index("AgentStalled") < types.index("StepRecovered")
    # The recovery is named for the output the agent wrote before its turn ended (the monitor's
    # StepRecovered may reach the stream after the vm_agent's AgentFinished: they race).
    recovered = next(e for e in events if e["type"] == "StepRecovered")
    [cause] = [e for e in events if e["event_id"] == recovered["causation_id"]]
    assert cause["type"] == "AgentOutput" and events.index(cause) < types.index("AgentFinished")
    stalled = next(e for e in events if e["type"] == "AgentStalled")["data"]
    assert stalled["silent_s"] >= 2 and stalled["last_seq"] == 1
    board = api.wait_for_state(task["task_id"], "completed")
    assert [(g.get("stalled"), g["recovered"]) for g in board["gaps"]] == [(True, True)]
