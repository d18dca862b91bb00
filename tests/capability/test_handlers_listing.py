"""`baton handlers` answers "who acts on this event?" from the declarations, without starting anything."""

from __future__ import annotations

import json

import pytest

from events import EVENT_TYPES
from events.flow import FLOW_CONTRACT, TURN_CONTRACT
from tests.support.agents import baton

pytestmark = pytest.mark.capability

ACTS_ON = {
    "TaskSubmitted": ("task-runner", "TaskRunnerHandlers.on_task_submitted"),
    "WorkspaceRequested": ("provisioner", "ProvisionerHandlers.on_workspace_requested"),
    "WorkspaceReady": ("task-runner", "TaskRunnerHandlers.on_workspace_ready"),
    "AgentFinished": ("task-runner", "TaskRunnerHandlers.on_agent_finished"),
    "BranchPushed": ("task-runner", "TaskRunnerHandlers.on_branch_pushed"),
    "TaskCompleted": ("pull-requests", "PullRequests.on_task_completed"),
    "PromptDelivered": ("monitor", "Monitor.on_event"),
    "TurnRequested": ("monitor", "Monitor.on_event"),
}
"""Who acts on some of the flow's handoffs (the rest are watched by the monitor and shown on the board)."""


def test_every_handoff_of_the_flow_is_listed_with_the_services_acting_on_it():
    done = baton("handlers", "--json")
    assert done.returncode == 0, done.stderr
    listing = json.loads(done.stdout)
    acting = {listed["event"]: {(a["service"], a["handler"]) for a in listed["handled_by"]}
              for listed in listing["events"]}
    assert list(acting) == list(EVENT_TYPES)  # Every event of events/, handled or not.
    for step in (*FLOW_CONTRACT, *TURN_CONTRACT):
        assert ("monitor", "Monitor.on_event") in acting[step], f"the monitor does not watch {step}"
        assert step not in listing["unhandled"]
    for step, (service, handler) in ACTS_ON.items():
        assert (service, handler) in acting[step]
    assert listing["every_event"] == [{"service": "projector", "handler": "Projector.append_to_audit_log"}]
    assert set(listing["unhandled"]) == {e for e, handlers in acting.items() if not handlers}


def test_the_table_names_each_event_on_every_row_of_it_and_says_which_nobody_handles():
    done = baton("handlers")
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()[1:] if line and not line.startswith("Every")]
    ready = [row for row in rows if row[0] == "WorkspaceReady"]
    assert ["WorkspaceReady", "provisioner", "task-runner", "TaskRunnerHandlers.on_workspace_ready"] in ready
    assert {row[2] for row in ready} == {"task-runner", "projector", "monitor"}
    unhandled = {row[0] for row in rows if row[2:] == ["-", "nobody", "handles", "it"]}
    assert unhandled and not unhandled & {*FLOW_CONTRACT, *TURN_CONTRACT}
    assert "Every event also goes to projector (Projector.append_to_audit_log)." in done.stdout
