"""A task whose workspace was lost restarts its flow with a new attempt: the flow check and the
monitor judge the last attempt, and name no gap for an earlier one."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

from eventsourcing.persistence import Tracking

from events import DEADLINES, FLOW_CONTRACT, Envelope, check_flow, parse_deadlines
from services.monitor.handlers import Monitor
from tests.unit.fakes import envelopes_in, popo_store

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
TASK = "t1"
_seq = itertools.count(1)
LOST_MID_TURN = ["TaskSubmitted", "WorkspaceRequested", "WorkspaceReady", "AgentSessionStarted",
                 "PromptDelivered", "AgentOutput", "SessionFailed"]


def test_a_flow_that_completes_on_a_new_attempt_is_complete():
    report = check_flow([*LOST_MID_TURN, "AttemptStarted", *FLOW_CONTRACT[1:]])
    assert report.ok, report.describe()


def test_a_lost_attempt_before_its_prompt_is_no_gap_when_the_next_attempt_completes():
    lost_early = ["TaskSubmitted", "WorkspaceRequested", "WorkspaceReady", "SessionFailed"]
    assert check_flow([*lost_early, "AttemptStarted", *FLOW_CONTRACT[1:]]).ok


def test_the_last_attempt_is_judged_and_its_missing_handoff_named():
    last = [t for t in FLOW_CONTRACT[1:] if t != "PromptDelivered"]
    report = check_flow([*LOST_MID_TURN, "AttemptStarted", *last])
    assert report.first_gap == "PromptDelivered"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


async def observe(m: Monitor, event_type: str, seconds: float, **data) -> None:
    envelope = Envelope(type=event_type, task_id=TASK, actor="test", occurred_at=at(seconds), data=data)
    await m.on_event(envelope, Tracking(f"monitor-{event_type}", next(_seq)))


def named(m: Monitor) -> list[str]:
    return [f"{e.type} {e.data.get('expected', '')}".strip() for e in envelopes_in(m.store)]


async def lost_first_attempt(m: Monitor) -> None:
    for i, step in enumerate(("TaskSubmitted", "WorkspaceRequested", "WorkspaceReady",
                              "AgentSessionStarted", "PromptDelivered", "AgentOutput")):
        await observe(m, step, i, seq=1)
    await observe(m, "WorkspaceRequested", 10, attempt=2)


async def test_the_monitor_runs_the_new_attempts_deadlines_from_its_own_handoffs():
    m = Monitor(popo_store(), parse_deadlines("PromptDelivered=30", DEADLINES), stall_after_s=300)
    await lost_first_attempt(m)
    await observe(m, "WorkspaceReady", 11)

    m.tick(at(40))  # 29 s after the new attempt's WorkspaceReady: not yet
    assert named(m) == []
    m.tick(at(42))
    assert named(m) == ["StepOverdue PromptDelivered"]


async def test_an_earlier_attempts_event_folded_late_names_no_gap():
    m = Monitor(popo_store(), parse_deadlines("PromptDelivered=30", DEADLINES), stall_after_s=300)
    await lost_first_attempt(m)
    await observe(m, "WorkspaceReady", 11)
    # Attempt 1's output, relayed after its vm_agent died, reaches the monitor after attempt 2 began.
    await observe(m, "AgentOutput", 5, seq=2)
    await observe(m, "AgentSessionStarted", 12, session_id="s2", agent="shell", attempt_id="t1-a2")
    await observe(m, "PromptDelivered", 12.5, session_id="s2", prompt_sha256="x")
    for step, seconds in (("AgentOutput", 13), ("AgentFinished", 14), ("BranchPushed", 15)):
        await observe(m, step, seconds, seq=1)
    m.tick(at(16))
    assert named(m) == []
