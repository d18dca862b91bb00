"""The flow monitor's rules, with an in-memory store and a clock the test controls."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

from eventsourcing.persistence import Tracking

from events import DEADLINES, Envelope, parse_deadlines
from services.monitor.handlers import Monitor
from tests.unit.fakes import envelopes_in, popo_store

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
TASK = "t1"
_seq = itertools.count(1)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def monitor(spec: str = "PromptDelivered=30", stall_after_s: float = 300) -> Monitor:
    return Monitor(popo_store(), parse_deadlines(spec, DEADLINES), stall_after_s=stall_after_s)


async def observe(m: Monitor, event_type: str, seconds: float, **data) -> None:
    envelope = Envelope(type=event_type, task_id=TASK, actor="test", occurred_at=at(seconds), data=data)
    await m.on_event(envelope, Tracking(f"monitor-{event_type}", next(_seq)))


def named(m: Monitor) -> list[tuple[str, dict]]:
    return [(e.type, e.data) for e in envelopes_in(m.store)]


async def test_a_deadline_that_passes_is_named_once_with_how_long_it_waited():
    m = monitor()
    await observe(m, "WorkspaceReady", 0)

    m.tick(at(29))
    assert named(m) == []
    m.tick(at(31))
    m.tick(at(40))

    assert named(m) == [("StepOverdue", {"expected": "PromptDelivered", "after": "WorkspaceReady", "waited_s": 31.0})]
    assert envelopes_in(m.store)[0].causation_id is not None


async def test_a_late_handoff_is_named_recovered_with_its_real_delay():
    m = monitor()
    await observe(m, "WorkspaceReady", 0)
    await observe(m, "AgentSessionStarted", 1, session_id="s", agent="shell", attempt_id="a")
    m.tick(at(31))

    await observe(m, "PromptDelivered", 45, session_id="s", prompt_sha256="x")

    assert named(m)[-1] == ("StepRecovered", {"expected": "PromptDelivered", "after": "WorkspaceReady", "waited_s": 45.0})


async def test_a_handoff_the_flow_moved_past_is_named_at_once():
    m = monitor("AgentOutput=120")
    await observe(m, "PromptDelivered", 0, session_id="s", prompt_sha256="x")

    await observe(m, "AgentFinished", 1, stop_reason="end_turn")

    assert [(t, d["expected"]) for t, d in named(m)] == [("StepOverdue", "AgentOutput")]


async def test_a_silent_agent_is_stalled_once_and_recovers_when_it_speaks():
    m = monitor(stall_after_s=10)
    await observe(m, "PromptDelivered", 0, session_id="s", prompt_sha256="x")
    await observe(m, "AgentOutput", 1, seq=1, stream="stdout", text="hi\n")

    m.tick(at(12))
    m.tick(at(20))
    await observe(m, "AgentOutput", 25, seq=2, stream="stdout", text="again\n")

    assert [t for t, _ in named(m)] == ["AgentStalled", "StepRecovered"]
    assert named(m)[0][1]["last_seq"] == 1


async def test_an_agent_busy_in_a_long_tool_call_is_not_stalled():
    m = monitor(stall_after_s=10)
    await observe(m, "PromptDelivered", 0, session_id="s", prompt_sha256="x")
    await observe(m, "ToolCallStarted", 1, tool_call_id="c1", title="pytest", kind="execute", status="pending")
    await observe(m, "ToolCallUpdated", 9, tool_call_id="c1", status="in_progress")
    m.tick(at(15))
    assert named(m) == []
    # Silence after its last sign of life is still a stall.
    m.tick(at(20))
    assert [t for t, _ in named(m)] == ["AgentStalled"]


async def test_a_restarted_monitor_rebuilds_its_timers_from_the_store():
    m = monitor()
    await observe(m, "WorkspaceReady", 0)

    again = Monitor(m.store, m.deadlines, stall_after_s=300)
    again.resume()
    again.tick(at(31))

    assert [t for t, _ in named(again)] == ["StepOverdue"]


async def test_an_ended_task_is_no_longer_watched():
    m = monitor()
    await observe(m, "WorkspaceReady", 0)
    await observe(m, "TaskFailed", 1, reason="no")

    m.tick(at(100))

    assert named(m) == [] and TASK not in m.watches


async def test_a_task_queued_for_a_place_is_not_a_gap_however_long_it_waits():
    m = monitor()
    await observe(m, "TaskSubmitted", 0, repo="file:///r", prompt="p", agent="shell")
    await observe(m, "TaskQueued", 0.1, position=3, max_running=2)
    m.tick(at(600))
    assert named(m) == []
    # Once it gets its place the next deadlines run as for any task.
    await observe(m, "WorkspaceRequested", 601, repo="file:///r", agent="shell")
    m.tick(at(601 + 121))
    assert named(m) == [("StepOverdue", {"expected": "WorkspaceReady", "after": "WorkspaceRequested",
                                         "waited_s": 121.0})]


async def test_a_task_neither_queued_nor_given_a_workspace_is_still_a_gap():
    m = monitor()
    await observe(m, "TaskSubmitted", 0, repo="file:///r", prompt="p", agent="shell")
    m.tick(at(31))
    assert named(m)[0][1]["expected"] == "WorkspaceRequested"


async def test_after_a_cancel_was_asked_nothing_left_undone_is_named_a_gap():
    m = monitor()
    await observe(m, "WorkspaceReady", 0)
    await observe(m, "TaskCancelRequested", 1, by="user", reason=None)
    # The vm_agent records the cancelled turn without a session or a prompt: no gap for them.
    await observe(m, "AgentFinished", 2, stop_reason="cancelled", exit_code=None)
    m.tick(at(120))
    assert named(m) == []
    await observe(m, "TaskCancelled", 3, by="user", reason=None, pushed=False, branch=None, commit=None)
    assert TASK not in m.watches


async def test_a_cloud_server_whose_vm_agent_never_calls_home_is_a_named_gap_and_its_boot_no_other():
    m = monitor("ServerCreated=300,VmAgentConnected=600")
    await observe(m, "TaskSubmitted", 0)
    await observe(m, "WorkspaceRequested", 0)
    await observe(m, "ServerRequested", 1, server_name="baton-t1", server_type="cx22", location="fsn1")
    await observe(m, "ServerCreated", 5, server_id=7, server_type="cx22", location="fsn1")

    # A VM boots for minutes: WorkspaceReady's own deadline (120 s) does not run once a server is requested.
    m.tick(at(300))
    assert named(m) == []
    m.tick(at(606))
    assert named(m) == [("StepOverdue", {"expected": "VmAgentConnected", "after": "ServerCreated", "waited_s": 601.0})]


async def test_a_local_task_has_no_server_deadlines():
    m = monitor()
    await observe(m, "TaskSubmitted", 0)
    await observe(m, "WorkspaceRequested", 0)
    m.tick(at(1000))
    assert [d["expected"] for _, d in named(m)] == ["WorkspaceReady"]
